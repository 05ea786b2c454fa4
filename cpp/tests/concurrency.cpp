// l2c-concurrency-test ENGINE_DIR NOISE.npy LABELS: what pipeline.hpp promises about threads, held to account.
//
// 16 threads sample from one l2c::Pipeline at once, released together: the schedule, full compute and the schedule
// unguided in turn, and every fourth thread a request the pipeline must refuse (a label past the class count). A
// 17th thread waits for them to finish and destroys the Pipeline; then a new Pipeline samples again. Every good result
// must equal the serial run of the same request bit for bit, every bad request must end in an l2c::Error (and nothing
// else), and the new Pipeline must sample what the destroyed one did. Built by CMake with the runtime (and with
// AddressSanitizer and UndefinedBehaviorSanitizer by `make cpp-asan`); run by tests/test_cpp.py.
//
// Prints one line and exits 0 when all of that holds; 1 (with the reason) when it does not.
#include <condition_variable>
#include <cstring>
#include <iostream>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>

#include <l2c/pipeline.hpp>

namespace {

constexpr int kThreads = 16;

// A request each thread makes: the schedule, full compute, the schedule unguided, or a label past the class count.
enum class Request { Schedule, Full, Unguided, BadLabel };

l2c::SampleOptions options_for(Request request) {
  l2c::SampleOptions options;
  options.full = request == Request::Full;
  if (request == Request::Unguided) options.cfg_scale = 1.0;
  return options;
}

bool same(const l2c::Tensor& a, const l2c::Tensor& b) {
  return a.shape == b.shape && a.size() == b.size() &&
         std::memcmp(a.data.data(), b.data.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " ENGINE_DIR NOISE.npy LABELS\n";
    return 2;
  }
  try {
    const l2c::Tensor noise = l2c::read_npy(argv[2]);
    std::vector<int64_t> labels;
    std::stringstream list(argv[3]);
    for (std::string label; std::getline(list, label, ',');) labels.push_back(std::stoll(label));

    auto pipe = std::make_unique<l2c::Pipeline>(argv[1]);
    std::vector<int64_t> bad_labels(labels);
    bad_labels.back() = pipe->manifest().num_classes;
    const Request kinds[] = {Request::Schedule, Request::Full, Request::Unguided};
    std::vector<l2c::Tensor> serial;
    for (Request kind : kinds) serial.push_back(pipe->sample(labels, noise, options_for(kind)));

    std::vector<l2c::Tensor> results(kThreads);
    std::vector<std::string> failures(kThreads);  // what went wrong in thread i, empty when it did what it should
    std::mutex mutex;
    std::condition_variable released;
    bool go = false;
    std::vector<std::thread> workers;
    for (int i = 0; i < kThreads; ++i)
      workers.emplace_back([&, i] {
        const Request request = i % 4 == 3 ? Request::BadLabel : kinds[i % 4];
        {
          std::unique_lock<std::mutex> lock(mutex);
          released.wait(lock, [&] { return go; });
        }
        try {
          if (request == Request::BadLabel) {
            pipe->sample(bad_labels, noise);
            failures[i] = "a label past the class count was not refused";
          } else {
            results[i] = pipe->sample(labels, noise, options_for(request));
          }
        } catch (const l2c::Error& error) {
          if (request != Request::BadLabel) failures[i] = std::string("l2c::Error: ") + error.what();
        } catch (const std::exception& error) {
          failures[i] = std::string("not an l2c::Error: ") + error.what();
        }
      });
    // The destroyer: waits for every worker, then destroys the Pipeline on its own thread (neither the thread that
    // made it nor one that sampled from it).
    std::thread destroyer([&] {
      for (auto& worker : workers) worker.join();
      pipe.reset();
    });
    {
      std::lock_guard<std::mutex> lock(mutex);
      go = true;
    }
    released.notify_all();
    destroyer.join();
    if (pipe) throw l2c::Error("the Pipeline was not destroyed");

    int refused = 0;
    for (int i = 0; i < kThreads; ++i) {
      if (!failures[i].empty()) {
        std::cerr << "thread " << i << ": " << failures[i] << "\n";
        return 1;
      }
      if (i % 4 == 3) {
        ++refused;
      } else if (!same(results[i], serial[i % 4])) {
        std::cerr << "thread " << i << " differs from the serial run of the same request\n";
        return 1;
      }
    }
    // ONNX Runtime's process-wide state outlives a Pipeline: a new one samples what the destroyed one did.
    l2c::Pipeline again(argv[1]);
    if (!same(again.sample(labels, noise), serial[0])) {
      std::cerr << "a Pipeline made after the first was destroyed samples something else\n";
      return 1;
    }
    std::cout << kThreads << " threads on one Pipeline: " << kThreads - refused << " samples == serial, " << refused
              << " bad requests refused with l2c::Error; destroyed on another thread; a new Pipeline samples the "
              << "same\n";
  } catch (const std::exception& error) {
    std::cerr << "l2c-concurrency-test: error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
