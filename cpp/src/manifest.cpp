#include "l2c/manifest.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <fstream>
#include <iomanip>
#include <map>
#include <regex>
#include <set>
#include <tuple>
#include <sstream>

#include "json_fields.hpp"
#include "l2c/error.hpp"
#include "sampler_factory.hpp"

namespace l2c {

namespace fs = std::filesystem;
using detail::Fields;
using detail::json;

std::string sha256_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path.string() + ": cannot be read");
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> context(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_DigestInit_ex(context.get(), EVP_sha256(), nullptr);
  std::vector<char> block(1 << 22);
  while (in) {
    in.read(block.data(), static_cast<std::streamsize>(block.size()));
    EVP_DigestUpdate(context.get(), block.data(), static_cast<size_t>(in.gcount()));
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(context.get(), digest, &length);
  std::ostringstream hex;
  for (unsigned int i = 0; i < length; ++i) hex << std::hex << std::setw(2) << std::setfill('0') << int(digest[i]);
  return hex.str();
}

std::string record_shape_string(const std::vector<int64_t>& shape) {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i)
    text += (i ? ", " : "") + (shape[i] == kBatch           ? std::string("batch")
                               : shape[i] == kPromptTokens ? std::string("prompt_tokens")
                               : shape[i] == kJointTokens  ? std::string("joint_tokens")
                                                           : std::to_string(shape[i]));
  return text + (shape.size() == 1 ? ",)" : ")");
}

