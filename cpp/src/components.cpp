// The build's components, as l2c_export/runtime/components.py runs them: PromptEncoder (StackEncoder, PromptEncoder
// and core/text_stack.py's combine) and ImageDecoder. Their graphs run on the process-wide ONNX Runtime environment
// the subset sessions use.
#include "l2c/components.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "onnxruntime_env.hpp"
#include "preprocessing.hpp"
#include "tokenizer.hpp"

namespace l2c {

namespace fs = std::filesystem;

namespace {

// A component's graph, its weights beside it, checked to take and give the record's names (as the Python runtime's
// _component_session).
Ort::Session open_component(const Manifest& m, const ComponentGraph& record, const Options& options) {
  Ort::Env& env = detail::onnxruntime_env(options.onnxruntime_library, options.threads);
  Ort::SessionOptions session_options;
  session_options.SetGraphOptimizationLevel(ORT_ENABLE_EXTENDED);
  session_options.DisablePerSessionThreads();
  session_options.AddConfigEntry("session.use_env_allocators", "1");
  const fs::path file = m.file_path(record.graph);
  try {
    Ort::Session session(env, file.c_str(), session_options);
    Ort::AllocatorWithDefaultOptions allocator;
    for (bool outputs : {false, true}) {
      std::vector<std::string> names;
      const size_t count = outputs ? session.GetOutputCount() : session.GetInputCount();
      for (size_t i = 0; i < count; ++i)
        names.push_back((outputs ? session.GetOutputNameAllocated(i, allocator)
                                 : session.GetInputNameAllocated(i, allocator)).get());
      const std::vector<std::string>& recorded = outputs ? record.outputs : record.inputs;
      if (names != recorded) {
        std::string got, want;
        for (const auto& name : names) got += (got.empty() ? "" : ", ") + name;
        for (const auto& name : recorded) want += (want.empty() ? "" : ", ") + name;
        throw Error(m.path.string() + ": field 'components/" + record.name + "/" + (outputs ? "outputs" : "inputs") +
                    "' names " + want + "; the graph " + file.filename().string() + " has " + got);
      }
    }
    return session;
  } catch (const Ort::Exception& error) {
    throw Error(file.string() + ": ONNX Runtime cannot load it: " + error.what());
  }
}

// Runs `session` on `inputs` (by the record's input names) and returns its outputs as float32 tensors.
std::vector<Tensor> run_component(Ort::Session& session, const ComponentGraph& record,
                                  std::vector<Ort::Value>& inputs) {
  std::vector<const char*> input_names, output_names;
  for (const auto& name : record.inputs) input_names.push_back(name.c_str());
  for (const auto& name : record.outputs) output_names.push_back(name.c_str());
  std::vector<Ort::Value> values;
  try {
    values = session.Run(Ort::RunOptions{nullptr}, input_names.data(), inputs.data(), inputs.size(),
                         output_names.data(), output_names.size());
  } catch (const Ort::Exception& error) {
    throw Error("components/" + record.name + ": ONNX Runtime failed: " + error.what());
  }
  std::vector<Tensor> outputs;
  for (auto& value : values) {
    auto info = value.GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      throw Error("components/" + record.name + ": an output is not float32");
    Tensor tensor(info.GetShape());
    const float* data = value.GetTensorData<float>();
    std::copy(data, data + tensor.size(), tensor.data.begin());
    outputs.push_back(std::move(tensor));
  }
  return outputs;
}

// Where a text is not a prompt at all (as l2c_export/runtime/components.py check_prompt): not UTF-8, too long, or (but
// where `allow_empty`) only whitespace: the refusal, else "".
std::string refused_prompt(const std::string& text, bool allow_empty) {
  if (text.size() > kMaxPromptBytes)
    return std::to_string(text.size()) + " bytes; expected a prompt of at most " + std::to_string(kMaxPromptBytes) +
           " bytes (the model reads at most its max_sequence_length tokens of it)";
  for (size_t i = 0; i < text.size();) {  // UTF-8: each sequence's length from its lead byte, no overlong forms
    const auto byte = static_cast<unsigned char>(text[i]);
    const size_t length = byte < 0x80            ? 1
                          : (byte >> 5) == 0x6   ? 2
                          : (byte >> 4) == 0xe   ? 3
                          : (byte >> 3) == 0x1e  ? 4
                                                 : 0;
    bool valid = length != 0 && i + length <= text.size() && !(byte == 0xc0 || byte == 0xc1) && byte <= 0xf4;
    for (size_t k = 1; valid && k < length; ++k) valid = (static_cast<unsigned char>(text[i + k]) >> 6) == 0x2;
    if (valid && length == 3) {
      const auto second = static_cast<unsigned char>(text[i + 1]);
      valid = !(byte == 0xe0 && second < 0xa0) && !(byte == 0xed && second >= 0xa0);  // overlong, surrogates
    }
    if (valid && length == 4) {
      const auto second = static_cast<unsigned char>(text[i + 1]);
      valid = !(byte == 0xf0 && second < 0x90) && !(byte == 0xf4 && second >= 0x90);
    }
    if (!valid) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "0x%02x", byte);
      return "not UTF-8 text (byte " + std::to_string(i) + ": " + hex + "); expected a UTF-8 prompt";
    }
    i += length;
  }
  // Python's str.strip on ASCII: the space, \t \n \v \f \r and U+001C..U+001F
  if (!allow_empty && text.find_first_not_of(" \t\n\v\f\r\x1c\x1d\x1e\x1f") == std::string::npos)
    return "empty prompt; expected some text";
  return "";
}

