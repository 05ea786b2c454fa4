// manifest.json: the only thing the C++ runtime reads about a build (see l2c_export/schemas/manifest.schema.json).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "l2c/sampler.hpp"

namespace l2c {

// The manifest schema this runtime reads; older manifests are refused (l2c-export upgrades them when it reads them,
// and a rebuild writes this version).
constexpr int kSchemaVersion = 3;
constexpr int64_t kBatch = -1;     // a "batch" dimension in a tensor record's shape
constexpr int64_t kPromptTokens = -2;  // a "prompt_tokens" dimension: the text conditioning's length, per request
// A "joint_tokens" dimension (MMDiTs' joint attention: image tokens + prompt tokens), per request; the runtime learns
// its size from the graph's first write of the slot.
constexpr int64_t kJointTokens = -3;
// Bounds on what a manifest may declare, checked before anything is allocated: each dimension, and the elements of
// one sample of a tensor (or of one weight tensor). 2^31 float32 values are 8 GiB per sample, beyond any DiT's.
constexpr int64_t kMaxDimension = (int64_t(1) << 31) - 1;
constexpr uint64_t kMaxElements = uint64_t(1) << 31;

struct FileRecord {
  std::string file;  // relative to the manifest's folder
  std::string sha256;
  uint64_t bytes = 0;
};

struct TensorRecord {
  std::string name;
  std::string dtype;           // float32, float16, bfloat16, int64
  std::vector<int64_t> shape;  // kBatch where the record says "batch"
  std::string slot;            // the cache slot a cache input reads or a fresh output writes; empty otherwise
  // What the runtime feeds or reads: inputs "sample", "time", "conditioning", "cache"; outputs "output", "fresh".
  std::string role;
  // A conditioning input (l2c_export/core/interface.py): the pipeline argument it is fed from, its kind
  // (token_embeddings, token_mask, pooled, scalar, label) and the argument of its unconditional half (empty: none).
  std::string argument, kind, negative;
  // A token mask whose partner's token count may differ (pads_negative): the shorter half is padded under mask 0.
  bool pads_negative = false;
};

struct WeightTensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  uint64_t offset = 0, length = 0;  // bytes into weights.bin
};

struct CacheSlot {
  std::string name, dtype;
  std::vector<int64_t> shape;  // (batch, tokens, hidden); tokens may be kPromptTokens or kJointTokens
};

struct SubsetRecord {
  int index = 0;
  std::string name;
  std::vector<bool> compute;  // per sub-layer
  FileRecord graph, engine;
  std::vector<TensorRecord> inputs, outputs;  // model inputs and cache reads; model_out and fresh cache writes
  int expert = 0;  // a build of experts (Manifest::experts): the expert whose graph this is (subsets/*/expert)
};

// A pipeline of two transformers switching by timestep (Wan2.2's transformer and transformer_2; manifest 'experts'):
// model call c runs expert step_expert[c], 0 while its timestep is >= boundary_timestep, then 1, on a subset of that
// expert. Each expert has its own cache slots (its prefix, then the sub-layer's name), and the first call of each
// computes every sub-layer. Whether to guide is the first expert's scale's; each expert's calls combine the halves
// with its own scale (SampleOptions::cfg_scale, cfg_scale_2).
struct ExpertRecord {
  std::string name;            // the pipeline's component: transformer, transformer_2
  std::string prefix;          // of its cache slots and weight tensors: "" for the first
  std::string scale_argument;  // the pipeline's argument for this expert's scale (experts/models/i/scale_argument)
  int full_subset = -1;        // its subset that computes every sub-layer
};

struct Experts {
  double boundary_ratio = 0.0, boundary_timestep = 0.0;
  std::vector<int> step_expert;  // per model call
  std::vector<ExpertRecord> models;
};

struct Guidance {
  double cfg_scale = 1.0;   // default scale; > 1 runs the conditional and null halves as one 2B batch
  int guided_channels = 0;  // the leading model_out channels guidance mixes; the rest come from the conditional half
  int64_t null_class = 0;   // the label of the unconditional half (label models; 0 for a model without labels)
  // The leading channels of the guided output the sampler steps on (diffusers' pipelines drop the learned-sigma half
  // before the scheduler); 0: every channel.
  int sampler_channels = 0;
  // How the scale acts (guidance/rule): "classifier_free" (a 2n batch, uncond + s * (cond - uncond)) or
  // "guidance_embedding" (a guidance-distilled model, FLUX.1: no second half; the scale feeds the conditioning input
  // whose argument is scale_argument) or "true_cfg" (Qwen-Image: as classifier_free, then each row of the last axis
  // rescaled to the norm of the conditional half's).
  std::string rule = "classifier_free";
  std::string scale_argument;  // guidance/scale_argument
  bool classifier_free = true;  // the rule runs an unconditional half
  bool true_cfg = false;        // the rule rescales the combination per row of the last axis
};

// A graph the build carries beside the subsets (manifest 'components'), run once per request: its ONNX file and the
// weights file beside it (external data), its inputs and outputs by name with their shapes (kBatch, kPromptTokens).
struct ComponentGraph {
  std::string name;  // the component's name: vae_decoder, text_encoder, text_encoder_2, ...
  FileRecord graph, weights;
  std::vector<std::string> inputs, outputs;
  std::vector<std::vector<int64_t>> input_shapes, output_shapes;
};

// components/vae_decoder: latents / scaling_factor + shift_factor (packed_2x2 latents unpacked first) -> images.
struct VaeDecoderRecord {
  ComponentGraph graph;
  double scaling_factor = 1.0;
  std::optional<double> shift_factor;  // SD3's and FLUX.1's VAEs have one
  std::string latent_layout = "nchw";  // of the sampled latents: nchw, or packed_2x2 (FLUX.1)
};

