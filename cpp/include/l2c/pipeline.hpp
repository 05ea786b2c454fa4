// l2c::Pipeline: samples from an L2C build exactly as the Python runtime (l2c_export/runtime/pipeline.py) does.
//
//   l2c::Pipeline pipe("engines/demo");                  // manifest checked, one ONNX Runtime session per subset
//   l2c::Tensor noise = l2c::read_npy("z.npy");          // (n, C, H, W) float32
//   l2c::Tensor samples = pipe.sample({3, 1, 4}, noise);  // guidance at the manifest's default scale
//
// Every subset session shares one memory-mapped copy of weights.bin, one global thread pool and one CPU arena; each
// `sample` call is one request with its own cache slots, so calls from several threads give the results of serial
// ones.
//
// Threads. On one Pipeline, `sample`, `manifest`, `sample_shape` and `providers` may be called from any number of
// threads at once (the sessions are only read, and ONNX Runtime's Run is thread-safe; each request's cache and
// buffers are its own). The destructor may run on any thread, but only after every call on that Pipeline has
// returned (join the threads first); the Manifest reference `manifest` returns lives as long as the Pipeline.
// Different Pipelines may be constructed, used and destroyed concurrently (ONNX Runtime is loaded once, under a
// lock). cpp/tests/concurrency.cpp holds this to account: 16 threads sample from one Pipeline, then another thread
// destroys it, under AddressSanitizer and UndefinedBehaviorSanitizer (`make cpp-asan`).
//
// Errors. Everything a build, a file or an argument can get wrong is an l2c::Error (one line naming the file or
// argument, the field and what was expected), thrown before anything is allocated for it or written; a missing
// ONNX Runtime library or execution provider is its subclass l2c::UnavailableError.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "l2c/error.hpp"
#include "l2c/manifest.hpp"
#include "l2c/tensor.hpp"

namespace l2c {

enum class Provider { Cpu, TensorRT };

constexpr int kMaxThreads = 1024;  // Options::threads beyond this is refused, not handed to ONNX Runtime

struct Options {
  // libonnxruntime.so to dlopen; empty: $L2C_ONNXRUNTIME_LIBRARY, else the library this runtime was built against
  // (the onnxruntime wheel's capi/libonnxruntime.so.*), else "libonnxruntime.so.1" from the loader's search path.
  std::string onnxruntime_library;
  int threads = 0;                  // ONNX Runtime's global intra-op pool; 0 = one per core, at most kMaxThreads
  bool verify_files = true;         // check every file's sha256 against the manifest
  std::optional<std::vector<int>> subsets;  // load only these subset engines (default: all)
  Provider provider = Provider::Cpu;
  std::string optimization = "extended";  // basic | extended | all (see l2c_export/runtime/backends/onnxruntime.py)
};

struct SampleOptions {
  std::optional<double> cfg_scale;  // default: the manifest's guidance.cfg_scale; > 1 guides (one 2n batch)
  // A build of two experts (Manifest::experts, Wan2.2's): the scale the second expert's calls combine the halves with
  // (the pipeline's guidance_scale_2); default cfg_scale. Whether to guide at all is cfg_scale's. Refused (l2c::Error)
  // on a build of one transformer.
  std::optional<double> cfg_scale_2;
  bool full = false;  // run the full-compute engine at every model call (its expert's) instead of the schedule
  // The noise DDPM adds after each step but the last, (steps - 1, n, C, H, W). The Python runtime draws it from
  // numpy's generator (`step_noise(seed, s, ...)`); a C++ program passes it in, so both sample the same thing.
  const Tensor* step_noise = nullptr;
};

// A request of a model conditioned on arrays (PixArt, SD3, FLUX.1): each by the pipeline's argument name, as the
// manifest's conditioning inputs name them (their `argument`, and their `negative` partner, which guidance with an
// unconditional half feeds that half from). Which arrays a model takes, and how each is shaped and checked, follows
// from its inputs' kinds (Manifest::conditioning): token embeddings (n, L, D) float, a token mask (n, L) of 0/1 over
// the same tokens, a pooled vector (n, P) float, a scalar (n,) float.
struct Prompts {
  std::map<std::string, std::string> npy;  // an .npz's members by name: .npy bytes, parsed by the kind they feed
  std::map<std::string, Tensor> arrays;    // arrays set directly (float32), by name
  std::string source = "conditioning";     // names the arrays' origin in errors, e.g. "--conditioning cond.npz"
  void set(const std::string& argument, Tensor array);
};

// Prompts from an .npz archive (numpy.savez or savez_compressed) of arrays by the pipeline's argument names; a file
// that is not such an archive: l2c::Error naming the file. Names, dtypes (floats; a mask also bool or int), shapes
// and values are checked by Pipeline::sample, against the manifest. `source` names the arrays in errors (default:
// the file's path).
Prompts read_prompts(const std::filesystem::path& npz, const std::string& source = "");

class Pipeline {
 public:
  explicit Pipeline(const std::filesystem::path& engine_dir, Options options = {});
  ~Pipeline();
  Pipeline(const Pipeline&) = delete;
  Pipeline& operator=(const Pipeline&) = delete;

  // labels: n class indices in [0, num_classes); noise: (n, C, H, W) float32, finite. Returns samples (n, C, H, W):
  // images in [-1, 1] for a pixel model, latents for a latent one. Thread-safe (see above). l2c::Error for a label
  // out of range, noise of another shape or not finite, a guidance scale below 1, a batch beyond the engines', and a
  // graph that fails on what its records say it takes.
  Tensor sample(const std::vector<int64_t>& labels, const Tensor& noise, const SampleOptions& options = {}) const;
  // The same for a model conditioned on arrays (not Manifest::takes_labels): one sample per prompt, noise (n, C, H,
  // W) (FLUX.1: packed (n, T, C)). A guidance-distilled model (guidance.rule guidance_embedding) runs no negative
  // batch; its input named by guidance.scale_argument is fed the scale. l2c::Error (naming prompts.source and the
  // array) for an array the model does not take, a missing one (the negative ones when guiding), another dtype, a
  // shape that does not fit its input's kind with the same n and L throughout, values that are not finite, a mask of
  // values other than 0 and 1 or masking a whole prompt, and for prompts given to a label model.
  Tensor sample(const Prompts& prompts, const Tensor& noise, const SampleOptions& options = {}) const;
  // How many prompts a request holds: the rows of its first conditioning array in the manifest's order (0: none
  // given). What sample() then checks every other array against; seeded noise is drawn for that many.
  int64_t count_prompts(const Prompts& prompts) const;

  const Manifest& manifest() const;
  std::vector<int64_t> sample_shape() const;  // (C, H, W) (packed: (T, C)) of one sample, from the sample record
  std::vector<std::string> providers() const;  // the execution providers the sessions were created with

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Loads ONNX Runtime (dlopen) and creates its process-wide environment (global thread pool, shared CPU arena) once;
// Pipeline does this itself. Exposed for programs that want the library loaded before they measure something.
void init_onnxruntime(const std::string& library = "", int threads = 0);

}  // namespace l2c
