// l2c-memory-probe ENGINE_DIR BATCH all|full: the resident-set growth (bytes) of loading the subset engines ("all",
// or the full-compute one alone) and sampling once with each, as l2c_export/tools/bench.py measures the Python runtime.
// ONNX Runtime is loaded before the baseline: its library is not the engines' cost.
#include <unistd.h>

#include <fstream>
#include <iostream>
#include <string>

#include "l2c/pipeline.hpp"

static long resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  long size = 0, resident = 0;
  statm >> size >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

int main(int argc, char** argv) {
  if (argc != 4 || (std::string(argv[3]) != "all" && std::string(argv[3]) != "full")) {
    std::cerr << "usage: " << argv[0] << " ENGINE_DIR BATCH all|full\n";
    return 2;
  }
  try {
    l2c::init_onnxruntime();
    const long before = resident_bytes();
    const bool all = std::string(argv[3]) == "all";
    l2c::Options options;
    options.verify_files = false;
    if (!all) options.subsets = std::vector<int>{l2c::Manifest::load(argv[1], false).full_subset};
    l2c::Pipeline pipe(argv[1], options);
    const int64_t batch = std::stoll(argv[2]);
    std::vector<int64_t> shape{batch};
    for (int64_t dim : pipe.sample_shape()) shape.push_back(dim);
    l2c::Tensor noise(shape, 0.5f);
    std::vector<int64_t> labels(batch, 0);
    l2c::Tensor step_noise;
    l2c::SampleOptions sample;
    if (int draws = pipe.manifest().sampler->num_step_noises(); draws > 0) {
      std::vector<int64_t> step_shape{draws};
      step_shape.insert(step_shape.end(), shape.begin(), shape.end());
      step_noise = l2c::Tensor(step_shape, 0.1f);
      sample.step_noise = &step_noise;
    }
    sample.full = true;
    pipe.sample(labels, noise, sample);  // the full subset first: it writes every slot the others read
    if (all) {
      sample.full = false;
      pipe.sample(labels, noise, sample);  // every subset of the schedule
    }
    std::cout << resident_bytes() - before << std::endl;
  } catch (const std::exception& error) {
    std::cerr << "l2c-memory-probe: error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
