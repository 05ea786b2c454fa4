// l2c-run: samples from an l2c-export build with the C++ runtime, no Python in the process.
//
//   l2c-run ENGINE_DIR --labels 3,1,4 --noise z.npy [--cfg-scale S] [--full] --out samples.npy [--png grid.png]
//   l2c-run ENGINE_DIR --conditioning cond.npz --noise z.npy ...   (a text-conditioned build: PixArt, SD3, FLUX.1)
//   l2c-run ENGINE_DIR --conditioning cond.npz --noise z.npy --cfg-scale S --cfg-scale-2 S2 ...   (Wan2.2's two experts:
//       the second's calls guided with S2, the pipeline's guidance_scale_2)
//   l2c-run ENGINE_DIR ... --seed S ...   (instead of --noise: diffusers' noise for torch.Generator().manual_seed(S))
//   l2c-run ENGINE_DIR --prompt "a red cat" [--prompt ...] [--negative-prompt TEXT] --seed S --png out.png
//       (a build with its text encoders: the prompts through its tokenizers and text encoder graphs; a latent build's
//       samples through its VAE decoder graph into the PNG, as `l2c-export run --prompt ... --out out.png`)
//
// Every failure is one line on stderr ("l2c-run: error: ..."), and the outputs are written only after the whole run
// succeeded, each atomically. Exit status, as the l2c-export commands': 2 bad input (an l2c::Error from the library:
// a flag, file, field or manifest that cannot be used), 3 ONNX Runtime or the asked-for provider is not usable here,
// 4 the file system refused an output, 1 anything else (a failure that is not the input's, e.g. out of memory).
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <iostream>
#include <optional>
#include <sstream>

#include "l2c/components.hpp"
#include "l2c/pipeline.hpp"
#include "l2c/torch_noise.hpp"
#include "png.hpp"

namespace {

std::vector<int64_t> parse_labels(const std::string& text) {
  std::vector<int64_t> labels;
  std::stringstream stream(text);
  std::string part;
  while (std::getline(stream, part, ',')) {
    if (part.find_first_not_of(" ") == std::string::npos) continue;
    try {
      size_t used = 0;
      labels.push_back(std::stoll(part, &used));
      if (part.find_first_not_of(" ", used) != std::string::npos) throw std::invalid_argument(part);
    } catch (const std::exception&) {
      throw l2c::Error("--labels: '" + part + "' is not an integer; expected comma-separated class indices");
    }
  }
  return labels;
}

// One line on stderr, whatever ONNX Runtime's or CLI11's own messages hold; returns `status`.
// --seed as torch.Generator.manual_seed takes it: an integer in -2**63..2**64-1 (a negative one as its two's
// complement, as torch).
uint64_t parse_seed(const std::string& text) {
  const std::string expected = "; expected an integer in -2**63..2**64-1 (what torch.Generator.manual_seed accepts)";
  const bool negative = !text.empty() && text[0] == '-';
  const std::string digits = negative ? text.substr(1) : text;
  if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos)
    throw l2c::Error("--seed: '" + text + "' is not an integer" + expected);
  uint64_t value = 0;
  for (const char c : digits) {
    const uint64_t digit = static_cast<uint64_t>(c - '0');
    if (value > (UINT64_MAX - digit) / 10) throw l2c::Error("--seed: " + text + " is out of range" + expected);
    value = value * 10 + digit;
  }
  if (negative && value > (uint64_t{1} << 63)) throw l2c::Error("--seed: " + text + " is out of range" + expected);
  return negative ? uint64_t{0} - value : value;
}