// core/text_stack.py combine: a group's pieces concatenated on their last axis; where the last group is (N, L, D),
// every group zero-padded on channels to its width; the groups concatenated on axis 1 (tokens; a pooled group's
// channels, one group).
Tensor combine(const std::vector<std::vector<std::string>>& groups, const std::map<std::string, Tensor>& pieces) {
  std::vector<Tensor> made;
  for (const auto& group : groups) {
    const Tensor& first = pieces.at(group[0]);
    std::vector<int64_t> shape = first.shape;
    shape.back() = 0;
    for (const auto& piece : group) shape.back() += pieces.at(piece).shape.back();
    Tensor joined(shape);
    const size_t rows = joined.size() / static_cast<size_t>(shape.back());
    size_t offset = 0;
    for (const auto& piece : group) {
      const Tensor& part = pieces.at(piece);
      const size_t width = static_cast<size_t>(part.shape.back());
      for (size_t r = 0; r < rows; ++r)
        std::copy_n(part.data.begin() + r * width, width, joined.data.begin() + r * shape.back() + offset);
      offset += width;
    }
    made.push_back(std::move(joined));
  }
  const bool hidden = made.back().shape.size() == 3;
  const int64_t n = made.back().shape[0], width = made.back().shape.back();
  std::vector<int64_t> shape = made.back().shape;
  shape[1] = 0;
  for (const Tensor& part : made) shape[1] += part.shape[1];
  Tensor result(shape);
  const int64_t inner = hidden ? width : 1;  // elements per position of axis 1 in the result
  int64_t at = 0;
  for (const Tensor& part : made) {
    const int64_t length = part.shape[1], part_width = hidden ? part.shape[2] : 1;
    for (int64_t b = 0; b < n; ++b)
      for (int64_t t = 0; t < length; ++t)
        std::copy_n(part.data.begin() + (b * length + t) * part_width, part_width,
                    result.data.begin() + (b * shape[1] + at + t) * inner);  // the rest stays zero: the padding
    at += length;
  }
  return result;
}

}  // namespace

struct PromptEncoder::Impl {
  struct Encoder {
    PromptEncodingRecord::Encoder entry;
    ComponentGraph graph;
    std::unique_ptr<detail::Tokenizer> tokenizer;
    mutable Ort::Session session{nullptr};
  };
  PromptEncodingRecord record;
  std::map<std::string, std::string> negatives;  // argument -> its negative partner (where it has one)
  std::vector<Encoder> encoders;

  // `text` checked (refused_prompt) and preprocessed as the record says: the text the tokenizers read. l2c::Error
  // naming `where` for a text refused, by the checks, the preprocessing, or a tokenizer that would read the
  // preprocessed text otherwise than `tokenizers`.
  std::string prepare(const std::string& text, bool allow_empty, const std::string& where) const {
    std::string refused = refused_prompt(text, allow_empty);
    if (!refused.empty()) throw Error(where + ": " + refused);
    const std::string prepared = detail::preprocess_prompt(text, record.preprocessing, where);
    for (const Encoder& encoder : encoders)
      if (refused.empty()) refused = encoder.tokenizer->refusal(prepared);
    if (!refused.empty())
      throw Error(where + ": " + refused + (prepared == text ? "" : " (in the text as the build's " +
                                                                        record.preprocessing + " rewrites it)"));
    return prepared;
  }