namespace {

FileRecord read_file_record(const Fields& node) {
  FileRecord record{node["file"].str(), node["sha256"].str(),
                    static_cast<uint64_t>(node["bytes"].integer(0))};
  if (record.sha256.size() != 64 || record.sha256.find_first_not_of("0123456789abcdef") != std::string::npos)
    node["sha256"].fail("expected 64 lowercase hex digits");
  // The schema's rule: a plain relative path that stays inside the build folder (no absolute path, '..', hidden or
  // empty component); symbolic links are refused when the path is opened (Manifest::file_path).
  static const std::regex plain("[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*");
  if (!std::regex_match(record.file, plain))
    node["file"].fail("is '" + record.file + "'; expected a plain relative path inside the build folder (no "
                      "absolute path, '..', hidden component or backslash)");
  return record;
}

// A shape's dimensions: "batch" first where allowed, then sizes in 1..kMaxDimension (0.. for a weight), and no more
// than kMaxElements elements per sample (or per weight tensor), so every size the runtime computes from it is small
// enough to allocate and cannot overflow.
std::vector<int64_t> read_shape(const Fields& node, bool allow_batch) {
  std::vector<int64_t> shape;
  uint64_t elements = 1;
  for (size_t i = 0; i < node.size(); ++i) {
    Fields dim = node[i];
    if (allow_batch && i == 0) {
      if (dim.str() != "batch") dim.fail("expected \"batch\" (the first dimension)");
      shape.push_back(kBatch);
      continue;
    }
    if (allow_batch && dim.is_string()) {
      if (dim.str() != "prompt_tokens" && dim.str() != "joint_tokens")
        dim.fail("expected a size, \"prompt_tokens\" (the prompt's length) or \"joint_tokens\" (image and prompt "
                 "tokens)");
      shape.push_back(dim.str() == "prompt_tokens" ? kPromptTokens : kJointTokens);
      continue;
    }
    const int64_t size = dim.integer(allow_batch ? 1 : 0, kMaxDimension);
    shape.push_back(size);
    elements = elements > kMaxElements ? elements : elements * static_cast<uint64_t>(size);
  }
  if (allow_batch && shape.empty()) node.fail("is empty; expected [\"batch\", ...]");
  if (elements > kMaxElements)
    node.fail("has more than " + std::to_string(kMaxElements) + " elements" + (allow_batch ? " per sample" : "") +
              "; expected a tensor this runtime can allocate");
  return shape;
}

TensorRecord read_tensor(const Fields& node, bool output) {
  TensorRecord record{node["name"].str(), node["dtype"].str(), read_shape(node["shape"], true), "", "", "", "", ""};
  static const std::set<std::string> dtypes{"float32", "float16", "bfloat16", "int64"};
  if (!dtypes.count(record.dtype)) node["dtype"].fail("is " + record.dtype + "; expected float32, float16, bfloat16 or int64");
  if (node.has("slot")) record.slot = node["slot"].str();
  record.role = node["role"].str();
  static const std::set<std::string> input_roles{"sample", "time", "conditioning", "cache"},
      output_roles{"output", "fresh"};
  if (!(output ? output_roles : input_roles).count(record.role))
    node.fail(std::string("has no role this runtime feeds; expected ") +
              (output ? "role output, or a fresh output with a slot" :
                        "roles sample, time, conditioning or a cache input with a slot"));
  if ((record.role == "cache" || record.role == "fresh") == record.slot.empty())
    node.fail("role " + record.role + (record.slot.empty() ? " needs a slot" : " takes no slot"));
  if (record.role == "conditioning") {
    // What the input is, as l2c_export/core/interface.py says: per sample, its dtype and number of axes.
    static const std::map<std::string, std::pair<std::string, size_t>> kinds{
        {"token_embeddings", {"float32", 2}}, {"token_mask", {"float32", 1}}, {"pooled", {"float32", 1}},
        {"scalar", {"float32", 0}}, {"label", {"int64", 0}}};
    record.argument = node["argument"].str();
    record.kind = node["kind"].str();
    if (node.has("negative")) record.negative = node["negative"].str();
    if (node.has("pads_negative")) {
      record.pads_negative = node["pads_negative"].boolean();
      if (!record.pads_negative || record.kind != "token_mask" || record.negative.empty())
        node["pads_negative"].fail("is set on " + record.name + "; expected true, on a token_mask with a negative");
    }
    const auto found = kinds.find(record.kind);
    if (found == kinds.end())
      node["kind"].fail("is " + record.kind + "; expected token_embeddings, token_mask, pooled, scalar or label");
    if (record.dtype != found->second.first || record.shape.size() != found->second.second + 1)
      node.fail("(" + record.name + ", a " + record.kind + " input) is " + record.dtype + " " +
                record_shape_string(record.shape) + "; expected " + found->second.first + " of " +
                std::to_string(found->second.second) + " per-sample axes");
  } else if (node.has("argument") || node.has("kind") || node.has("negative") || node.has("pads_negative")) {
    node.fail("names an argument or kind; only a conditioning input does");
  }
  return record;
}

std::vector<bool> read_bool_row(const Fields& node) {
  std::vector<bool> row;
  for (size_t i = 0; i < node.size(); ++i) row.push_back(node[i].integer(0, 1) == 1);
  return row;
}

// What the schema cannot say, as l2c_export.core.manifest.check_consistency: the first step computes everything, a step
// reads only slots an earlier step wrote, each subset's cache inputs and fresh outputs are its reads and writes, and
// the schedule's rows are the compute of the subsets its steps name.
void check_consistency(const Manifest& m, const Fields& subsets, const Fields& schedule) {
  const Fields step_subset = schedule["step_subset"], compute = schedule["compute"];
  for (size_t i = 0; i < m.subsets.size(); ++i) {
    const SubsetRecord& record = m.subsets[i];
    std::vector<std::string> reads, writes, slot_inputs, slot_outputs;
    for (size_t k = 0; k < subsets[i]["reads"].size(); ++k) reads.push_back(subsets[i]["reads"][k].str());
    for (size_t k = 0; k < subsets[i]["writes"].size(); ++k) writes.push_back(subsets[i]["writes"][k].str());
    for (const auto& tensor : record.inputs)
      if (!tensor.slot.empty()) slot_inputs.push_back(tensor.slot);
    for (const auto& tensor : record.outputs)
      if (!tensor.slot.empty()) slot_outputs.push_back(tensor.slot);
    if (slot_inputs != reads) subsets[i]["inputs"].fail("the cache inputs' slots differ from 'reads'");
    if (slot_outputs != writes) subsets[i]["outputs"].fail("the fresh outputs' slots differ from 'writes'");
  }
  std::set<std::string> written;
  for (size_t step = 0; step < m.step_subset.size(); ++step) {
    const SubsetRecord& record = m.subsets[m.step_subset[step]];
    if (step == 0 && std::find(record.compute.begin(), record.compute.end(), false) != record.compute.end())
      step_subset[0].fail("names subset " + std::to_string(record.index) + ", which reuses sub-layers; the first " +
                          "step must compute every sub-layer (nothing is cached yet)");
    for (const auto& tensor : record.inputs)
      if (!tensor.slot.empty() && !written.count(tensor.slot))
        step_subset[step].fail("runs subset " + std::to_string(record.index) + ", which reads cache slot " +
                               tensor.slot + " that no earlier step writes");
    for (const auto& tensor : record.outputs)
      if (!tensor.slot.empty()) written.insert(tensor.slot);
    if (read_bool_row(compute[step]) != record.compute)
      compute[step].fail("differs from the 'compute' of subset " + std::to_string(record.index) +
                         ", which 'schedule/step_subset/" + std::to_string(step) + "' names");
  }
}

// The graph interface the runtime binds, as l2c_export.core.manifest checks it: one sample (float32 (batch, C, H, W),
// FLUX.1's packed (batch, T, C), or (batch, C, F, H, W): as many axes as model/latent_layout says), one time (float32
// (batch,)) and one output (the sample's shape, or C_out = 2 C) per subset, and the conditioning inputs of the full
// subset (names, dtypes, shapes, arguments, kinds and partners), the same in every subset; each cache input and fresh
// output is its slot's dtype and shape; every subset computes as many sub-layers as the full one. (That these records
// are each graph's own interface is checked when the graph is loaded.)
void check_interfaces(const Manifest& m, const Fields& subsets, const Fields& guidance, const Fields& model) {
  const SubsetRecord& full = m.subsets[m.full_subset];
  const bool packed = m.latent_layout == "packed_2x2";
  const size_t rank = m.latent_layout == "nchw" ? 4 : m.latent_layout == "ncfhw" ? 5 : 3;
  const std::string sample_form = packed                      ? "(batch, T, C) (packed)"
                                  : m.latent_layout == "nchw" ? "(batch, C, H, W)"
                                                              : "(batch, C, F, H, W)";
  if (Manifest::model_tensor(full, "sample").shape.size() != rank)
    model["latent_layout"].fail("is " + m.latent_layout + "; the sample " +
                                record_shape_string(Manifest::model_tensor(full, "sample").shape) + " is not " +
                                sample_form);
  // role -> (dtype, rank, the form in words)
  const std::map<std::string, std::tuple<std::string, size_t, std::string>> model_roles{
      {"sample", {"float32", rank, sample_form}}, {"time", {"float32", 1, "(batch,)"}},
      {"output", {"float32", rank, sample_form}}};
  auto same = [](const TensorRecord& a, const TensorRecord& b) {
    return a.name == b.name && a.dtype == b.dtype && a.shape == b.shape && a.argument == b.argument &&
           a.kind == b.kind && a.negative == b.negative && a.pads_negative == b.pads_negative;
  };
  for (size_t i = 0; i < m.subsets.size(); ++i) {
    const SubsetRecord& record = m.subsets[i];
    if (record.compute.size() != full.compute.size() || record.compute.empty())
      subsets[i]["compute"].fail("has " + std::to_string(record.compute.size()) + " entries; expected " +
                                 std::to_string(full.compute.size()) + ", one per sub-layer, as the full subset");
    for (const auto& [role, form] : model_roles) {
      const bool output = role == "output";
      const std::vector<TensorRecord>& list = output ? record.outputs : record.inputs;
      const Fields field = subsets[i][output ? "outputs" : "inputs"];
      const auto count = std::count_if(list.begin(), list.end(), [&](const TensorRecord& t) { return t.role == role; });
      if (count != 1)
        field.fail("has " + std::to_string(count) + " tensors with role " + role + "; expected exactly one");
      const size_t at = std::find_if(list.begin(), list.end(), [&](const TensorRecord& t) { return t.role == role; }) -
                        list.begin();
      const TensorRecord& tensor = list[at];
      const auto& [dtype, dims, words] = form;
      if (tensor.dtype != dtype || tensor.shape.size() != dims)
        field[at].fail("(" + tensor.name + ", role " + role + ") is " + tensor.dtype + " of " +
                       std::to_string(tensor.shape.size()) + " dimensions; expected " + dtype + " of " +
                       std::to_string(dims) + " " + words);
      const TensorRecord& in_full = Manifest::model_tensor(full, role);
      if (!same(tensor, in_full))
        field[at].fail("(" + tensor.name + " " + tensor.dtype + " " + record_shape_string(tensor.shape) +
                       ") differs from the full subset's " + in_full.name + " " + in_full.dtype + " " +
                       record_shape_string(in_full.shape));
    }
    std::vector<const TensorRecord*> conditioning;
    for (const auto& tensor : record.inputs)
      if (tensor.role == "conditioning") conditioning.push_back(&tensor);
    bool agree = conditioning.size() == m.conditioning.size();
    for (size_t k = 0; agree && k < conditioning.size(); ++k) agree = same(*conditioning[k], m.conditioning[k]);
    if (!agree) subsets[i]["inputs"].fail("has conditioning inputs that differ from the full subset's");
    for (bool output : {false, true}) {
      const std::vector<TensorRecord>& list = output ? record.outputs : record.inputs;
      for (size_t k = 0; k < list.size(); ++k) {
        if (list[k].slot.empty()) continue;
        const CacheSlot& slot = m.slot(list[k].slot);
        if (list[k].dtype != slot.dtype || list[k].shape != slot.shape)
          subsets[i][output ? "outputs" : "inputs"][k].fail(
              "(" + list[k].name + ") is " + list[k].dtype + " " + record_shape_string(list[k].shape) +
              "; its cache slot " + slot.name + " in 'cache_slots' is " + slot.dtype + " " +
              record_shape_string(slot.shape));
      }
    }
  }
  const TensorRecord& sample = Manifest::model_tensor(full, "sample");
  const TensorRecord& output = Manifest::model_tensor(full, "output");
  if (packed && (output.shape != sample.shape || sample.shape[1] < 1))
    subsets[m.full_subset]["outputs"].fail("model output " + output.name + " " + record_shape_string(output.shape) +
                                           " does not fit the packed sample " + record_shape_string(sample.shape) +
                                           "; expected the same (batch, T, C)");
  // Guidance and the sampler take channels: along axis 1 of a channels-first sample; a packed sample's channels are
  // its last axis, so there every channel is guided and stepped on.
  if (packed && (m.guidance.guided_channels != sample.shape[2] || m.guidance.sampler_channels))
    guidance["guided_channels"].fail("is " + std::to_string(m.guidance.guided_channels) +
                                     " (sampler_channels " + std::to_string(m.guidance.sampler_channels) +
                                     "); a packed sample " + record_shape_string(sample.shape) + " expects all " +
                                     std::to_string(sample.shape[2]) + " channels guided and no sampler_channels");
  if (packed) return;
  bool fits = output.shape[1] == sample.shape[1] || output.shape[1] == 2 * sample.shape[1];
  for (size_t d = 2; d < rank; ++d) fits = fits && output.shape[d] == sample.shape[d];
  if (!fits)
    subsets[m.full_subset]["outputs"].fail("model output " + output.name + " " + record_shape_string(output.shape) +
                                           " does not fit the sample " + record_shape_string(sample.shape) +
                                           "; expected C or 2C channels, then the sample's sizes");
  if (m.guidance.sampler_channels > output.shape[1] ||
      (m.guidance.sampler_channels && m.guidance.sampler_channels < sample.shape[1]))
    guidance["sampler_channels"].fail("is " + std::to_string(m.guidance.sampler_channels) + "; expected the sample's " +
                                      std::to_string(sample.shape[1]) + " channel(s) up to the output's " +
                                      std::to_string(output.shape[1]));
  if (m.guidance.guided_channels > sample.shape[1])
    guidance["guided_channels"].fail("is " + std::to_string(m.guidance.guided_channels) + "; expected at most the " +
                                     "sample's " + std::to_string(sample.shape[1]) + " channel(s)");
}

// experts (l2c_export/core/manifest.py's _check_experts): a first and a second expert, the first's prefix empty and
// its config model/config, the prefixes different; every subset names its expert, and only then; boundary_timestep is
// boundary_ratio x num_train_timesteps; one expert per model call, the one its timestep gives against the boundary
// (in float32),
// its subset one of that expert's, the first call of each computing every sub-layer (its cache is empty); each
// subset's cache slots are its expert's (its prefix, then the sub-layer's name).
void read_experts(const json& data, const Fields& root, const Fields& subsets, Manifest& m) {
  if (!root.has("experts")) {
    for (size_t i = 0; i < subsets.size(); ++i)
      if (subsets[i].has("expert")) subsets[i]["expert"].fail("is given; only a build with 'experts' has one");
    return;
  }
  const Fields node = root["experts"], models = node["models"];
  Experts experts;
  experts.boundary_ratio = node["boundary_ratio"].number();
  if (!(experts.boundary_ratio > 0.0 && experts.boundary_ratio < 1.0))
    node["boundary_ratio"].fail("is " + json(experts.boundary_ratio).dump() + "; expected a number in (0, 1)");
  experts.boundary_timestep = node["boundary_timestep"].number();
  const int64_t train = root["sampler"]["options"]["num_train_timesteps"].integer(1);
  if (experts.boundary_timestep != experts.boundary_ratio * static_cast<double>(train))
    node["boundary_timestep"].fail("is " + json(experts.boundary_timestep).dump() + "; expected 'boundary_ratio' " +
                                   json(experts.boundary_ratio).dump() + " x the sampler's num_train_timesteps " +
                                   std::to_string(train));
  if (models.size() != 2)
    models.fail("has " + std::to_string(models.size()) + " entries; expected 2 (the expert of the timesteps from " +
                "'boundary_timestep' up, then the one below it)");
  static const std::regex identifier("[A-Za-z_][A-Za-z0-9_]*"), prefix_form("([A-Za-z][A-Za-z0-9_]*\\.)?");
  std::string prefixes;
  for (size_t e = 0; e < models.size(); ++e) {
    const Fields model = models[e];
    ExpertRecord record{model["name"].str(), model["prefix"].str(), model["scale_argument"].str(), -1};
    if (!std::regex_match(record.name, identifier)) model["name"].fail("is '" + record.name + "'; expected a name");
    if (!std::regex_match(record.scale_argument, identifier))
      model["scale_argument"].fail("is '" + record.scale_argument + "'; expected an argument name");
    if (!std::regex_match(record.prefix, prefix_form))
      model["prefix"].fail("is '" + record.prefix + "'; expected empty or a name and a dot ('transformer_2.')");
    model["weights_sha256"].str();
    if (!data["experts"]["models"][e].contains("config") || !data["experts"]["models"][e]["config"].is_object())
      model["config"].fail("expected an object (the expert's config)");
    prefixes += (e ? ", '" : "['") + record.prefix + "'";
    experts.models.push_back(record);
  }
  if (!experts.models[0].prefix.empty() || experts.models[0].prefix == experts.models[1].prefix)
    models.fail("has prefixes " + prefixes + "]; expected the first empty and each different");
  root["model"]["config"];  // present (else named), before it is compared
  if (data["experts"]["models"][0]["config"] != data["model"]["config"])
    models[0]["config"].fail("differs from 'model/config' (the first expert's)");
  for (size_t i = 0; i < subsets.size(); ++i) {
    SubsetRecord& record = m.subsets[i];
    record.expert = static_cast<int>(subsets[i]["expert"].integer(0, static_cast<int64_t>(models.size()) - 1));
    ExpertRecord& expert = experts.models[record.expert];
    if (expert.full_subset < 0 && std::all_of(record.compute.begin(), record.compute.end(), [](bool b) { return b; }))
      expert.full_subset = record.index;
  }
  for (const ExpertRecord& expert : experts.models)
    if (expert.full_subset < 0)
      subsets.fail("has no subset of " + expert.name + " that computes every sub-layer (its full-compute engine)");

  const Fields step_expert = node["step_expert"], step_subset = root["schedule"]["step_subset"];
  const size_t calls = m.step_subset.size();
  if (step_expert.size() != calls)
    step_expert.fail("has " + std::to_string(step_expert.size()) + " entries; expected one per model call (" +
                     std::to_string(calls) + ")");
  const std::vector<double> times = root["sampler"]["model_times"].numbers(calls);
  std::set<int> started;
  for (size_t call = 0; call < calls; ++call) {
    const int expert = static_cast<int>(step_expert[call].integer(0, static_cast<int64_t>(models.size()) - 1));
    // compared in float32, as WanPipeline compares its timestep tensor with the boundary (l2c_export.core.manifest's
    // expert_of_time)
    const int expected = static_cast<float>(times[call]) >= static_cast<float>(experts.boundary_timestep) ? 0 : 1;
    if (expert != expected)
      step_expert[call].fail("is " + std::to_string(expert) + "; the call's timestep " + json(times[call]).dump() +
                             (expected == 0 ? " is >= " : " is < ") + "'experts/boundary_timestep' " +
                             json(experts.boundary_timestep).dump() + ", which runs expert " +
                             std::to_string(expected));
    const SubsetRecord& record = m.subsets[m.step_subset[call]];
    if (record.expert != expert)
      step_subset[call].fail("names subset " + std::to_string(record.index) + ", of expert " +
                             std::to_string(record.expert) + "; the call runs expert " + std::to_string(expert) +
                             " ('experts/step_expert')");
    if (started.insert(expert).second &&
        std::find(record.compute.begin(), record.compute.end(), false) != record.compute.end())
      step_subset[call].fail("names subset " + std::to_string(record.index) + ", which reuses sub-layers at the " +
                             "first call of " + experts.models[expert].name + "; the first call of each expert must " +
                             "compute every sub-layer (its cache is empty)");
    experts.step_expert.push_back(expert);
  }
  const Fields slots = root["cache_slots"];
  std::map<std::string, int64_t> slot_index;
  for (size_t k = 0; k < slots.size(); ++k) slot_index[slots[k]["name"].str()] = slots[k]["index"].integer(0);
  const json& model = data["model"];
  const bool named = model.contains("sublayers") && model["sublayers"].is_array() && !model["sublayers"].empty();
  for (size_t i = 0; i < m.subsets.size(); ++i) {
    const SubsetRecord& record = m.subsets[i];
    const std::string& prefix = experts.models[record.expert].prefix;
    for (const auto* list : {&record.inputs, &record.outputs})
      for (const TensorRecord& tensor : *list) {
        if (tensor.slot.empty()) continue;
        const int64_t index = slot_index.at(tensor.slot);
        const bool prefixed = tensor.slot.compare(0, prefix.size(), prefix) == 0;
        std::string expected = prefixed ? tensor.slot : prefix + tensor.slot;
        const size_t at = static_cast<size_t>(index);
        if (named && at < model["sublayers"].size() && model["sublayers"][at].is_string())
          expected = prefix + model["sublayers"][at].get<std::string>();
        if (!prefixed || tensor.slot != expected)
          subsets[i].fail("uses cache slot " + tensor.slot + "; a subset of expert " + std::to_string(record.expert) +
                          " uses its own slots ('" + expected + "')");
      }
  }
  m.experts = std::move(experts);
}

ComponentGraph read_component_graph(const Fields& node, const std::string& name) {
  ComponentGraph graph{name, read_file_record(node["graph"]), read_file_record(node["weights"]), {}, {}, {}, {}};
  for (bool outputs : {false, true}) {
    const Fields list = node[outputs ? "outputs" : "inputs"];
    if (list.size() == 0) list.fail("is empty; expected the graph's " + std::string(outputs ? "outputs" : "inputs"));
    for (size_t i = 0; i < list.size(); ++i) {
      (outputs ? graph.outputs : graph.inputs).push_back(list[i]["name"].str());
      (outputs ? graph.output_shapes : graph.input_shapes).push_back(read_shape(list[i]["shape"], true));
      const std::string dtype = list[i]["dtype"].str();
      const std::string expected = !outputs && name != "vae_decoder" ? "int64" : "float32";
      if (dtype != expected) list[i]["dtype"].fail("is " + dtype + "; expected " + expected);
    }
  }
  return graph;
}

// components (l2c_export/core/manifest.py's _check_components, as far as the C++ runtime uses them): the VAE
// decoder takes the sample's (unpacked) latents, one image out; each text encoder and tokenizer is one entry of
// prompt_encoding, each encoder fed input_ids (and attention_mask where 'masked'), each array one of the model's
// conditioning arguments made of outputs its encoders have.
void read_components(const json& data, const Fields& root, Manifest& m) {
  if (!data.contains("components")) return;
  const Fields components = root["components"];
  if (!data["components"].is_object()) components.fail("expected an object");
  for (const auto& item : data["components"].items()) {
    const std::string& name = item.key();
    const Fields node = components[name];
    if (name == "vae_decoder") {
      VaeDecoderRecord decoder;
      decoder.graph = read_component_graph(node, name);
      decoder.scaling_factor = node["scaling_factor"].number();
      if (decoder.scaling_factor <= 0) node["scaling_factor"].fail("expected a positive number");
      if (node.has("shift_factor")) decoder.shift_factor = node["shift_factor"].number();
      if (node.has("latent_layout")) decoder.latent_layout = node["latent_layout"].str();
      if (decoder.latent_layout != "nchw" && decoder.latent_layout != "packed_2x2" && decoder.latent_layout != "ncfhw")
        node["latent_layout"].fail("is " + decoder.latent_layout + "; expected nchw, packed_2x2 or ncfhw");
      const auto& in = decoder.graph.input_shapes, &out = decoder.graph.output_shapes;
      const size_t rank = decoder.latent_layout == "ncfhw" ? 5 : 4;  // a clip's decoder: (batch, C, F, h, w)
      if (in.size() != 1 || in[0].size() != rank || out.size() != 1 || out[0].size() != rank)
        node.fail(rank == 5 ? "expected one input (batch, C, F, h, w) and one output (batch, C, F, H, W)"
                            : "expected one input (batch, C, h, w) and one output (batch, C, H, W)");
      m.components.vae_decoder = decoder;
    } else if (name.rfind("text_encoder", 0) == 0) {
      m.components.text_encoders.emplace(name, read_component_graph(node, name));
    } else if (name.rfind("tokenizer", 0) == 0) {
      m.components.tokenizers.emplace(name, TokenizerRecord{read_file_record(node["file"]), node["pad_token"].str(),
                                                            node["pad_id"].integer(0, INT32_MAX)});
    } else if (name != "prompt_encoding") {
      components.fail("names a component " + name + "; expected vae_decoder, text_encoder*, tokenizer* or "
                      "prompt_encoding");
    }
  }
  if (!m.components.text_encoders.empty() || !m.components.tokenizers.empty()) {
    const Fields record = components["prompt_encoding"];
    PromptEncodingRecord encoding;
    encoding.max_sequence_length = record["max_sequence_length"].integer(1, 65536);
    encoding.preprocessing = record["preprocessing"].str();
    if (encoding.preprocessing != "none" && encoding.preprocessing != "lower_strip" &&
        encoding.preprocessing != "wan_prompt_clean")
      record["preprocessing"].fail("is " + encoding.preprocessing + "; expected none, lower_strip or "
                                   "wan_prompt_clean");
    std::set<std::string> listed;
    const Fields encoders = record["encoders"];
    for (size_t i = 0; i < encoders.size(); ++i) {
      PromptEncodingRecord::Encoder entry{encoders[i]["encoder"].str(), encoders[i]["tokenizer"].str(),
                                          encoders[i]["masked"].boolean(), encoders[i]["max_length"].integer(1, 65536)};
      if (!m.components.text_encoders.count(entry.encoder) || !m.components.tokenizers.count(entry.tokenizer) ||
          !listed.insert(entry.encoder).second || !listed.insert(entry.tokenizer).second)
        encoders[i].fail("names " + entry.encoder + " and " + entry.tokenizer + "; expected a text_encoder* and a "
                         "tokenizer* component of the build, each in one entry");
      const std::vector<std::string> expected = entry.masked ? std::vector<std::string>{"input_ids", "attention_mask"}
                                                             : std::vector<std::string>{"input_ids"};
      if (m.components.text_encoders.at(entry.encoder).inputs != expected)
        components[entry.encoder]["inputs"].fail(std::string("expected ") +
                                                 (entry.masked ? "input_ids, attention_mask" : "input_ids"));
      const std::string where = "field 'components/prompt_encoding/encoders/" + std::to_string(i) + "/";
      if (encoding.unsupported.empty() && encoders[i].has("template"))
        encoding.unsupported = where + "template' (prompts put in a decoder LLM's template)";
      if (encoders[i].has("selection")) entry.selection = encoders[i]["selection"].str();
      if (encoding.unsupported.empty() && entry.selection != "all" && entry.selection != "zeroed_past_prompt")
        encoding.unsupported = where + "selection' is " + entry.selection + " (a decoder LLM's kept tokens)";
      const Fields tokenizer = components[entry.tokenizer];
      if (encoding.unsupported.empty() && tokenizer.has("padding_side") && tokenizer["padding_side"].str() != "right")
        encoding.unsupported = "field 'components/" + entry.tokenizer + "/padding_side' is " +
                               tokenizer["padding_side"].str() + " (l2c-run pads on the right)";
      encoding.encoders.push_back(entry);
    }
    if (listed.size() != m.components.text_encoders.size() + m.components.tokenizers.size())
      encoders.fail("does not name every text_encoder* and tokenizer* component of the build");
    std::set<std::string> arguments;
    for (const TensorRecord& tensor : m.conditioning) arguments.insert(tensor.argument);
    for (const auto& item : data["components"]["prompt_encoding"]["arrays"].items()) {
      const Fields groups = record["arrays"][item.key()];
      if (!arguments.count(item.key())) groups.fail("names an array the model takes no input of ('model/inputs')");
      std::vector<std::vector<std::string>> made;
      if (groups.size() == 0) groups.fail("is empty; expected token groups of pieces");
      for (size_t g = 0; g < groups.size(); ++g) {
        made.emplace_back();
        if (groups[g].size() == 0) groups[g].fail("is empty; expected pieces");
        for (size_t k = 0; k < groups[g].size(); ++k) {
          const std::string piece = groups[g][k].str();
          const size_t slash = piece.find('/');
          const std::string encoder = piece.substr(0, slash), output = slash == std::string::npos ? "" :
                                                                       piece.substr(slash + 1);
          const auto found = m.components.text_encoders.find(encoder);
          const bool known = found != m.components.text_encoders.end() && listed.count(encoder) &&
                             (output == "attention_mask" ||
                              std::count(found->second.outputs.begin(), found->second.outputs.end(), output));
          if (!known) groups[g][k].fail("is " + piece + ", which no encoder of the build gives");
          made.back().push_back(piece);
        }
      }
      encoding.arrays.emplace_back(item.key(), made);
    }
    m.components.prompt_encoding = encoding;
  }
}

}  // namespace

