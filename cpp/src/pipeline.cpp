// The ONNX Runtime side of l2c::Pipeline, as l2c_export/runtime/backends/onnxruntime.py:
// - ONNX Runtime is dlopen'ed (ORT_API_MANUAL_INIT): the onnxruntime wheels ship the library but no headers or
//   unversioned link, and a dlopen'ed library finds its provider libraries beside it.
// - Weights: weights.bin memory-mapped once; each tensor wrapped as an OrtValue and given to every session with
//   AddInitializer, with session.disable_prepacking (prepacking would keep a packed copy per session).
// - One global intra-op thread pool and one process-wide CPU arena for all sessions; telemetry off.
// - A request's cache slots are its own buffers bound with IO binding, inputs and outputs alike: a fresh branch
//   output is written straight into the slot the next subset reads.
#include "onnxruntime_env.hpp"

#include "l2c/pipeline.hpp"

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>

namespace l2c {

namespace fs = std::filesystem;

namespace {

struct OnnxRuntime {
  std::string library;
  int threads = 0;
  std::unique_ptr<Ort::Env> env;
};

std::mutex runtime_mutex;
OnnxRuntime* runtime_instance = nullptr;  // process-wide, never unloaded (sessions may outlive a Pipeline's caller)

std::string default_library() {
  if (const char* from_env = std::getenv("L2C_ONNXRUNTIME_LIBRARY"); from_env && *from_env) return from_env;
#ifdef L2C_DEFAULT_ONNXRUNTIME_LIBRARY
  if (fs::exists(L2C_DEFAULT_ONNXRUNTIME_LIBRARY)) return L2C_DEFAULT_ONNXRUNTIME_LIBRARY;
#endif
  return "libonnxruntime.so.1";
}

OnnxRuntime& onnxruntime(const std::string& library, int threads) {
  std::lock_guard<std::mutex> lock(runtime_mutex);
  if (runtime_instance != nullptr) {
    if (threads != runtime_instance->threads)
      throw Error("ONNX Runtime's global thread pool already has " +
                  (runtime_instance->threads ? std::to_string(runtime_instance->threads) : "one per core") +
                  " threads in this process; cannot change it to " + std::to_string(threads));
    return *runtime_instance;
  }
  const std::string path = library.empty() ? default_library() : library;
  // ONNX Runtime's telemetry off, as in the Triton server's environment and the Python package: ONNX Runtime reads
  // ORT_DISABLE_TELEMETRY when it starts (DisableTelemetryEvents afterwards does not keep it from making its database
  // under ~/.cache/Microsoft). Once, before the library is loaded; an explicit ORT_DISABLE_TELEMETRY=0 is kept.
  setenv("ORT_DISABLE_TELEMETRY", "1", /*overwrite=*/0);
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr)
    throw UnavailableError("cannot load ONNX Runtime from " + path + " (" + dlerror() +
                           "); point L2C_ONNXRUNTIME_LIBRARY at libonnxruntime.so from the onnxruntime wheel");
  using GetApiBase = const OrtApiBase* (*)();
  auto get_api_base = reinterpret_cast<GetApiBase>(dlsym(handle, "OrtGetApiBase"));
  if (get_api_base == nullptr) throw UnavailableError(path + ": has no OrtGetApiBase; not an ONNX Runtime library");
  const OrtApi* api = get_api_base()->GetApi(ORT_API_VERSION);
  if (api == nullptr)
    throw UnavailableError(path + ": ONNX Runtime " + get_api_base()->GetVersionString() +
                           " does not offer C API version " + std::to_string(ORT_API_VERSION) + "; use ONNX Runtime 1." +
                           std::to_string(ORT_API_VERSION) + " or newer");
  Ort::InitApi(api);
  auto* instance = new OnnxRuntime{path, threads, nullptr};
  Ort::ThreadingOptions threading;
  threading.SetGlobalIntraOpNumThreads(threads);
  threading.SetGlobalInterOpNumThreads(1);
  // ONNX Runtime's own log stays quiet: every error it reports reaches the caller as an exception, and from there
  // as one line (its log would print the same error again, on lines of its own).
  instance->env = std::make_unique<Ort::Env>(threading, ORT_LOGGING_LEVEL_FATAL, "l2c");
  instance->env->DisableTelemetryEvents();
  Ort::MemoryInfo arena_memory("Cpu", OrtArenaAllocator, 0, OrtMemTypeDefault);
  Ort::ArenaCfg arena(0, -1, -1, -1);
  instance->env->CreateAndRegisterAllocator(arena_memory, arena);
  runtime_instance = instance;
  return *instance;
}

ONNXTensorElementDataType element_type(const std::string& dtype) {
  if (dtype == "float32") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (dtype == "float16") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  if (dtype == "bfloat16") return ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
  if (dtype == "int64") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  throw Error("unknown dtype " + dtype);
}

size_t element_size(const std::string& dtype) { return dtype == "float32" ? 4 : dtype == "int64" ? 8 : 2; }

// The session's inputs and outputs must be the manifest's records of that subset: names, order, element types and
// shapes (a record's "batch" is a dimension the graph leaves open; a size the graph leaves open matches any record).
// A graph swapped for another subset's (its sha256 updated to match) fails here: distinct subsets reuse distinct
// sub-layers, so their cache inputs differ.
// The fields the graph's build fixed (its kGraphStampKey record: model/config, guidance/null_class) must be the
// manifest's, so a field edited after the build is refused whether or not this runtime reads it.
void check_stamp(Ort::Session& session, const Manifest& manifest, const fs::path& file,
                        const std::string& manifest_path) {
  Ort::AllocatorWithDefaultOptions allocator;
  Ort::AllocatedStringPtr stamp = session.GetModelMetadata().LookupCustomMetadataMapAllocated(kGraphStampKey, allocator);
  if (!stamp)
    throw Error(manifest_path + ": the graph " + file.filename().string() + " has no '" + kGraphStampKey +
                "' record of what it was built for (a build of an older l2c-export); rebuild it");
  const std::string difference = stamp_difference(manifest.document, stamp.get());
  if (!difference.empty()) throw Error(manifest_path + ": " + difference + " (graph " + file.filename().string() + ")");
}

void check_interface(const Ort::Session& session, const SubsetRecord& record, const fs::path& file,
                     const std::string& manifest_path) {
  Ort::AllocatorWithDefaultOptions allocator;
  for (bool outputs : {false, true}) {
    const std::vector<TensorRecord>& expected = outputs ? record.outputs : record.inputs;
    const std::string field = "subsets/" + std::to_string(record.index) + (outputs ? "/outputs" : "/inputs");
    const size_t count = outputs ? session.GetOutputCount() : session.GetInputCount();
    std::string got, want;
    bool same = count == expected.size();
    for (size_t i = 0; i < count; ++i) {
      auto name = outputs ? session.GetOutputNameAllocated(i, allocator) : session.GetInputNameAllocated(i, allocator);
      auto type = (outputs ? session.GetOutputTypeInfo(i) : session.GetInputTypeInfo(i))
                      .GetTensorTypeAndShapeInfo().GetElementType();
      got += std::string(i ? ", " : "") + name.get();
      same = same && i < expected.size() && expected[i].name == name.get() && element_type(expected[i].dtype) == type;
    }
    for (size_t i = 0; i < expected.size(); ++i) want += (i ? ", " : "") + expected[i].name + " " + expected[i].dtype;
    if (!same)
      throw Error(file.string() + ": the graph's " + (outputs ? "outputs (" : "inputs (") + got +
                  ") are not the manifest's (field '" + field + "' of subset " + record.name + ": " + want + ")");
    for (size_t i = 0; i < count; ++i) {
      const std::vector<int64_t> shape = (outputs ? session.GetOutputTypeInfo(i) : session.GetInputTypeInfo(i))
                                             .GetTensorTypeAndShapeInfo().GetShape();
      const std::vector<int64_t>& recorded = expected[i].shape;
      bool fits = shape.size() == recorded.size();
      for (size_t d = 0; fits && d < shape.size(); ++d)
        fits = recorded[d] < 0 ? shape[d] < 0 : shape[d] < 0 || shape[d] == recorded[d];  // batch, prompt_tokens
      if (!fits) {
        std::string graph_shape = "(";
        for (size_t d = 0; d < shape.size(); ++d)
          graph_shape += (d ? ", " : "") + (shape[d] < 0 ? std::string("?") : std::to_string(shape[d]));
        throw Error(manifest_path + ": field '" + field + "/" + std::to_string(i) + "/shape' (" + expected[i].name +
                    " of subset " + record.name + ") is " + record_shape_string(recorded) + "; the graph " +
                    file.filename().string() + " has " + graph_shape + ")");
      }
    }
  }
}

// weights.bin, mapped read-only once for the whole process lifetime of the pipeline.
class MappedFile {
 public:
  explicit MappedFile(const fs::path& path) {
    int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) throw Error(path.string() + ": cannot be opened");
    struct stat info {};
    ::fstat(fd, &info);
    size_ = static_cast<size_t>(info.st_size);
    data_ = size_ ? ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0) : nullptr;
    ::close(fd);
    if (data_ == MAP_FAILED) throw Error(path.string() + ": cannot be memory-mapped");
  }
  ~MappedFile() {
    if (data_ && data_ != MAP_FAILED) ::munmap(data_, size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  char* data() const { return static_cast<char*>(data_); }
  size_t size() const { return size_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

// One request's cache: a buffer per slot, allocated at its first write and bound in place from then on. A slot whose
// shape names joint_tokens (image + prompt tokens) is allocated by ONNX Runtime at its first write, at the size the
// graph computes, and bound in place from then on too.
struct RequestCache {
  struct Slot {
    std::vector<char> bytes;
    Ort::Value value{nullptr};
  };
  std::map<std::string, Slot> slots;
};

// The model batch's conditioning inputs, by graph input name: class labels (with the null class for the
// unconditional half) as int64, every other input as float32 (2n rows when guiding: the conditional half first);
// and the size of the token axis ("prompt_tokens") of this request, 0 without one.
struct Condition {
  std::vector<int64_t> labels;
  std::map<std::string, Tensor> inputs;
  int64_t prompt_tokens = 0;
};

// The guidance scale; and a build of experts' second scale (SampleOptions::cfg_scale_2, checked here, refused on a build
// of one transformer).
double checked_scale(const SampleOptions& options, const Manifest& m) {
  const double cfg_scale = options.cfg_scale.value_or(m.guidance.cfg_scale);
  if (!std::isfinite(cfg_scale) || cfg_scale < 1.0)
    throw Error("cfg_scale is " + std::to_string(cfg_scale) + "; expected a finite number at least 1 "
                "(uncond + s * (cond - uncond); 1 means no guidance)");
  if (options.cfg_scale_2 && !m.experts)
    throw Error("cfg_scale_2: the build " + m.folder.string() + " has one transformer (its manifest has no " +
                "'experts'), guided by cfg_scale alone; leave cfg_scale_2 out");
  if (options.cfg_scale_2 && (!std::isfinite(*options.cfg_scale_2) || *options.cfg_scale_2 < 1.0))
    throw Error("cfg_scale_2 is " + std::to_string(*options.cfg_scale_2) + "; expected a finite number at least 1 "
                "(the second expert's uncond + s * (cond - uncond))");
  return cfg_scale;
}

// The conditioning inputs a request feeds by argument name (all but a label and those fed the guidance scale), in
// graph order, as l2c_export/core/interface.py's request_records.
std::vector<const TensorRecord*> request_inputs(const Manifest& m) {
  std::vector<const TensorRecord*> records;
  for (const TensorRecord& tensor : m.conditioning)
    if (tensor.kind != "label" && tensor.argument != m.guidance.scale_argument) records.push_back(&tensor);
  return records;
}

// Their arguments, then (with `negatives`) their negative partners: the arrays a request may carry.
std::vector<std::string> argument_names(const Manifest& m, bool negatives) {
  std::vector<std::string> names;
  for (const TensorRecord* record : request_inputs(m)) names.push_back(record->argument);
  if (negatives)
    for (const TensorRecord* record : request_inputs(m))
      if (!record->negative.empty()) names.push_back(record->negative);
  return names;
}

std::string joined(const std::vector<std::string>& names) {
  std::string text;
  for (const auto& name : names) text += (text.empty() ? "" : ", ") + name;
  return text;
}

// An array (set directly, or an .npz member's .npy bytes parsed as the kind of input it feeds: floats for embeddings,
// pooled vectors and scalars; a mask may be bool, int or float), as float32.
Tensor parse_array(const Prompts& prompts, const std::string& name, const std::string& kind) {
  const auto given = prompts.arrays.find(name);
  if (given != prompts.arrays.end()) return given->second;
  const std::string where = prompts.source + ": array '" + name + "'";
  const std::string& bytes = prompts.npy.at(name);
  if (kind == "token_mask")
    return parse_npy(bytes, where, {"<f4", "<f8", "<i8", "<i4", "|b1"}, "a 0/1 mask (bool, int or float)");
  return parse_npy(bytes, where, {"<f4", "<f8"}, kind == "scalar" ? "float32 values" : "float32 embeddings");
}

size_t count_not_finite(const Tensor& tensor) {
  return static_cast<size_t>(
      std::count_if(tensor.data.begin(), tensor.data.end(), [](float v) { return !std::isfinite(v); }));
}

// token_embeddings: (n, L, width) with n, L >= 1 (and `like`'s shape when given: the conditional half's, whose
// argument is `positive`), every value finite.
void check_embeddings(const Tensor& embeds, const std::string& array, int64_t width, const Tensor* like,
                      const std::string& positive, const std::string& source, bool any_length = false) {
  const std::string where = source + ": array '" + array + "'";
  if (embeds.shape.size() != 3 || embeds.shape[0] < 1 || embeds.shape[1] < 1 || embeds.shape[2] != width)
    throw Error(where + " has shape " + embeds.shape_string() + "; expected (n, L, " + std::to_string(width) + ")");
  if (const size_t bad = count_not_finite(embeds))
    throw Error(where + ": " + std::to_string(bad) + " of its " + std::to_string(embeds.size()) +
                " values are NaN or infinite; expected finite embeddings");
  if (like != nullptr && any_length && embeds.shape[0] != like->shape[0])
    throw Error(where + " has shape " + embeds.shape_string() + "; expected (" + std::to_string(like->shape[0]) +
                ", L, " + std::to_string(width) + "), as many prompts as '" + positive + "' (any length L: the " +
                "shorter is padded under its mask)");
  if (like != nullptr && !any_length && embeds.shape != like->shape)
    throw Error(where + " has shape " + embeds.shape_string() + "; expected " + like->shape_string() + ", that of '" +
                positive + "' (both halves run as one batch)");
}

// pooled: (n, width), every value finite.
void check_pooled(const Tensor& pooled, const std::string& array, int64_t n, int64_t width, const std::string& source) {
  const std::string where = source + ": array '" + array + "'";
  if (pooled.shape != std::vector<int64_t>{n, width})
    throw Error(where + " has shape " + pooled.shape_string() + "; expected " + shape_string({n, width}) +
                " (one pooled embedding per prompt)");
  if (const size_t bad = count_not_finite(pooled))
    throw Error(where + ": " + std::to_string(bad) + " of its " + std::to_string(pooled.size()) +
                " values are NaN or infinite; expected finite embeddings");
}

// scalar: (n,), every value finite.
void check_scalars(const Tensor& values, const std::string& array, int64_t n, const std::string& source) {
  if (values.shape != std::vector<int64_t>{n} || count_not_finite(values))
    throw Error(source + ": array '" + array + "' has shape " + values.shape_string() + "; expected (" +
                std::to_string(n) + ",) finite numbers (one per prompt)");
}

// token_mask: (n, L) of the embeddings, values 0 and 1, at least one 1 per prompt.
void check_mask(const Tensor& mask, const std::string& array, int64_t n, int64_t tokens, const std::string& source) {
  const std::string where = source + ": array '" + array + "'";
  const std::vector<int64_t> shape{n, tokens};
  if (mask.shape != shape)
    throw Error(where + " has shape " + mask.shape_string() + "; expected " + shape_string(shape) +
                " (n, L of the embeddings)");
  for (int64_t row = 0; row < shape[0]; ++row) {
    bool kept = false;
    for (int64_t i = 0; i < shape[1]; ++i) {
      const float value = mask.data[row * shape[1] + i];
      if (value != 0.0f && value != 1.0f)
        throw Error(where + " holds values other than 0 and 1; expected a 0/1 mask");
      kept = kept || value == 1.0f;
    }
    if (!kept) throw Error(where + " masks every token of a prompt; expected at least one 1 per row");
  }
}

// (n, L, ...) -> (n, tokens, ...): zeros after each row's L tokens (a token input's shorter half, under mask 0).
Tensor padded_tokens(const Tensor& array, int64_t tokens) {
  if (array.shape.size() < 2 || array.shape[1] == tokens) return array;
  const int64_t n = array.shape[0], length = array.shape[1];
  const int64_t inner = length ? static_cast<int64_t>(array.size()) / (n * length) : 0;
  std::vector<int64_t> shape = array.shape;
  shape[1] = tokens;
  Tensor padded(shape);
  for (int64_t row = 0; row < n; ++row)
    std::copy(array.data.begin() + row * length * inner, array.data.begin() + (row + 1) * length * inner,
              padded.data.begin() + row * tokens * inner);
  return padded;
}

Tensor concatenated(const Tensor& first, const Tensor& second) {
  Tensor both = first;
  both.shape[0] += second.shape[0];
  both.data.insert(both.data.end(), second.data.begin(), second.data.end());
  return both;
}

}  // namespace

void Prompts::set(const std::string& argument, Tensor array) { arrays[argument] = std::move(array); }

Prompts read_prompts(const fs::path& npz, const std::string& source) {
  Prompts prompts;
  prompts.source = source.empty() ? npz.string() : source;
  prompts.npy = read_npz(npz);
  return prompts;
}

void init_onnxruntime(const std::string& library, int threads) { onnxruntime(library, threads); }

Ort::Env& detail::onnxruntime_env(const std::string& library, int threads) {
  return *onnxruntime(library, threads).env;
}

struct Pipeline::Impl {
  Manifest manifest;
  Options options;
  OnnxRuntime* ort = nullptr;
  std::unique_ptr<MappedFile> weights;
  std::vector<Ort::Value> weight_values;  // views into `weights`, shared by every session
  std::map<int, Ort::Session> sessions;
  Ort::MemoryInfo cpu{nullptr};
  std::vector<int64_t> sample_shape, out_shape;  // (C, H, W) and (C_out, H, W)
  std::vector<std::string> providers;

  void append_tensorrt(Ort::SessionOptions& session_options) const;
  const Tensor& run(int subset, const Tensor& x, const std::vector<float>& t, const Condition& condition,
                    RequestCache& cache, Tensor& model_out) const;
  // The sampling loop for n samples whose model-batch conditioning is `condition` (2n rows when `guiding`, the
  // classifier-free batch); the guidance input, where the model has one, is fed cfg_scale here.
  Tensor sample(int64_t n, Condition condition, bool guiding, double cfg_scale, const Tensor& noise,
                const SampleOptions& options, const std::string& what) const;
};

Pipeline::Pipeline(const fs::path& engine_dir, Options options) {
  // The build is checked before ONNX Runtime is touched: Impl's ONNX Runtime members need the loaded library even
  // to be destroyed.
  Manifest manifest = Manifest::load(engine_dir, options.verify_files);
  const std::string where = manifest.path.string();
  if (manifest.precision == "bf16" && options.provider == Provider::Cpu)
    throw Error(where + ": field 'precision' is bf16; ONNX Runtime's CPU provider has no bfloat16 kernels for these "
                        "graphs (build with --precision fp32 or fp16, or run with the TensorRT provider)");
  static const std::map<std::string, GraphOptimizationLevel> levels{
      {"basic", ORT_ENABLE_BASIC}, {"extended", ORT_ENABLE_EXTENDED}, {"all", ORT_ENABLE_ALL}};
  if (!levels.count(options.optimization))
    throw Error("optimization level " + options.optimization + ": expected basic, extended or all");
  if (options.threads < 0 || options.threads > kMaxThreads)
    throw Error("threads is " + std::to_string(options.threads) + "; expected 0 (one per core) to " +
                std::to_string(kMaxThreads));
  OnnxRuntime& ort = onnxruntime(options.onnxruntime_library, options.threads);

  impl_ = std::make_unique<Impl>();
  Impl& p = *impl_;
  p.manifest = std::move(manifest);
  p.options = std::move(options);
  p.ort = &ort;
  const Manifest& m = p.manifest;
  p.cpu = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);

  // Shapes come from the records (Manifest::load checked them): x is (batch, C, H, W), model_out (batch, C_out, H, W).
  const SubsetRecord& full = m.subset(m.full_subset);
  const TensorRecord& x = Manifest::model_tensor(full, "sample");
  const TensorRecord& out = Manifest::model_tensor(full, "output");
  p.sample_shape.assign(x.shape.begin() + 1, x.shape.end());
  p.out_shape.assign(out.shape.begin() + 1, out.shape.end());

  p.weights = std::make_unique<MappedFile>(m.file_path(m.weights));
  if (p.weights->size() != m.weights.bytes)
    throw Error(m.file_path(m.weights).string() + ": " + std::to_string(p.weights->size()) +
                " bytes; the manifest says " + std::to_string(m.weights.bytes));
  for (const WeightTensor& w : m.weight_tensors)
    p.weight_values.push_back(Ort::Value::CreateTensor(p.cpu, p.weights->data() + w.offset, w.length,
                                                       w.shape.data(), w.shape.size(), element_type(w.dtype)));

  std::vector<int> selected;
  if (p.options.subsets) {
    selected = *p.options.subsets;
  } else {
    for (const auto& subset : m.subsets) selected.push_back(subset.index);
  }
  for (int index : selected) {
    const SubsetRecord& record = m.subset(index);
    Ort::SessionOptions session_options;
    session_options.SetGraphOptimizationLevel(levels.at(p.options.optimization));
    session_options.DisablePerSessionThreads();
    session_options.AddConfigEntry("session.use_env_allocators", "1");
    session_options.AddConfigEntry("session.disable_prepacking", "1");
    // Every weight of weights.bin is offered; ONNX Runtime takes those the graph names and ignores the rest.
    for (size_t i = 0; i < m.weight_tensors.size(); ++i)
      session_options.AddInitializer(m.weight_tensors[i].name.c_str(), p.weight_values[i]);
    if (p.options.provider == Provider::TensorRT) p.append_tensorrt(session_options);
    // ONNX Runtime runs ONNX: an onnxruntime build's engine is its graph; a TensorRT build's plans are for TensorRT
    // itself, so its graphs are opened (ONNX Runtime's TensorRT provider builds and caches its own engines).
    const fs::path file = m.file_path(m.backend == "onnxruntime" ? record.engine : record.graph);
    try {
      Ort::Session session(*p.ort->env, file.c_str(), session_options);
      check_stamp(session, m, file, where);
      check_interface(session, record, file, where);
      p.sessions.emplace(index, std::move(session));
    } catch (const Ort::Exception& error) {
      throw Error(file.string() + ": ONNX Runtime cannot load it: " + error.what());
    }
  }
  p.providers = p.options.provider == Provider::TensorRT
                    ? std::vector<std::string>{"TensorrtExecutionProvider", "CUDAExecutionProvider",
                                               "CPUExecutionProvider"}
                    : std::vector<std::string>{"CPUExecutionProvider"};
}

Pipeline::~Pipeline() = default;

const Manifest& Pipeline::manifest() const { return impl_->manifest; }
std::vector<int64_t> Pipeline::sample_shape() const { return impl_->sample_shape; }
std::vector<std::string> Pipeline::providers() const { return impl_->providers; }

void Pipeline::Impl::append_tensorrt(Ort::SessionOptions& session_options) const {
  // ONNX Runtime's TensorRT execution provider (documented C API: CreateTensorRTProviderOptions,
  // UpdateTensorRTProviderOptions, SessionOptionsAppendExecutionProvider_TensorRT_V2), the CUDA provider behind it
  // for anything TensorRT does not take. Engines are cached beside the build, keyed by ONNX Runtime.
  const std::string cache = (manifest.folder / "ort-tensorrt-cache").string();
  const std::string fp16 = manifest.precision == "fp16" ? "1" : "0";
  const char* keys[] = {"device_id", "trt_fp16_enable", "trt_engine_cache_enable", "trt_engine_cache_path",
                        "trt_timing_cache_enable", "trt_timing_cache_path"};
  const char* values[] = {"0", fp16.c_str(), "1", cache.c_str(), "1", cache.c_str()};
  const OrtApi& api = Ort::GetApi();
  OrtTensorRTProviderOptionsV2* tensorrt = nullptr;
  OrtCUDAProviderOptionsV2* cuda = nullptr;
  try {
    Ort::ThrowOnError(api.CreateTensorRTProviderOptions(&tensorrt));
    Ort::ThrowOnError(api.UpdateTensorRTProviderOptions(tensorrt, keys, values, 6));
    session_options.AppendExecutionProvider_TensorRT_V2(*tensorrt);
    Ort::ThrowOnError(api.CreateCUDAProviderOptions(&cuda));
    session_options.AppendExecutionProvider_CUDA_V2(*cuda);
  } catch (const Ort::Exception& error) {
    if (tensorrt) api.ReleaseTensorRTProviderOptions(tensorrt);
    if (cuda) api.ReleaseCUDAProviderOptions(cuda);
    std::string what = error.what();
    for (char& c : what)
      if (c == '\n') c = ' ';
    throw UnavailableError("TensorRT is not usable by ONNX Runtime (" + ort->library + ") on this machine: " + what +
                           ". The TensorRT provider needs an NVIDIA GPU with the CUDA and TensorRT libraries that this "
                           "ONNX Runtime was built for on the loader path; run with the CPU provider (the default) "
                           "instead");
  }
  api.ReleaseTensorRTProviderOptions(tensorrt);
  api.ReleaseCUDAProviderOptions(cuda);
}

const Tensor& Pipeline::Impl::run(int subset, const Tensor& x, const std::vector<float>& t,
                                  const Condition& condition, RequestCache& cache, Tensor& model_out) const {
  const SubsetRecord& record = manifest.subset(subset);
  Ort::Session& session = const_cast<Ort::Session&>(sessions.at(subset));  // Run is thread-safe
  const int64_t batch = x.shape[0];
  Ort::IoBinding binding(session);
  auto x_value = Ort::Value::CreateTensor<float>(cpu, const_cast<float*>(x.data.data()), x.size(), x.shape.data(),
                                                 x.shape.size());
  auto t_value = Ort::Value::CreateTensor<float>(cpu, const_cast<float*>(t.data()), t.size(), &batch, 1);
  auto wrap = [&](const Tensor& tensor) {
    return Ort::Value::CreateTensor<float>(cpu, const_cast<float*>(tensor.data.data()), tensor.size(),
                                           tensor.shape.data(), tensor.shape.size());
  };
  std::map<std::string, Ort::Value> values;  // the conditioning inputs by graph input name
  if (manifest.takes_labels) {
    values.emplace(manifest.conditioning.front().name,
                   Ort::Value::CreateTensor<int64_t>(cpu, const_cast<int64_t*>(condition.labels.data()),
                                                     condition.labels.size(), &batch, 1));
  } else {
    for (const auto& [name, tensor] : condition.inputs) values.emplace(name, wrap(tensor));
  }
  for (const TensorRecord& input : record.inputs) {
    if (input.role == "cache") {
      auto found = cache.slots.find(input.slot);
      if (found == cache.slots.end())
        throw Error("subset " + record.name + " reads cache slot " + input.slot + " before any step wrote it");
      binding.BindInput(input.name.c_str(), found->second.value);
      continue;
    }
    if (input.role == "sample" || input.role == "time") {
      binding.BindInput(input.name.c_str(), input.role == "sample" ? x_value : t_value);
      continue;
    }
    const auto value = values.find(input.name);
    if (value == values.end())
      throw Error(manifest.path.string() + ": subset " + record.name + " has an input " + input.name + " (role " +
                  input.role + ") that the request does not feed");
    binding.BindInput(input.name.c_str(), value->second);
  }
  std::vector<int64_t> out_dims{batch};
  out_dims.insert(out_dims.end(), out_shape.begin(), out_shape.end());
  model_out = Tensor(out_dims);
  auto out_value = Ort::Value::CreateTensor<float>(cpu, model_out.data.data(), model_out.size(),
                                                   model_out.shape.data(), model_out.shape.size());
  // The slots ONNX Runtime sizes at their first write (joint_tokens), by their place among the bound outputs.
  std::vector<std::pair<size_t, const TensorRecord*>> sized_by_graph;
  const int64_t prompt_tokens = condition.prompt_tokens;
  for (size_t k = 0; k < record.outputs.size(); ++k) {
    const TensorRecord& output = record.outputs[k];
    if (output.role == "output") {
      binding.BindOutput(output.name.c_str(), out_value);
      continue;
    }
    const CacheSlot& slot = manifest.slot(output.slot);
    RequestCache::Slot& buffer = cache.slots[output.slot];
    std::vector<int64_t> shape = slot.shape;
    shape[0] = batch;
    for (int64_t& size : shape)
      if (size == kPromptTokens) size = prompt_tokens;
    if (std::find(shape.begin(), shape.end(), kJointTokens) != shape.end()) {
      if (buffer.value) {  // sized by an earlier write of this request (its batch and prompt do not change)
        binding.BindOutput(output.name.c_str(), buffer.value);
      } else {
        binding.BindOutput(output.name.c_str(), cpu);
        sized_by_graph.emplace_back(k, &output);
      }
      continue;
    }
    const size_t bytes = Tensor::count(shape) * element_size(slot.dtype);
    if (buffer.bytes.size() != bytes) {
      buffer.bytes.assign(bytes, 0);
      buffer.value = Ort::Value::CreateTensor(cpu, buffer.bytes.data(), bytes, shape.data(), shape.size(),
                                              element_type(slot.dtype));
    }
    binding.BindOutput(output.name.c_str(), buffer.value);
  }
  try {
    session.Run(Ort::RunOptions{nullptr}, binding);
  } catch (const Ort::Exception& error) {
    // A graph that does not run on what its records say it takes (a hostile build whose hashes were fixed up).
    std::string what = error.what();
    for (char& c : what)
      if (c == '\n' || c == '\r') c = ' ';
    throw Error(manifest.file_path(manifest.backend == "onnxruntime" ? record.engine : record.graph).string() +
                ": ONNX Runtime failed to run subset " + record.name + " on a batch of " + std::to_string(batch) +
                ": " + what);
  }
  if (!sized_by_graph.empty()) {
    std::vector<Ort::Value> values = binding.GetOutputValues();
    for (auto& [k, output] : sized_by_graph) {
      // The size the graph gave must be the record's wherever the record fixes it (batch, prompt_tokens, sizes).
      const std::vector<int64_t> got = values[k].GetTensorTypeAndShapeInfo().GetShape();
      const std::vector<int64_t>& recorded = manifest.slot(output->slot).shape;
      bool fits = got.size() == recorded.size();
      for (size_t d = 0; fits && d < got.size(); ++d)
        fits = recorded[d] == kBatch         ? got[d] == batch
               : recorded[d] == kPromptTokens ? got[d] == prompt_tokens
               : recorded[d] == kJointTokens  ? got[d] > prompt_tokens
                                              : got[d] == recorded[d];
      if (!fits)
        throw Error(manifest.path.string() + ": cache slot " + output->slot + " is " +
                    record_shape_string(recorded) + "; subset " + record.name + " wrote " + shape_string(got) +
                    " for a batch of " + std::to_string(batch) + " with " + std::to_string(prompt_tokens) +
                    " prompt tokens");
      cache.slots[output->slot].value = std::move(values[k]);
    }
  }
  return model_out;
}

Tensor Pipeline::sample(const std::vector<int64_t>& labels, const Tensor& noise, const SampleOptions& options) const {
  const Manifest& m = impl_->manifest;
  if (!m.takes_labels)
    throw Error("--labels: this model is conditioned on prompt embeddings (--conditioning), not class labels");
  if (labels.empty()) throw Error("no labels given; expected at least one class label");
  std::vector<int64_t> bad;
  for (int64_t label : labels)
    if (label < 0 || label >= m.num_classes) bad.push_back(label);
  if (!bad.empty())
    throw Error("labels " + shape_string(bad) + " are out of range; expected class indices in 0.." +
                std::to_string(m.num_classes - 1));
  const double cfg_scale = checked_scale(options, m);
  const bool guiding = m.guidance.classifier_free && cfg_scale > 1.0;
  // The model batch: n conditional samples, then (guiding) the same x with the null class.
  Condition condition;
  condition.labels = labels;
  if (guiding) condition.labels.insert(condition.labels.end(), labels.size(), m.guidance.null_class);
  return impl_->sample(static_cast<int64_t>(labels.size()), std::move(condition), guiding, cfg_scale, noise, options,
                       "labels");
}

int64_t Pipeline::count_prompts(const Prompts& prompts) const {
  for (const TensorRecord* record : request_inputs(impl_->manifest))
    if (prompts.arrays.count(record->argument) || prompts.npy.count(record->argument)) {
      const Tensor array = parse_array(prompts, record->argument, record->kind);
      return array.shape.empty() ? 0 : array.shape[0];
    }
  return 0;
}

Tensor Pipeline::sample(const Prompts& prompts, const Tensor& noise, const SampleOptions& options) const {
  const Manifest& m = impl_->manifest;
  if (m.takes_labels)
    throw Error(prompts.source + ": this model is conditioned on class labels (--labels), not on prompt embeddings");
  const double cfg_scale = checked_scale(options, m);
  const bool guiding = m.guidance.classifier_free && cfg_scale > 1.0;
  // As l2c_export/samplers/conditioning.py: negatives a guidance-distilled model never runs, arrays the model does not
  // take, missing ones; then each array's dtype, shape and values, by the kind of the input it feeds.
  std::vector<std::string> given;
  for (const auto& entry : prompts.npy) given.push_back(entry.first);
  for (const auto& entry : prompts.arrays) given.push_back(entry.first);
  if (!m.guidance.classifier_free)
    for (const auto& name : given)
      if (name.rfind("negative_", 0) == 0)
        throw Error(prompts.source + ": array '" + name + "' is not used: this model is guidance-distilled "
                    "(--cfg-scale feeds its guidance embedding; no negative prompt runs); leave it out");
  const std::vector<std::string> all = argument_names(m, true), needed = argument_names(m, guiding);
  std::sort(given.begin(), given.end());
  for (const auto& name : given)
    if (std::find(all.begin(), all.end(), name) == all.end())
      throw Error(prompts.source + ": unknown array '" + name + "'; expected " + joined(all));
  for (const auto& name : needed)
    if (std::find(given.begin(), given.end(), name) == given.end())
      throw Error(prompts.source + ": array '" + name + "' is missing" +
                  (name.rfind("negative_", 0) == 0 ? " (guidance runs the negative prompt as the unconditional half)"
                                                   : "") +
                  "; expected " + joined(needed));
  Condition condition;
  std::map<std::string, Tensor> conditional;  // by argument: the conditional half's arrays
  int64_t n = 0, negative_tokens = 0;
  // A token mask that pads_negative: the halves' prompt lengths may differ, the shorter padded under mask 0.
  const bool any_length = std::any_of(m.conditioning.begin(), m.conditioning.end(),
                                      [](const TensorRecord& r) { return r.pads_negative; });
  for (bool negative : {false, true}) {
    if (negative && !guiding) break;
    for (const TensorRecord* record : request_inputs(m)) {
      if (negative && record->negative.empty()) {  // the same value in both halves
        Tensor& fed = condition.inputs[record->name];
        fed = concatenated(fed, conditional.at(record->argument));
        continue;
      }
      const std::string& name = negative ? record->negative : record->argument;
      const Tensor array = parse_array(prompts, name, record->kind);
      const int64_t width = record->shape.back();
      if (n == 0 && !array.shape.empty()) n = array.shape[0];  // the first array given says how many prompts
      if (record->kind == "token_embeddings") {
        if (array.shape.empty())
          throw Error(prompts.source + ": array '" + name + "' is a 0-d array; expected (n, L, " +
                      std::to_string(width) + ")");
        check_embeddings(array, name, width, negative ? &conditional.at(record->argument) : nullptr,
                         record->argument, prompts.source, any_length);
        if (array.shape[1] > m.max_prompt_tokens)
          throw Error(prompts.source + ": array '" + name + "' has shape " + array.shape_string() + ": " +
                      std::to_string(array.shape[1]) + " prompt tokens; expected at most the model's " +
                      "max_sequence_length " + std::to_string(m.max_prompt_tokens));
        (negative ? negative_tokens : condition.prompt_tokens) = array.shape[1];
      } else if (record->kind == "token_mask") {
        check_mask(array, name, n, negative ? negative_tokens : condition.prompt_tokens, prompts.source);
      } else if (record->kind == "pooled") {
        check_pooled(array, name, n, width, prompts.source);
      } else {
        check_scalars(array, name, n, prompts.source);
      }
      if (negative) {
        const Tensor& cond = conditional.at(record->argument);
        const bool tokens = record->kind == "token_embeddings" || record->kind == "token_mask";
        const int64_t longer = tokens ? std::max(cond.shape[1], array.shape[1]) : 0;
        condition.inputs[record->name] = tokens ? concatenated(padded_tokens(cond, longer), padded_tokens(array, longer))
                                                : concatenated(cond, array);
      } else {
        conditional[record->argument] = array;
        condition.inputs[record->name] = array;
      }
    }
  }
  if (guiding) condition.prompt_tokens = std::max(condition.prompt_tokens, negative_tokens);
  return impl_->sample(n, std::move(condition), guiding, cfg_scale, noise, options, "prompts");
}

Tensor Pipeline::Impl::sample(int64_t n, Condition condition, bool guiding, double cfg_scale, const Tensor& noise,
                              const SampleOptions& options, const std::string& what) const {
  const Impl& p = *this;
  const Manifest& m = p.manifest;
  const bool packed = m.latent_layout == "packed_2x2";  // FLUX.1's (T, C): channels last
  const std::string axes = packed ? ", T, C)" : m.latent_layout == "ncfhw" ? ", C, F, H, W)" : ", C, H, W)";
  std::vector<int64_t> expected{n};
  expected.insert(expected.end(), p.sample_shape.begin(), p.sample_shape.end());
  if (noise.shape != expected)
    throw Error("noise has shape " + shape_string(noise.shape) + "; expected " + shape_string(expected) +
                " (n " + what + axes + (packed ? ", the pipeline's packed latents" : ""));
  for (float value : noise.data)
    if (!std::isfinite(value)) throw Error("noise holds a value that is not finite; expected finite float32 noise");
  const int64_t model_batch = guiding ? 2 * n : n;
  for (const TensorRecord& record : m.conditioning)  // the inputs fed the guidance scale, per row
    if (record.argument == m.guidance.scale_argument)
      condition.inputs[record.name] = Tensor({model_batch}, static_cast<float>(cfg_scale));
  if (model_batch < m.batch_min || model_batch > m.batch_max)
    throw Error(std::to_string(n) + " " + what + " make a model batch of " + std::to_string(model_batch) +
                (guiding ? " (guidance doubles it)" : "") + "; the engines take " + std::to_string(m.batch_min) +
                ".." + std::to_string(m.batch_max) + " (" + m.path.string() + " field 'batch')");
  const Sampler& sampler = *m.sampler;
  const int noises = sampler.num_step_noises();
  if (noises > 0) {
    std::vector<int64_t> step_shape{noises};
    step_shape.insert(step_shape.end(), expected.begin(), expected.end());
    if (options.step_noise == nullptr)
      throw Error("the " + sampler.kind() + " sampler adds noise after each step but the last: pass step noise of " +
                  "shape " + shape_string(step_shape));
    if (options.step_noise->shape != step_shape)
      throw Error("step noise has shape " + shape_string(options.step_noise->shape) + "; expected " +
                  shape_string(step_shape) + " (steps - 1, n " + what + axes);
    for (float value : options.step_noise->data)
      if (!std::isfinite(value)) throw Error("step noise holds a value that is not finite");
  }
  // Each call's subset and guidance scale: with experts, its expert's (full compute: that expert's full subset; the
  // second expert's calls guided with cfg_scale_2, default cfg_scale, as WanPipeline's guidance_scale_2).
  std::vector<int> subsets(sampler.num_model_calls());
  std::vector<float> call_scales(sampler.num_model_calls(), static_cast<float>(cfg_scale));
  for (int call = 0; call < sampler.num_model_calls(); ++call) {
    subsets[call] = options.full ? m.full_subset_of_call(call) : m.step_subset[call];
    if (m.experts && m.experts->step_expert[call] == 1)
      call_scales[call] = static_cast<float>(options.cfg_scale_2.value_or(cfg_scale));
  }
  for (int subset : subsets)
    if (!p.sessions.count(subset))
      throw Error("subset " + std::to_string(subset) + " is not loaded (Options::subsets leaves it out)");

  // Per sample: (C_out, ...) planes of which guidance mixes the leading guided channels and the sampler takes the
  // leading sampler channels; a packed (T, C) output is guided and stepped on whole (Manifest::load checks so).
  const int64_t out_plane = static_cast<int64_t>(Tensor::count(p.out_shape));
  const int64_t channel_plane = packed ? 0 : out_plane / p.out_shape[0];
  const int64_t guided_plane = packed ? out_plane : m.guidance.guided_channels * channel_plane;
  const int64_t sampler_channels = m.guidance.sampler_channels ? m.guidance.sampler_channels : p.out_shape[0];
  const int64_t sampler_plane = packed ? out_plane : sampler_channels * channel_plane;
  std::vector<int64_t> guided_shape = expected;
  if (!packed) guided_shape[1] = sampler_channels;

  RequestCache cache;
  Tensor model_x, model_out, guided(guided_shape);
  std::vector<float> t(model_batch);
  ModelCall model = [&](int call, const Tensor& x, float timestep) -> const Tensor& {
    const Tensor* input = &x;
    if (guiding) {
      model_x.shape = expected;
      model_x.shape[0] = model_batch;
      model_x.data.assign(x.data.begin(), x.data.end());
      model_x.data.insert(model_x.data.end(), x.data.begin(), x.data.end());
      input = &model_x;
    }
    std::fill(t.begin(), t.end(), timestep);
    p.run(subsets[call], *input, t, condition, cache, model_out);
    const float scale = call_scales[call];
    if (!guiding && sampler_plane == out_plane) return model_out;
    // Guided channels: uncond + s * (cond - uncond); the others from the conditional half (DiT's forward_with_cfg).
    // Only the leading sampler channels are kept (all but where the manifest's guidance/sampler_channels says).
    for (int64_t b = 0; b < n; ++b) {
      const float* cond = model_out.data.data() + b * out_plane;
      const float* uncond = guiding ? model_out.data.data() + (b + n) * out_plane : cond;
      float* to = guided.data.data() + b * sampler_plane;
      for (int64_t i = 0; i < sampler_plane; ++i)
        to[i] = guiding && i < guided_plane ? uncond[i] + scale * (cond[i] - uncond[i]) : cond[i];
      if (guiding && m.guidance.true_cfg) {  // each row of the last axis rescaled to the conditional half's norm
        const int64_t row = p.out_shape.back(), rows = std::min(guided_plane, sampler_plane) / row;
        for (int64_t r = 0; r < rows; ++r) {
          double cond_norm = 0.0, comb_norm = 0.0;
          for (int64_t i = r * row; i < (r + 1) * row; ++i) {
            cond_norm += static_cast<double>(cond[i]) * cond[i];
            comb_norm += static_cast<double>(to[i]) * to[i];
          }
          const float ratio = static_cast<float>(std::sqrt(cond_norm) / std::sqrt(comb_norm));
          for (int64_t i = r * row; i < (r + 1) * row; ++i) to[i] *= ratio;
        }
      }
    }
    return guided;
  };
  Tensor x = noise;
  sampler.sample(x, model, options.step_noise);
  return x;
}

}  // namespace l2c