// components/tokenizer*: a Hugging Face tokenizer.json and the token the runtime pads with.
struct TokenizerRecord {
  FileRecord file;
  std::string pad_token;
  int64_t pad_id = 0;
};

// components/prompt_encoding (l2c_export/core/text_stack.py): each prompt preprocessed ("none"; "lower_strip":
// PixArt's lower-cased and stripped; "wan_prompt_clean": WanPipeline's prompt_clean), tokenized and encoded by every
// encoder in order (of its token outputs the tokens its selection keeps), and each array by the pipeline's argument
// name made of token groups of "<encoder>/<output>" pieces ("<encoder>/attention_mask": the tokenizer's mask).
struct PromptEncodingRecord {
  struct Encoder {
    std::string encoder, tokenizer;
    bool masked = false;  // the graph is fed the tokenizer's mask (PixArt); else the padding is attended to
    int64_t max_length = 0;  // prompts are truncated and padded to this many tokens
    // "all"; "zeroed_past_prompt": each row's tokens past its prompt's zeroed (Wan's); a decoder LLM's others are
    // not applied (`unsupported`)
    std::string selection = "all";
  };
  int64_t max_sequence_length = 0;
  std::string preprocessing = "none";
  std::vector<Encoder> encoders;
  std::vector<std::pair<std::string, std::vector<std::vector<std::string>>>> arrays;  // in the record's order
  // The first field of the record l2c-run does not apply (a decoder LLM's template or token selection, a left-padding
  // tokenizer: Sana's and Qwen-Image's stacks), with why; empty where it applies all of it. Prompts are refused
  // naming it (embeddings still run).
  std::string unsupported;
};

struct Components {
  std::optional<VaeDecoderRecord> vae_decoder;
  std::map<std::string, ComponentGraph> text_encoders;
  std::map<std::string, TokenizerRecord> tokenizers;
  std::optional<PromptEncodingRecord> prompt_encoding;  // set where the build carries its text encoders
};

struct Manifest {
  std::filesystem::path folder, path;
  int schema_version = 0;
  std::string name, backend, precision, space;  // space: "pixel" (images in [-1, 1]) or "latent"
  std::string document;  // the whole manifest as JSON text, for the fields each graph's stamp names
  int64_t num_classes = 0;  // label models: labels 0 .. num_classes - 1; 0 for a model conditioned otherwise
  // The model's conditioning inputs (role "conditioning"), in graph order: a label model's one label input (guided
  // against the null class), or the arrays a request feeds by argument name (and those fed the guidance scale).
  std::vector<TensorRecord> conditioning;
  bool takes_labels = false;     // a label input: the model is sampled from class labels
  int64_t max_prompt_tokens = 0;  // models with token inputs: the most tokens L (model/max_sequence_length)
  // How the sample's per-sample axes lie (model/latent_layout): "nchw" (C, H, W), "packed_2x2" (T, C: channels
  // last) or "ncfhw" (C, F, H, W).
  std::string latent_layout = "nchw";
  std::shared_ptr<const Sampler> sampler;
  Guidance guidance;
  std::vector<int> step_subset;  // schedule: subset index per model call
  int64_t batch_min = 1, batch_max = 1;
  std::vector<CacheSlot> cache_slots;
  FileRecord weights;
  std::vector<FileRecord> other_files;  // e.g. a TensorRT build's timing cache
  std::vector<WeightTensor> weight_tensors;
  std::vector<SubsetRecord> subsets;
  int full_subset = -1;  // the subset that computes every sub-layer (with experts: the first expert's)
  std::optional<Experts> experts;  // set for a pipeline of experts (Wan2.2); absent: one transformer
  double ideal_speedup = 1.0;
  Components components;  // what the build carries beside the subsets: VAE decoder, text encoders, tokenizers

  // Reads and checks `folder/manifest.json` (refusing another schema version before anything else) and, with
  // verify_files, every listed file's size and sha256. The records must agree with one another: every subset feeds
  // the same sample, time and conditioning inputs and returns the same output as the full subset, each cache input and
  // fresh output has its slot's dtype and shape, shapes are positive and bounded (kMaxDimension, kMaxElements).
  // Throws l2c::Error naming the file and the field.
  static Manifest load(const std::filesystem::path& folder, bool verify_files = true);

  // folder / record.file, refusing a symbolic link anywhere on the way.
  std::filesystem::path file_path(const FileRecord& record) const;
  const SubsetRecord& subset(int index) const;
  const CacheSlot& slot(const std::string& name) const;
  // The subset computing every sub-layer that model call `call` runs under full compute (its expert's).
  int full_subset_of_call(int call) const;
  // The record of a subset's tensor with `role` ("sample", "time", "output"; the first "conditioning" one).
  static const TensorRecord& model_tensor(const SubsetRecord& subset, const std::string& role);
  // Every file the manifest lists (weights, graphs, engines, components' files), each once.
  std::vector<FileRecord> files() const;
};

std::string sha256_file(const std::filesystem::path& path);

// The ONNX metadata key under which each graph carries the manifest fields its build fixed, as JSON text
// {"model/config": {...}, "guidance/null_class": 10} (l2c_export/core/manifest.py: GRAPH_STAMP_KEY).
inline constexpr const char* kGraphStampKey = "l2c.built_for";

// The first field where the manifest (JSON text) differs from a graph's stamp (JSON text), as
// "field 'model/config/num_classes' is 1000; the graph was built for 10"; empty when they agree.
std::string stamp_difference(const std::string& manifest, const std::string& stamp);

// A record's shape as the manifest writes it: "(batch, 16, 128)".
std::string record_shape_string(const std::vector<int64_t>& shape);

}  // namespace l2c