Manifest Manifest::load(const fs::path& where, bool verify_files) {
  Manifest m;
  if (!fs::exists(where)) throw Error(where.string() + ": no such build folder");
  m.path = fs::is_directory(where) ? where / "manifest.json" : where;
  m.folder = m.path.parent_path();
  const std::string file = m.path.string();
  if (fs::is_symlink(m.path)) throw Error(file + ": is a symbolic link; a build folder holds no links");
  std::ifstream in(m.path);
  if (!in) throw Error(file + ": cannot be read (is " + m.folder.string() + " an l2c-export build?)");
  json data;
  try {
    data = json::parse(in);
  } catch (const json::parse_error& error) {
    throw Error(file + ": not valid JSON (" + error.what() + ")");
  }
  Fields root(data, file);
  // The version first: a newer manifest may have changed any other field.
  m.schema_version = static_cast<int>(root["schema_version"].integer(1));
  if (m.schema_version > kSchemaVersion)
    root.fail("schema_version", "is " + std::to_string(m.schema_version) + ", newer than this l2c runtime reads (" +
                                    std::to_string(kSchemaVersion) + "); upgrade l2c or rebuild the engines");
  if (m.schema_version < kSchemaVersion)
    root.fail("schema_version", "is " + std::to_string(m.schema_version) + ", older than this l2c runtime reads (" +
                                    std::to_string(kSchemaVersion) + ": conditioning inputs named by argument and " +
                                    "kind); rebuild the engines with this l2c-export");
  m.name = root["name"].str();
  m.backend = root["backend"].str();
  if (m.backend != "onnxruntime" && m.backend != "tensorrt") root["backend"].fail("expected onnxruntime or tensorrt");
  m.precision = root["precision"].str();
  if (m.precision != "fp32" && m.precision != "fp16" && m.precision != "bf16")
    root["precision"].fail("expected fp32, fp16 or bf16");

  m.space = root["model"]["space"].str();
  m.document = data.dump();
  if (m.space != "pixel" && m.space != "latent") root["model"]["space"].fail("expected pixel or latent");

  Fields guidance = root["guidance"];
  m.guidance.cfg_scale = guidance["cfg_scale"].number();
  m.guidance.guided_channels = static_cast<int>(guidance["guided_channels"].integer(1, 1 << 20));
  if (guidance.has("sampler_channels") && !guidance["sampler_channels"].is_null())
    m.guidance.sampler_channels = static_cast<int>(guidance["sampler_channels"].integer(1, 1 << 20));
  m.guidance.rule = guidance["rule"].str();
  m.guidance.scale_argument = guidance["scale_argument"].str();
  if (m.guidance.rule != "classifier_free" && m.guidance.rule != "guidance_embedding" && m.guidance.rule != "true_cfg")
    guidance["rule"].fail("is " + m.guidance.rule + "; expected classifier_free, guidance_embedding or true_cfg");
  m.guidance.classifier_free = m.guidance.rule != "guidance_embedding";
  m.guidance.true_cfg = m.guidance.rule == "true_cfg";
  m.latent_layout = root["model"]["latent_layout"].str();
  if (m.latent_layout != "nchw" && m.latent_layout != "packed_2x2" && m.latent_layout != "ncfhw")
    root["model"]["latent_layout"].fail("is " + m.latent_layout + "; expected nchw, packed_2x2 or ncfhw");

  Fields batch = root["batch"];
  m.batch_min = batch["min"].integer(1, 1 << 20);
  m.batch_max = batch["max"].integer(m.batch_min, 1 << 20);

  Fields slots = root["cache_slots"];
  for (size_t i = 0; i < slots.size(); ++i) {
    CacheSlot slot{slots[i]["name"].str(), slots[i]["dtype"].str(), read_shape(slots[i]["shape"], true)};
    if (slot.dtype != "float32" && slot.dtype != "float16" && slot.dtype != "bfloat16")
      slots[i]["dtype"].fail("expected float32, float16 or bfloat16");
    m.cache_slots.push_back(slot);
  }

  m.weights = read_file_record(root["weights"]);
  Fields weights = root["weight_tensors"];
  for (size_t i = 0; i < weights.size(); ++i) {
    Fields w = weights[i];
    WeightTensor tensor{w["name"].str(), w["dtype"].str(), read_shape(w["shape"], false),
                        static_cast<uint64_t>(w["offset"].integer(0)), static_cast<uint64_t>(w["length"].integer(0))};
    int element = tensor.dtype == "float32" ? 4 : (tensor.dtype == "float16" || tensor.dtype == "bfloat16") ? 2 : 0;
    if (element == 0) w["dtype"].fail("expected float32, float16 or bfloat16");
    if (tensor.length != Tensor::count(tensor.shape) * element)
      w["length"].fail("does not match its shape and dtype");
    if (tensor.offset % element != 0)  // each weight is used in place, straight from the memory-mapped file
      w["offset"].fail("is " + std::to_string(tensor.offset) + "; expected a multiple of its dtype's " +
                       std::to_string(element) + " bytes");
    if (tensor.offset + tensor.length > m.weights.bytes)
      w["offset"].fail("reaches past the end of " + m.weights.file + " (" + std::to_string(m.weights.bytes) + " bytes)");
    m.weight_tensors.push_back(tensor);
  }

  Fields subsets = root["subsets"];
  if (subsets.size() == 0) subsets.fail("expected at least one subset");
  for (size_t i = 0; i < subsets.size(); ++i) {
    Fields s = subsets[i];
    SubsetRecord record;
    record.index = static_cast<int>(s["index"].integer(static_cast<int64_t>(i), static_cast<int64_t>(i)));
    record.name = s["name"].str();
    record.compute = read_bool_row(s["compute"]);
    record.graph = read_file_record(s["graph"]);
    record.engine = read_file_record(s["engine"]);
    for (size_t k = 0; k < s["inputs"].size(); ++k) record.inputs.push_back(read_tensor(s["inputs"][k], false));
    for (size_t k = 0; k < s["outputs"].size(); ++k) record.outputs.push_back(read_tensor(s["outputs"][k], true));
    for (const auto* list : {&record.inputs, &record.outputs})
      for (const auto& tensor : *list)
        if (!tensor.slot.empty() &&
            std::none_of(m.cache_slots.begin(), m.cache_slots.end(), [&](auto& c) { return c.name == tensor.slot; }))
          s.fail("names cache slot " + tensor.slot + ", which is not in cache_slots");
    if (m.full_subset < 0 && std::all_of(record.compute.begin(), record.compute.end(), [](bool b) { return b; }))
      m.full_subset = record.index;
    m.subsets.push_back(std::move(record));
  }
  if (m.full_subset < 0) subsets.fail("has no subset that computes every sub-layer (the full-compute engine)");

  // What the model conditions on: the full subset's conditioning inputs, each by its argument and kind.
  const Fields full_inputs = subsets[m.full_subset]["inputs"];
  std::set<std::string> arguments;
  for (const TensorRecord& tensor : m.subsets[m.full_subset].inputs) {
    if (tensor.role != "conditioning") continue;
    m.conditioning.push_back(tensor);
    for (const std::string& argument : {tensor.argument, tensor.negative})
      if (!argument.empty() && !arguments.insert(argument).second)
        full_inputs.fail("names the pipeline argument " + argument + " twice");
    if (tensor.kind == "label") m.takes_labels = true;
    const bool scale_fed = tensor.argument == m.guidance.scale_argument;
    if (scale_fed && tensor.kind != "scalar")
      full_inputs.fail("has " + tensor.name + " fed the guidance scale (" + tensor.argument + "); expected a scalar");
    if (!tensor.negative.empty() && !m.guidance.classifier_free)
      full_inputs.fail("has " + tensor.name + " with a negative partner; guidance rule " + m.guidance.rule +
                       " runs no unconditional half");
  }
  const auto request_fed = std::count_if(m.conditioning.begin(), m.conditioning.end(), [&](const TensorRecord& t) {
    return t.kind != "label" && t.argument != m.guidance.scale_argument;
  });
  if (m.takes_labels == (request_fed > 0) || (m.takes_labels && m.conditioning.size() != 1))
    full_inputs.fail("has no conditioning this runtime feeds; expected one label input, or inputs fed by argument "
                     "name (token embeddings, masks, pooled vectors)");
  if (m.takes_labels) {
    m.guidance.null_class = guidance["null_class"].integer(1, 1 << 30);
    m.num_classes = m.guidance.null_class;  // the labels are 0 .. null_class - 1 (every family's convention)
  }
  check_interfaces(m, subsets, guidance, root["model"]);
  for (const TensorRecord& tensor : m.conditioning) {
    if (tensor.kind == "token_embeddings" || tensor.kind == "pooled") {
      if (tensor.shape.back() < 1)
        full_inputs.fail(tensor.name + " is " + record_shape_string(tensor.shape) + "; expected a size last");
    }
    if (tensor.kind == "token_embeddings" && m.max_prompt_tokens == 0)
      m.max_prompt_tokens = root["model"]["max_sequence_length"].integer(1, 65536);
  }

  // Learned sigma (DiT): model_out carries the variance interpolation values after the eps channels.
  const SubsetRecord& full = m.subsets[m.full_subset];
  const TensorRecord& sample = Manifest::model_tensor(full, "sample"), &output = Manifest::model_tensor(full, "output");
  m.sampler = detail::make_sampler(root["sampler"], output.shape[1] == 2 * sample.shape[1]);

  Fields schedule = root["schedule"], step_subset = schedule["step_subset"];
  if (static_cast<int>(step_subset.size()) != m.sampler->num_model_calls())
    step_subset.fail("has " + std::to_string(step_subset.size()) + " entries; expected one per model call of the " +
                     "sampler (" + std::to_string(m.sampler->num_model_calls()) + ")");
  if (schedule["compute"].size() != step_subset.size())
    schedule["compute"].fail("has " + std::to_string(schedule["compute"].size()) + " rows for " +
                             std::to_string(step_subset.size()) + " steps in 'schedule/step_subset'");
  for (size_t i = 0; i < step_subset.size(); ++i)
    m.step_subset.push_back(static_cast<int>(step_subset[i].integer(0, static_cast<int64_t>(m.subsets.size()) - 1)));
  read_experts(data, root, subsets, m);  // before the schedule's slots: an expert's first call is named as such
  check_consistency(m, subsets, schedule);
  m.ideal_speedup = root["macs"]["ideal_speedup"].number();
  read_components(data, root, m);
  if (root.has("tensorrt") && root["tensorrt"].has("timing_cache"))
    m.other_files.push_back(read_file_record(root["tensorrt"]["timing_cache"]));

  for (const FileRecord& record : m.files()) {
    const fs::path path = m.file_path(record);
    if (!fs::is_regular_file(path))
      throw Error(file + ": file " + record.file + " is missing from " + m.folder.string());
    if (!verify_files) continue;
    const uintmax_t size = fs::file_size(path);
    if (size != record.bytes)
      throw Error(path.string() + ": sha256 cannot match: " + std::to_string(size) + " bytes where the manifest says " +
                  std::to_string(record.bytes) + " (the file was changed after the build)");
    const std::string actual = sha256_file(path);
    if (actual != record.sha256)
      throw Error(path.string() + ": sha256 " + actual + " does not match the manifest's " + record.sha256 +
                  " (the file was changed after the build)");
  }
  return m;
}

