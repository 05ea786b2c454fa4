#include "l2c/sampler.hpp"

#include <algorithm>
#include <cmath>

#include "l2c/error.hpp"
#include "sampler_factory.hpp"

namespace l2c {

void OneCallPerStepSampler::sample(Tensor& x, const ModelCall& model, const Tensor* step_noise) const {
  const size_t per_step = x.size();
  for (int s = 0; s < num_model_calls(); ++s) {
    const Tensor& model_out = model(s, x, static_cast<float>(tables_.timesteps[s]));
    const float* noise = nullptr;
    if (step_noise != nullptr && s < num_step_noises()) noise = step_noise->data.data() + per_step * s;
    update(s, x, model_out, noise);
  }
}

std::vector<float> OneCallPerStepSampler::predict_xstart(int s, const Tensor& x, const Tensor& model_out) const {
  const int64_t n = x.shape[0], plane = static_cast<int64_t>(x.size()) / n;  // plane: C*H*W
  const int64_t out_plane = static_cast<int64_t>(model_out.size()) / n;
  const double alpha_bar = tables_.alphas_cumprod[s];
  const float sqrt_recip = static_cast<float>(std::sqrt(1.0 / alpha_bar));
  const float sqrt_recipm1 = static_cast<float>(std::sqrt(1.0 / alpha_bar - 1.0));
  std::vector<float> xstart(x.size());
  for (int64_t b = 0; b < n; ++b)
    for (int64_t i = 0; i < plane; ++i) {
      const float eps = model_out.data[b * out_plane + i];  // the eps channels lead model_out
      float value = sqrt_recip * x.data[b * plane + i] - sqrt_recipm1 * eps;
      if (tables_.clip_denoised) value = std::min(1.0f, std::max(-1.0f, value));
      xstart[b * plane + i] = value;
    }
  return xstart;
}

const std::string& DdimSampler::kind() const {
  static const std::string name = "ddim";
  return name;
}

void DdimSampler::update(int s, Tensor& x, const Tensor& model_out, const float*) const {
  const std::vector<float> xstart = predict_xstart(s, x, model_out);
  const double alpha_bar = tables_.alphas_cumprod[s], alpha_bar_prev = tables_.alphas_cumprod_prev[s];
  const float sqrt_recip = static_cast<float>(std::sqrt(1.0 / alpha_bar));
  const float sqrt_recipm1 = static_cast<float>(std::sqrt(1.0 / alpha_bar - 1.0));
  const float coef_xstart = static_cast<float>(std::sqrt(alpha_bar_prev));
  const float coef_eps = static_cast<float>(std::sqrt(1.0 - alpha_bar_prev));
  for (size_t i = 0; i < x.size(); ++i) {
    // eps re-derived from the (possibly clipped) x0 prediction, as DiT's ddim_sample (eta 0).
    const float eps = (sqrt_recip * x.data[i] - xstart[i]) / sqrt_recipm1;
    x.data[i] = xstart[i] * coef_xstart + coef_eps * eps;
  }
}

const std::string& DdpmSampler::kind() const {
  static const std::string name = "ddpm";
  return name;
}

void DdpmSampler::update(int s, Tensor& x, const Tensor& model_out, const float* noise) const {
  const std::vector<float> xstart = predict_xstart(s, x, model_out);
  const float coef1 = static_cast<float>(tables_.posterior_mean_coef1[s]);
  const float coef2 = static_cast<float>(tables_.posterior_mean_coef2[s]);
  const bool last = s == num_model_calls() - 1;
  if (!last && noise == nullptr)
    throw Error("the DDPM sampler needs step noise at every step but the last; none was given for step " +
                std::to_string(s));
  const int64_t n = x.shape[0], plane = static_cast<int64_t>(x.size()) / n;
  const int64_t out_plane = static_cast<int64_t>(model_out.size()) / n;
  const float min_log = static_cast<float>(tables_.posterior_log_variance_clipped[s]);
  const float max_log = static_cast<float>(tables_.log_betas[s]);
  const float fixed_std = static_cast<float>(std::exp(0.5 * tables_.fixed_log_variance[s]));
  for (int64_t b = 0; b < n; ++b)
    for (int64_t i = 0; i < plane; ++i) {
      const int64_t at = b * plane + i;
      const float mean = coef1 * xstart[at] + coef2 * x.data[at];
      if (last) {
        x.data[at] = mean;
        continue;
      }
      float std_dev = fixed_std;
      if (tables_.learn_sigma) {
        // LEARNED_RANGE: the log variance interpolated between the clipped posterior's and beta's.
        const float frac = (model_out.data[b * out_plane + plane + i] + 1.0f) / 2.0f;
        std_dev = std::exp(0.5f * (frac * max_log + (1.0f - frac) * min_log));
      }
      x.data[at] = mean + std_dev * noise[at];
    }
}

namespace detail {

std::shared_ptr<const Sampler> make_sampler(const Fields& section, bool learn_sigma) {
  const std::string kind = section["kind"].str();
  const size_t steps = static_cast<size_t>(section["num_steps"].integer(1, 1 << 20));
  RespacedTables tables;
  tables.learn_sigma = learn_sigma;
  tables.clip_denoised = section["clip_denoised"].boolean();
  for (size_t i = 0; i < section["timesteps"].size(); ++i)
    tables.timesteps.push_back(static_cast<double>(section["timesteps"][i].integer(0, 999)));
  if (tables.timesteps.size() != steps)
    section["timesteps"].fail("has " + std::to_string(tables.timesteps.size()) + " entries; expected num_steps (" +
                              std::to_string(steps) + ")");
  const std::pair<const char*, std::vector<double>*> named[] = {
      {"alphas_cumprod", &tables.alphas_cumprod},
      {"alphas_cumprod_prev", &tables.alphas_cumprod_prev},
      {"posterior_mean_coef1", &tables.posterior_mean_coef1},
      {"posterior_mean_coef2", &tables.posterior_mean_coef2},
      {"posterior_log_variance_clipped", &tables.posterior_log_variance_clipped},
      {"log_betas", &tables.log_betas},
      {"fixed_log_variance", &tables.fixed_log_variance}};
  for (const auto& [name, table] : named) *table = section[name].numbers(steps);
  for (size_t s = 0; s < steps; ++s) {
    if (!(tables.alphas_cumprod[s] > 0.0 && tables.alphas_cumprod[s] < 1.0))
      section["alphas_cumprod"][s].fail("expected a value in (0, 1)");
    if (!(tables.alphas_cumprod_prev[s] > 0.0 && tables.alphas_cumprod_prev[s] <= 1.0))
      section["alphas_cumprod_prev"][s].fail("expected a value in (0, 1]");
    for (const char* log_table : {"posterior_log_variance_clipped", "log_betas", "fixed_log_variance"})
      if (section[log_table][s].number() > 0.0) section[log_table][s].fail("expected a log variance, at most 0");
  }
  if (kind == "ddim") return std::make_shared<DdimSampler>(std::move(tables));
  if (kind == "ddpm") return std::make_shared<DdpmSampler>(std::move(tables));
  section["kind"].fail("is " + kind + "; this l2c runtime knows ddim and ddpm");
}

}  // namespace detail
}  // namespace l2c
