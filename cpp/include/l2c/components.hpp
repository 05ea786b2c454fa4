// What a build carries beside the subset engines (the manifest's `components`), as the Python runtime runs them
// (l2c_export/runtime/components.py): prompts to the conditioning arrays, sampled latents to images.
//
//   l2c::Pipeline pipe("engines/pixart");
//   l2c::PromptEncoder encoder(pipe.manifest());                         // tokenizers + text encoder graphs
//   l2c::Prompts prompts = encoder.encode({"a red cat"}, "", true);      // with the negative prompt's arrays
//   l2c::Tensor latents = pipe.sample(prompts, l2c::initial_noise(seed, 1, pipe.sample_shape()));
//   l2c::Tensor images = l2c::ImageDecoder(pipe.manifest()).decode(latents);   // (n, 3, H, W), about [-1, 1]
//
// Neither is thread-safe: one call at a time on each (the tokenizer library's API is not thread-safe).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "l2c/manifest.hpp"
#include "l2c/pipeline.hpp"
#include "l2c/tensor.hpp"

namespace l2c {

// The longest prompt, in UTF-8 bytes (l2c_export/runtime/components.py MAX_PROMPT_BYTES).
constexpr size_t kMaxPromptBytes = 16 * 1024;

// Prompts -> the conditioning arrays by the pipelines' argument names, as the manifest's components/prompt_encoding
// says (l2c_export/core/text_stack.py): each prompt preprocessed (PixArt's lower_strip, Wan's prompt_clean),
// tokenized by each encoder's tokenizer (onnxruntime-extensions' tokenizer: T5's Unigram and CLIP's BPE
// tokenizer.json; WordLevel ones read by the runtime), encoded by its graph (Wan's rows past each prompt zeroed), the
// outputs combined into the arrays. l2c::Error from the constructor for a build without text encoders, or a
// tokenizer of another kind; l2c::UnavailableError where the tokenizer library is missing.
class PromptEncoder {
 public:
  explicit PromptEncoder(const Manifest& manifest, const Options& options = {});
  ~PromptEncoder();
  PromptEncoder(const PromptEncoder&) = delete;
  PromptEncoder& operator=(const PromptEncoder&) = delete;

  // One request's arrays for `prompts` and, when `guiding` (a classifier-free batch runs), the negative prompt's
  // under the negative partners' names (one negative for every prompt, "" as the pipelines' default). Each text is
  // checked as the Python runtime checks it (UTF-8, at most kMaxPromptBytes, a prompt not empty), preprocessed as
  // the build says (refused where the preprocessing is not done as in Python: non-ASCII text where the build
  // lower-cases prompts, PixArt; for Wan's prompt_clean, what Python refuses without ftfy) and, where the C++
  // tokenizer would read the preprocessed text otherwise than `tokenizers`, refused: control characters (tabs,
  // newlines), whitespace other than the space. Errors name `where` ("prompt", "prompt 2") or `negative_where`.
  Prompts encode(const std::vector<std::string>& prompts, const std::string& negative_prompt, bool guiding,
                 const std::string& where = "prompt", const std::string& negative_where = "negative prompt") const;

  // The tokenizers' kinds in encoder order, e.g. {"unigram (T5)"}.
  std::vector<std::string> tokenizer_kinds() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Latents (n, *sample shape) -> the VAE decoder's images (n, 3, H, W), about [-1, 1]: latents / scaling_factor +
// shift_factor (FLUX.1's packed (n, T, 4 C) unpacked to (n, C, h, w) first), as the pipelines decode before
// image_processor.postprocess. l2c::Error from the constructor for a build without a VAE decoder.
class ImageDecoder {
 public:
  explicit ImageDecoder(const Manifest& manifest, const Options& options = {});
  ~ImageDecoder();
  ImageDecoder(const ImageDecoder&) = delete;
  ImageDecoder& operator=(const ImageDecoder&) = delete;

  Tensor decode(const Tensor& latents) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// (n, C, H, W) in [-1, 1] -> (n, H, W, C) bytes, as l2c_export/core/images.py to_uint8: clip((x + 1) 127.5 + 0.5).
std::vector<uint8_t> to_uint8(const Tensor& images);

}  // namespace l2c