fs::path Manifest::file_path(const FileRecord& record) const {
  fs::path at = folder;
  for (const auto& part : fs::path(record.file)) {
    at /= part;
    if (fs::is_symlink(at))
      throw Error(path.string() + ": file " + record.file + " is (or lies in) a symbolic link; a build folder holds "
                  "no links, so nothing outside it is ever read");
  }
  return at;
}

const SubsetRecord& Manifest::subset(int index) const {
  if (index < 0 || index >= static_cast<int>(subsets.size()))
    throw Error(path.string() + ": no subset " + std::to_string(index));
  return subsets[index];
}

const CacheSlot& Manifest::slot(const std::string& slot_name) const {
  for (const auto& slot : cache_slots)
    if (slot.name == slot_name) return slot;
  throw Error(path.string() + ": no cache slot " + slot_name);
}

int Manifest::full_subset_of_call(int call) const {
  return experts ? experts->models.at(experts->step_expert.at(call)).full_subset : full_subset;
}

const TensorRecord& Manifest::model_tensor(const SubsetRecord& subset, const std::string& role) {
  for (const auto* list : {&subset.inputs, &subset.outputs})
    for (const auto& tensor : *list)
      if (tensor.role == role) return tensor;
  throw Error("subset " + subset.name + ": no tensor record with role " + role);
}