  std::map<std::string, Tensor> embed(const std::vector<std::string>& texts) const {
    std::map<std::string, Tensor> pieces;
    const int64_t n = static_cast<int64_t>(texts.size());
    for (const Encoder& encoder : encoders) {
      std::vector<int64_t> ids, mask;
      for (const std::string& text : texts) encoder.tokenizer->encode(text, ids, mask);
      const int64_t length = encoder.entry.max_length;
      const std::vector<int64_t> shape{n, length};
      Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
      std::vector<Ort::Value> inputs;
      inputs.push_back(Ort::Value::CreateTensor<int64_t>(cpu, ids.data(), ids.size(), shape.data(), shape.size()));
      if (encoder.entry.masked)
        inputs.push_back(Ort::Value::CreateTensor<int64_t>(cpu, mask.data(), mask.size(), shape.data(), shape.size()));
      std::vector<Tensor> outputs = run_component(encoder.session, encoder.graph, inputs);
      if (encoder.entry.selection == "zeroed_past_prompt")  // each row's tokens past its prompt's zeroed (Wan's)
        for (Tensor& output : outputs) {
          if (output.shape.size() != 3) continue;
          const int64_t width = output.shape[2];
          for (int64_t b = 0; b < n; ++b) {
            const int64_t kept = std::count(mask.begin() + b * length, mask.begin() + (b + 1) * length, int64_t{1});
            std::fill(output.data.begin() + (b * length + kept) * width, output.data.begin() + (b + 1) * length * width,
                      0.0f);
          }
        }
      for (size_t i = 0; i < outputs.size(); ++i)
        pieces[encoder.entry.encoder + "/" + encoder.graph.outputs[i]] = std::move(outputs[i]);
      Tensor mask_piece(shape);
      std::transform(mask.begin(), mask.end(), mask_piece.data.begin(), [](int64_t v) { return float(v); });
      pieces[encoder.entry.encoder + "/attention_mask"] = std::move(mask_piece);
    }
    std::map<std::string, Tensor> arrays;
    for (const auto& [name, groups] : record.arrays) arrays[name] = combine(groups, pieces);
    return arrays;
  }
};

PromptEncoder::PromptEncoder(const Manifest& manifest, const Options& options) : impl_(std::make_unique<Impl>()) {
  if (!manifest.components.prompt_encoding)
    throw Error(manifest.path.string() + ": the build carries no text encoders (field 'components/prompt_encoding' "
                "is missing: a folder without its text encoders builds without them); give --conditioning "
                "cond.npz (the encoded prompts) instead");
  impl_->record = *manifest.components.prompt_encoding;
  if (!impl_->record.unsupported.empty())
    throw Error(manifest.path.string() + ": " + impl_->record.unsupported + ": not done by l2c-run's prompt encoding "
                "yet; give --conditioning cond.npz (the encoded prompts, e.g. from l2c-export's Python runtime) "
                "instead");
  for (const TensorRecord& tensor : manifest.conditioning)
    if (!tensor.negative.empty()) impl_->negatives[tensor.argument] = tensor.negative;
  detail::onnxruntime_env(options.onnxruntime_library, options.threads);  // loaded before the tokenizer library
  for (const auto& entry : impl_->record.encoders) {
    const TokenizerRecord& tokenizer = manifest.components.tokenizers.at(entry.tokenizer);
    Impl::Encoder encoder{entry, manifest.components.text_encoders.at(entry.encoder), nullptr};
    encoder.tokenizer = std::make_unique<detail::Tokenizer>(
        manifest.file_path(tokenizer.file), manifest.file_path(tokenizer.file).string() + " (components/" +
        entry.tokenizer + ")", tokenizer.pad_id, entry.max_length);
    encoder.session = open_component(manifest, encoder.graph, options);
    impl_->encoders.push_back(std::move(encoder));
  }
}

PromptEncoder::~PromptEncoder() = default;

std::vector<std::string> PromptEncoder::tokenizer_kinds() const {
  std::vector<std::string> kinds;
  for (const auto& encoder : impl_->encoders) kinds.push_back(encoder.tokenizer->kind());
  return kinds;
}

