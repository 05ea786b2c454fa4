// Embedding the l2c runtime in a C++ program: load a build, sample from several threads at once.
//
//   embed ENGINE_DIR NOISE.npy LABELS [THREADS]
//
// Each thread runs the same request; every result must equal a serial run bit for bit (each request has its own
// cache slots; the sessions are shared). Prints "concurrent == serial" and exits 0 when they do.
#include <cstring>
#include <iostream>
#include <sstream>
#include <thread>

#include <l2c/pipeline.hpp>

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " ENGINE_DIR NOISE.npy LABELS [THREADS]\n";
    return 2;
  }
  try {
    l2c::Pipeline pipe(argv[1]);
    const l2c::Tensor noise = l2c::read_npy(argv[2]);
    std::vector<int64_t> labels;
    std::stringstream list(argv[3]);
    for (std::string label; std::getline(list, label, ',');) labels.push_back(std::stoll(label));
    const int threads = argc > 4 ? std::stoi(argv[4]) : 4;

    const l2c::Tensor serial = pipe.sample(labels, noise);
    std::vector<l2c::Tensor> results(threads);
    std::vector<std::string> errors(threads);
    std::vector<std::thread> workers;
    for (int i = 0; i < threads; ++i)
      workers.emplace_back([&, i] {
        try {
          // Alternate full compute and the schedule so that different subsets run at the same time.
          l2c::SampleOptions options;
          options.full = i % 2 == 1;
          results[i] = pipe.sample(labels, noise, options);
        } catch (const std::exception& error) {
          errors[i] = error.what();
        }
      });
    for (auto& worker : workers) worker.join();
    l2c::SampleOptions full;
    full.full = true;
    const l2c::Tensor serial_full = pipe.sample(labels, noise, full);
    for (int i = 0; i < threads; ++i) {
      if (!errors[i].empty()) throw l2c::Error("thread " + std::to_string(i) + ": " + errors[i]);
      const l2c::Tensor& expected = i % 2 == 1 ? serial_full : serial;
      if (results[i].shape != expected.shape ||
          std::memcmp(results[i].data.data(), expected.data.data(), expected.size() * sizeof(float)) != 0) {
        std::cerr << "thread " << i << " differs from the serial run\n";
        return 1;
      }
    }
    std::cout << threads << " concurrent requests == serial (" << pipe.manifest().name << ", "
              << serial.shape_string() << ")\n";
  } catch (const std::exception& error) {
    std::cerr << "embed: error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