int fail(int status, std::string message) {
  for (char& c : message)
    if (c == '\n' || c == '\r') c = ' ';
  std::cerr << "l2c-run: error: " << message << std::endl;
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Sample from an l2c-export build with the C++ runtime (ONNX Runtime, no Python)."};
  std::string engine_dir, labels_text, conditioning_path, noise_path, step_noise_path, out_path, png_path, provider = "cpu";
  std::string seed_text;
  std::optional<double> cfg_scale, cfg_scale_2;
  bool full = false;
  int threads = 0;
  app.add_option("engine_dir", engine_dir, "a build's folder (its manifest.json)")->required();
  auto* labels_option = app.add_option("--labels", labels_text, "comma-separated class labels, e.g. 3,1,4 (label models)");
  auto* conditioning_option = app.add_option(
      "--conditioning", conditioning_path,
      ".npz (numpy.savez) of the arrays the manifest's conditioning inputs name (their pipeline arguments) and, to "
      "guide classifier-free, their negative partners (models conditioned on arrays: PixArt, SD3, FLUX.1)");
  labels_option->excludes(conditioning_option);
  std::vector<std::string> prompt_texts;
  std::optional<std::string> negative_prompt;
  auto* prompt_option = app.add_option(
      "--prompt", prompt_texts,
      "a prompt (repeat for several, one sample each), encoded by the build's tokenizers and text encoder graphs "
      "(a build of a diffusers folder with its text encoders: PixArt, SD3, FLUX.1)");
  auto* negative_option = app.add_option("--negative-prompt", negative_prompt,
                                         "with --prompt, when guiding: the unconditional half's text (default: \"\", "
                                         "as the pipelines)");
  prompt_option->excludes(labels_option)->excludes(conditioning_option);

  auto* noise_option =
      app.add_option("--noise", noise_path, ".npy float32 (n, C, H, W) (FLUX.1: packed (n, T, C)): the initial noise");
  auto* seed_option = app.add_option("--seed", seed_text,
                                     "instead of --noise: the initial noise diffusers draws for the n samples with "
                                     "torch.Generator().manual_seed(SEED) (torch's CPU randn, bit for bit)");
  noise_option->excludes(seed_option);
  app.add_option("--step-noise", step_noise_path,
                 ".npy float32 (steps - 1, n, C, H, W): the noise a DDPM build adds after each step but the last");
  app.add_option("--cfg-scale", cfg_scale, "guidance scale (default: the manifest's); > 1 guides");
  app.add_option("--cfg-scale-2", cfg_scale_2,
                 "a build of two experts (Wan2.2): the second's guidance scale, the pipeline's guidance_scale_2 "
                 "(default: --cfg-scale's)");
  app.add_flag("--full", full, "run the full-compute engine at every step instead of the L2C schedule");
  app.add_option("--out", out_path, ".npy float32 (n, C, H, W): the samples");
  app.add_option("--png", png_path,
                 "a grid PNG of the samples (a latent build's decoded by its VAE decoder graph), as l2c-export run "
                 "--out writes it");
  app.add_option("--threads", threads, "ONNX Runtime's intra-op threads (0: one per core)")
      ->check(CLI::Range(0, l2c::kMaxThreads));
  app.add_option("--provider", provider, "cpu, or tensorrt (ONNX Runtime's TensorRT provider)")
      ->check(CLI::IsMember({"cpu", "tensorrt"}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& help) {
    return app.exit(help);
  } catch (const CLI::ParseError& error) {  // a flag that cannot be used: one line, as any other bad input
    return fail(2, error.what());
  }

  try {
    if (negative_prompt && conditioning_option->count())
      throw l2c::Error("--negative-prompt is not used with --conditioning: the conditioning carries its own negative "
                       "arrays; encode the negative prompt into it, or give --prompt instead");
    if (negative_prompt && !prompt_option->count())
      throw l2c::Error("--negative-prompt needs --prompt: it is the text the prompts are guided against");
    if (labels_option->count() + conditioning_option->count() + prompt_option->count() == 0)
      throw l2c::Error("give either --labels (a label model), --conditioning cond.npz or --prompt TEXT (a "
                       "text-conditioned model)");
    if (out_path.empty() && png_path.empty()) throw l2c::Error("give --out samples.npy, --png grid.png or both");
    const std::vector<int64_t> labels = parse_labels(labels_text);
    std::optional<l2c::Prompts> prompts;
    if (!conditioning_path.empty()) prompts = l2c::read_prompts(conditioning_path, "--conditioning " + conditioning_path);
    if (noise_option->count() == seed_option->count())
      throw l2c::Error("give either --noise z.npy or --seed S (the initial noise diffusers draws for that seed)");
    const std::optional<uint64_t> seed = seed_option->count() ? std::optional(parse_seed(seed_text)) : std::nullopt;
    std::optional<l2c::Tensor> read_noise;
    if (!seed) read_noise = l2c::read_npy(noise_path);
    std::optional<l2c::Tensor> step_noise;
    if (!step_noise_path.empty()) step_noise = l2c::read_npy(step_noise_path);
    l2c::Options options;
    options.threads = threads;
    options.provider = provider == "tensorrt" ? l2c::Provider::TensorRT : l2c::Provider::Cpu;
    l2c::Pipeline pipe(engine_dir, options);
    const l2c::Manifest& manifest = pipe.manifest();
    std::optional<l2c::ImageDecoder> decoder;  // made before sampling: a build without one is refused first
    if (!png_path.empty() && manifest.space != "pixel") {
      if (!manifest.components.vae_decoder)
        throw l2c::Error("--png: " + manifest.name + " is a latent model and its build carries no VAE decoder "
                         "(field 'components/vae_decoder' of " + manifest.path.string() + "); write the latents "
                         "with --out");
      decoder.emplace(manifest, options);
    }
    std::cout << engine_dir << ": " << manifest.name << ", " << manifest.subsets.size() << " subset engine(s), "
              << manifest.sampler->num_model_calls() << " " << manifest.sampler->kind() << " steps" << std::endl;
    if (cfg_scale_2 && !manifest.experts)
      throw l2c::Error("--cfg-scale-2: the build " + engine_dir + " has one transformer (field 'experts' is not in " +
                       manifest.path.string() + "), guided by --cfg-scale alone; leave --cfg-scale-2 out");
    const double scale = cfg_scale.value_or(manifest.guidance.cfg_scale);
    const bool guiding = manifest.guidance.classifier_free && scale > 1.0;
    if (prompt_option->count()) {
      if (negative_prompt && !guiding)
        throw l2c::Error("--negative-prompt is not used: no classifier-free batch runs (a --cfg-scale of 1, or a "
                         "guidance-distilled model); leave it out");
      if (!manifest.components.prompt_encoding)
        throw l2c::Error("--prompt: the build " + engine_dir + " carries no text encoders (field "
                         "'components/prompt_encoding' of " + manifest.path.string() + "); give --conditioning "
                         "cond.npz (the encoded prompts) instead, or build from a diffusers folder with its text "
                         "encoders");
      const l2c::PromptEncoder encoder(manifest, options);
      std::string kinds;
      for (const auto& kind : encoder.tokenizer_kinds()) kinds += (kinds.empty() ? "" : ", ") + kind;
      prompts = encoder.encode(prompt_texts, negative_prompt.value_or(""), guiding, "--prompt", "--negative-prompt");
      std::cout << "encoded " << prompt_texts.size() << " prompt(s) (tokenizers: " << kinds << ")" << std::endl;
    }
    l2c::Tensor seeded_noise;
    if (seed) {  // one draw of the whole (n, ...) batch, as diffusers' randn_tensor
      const int64_t n = prompts ? pipe.count_prompts(*prompts) : static_cast<int64_t>(labels.size());
      seeded_noise = l2c::initial_noise(*seed, n, pipe.sample_shape());
    }
    const l2c::Tensor& noise = seed ? seeded_noise : *read_noise;
    l2c::SampleOptions sample_options;
    sample_options.cfg_scale = cfg_scale;
    sample_options.cfg_scale_2 = cfg_scale_2;
    sample_options.full = full;
    sample_options.step_noise = step_noise ? &*step_noise : nullptr;
    const auto start = std::chrono::steady_clock::now();
    const l2c::Tensor samples =
        prompts ? pipe.sample(*prompts, noise, sample_options) : pipe.sample(labels, noise, sample_options);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::cout << (full ? "full compute: " : "L2C schedule: ") << seconds << " s for " << samples.shape[0]
              << " sample(s)" << std::endl;
    // The images before anything is written: both outputs, or neither.
    const l2c::Tensor images = decoder ? decoder->decode(samples) : l2c::Tensor();
    if (!out_path.empty()) {
      l2c::write_npy(out_path, samples);
      std::cout << "wrote " << out_path << std::endl;
    }
    if (!png_path.empty()) {
      // As l2c-export run --out: pixel samples enlarged 8 times; decoded images to 64 px at least (tiny ones).
      const int enlarge = decoder ? std::max<int>(1, static_cast<int>(64 / images.shape[3])) : 8;
      l2c_run::write_png_grid(png_path, decoder ? images : samples, enlarge);
      std::cout << "wrote " << png_path << std::endl;
    }
  } catch (const l2c::UnavailableError& error) {
    return fail(3, error.what());
  } catch (const l2c::FileSystemError& error) {
    return fail(4, error.what());
  } catch (const l2c::Error& error) {
    return fail(2, error.what());
  } catch (const std::exception& error) {
    return fail(1, error.what());
  }
  return 0;
}
