// l2c-run: samples from an l2c-export build with the C++ runtime, no Python in the process.
//
//   l2c-run ENGINE_DIR --labels 3,1,4 --noise z.npy [--cfg-scale S] [--full] --out samples.npy [--png grid.png]
//   l2c-run ENGINE_DIR --conditioning cond.npz --noise z.npy ...   (a text-conditioned build: PixArt, SD3, FLUX.1)
//
// Every failure is one line on stderr ("l2c-run: error: ..."), and the outputs are written only after the whole run
// succeeded, each atomically. Exit status, as the l2c-export commands': 2 bad input (an l2c::Error from the library:
// a flag, file, field or manifest that cannot be used), 3 ONNX Runtime or the asked-for provider is not usable here,
// 4 the file system refused an output, 1 anything else (a failure that is not the input's, e.g. out of memory).
#include <CLI/CLI.hpp>

#include <chrono>
#include <iostream>
#include <sstream>

#include "l2c/pipeline.hpp"
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
  std::optional<double> cfg_scale;
  bool full = false;
  int threads = 0;
  app.add_option("engine_dir", engine_dir, "a build's folder (its manifest.json)")->required();
  auto* labels_option = app.add_option("--labels", labels_text, "comma-separated class labels, e.g. 3,1,4 (label models)");
  auto* conditioning_option = app.add_option(
      "--conditioning", conditioning_path,
      ".npz (numpy.savez) of prompt_embeds with prompt_attention_mask (PixArt), prompt_embeds_mask (Qwen-Image) "
      "or pooled_prompt_embeds (SD3, FLUX.1) and, to guide classifier-free, their negative_ twins "
      "(text-conditioned models)");
  labels_option->excludes(conditioning_option);

  app.add_option("--noise", noise_path, ".npy float32 (n, C, H, W) (FLUX.1: packed (n, T, C)): the initial noise")
      ->required();
  app.add_option("--step-noise", step_noise_path,
                 ".npy float32 (steps - 1, n, C, H, W): the noise a DDPM build adds after each step but the last");
  app.add_option("--cfg-scale", cfg_scale, "guidance scale (default: the manifest's); > 1 guides");
  app.add_flag("--full", full, "run the full-compute engine at every step instead of the L2C schedule");
  app.add_option("--out", out_path, ".npy float32 (n, C, H, W): the samples")->required();
  app.add_option("--png", png_path, "a grid PNG of the samples (pixel-space builds)");
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
    if (labels_option->count() == conditioning_option->count())
      throw l2c::Error("give either --labels (a label model) or --conditioning cond.npz (a text-conditioned model)");
    const std::vector<int64_t> labels = parse_labels(labels_text);
    std::optional<l2c::Prompts> prompts;
    if (!conditioning_path.empty()) prompts = l2c::read_prompts(conditioning_path, "--conditioning " + conditioning_path);
    const l2c::Tensor noise = l2c::read_npy(noise_path);
    std::optional<l2c::Tensor> step_noise;
    if (!step_noise_path.empty()) step_noise = l2c::read_npy(step_noise_path);
    l2c::Options options;
    options.threads = threads;
    options.provider = provider == "tensorrt" ? l2c::Provider::TensorRT : l2c::Provider::Cpu;
    l2c::Pipeline pipe(engine_dir, options);
    const l2c::Manifest& manifest = pipe.manifest();
    if (!png_path.empty() && manifest.space != "pixel")
      throw l2c::Error("--png: " + manifest.name + " is a latent model; its samples need a VAE to become images");
    std::cout << engine_dir << ": " << manifest.name << ", " << manifest.subsets.size() << " subset engine(s), "
              << manifest.sampler->num_model_calls() << " " << manifest.sampler->kind() << " steps" << std::endl;
    l2c::SampleOptions sample_options;
    sample_options.cfg_scale = cfg_scale;
    sample_options.full = full;
    sample_options.step_noise = step_noise ? &*step_noise : nullptr;
    const auto start = std::chrono::steady_clock::now();
    const l2c::Tensor samples =
        prompts ? pipe.sample(*prompts, noise, sample_options) : pipe.sample(labels, noise, sample_options);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::cout << (full ? "full compute: " : "L2C schedule: ") << seconds << " s for " << samples.shape[0]
              << " sample(s)" << std::endl;
    l2c::write_npy(out_path, samples);
    std::cout << "wrote " << out_path << std::endl;
    if (!png_path.empty()) {
      l2c_run::write_png_grid(png_path, samples);
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