Prompts PromptEncoder::encode(const std::vector<std::string>& prompts, const std::string& negative_prompt,
                              bool guiding, const std::string& where, const std::string& negative_where) const {
  if (prompts.empty()) throw Error(where + ": expected one or more prompts");
  std::vector<std::string> texts;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::string named = prompts.size() > 1 ? where + " " + std::to_string(i + 1) : where;
    texts.push_back(impl_->prepare(prompts[i], false, named));
  }
  const std::string negative = guiding ? impl_->prepare(negative_prompt, true, negative_where) : "";
  Prompts request;
  request.source = where;
  for (auto& [name, array] : impl_->embed(texts)) request.set(name, std::move(array));
  if (guiding) {
    const std::vector<std::string> negatives(prompts.size(), negative);
    for (auto& [name, array] : impl_->embed(negatives))
      if (impl_->negatives.count(name)) request.set(impl_->negatives.at(name), std::move(array));
  }
  return request;
}

struct ImageDecoder::Impl {
  VaeDecoderRecord record;
  mutable Ort::Session session{nullptr};
};

ImageDecoder::ImageDecoder(const Manifest& manifest, const Options& options) : impl_(std::make_unique<Impl>()) {
  if (!manifest.components.vae_decoder)
    throw Error(manifest.path.string() + ": the build carries no VAE decoder (field 'components/vae_decoder' is "
                "missing: a folder without vae/ builds without one); write the latents with --out");
  impl_->record = *manifest.components.vae_decoder;
  if (impl_->record.latent_layout == "ncfhw")
    throw Error(manifest.path.string() + ": field 'components/vae_decoder/latent_layout' is ncfhw: a video build's "
                "clips are not decoded by l2c-run yet; write the latents with --out (l2c-export run --out clip.gif "
                "decodes them)");
  impl_->session = open_component(manifest, impl_->record.graph, options);
}

ImageDecoder::~ImageDecoder() = default;

Tensor ImageDecoder::decode(const Tensor& latents) const {
  const VaeDecoderRecord& record = impl_->record;
  const std::vector<int64_t>& input = record.graph.input_shapes[0];  // (batch, C, h, w)
  const int64_t n = latents.shape.empty() ? 0 : latents.shape[0], c = input[1], h = input[2], w = input[3];
  Tensor scaled({n, c, h, w});
  if (static_cast<int64_t>(latents.size()) != n * c * h * w)
    throw Error("latents " + latents.shape_string() + ": expected " + std::to_string(c * h * w) +
                " values per sample for the VAE decoder (" + shape_string({n, c, h, w}) + ")");
  if (record.latent_layout == "packed_2x2") {  // (n, (h/2)(w/2), 4 C) -> (n, C, h, w), core/latents.py
    for (int64_t b = 0; b < n; ++b)
      for (int64_t ch = 0; ch < c; ++ch)
        for (int64_t y = 0; y < h; ++y)
          for (int64_t x = 0; x < w; ++x)
            scaled.data[((b * c + ch) * h + y) * w + x] =
                latents.data[(b * (h / 2) * (w / 2) + (y / 2) * (w / 2) + x / 2) * 4 * c + ch * 4 + (y % 2) * 2 +
                             x % 2];
  } else {
    scaled.data = latents.data;
  }
  const float scaling = static_cast<float>(record.scaling_factor);
  for (float& v : scaled.data) v = v / scaling;
  if (record.shift_factor) {
    const float shift = static_cast<float>(*record.shift_factor);
    for (float& v : scaled.data) v = v + shift;
  }
  Ort::MemoryInfo cpu = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
  std::vector<Ort::Value> inputs;
  inputs.push_back(Ort::Value::CreateTensor<float>(cpu, scaled.data.data(), scaled.size(), scaled.shape.data(),
                                                   scaled.shape.size()));
  return std::move(run_component(impl_->session, record.graph, inputs)[0]);
}

std::vector<uint8_t> to_uint8(const Tensor& images) {
  const int64_t n = images.shape[0], c = images.shape[1], h = images.shape[2], w = images.shape[3];
  std::vector<uint8_t> bytes(images.size());
  for (int64_t b = 0; b < n; ++b)
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x) {
          float v = images.data[((b * c + ch) * h + y) * w + x];
          v = (v + 1.0f) * 127.5f + 0.5f;
          v = std::isnan(v) ? 0.0f : std::min(std::max(v, 0.0f), 255.0f);  // numpy's clip, then a truncating cast
          bytes[((b * h + y) * w + x) * c + ch] = static_cast<uint8_t>(v);
        }
  return bytes;
}

}  // namespace l2c
