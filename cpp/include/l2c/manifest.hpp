// manifest.json: the only thing the C++ runtime reads about a build (see l2c_export/schemas/manifest.schema.json).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "l2c/sampler.hpp"

namespace l2c {

constexpr int kSchemaVersion = 2;  // the newest manifest schema this runtime reads (1 and 2)
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
  // What the runtime feeds or reads: inputs "sample", "time", "label" (or "prompt_embeds" with
  // "prompt_attention_mask" (PixArt), "prompt_embeds_mask" (Qwen-Image) or "pooled_prompt_embeds" (SD3, FLUX.1)
  // for a text-conditioned model),
  // "guidance" (FLUX.1's guidance embedding: the scale), "cache"; outputs "output", "fresh". Schema 2 records say it;
  // for schema 1 it follows from the names x, t, y, model_out and the slot.
  std::string role;
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
};

struct Guidance {
  double cfg_scale = 1.0;   // default scale; > 1 runs the conditional and null halves as one 2B batch
  int guided_channels = 0;  // the leading model_out channels guidance mixes; the rest come from the conditional half
  int64_t null_class = 0;   // the label of the unconditional half (label models; 0 for a model without labels)
  // The leading channels of the guided output the sampler steps on (diffusers' pipelines drop the learned-sigma half
  // before the scheduler); 0: every channel.
  int sampler_channels = 0;
  // false: a guidance-distilled model (FLUX.1): no classifier-free batch runs; the scale feeds its guidance input.
  bool classifier_free = true;
  // true: uncond + s * (cond - uncond) is rescaled along the output's last axis to the norm of cond (Qwen-Image's
  // true CFG, per token of its packed (T, C) output).
  bool norm_rescale = false;
};

struct Manifest {
  std::filesystem::path folder, path;
  int schema_version = 0;
  std::string name, backend, precision, space;  // space: "pixel" (images in [-1, 1]) or "latent"
  std::string document;  // the whole manifest as JSON text, for the fields each graph's stamp names
  int64_t num_classes = 0;  // label models: labels 0 .. num_classes - 1; 0 for a text-conditioned model
  // What the model conditions on, from its input roles: "label" (class labels, guided against the null class) or
  // "prompt" (prompt_embeds (batch, L, prompt_width), with prompt_attention_mask (batch, L) and/or
  // pooled_prompt_embeds (batch, pooled_width) where the model has them, guided against the negative prompt's).
  std::string conditioning;
  int64_t prompt_width = 0;
  bool has_prompt_mask = false;  // a token mask input: mask_role
  // The mask's role and argument name: prompt_attention_mask (PixArt) or prompt_embeds_mask (Qwen-Image, whose
  // negative prompt may have another length: the shorter half is padded to the longer under mask 0).
  std::string mask_role;
  int64_t pooled_width = 0;      // P of a pooled_prompt_embeds input (SD3, FLUX.1); 0: none
  bool has_guidance_input = false;  // a guidance input (FLUX.1-dev), fed the guidance scale per row
  int64_t max_prompt_tokens = 0;  // "prompt" models: the most prompt tokens L (model/max_sequence_length)
  std::shared_ptr<const Sampler> sampler;
  Guidance guidance;
  std::vector<int> step_subset;  // schedule: subset index per model call
  int64_t batch_min = 1, batch_max = 1;
  std::vector<CacheSlot> cache_slots;
  FileRecord weights;
  std::vector<FileRecord> other_files;  // e.g. a TensorRT build's timing cache
  std::vector<WeightTensor> weight_tensors;
  std::vector<SubsetRecord> subsets;
  int full_subset = -1;  // the subset that computes every sub-layer
  double ideal_speedup = 1.0;

  // Reads and checks `folder/manifest.json` (refusing a newer schema version before anything else) and, with
  // verify_files, every listed file's size and sha256. The records must agree with one another: every subset feeds
  // the same sample, time and label inputs and returns the same output as the full subset, each cache input and
  // fresh output has its slot's dtype and shape, shapes are positive and bounded (kMaxDimension, kMaxElements).
  // Throws l2c::Error naming the file and the field.
  static Manifest load(const std::filesystem::path& folder, bool verify_files = true);

  // folder / record.file, refusing a symbolic link anywhere on the way.
  std::filesystem::path file_path(const FileRecord& record) const;
  const SubsetRecord& subset(int index) const;
  const CacheSlot& slot(const std::string& name) const;
  // The record of a subset's tensor with `role` ("sample", "time", "label", "output").
  static const TensorRecord& model_tensor(const SubsetRecord& subset, const std::string& role);
  // Every file the manifest lists (weights, graphs, engines), each once.
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