std::vector<FileRecord> Manifest::files() const {
  std::vector<FileRecord> all{weights};
  for (const auto& subset : subsets) all.insert(all.end(), {subset.graph, subset.engine});
  all.insert(all.end(), other_files.begin(), other_files.end());
  if (components.vae_decoder)
    all.insert(all.end(), {components.vae_decoder->graph.graph, components.vae_decoder->graph.weights});
  for (const auto& [name, encoder] : components.text_encoders) all.insert(all.end(), {encoder.graph, encoder.weights});
  for (const auto& [name, tokenizer] : components.tokenizers) all.push_back(tokenizer.file);
  std::vector<FileRecord> unique;
  std::set<std::string> seen;
  for (auto& record : all)
    if (seen.insert(record.file).second) unique.push_back(record);
  return unique;
}

namespace {

std::string difference(const json& recorded, const json& built, const std::string& path) {
  if (recorded.is_object() && built.is_object()) {
    std::vector<std::string> keys;
    for (const auto& item : recorded.items()) keys.push_back(item.key());
    for (const auto& item : built.items())
      if (!recorded.contains(item.key())) keys.push_back(item.key());
    std::sort(keys.begin(), keys.end());
    for (const std::string& key : keys) {
      const std::string field = path + "/" + key;
      if (!built.contains(key)) return "field '" + field + "' is not in what the graph was built for";
      if (!recorded.contains(key)) return "field '" + field + "' is missing; the graph was built for " + built[key].dump();
      std::string found = difference(recorded[key], built[key], field);
      if (!found.empty()) return found;
    }
    return "";
  }
  // nlohmann compares integers and floats by value, as the manifest's JSON means them.
  if (recorded != built || recorded.is_boolean() != built.is_boolean())
    return "field '" + path + "' is " + recorded.dump() + "; the graph was built for " + built.dump();
  return "";
}

}  // namespace

std::string stamp_difference(const std::string& manifest, const std::string& stamp) {
  json fields;
  try {
    fields = json::parse(stamp);
  } catch (const json::parse_error&) {
    return std::string("the graph's '") + kGraphStampKey + "' record is not JSON";
  }
  if (!fields.is_object()) return "the graph's stamp is not a JSON object";
  const json document = json::parse(manifest);
  for (const auto& item : fields.items()) {  // nlohmann's objects iterate in key order, as the Python reader does
    json recorded;  // null where the manifest has no such field
    try {
      const json::json_pointer pointer("/" + item.key());
      if (document.contains(pointer)) recorded = document.at(pointer);
    } catch (const json::exception&) {
      return "the graph's stamp names '" + item.key() + "', which is not a manifest field";
    }
    std::string found = difference(recorded, item.value(), item.key());
    if (!found.empty()) return found;
  }
  return "";
}

}  // namespace l2c
