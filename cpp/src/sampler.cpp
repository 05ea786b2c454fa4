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

const std::string& DpmSolver2SSampler::kind() const {
  static const std::string name = "dpm_solver_2s";
  return name;
}

std::vector<float> DpmSolver2SSampler::predict_x0(int call, const std::vector<float>& x, const Tensor& model_out) const {
  const int64_t n = model_out.shape[0], plane = static_cast<int64_t>(x.size()) / n;
  const int64_t out_plane = static_cast<int64_t>(model_out.size()) / n;
  const float sigma = static_cast<float>(tables_.sigmas[call]), alpha = static_cast<float>(tables_.alphas[call]);
  std::vector<float> x0(x.size());
  for (int64_t b = 0; b < n; ++b)
    for (int64_t i = 0; i < plane; ++i)
      x0[b * plane + i] = (x[b * plane + i] - sigma * model_out.data[b * out_plane + i]) / alpha;
  return x0;
}

void DpmSolver2SSampler::sample(Tensor& x, const ModelCall& model, const Tensor*) const {
  Tensor x_s1(x.shape);
  for (size_t k = 0; k < tables_.mid_x.size(); ++k) {
    const int start = static_cast<int>(2 * k), middle = start + 1;
    // The model output is only valid until the next call: x0_s is taken from it first.
    const std::vector<float> x0_s = predict_x0(start, x.data, model(start, x, static_cast<float>(tables_.times[start] * 1000.0)));
    const float mid_x = static_cast<float>(tables_.mid_x[k]), mid_x0 = static_cast<float>(tables_.mid_x0[k]);
    for (size_t i = 0; i < x.size(); ++i) x_s1.data[i] = mid_x * x.data[i] + mid_x0 * x0_s[i];
    const std::vector<float> x0_s1 =
        predict_x0(middle, x_s1.data, model(middle, x_s1, static_cast<float>(tables_.times[middle] * 1000.0)));
    const float out_x = static_cast<float>(tables_.out_x[k]), out_x0 = static_cast<float>(tables_.out_x0[k]);
    const float out_diff = static_cast<float>(tables_.out_diff[k]);
    for (size_t i = 0; i < x.size(); ++i)
      x.data[i] = out_x * x.data[i] + out_x0 * x0_s[i] + out_diff * (x0_s1[i] - x0_s[i]);
  }
}

namespace {

// The scheduler's model output: model_out (n, C or 2C, H, W) cut to its leading C channels, the sample's (a learned
// sigma half dropped, as DiTPipeline and the PixArt pipelines do before `step`). Returns the row stride.
int64_t scheduler_output_stride(const Tensor& x, const Tensor& model_out) {
  const int64_t n = x.shape[0], plane = static_cast<int64_t>(x.size()) / n;
  const int64_t out_plane = static_cast<int64_t>(model_out.size()) / n;
  if (out_plane != plane && out_plane != 2 * plane)
    throw Error("the model output has " + std::to_string(out_plane) + " values per sample; the diffusers scheduler "
                "expects the sample's " + std::to_string(plane) + " (or twice that, with a learned sigma)");
  return out_plane;
}

}  // namespace

const std::string& DiffusersDdimSampler::kind() const {
  static const std::string name = "diffusers_ddim";
  return name;
}

void DiffusersDdimSampler::sample(Tensor& x, const ModelCall& model, const Tensor*) const {
  const int64_t n = x.shape[0], plane = static_cast<int64_t>(x.size()) / n;
  const float limit = static_cast<float>(tables_.clip_sample_range);
  for (int s = 0; s < num_model_calls(); ++s) {
    const Tensor& out = model(s, x, static_cast<float>(tables_.timesteps[s]));
    const int64_t stride = scheduler_output_stride(x, out);
    const float alpha = static_cast<float>(tables_.alphas_cumprod[s]);
    const float alpha_prev = static_cast<float>(tables_.alphas_cumprod_prev[s]);
    const float sqrt_alpha = std::sqrt(alpha), sqrt_beta = std::sqrt(1.0f - alpha);
    const float sqrt_alpha_prev = std::sqrt(alpha_prev), sqrt_beta_prev = std::sqrt(1.0f - alpha_prev);
    for (int64_t b = 0; b < n; ++b)
      for (int64_t i = 0; i < plane; ++i) {
        float& value = x.data[b * plane + i];
        const float m = out.data[b * stride + i];
        float x0, eps;
        if (tables_.prediction == Prediction::Epsilon) {
          x0 = (value - sqrt_beta * m) / sqrt_alpha;
          eps = m;
        } else if (tables_.prediction == Prediction::Sample) {
          x0 = m;
          eps = (value - sqrt_alpha * x0) / sqrt_beta;
        } else {
          x0 = sqrt_alpha * value - sqrt_beta * m;
          eps = sqrt_alpha * m + sqrt_beta * value;
        }
        if (tables_.clip_sample) x0 = std::min(limit, std::max(-limit, x0));
        value = sqrt_alpha_prev * x0 + sqrt_beta_prev * eps;
      }
  }
}

namespace {

// float32 log and exp rounded from float64, as the Python sampler's _log32/_exp32 (glibc's logf/expf).
float log32(float value) { return static_cast<float>(std::log(static_cast<double>(value))); }
float exp32(float value) { return static_cast<float>(std::exp(static_cast<double>(value))); }
float expm1_32(float value) { return static_cast<float>(std::expm1(static_cast<double>(value))); }

// Half log-SNR in float64 of a float32 sigma (+inf at 0), as unipc.py's _lambda64.
double lambda64(double sigma, bool flow) {
  const double alpha = flow ? 1.0 - sigma : 1.0 / std::sqrt(sigma * sigma + 1.0);
  const double sigma_t = flow ? sigma : sigma * alpha;
  return sigma_t == 0.0 ? INFINITY : std::log(alpha) - std::log(sigma_t);
}

// matrix x = vector for 2 x 2 or 3 x 3: Gaussian elimination with partial pivoting (the first largest pivot) in
// float64, rounded to float32; NaN where a pivot is zero or not finite (unipc.py's solve_small, line for line).
std::vector<float> solve_small(std::vector<std::vector<double>> a, const std::vector<double>& vector) {
  const size_t n = vector.size();
  for (size_t i = 0; i < n; ++i) a[i].push_back(vector[i]);
  for (size_t col = 0; col < n; ++col) {
    size_t pivot = col;
    for (size_t r = col + 1; r < n; ++r)
      if (std::fabs(a[r][col]) > std::fabs(a[pivot][col])) pivot = r;
    std::swap(a[col], a[pivot]);
    if (a[col][col] == 0.0 || !std::isfinite(a[col][col])) return std::vector<float>(n, NAN);
    for (size_t row = col + 1; row < n; ++row) {
      const double factor = a[row][col] / a[col][col];
      for (size_t k = col; k <= n; ++k) a[row][k] -= factor * a[col][k];
    }
  }
  std::vector<double> x(n, 0.0);
  for (size_t row = n; row-- > 0;) {
    double total = a[row][n];
    for (size_t k = row + 1; k < n; ++k) total -= a[row][k] * x[k];
    x[row] = total / a[row][row];
  }
  return std::vector<float>(x.begin(), x.end());
}

}  // namespace

DiffusersDpmMultistepSampler::DiffusersDpmMultistepSampler(DiffusersDpmTables tables) : tables_(std::move(tables)) {
  const size_t count = tables_.timesteps.size();
  std::vector<float> alphas, sigmas_t, lambdas;
  for (size_t i = 0; i <= count; ++i) {
    const float sigma = static_cast<float>(i < count ? tables_.sigmas[i] : tables_.final_sigma);
    const float alpha = tables_.flow_sigmas ? 1.0f - sigma : 1.0f / std::sqrt(sigma * sigma + 1.0f);
    const float sigma_t = tables_.flow_sigmas ? sigma : sigma * alpha;
    alphas.push_back(alpha);
    sigmas_t.push_back(sigma_t);
    lambdas.push_back(log32(alpha) - log32(sigma_t));  // +inf at sigma 0
  }
  alpha_.assign(alphas.begin(), alphas.end() - 1);
  sigma_.assign(sigmas_t.begin(), sigmas_t.end() - 1);
  c_sample_.assign(count, 0.0f);
  c_x0_.assign(count, 0.0f);
  c_d1_.assign(count, 0.0f);
  inv_r0_.assign(count, 0.0f);
  for (size_t i = 0; i < count; ++i) {
    const float h = lambdas[i + 1] - lambdas[i];
    const float phi = alphas[i + 1] * (exp32(-h) - 1.0f);
    c_sample_[i] = sigmas_t[i + 1] / sigmas_t[i];
    c_x0_[i] = phi;
    if (tables_.orders[i] == 2) {
      inv_r0_[i] = 1.0f / ((lambdas[i] - lambdas[i - 1]) / h);
      c_d1_[i] = tables_.heun ? alphas[i + 1] * ((exp32(-h) - 1.0f) / h + 1.0f) : 0.5f * phi;
    }
  }
}

const std::string& DiffusersDpmMultistepSampler::kind() const {
  static const std::string name = "diffusers_dpm_multistep";
  return name;
}

void DiffusersDpmMultistepSampler::sample(Tensor& x, const ModelCall& model, const Tensor*) const {
  const int64_t n = x.shape[0], plane = static_cast<int64_t>(x.size()) / n;
  std::vector<float> x0(x.size()), previous;
  for (int s = 0; s < num_model_calls(); ++s) {
    const Tensor& out = model(s, x, static_cast<float>(tables_.timesteps[s]));
    const int64_t stride = scheduler_output_stride(x, out);
    const float alpha = alpha_[s], sigma = sigma_[s];
    for (int64_t b = 0; b < n; ++b)  // convert_model_output: the data prediction
      for (int64_t i = 0; i < plane; ++i) {
        const float value = x.data[b * plane + i], m = out.data[b * stride + i];
        x0[b * plane + i] = tables_.prediction == Prediction::Epsilon ? (value - sigma * m) / alpha
                            : tables_.prediction == Prediction::Sample ? m
                            : tables_.prediction == Prediction::Flow   ? value - sigma * m
                                                                       : alpha * value - sigma * m;
      }
    const bool second_order = tables_.orders[s] == 2 && !previous.empty();
    for (size_t i = 0; i < x.size(); ++i) {
      float update = c_sample_[s] * x.data[i] - c_x0_[s] * x0[i];
      if (second_order) {
        const float d1 = inv_r0_[s] * (x0[i] - previous[i]);
        update = tables_.heun ? update + c_d1_[s] * d1 : update - c_d1_[s] * d1;
      }
      x.data[i] = update;
    }
    previous = x0;
  }
}

DiffusersUniPcSampler::DiffusersUniPcSampler(DiffusersUniPcTables tables) : tables_(std::move(tables)) {
  const size_t count = tables_.timesteps.size();
  for (size_t i = 0; i <= count; ++i) {
    const float sigma = static_cast<float>(i < count ? tables_.sigmas[i] : tables_.final_sigma);
    const float alpha = tables_.flow_sigmas ? 1.0f - sigma : 1.0f / std::sqrt(sigma * sigma + 1.0f);
    const float sigma_t = tables_.flow_sigmas ? sigma : sigma * alpha;
    alpha_.push_back(alpha);
    sigma_t_.push_back(sigma_t);
    lambdas_.push_back(log32(alpha) - log32(sigma_t));  // +inf at sigma 0
    lambdas64_.push_back(lambda64(static_cast<double>(sigma), tables_.flow_sigmas));
  }
  auto finite = [](const Update& u) {
    bool ok = std::isfinite(u.c_x) && std::isfinite(u.c_m0) && std::isfinite(u.c_b);
    for (float rho : u.rhos) ok = ok && std::isfinite(rho);
    for (float rk : u.rks) ok = ok && rk != 0.0f && !std::isnan(rk);  // an infinite rk only zeroes its difference
    return ok;
  };
  for (size_t i = 0; i < count; ++i) {
    predictor_.push_back(make_update(static_cast<int>(i), tables_.orders[i], false));
    const bool corrects = i + 1 < count && tables_.corrector_after[i];
    corrector_.push_back(corrects ? make_update(static_cast<int>(i), tables_.orders[i], true) : Update());
    if (first_infinite_step_ < 0 && (!finite(predictor_.back()) || (corrects && !finite(corrector_.back()))))
      first_infinite_step_ = static_cast<int>(i);
  }
}

DiffusersUniPcSampler::Update DiffusersUniPcSampler::make_update(int s0, int order, bool corrector) const {
  const int t = s0 + 1;
  Update u;
  const float h = lambdas_[t] - lambdas_[s0];
  for (int k = 1; k < order; ++k) u.rks.push_back((lambdas_[s0 - k] - lambdas_[s0]) / h);
  const float hh = tables_.predict_x0 ? -h : h;
  const float h_phi_1 = expm1_32(hh);
  const float b_h = tables_.bh1 ? hh : expm1_32(hh);
  const float scale = tables_.predict_x0 ? alpha_[t] : sigma_t_[t];
  const std::vector<float>& other = tables_.predict_x0 ? sigma_t_ : alpha_;
  u.c_x = other[t] / other[s0];
  u.c_m0 = scale * h_phi_1;
  u.c_b = scale * b_h;
  if (order == 1) {
    if (corrector) u.rhos = {0.5f};
    return u;
  }
  if (order == 2 && !corrector) {
    u.rhos = {0.5f};
    return u;
  }
  // The weights from the float64 recursion h_phi_k = h_phi_{k-1} / hh - 1 / k! and R rhos = b.
  const double h64 = lambdas64_[t] - lambdas64_[s0];
  std::vector<double> columns;
  for (int k = 1; k < order; ++k) columns.push_back((lambdas64_[s0 - k] - lambdas64_[s0]) / h64);
  columns.push_back(1.0);
  const double hh64 = tables_.predict_x0 ? -h64 : h64;
  const double h_phi_1_64 = std::expm1(hh64);
  double h_phi_k = h_phi_1_64 / hh64 - 1.0;
  const double b_h64 = tables_.bh1 ? hh64 : h_phi_1_64;
  std::vector<double> b;
  double factorial = 1.0;
  for (int i = 1; i <= order; ++i) {
    b.push_back(h_phi_k * factorial / b_h64);
    factorial *= i + 1;
    h_phi_k = h_phi_k / hh64 - 1.0 / factorial;
  }
  std::vector<std::vector<double>> powers(order);
  for (int p = 0; p < order; ++p)
    for (double r : columns) powers[p].push_back(p == 0 ? 1.0 : p == 1 ? r : r * r);
  if (!corrector) {  // the predictor's system leaves out the last row and column
    powers.pop_back();
    for (auto& row : powers) row.pop_back();
    b.pop_back();
  }
  u.rhos = solve_small(powers, b);
  return u;
}

const std::string& DiffusersUniPcSampler::kind() const {
  static const std::string name = "diffusers_unipc";
  return name;
}

std::vector<float> DiffusersUniPcSampler::convert(int s, const Tensor& x, const Tensor& out) const {
  const int64_t n = x.shape[0], plane = static_cast<int64_t>(x.size()) / n;
  const int64_t stride = scheduler_output_stride(x, out);
  const float alpha = alpha_[s], sigma = sigma_t_[s];
  std::vector<float> converted(x.size());
  for (int64_t b = 0; b < n; ++b)
    for (int64_t i = 0; i < plane; ++i) {
      const float value = x.data[b * plane + i], m = out.data[b * stride + i];
      float result;
      if (tables_.predict_x0) {
        result = tables_.prediction == Prediction::Epsilon ? (value - sigma * m) / alpha
                 : tables_.prediction == Prediction::Sample ? m
                 : tables_.prediction == Prediction::Flow   ? value - sigma * m
                                                            : alpha * value - sigma * m;
      } else {
        result = tables_.prediction == Prediction::Epsilon ? m
                 : tables_.prediction == Prediction::Sample ? (value - alpha * m) / sigma
                                                            : alpha * m + sigma * value;
      }
      converted[b * plane + i] = result;
    }
  return converted;
}

namespace {

// x_next = c_x * x - c_m0 * m0 - c_b * (sum_k rhos[k] * (m_k - m0) / rks[k] [+ rhos.back() * (m_t - m0)]), each
// operation rounded as numpy rounds the Python sampler's. outputs[k]: m_k (outputs[0] is m0); m_t: null for the
// predictor.
void apply_uni_update(const DiffusersUniPcSampler::Update& u, std::vector<float>& x,
                      const std::vector<std::vector<float>>& outputs, const std::vector<float>* m_t) {
  const std::vector<float>& m0 = outputs[0];
  const size_t differences = u.rks.size();
  const bool any = differences > 0 || m_t != nullptr;
  for (size_t i = 0; i < x.size(); ++i) {
    float next = u.c_x * x[i] - u.c_m0 * m0[i];
    if (any) {
      float total = 0.0f;
      for (size_t k = 0; k < differences; ++k) {
        const float term = u.rhos[k] * ((outputs[k + 1][i] - m0[i]) / u.rks[k]);
        total = k == 0 ? term : total + term;
      }
      if (m_t != nullptr) {
        const float term = u.rhos.back() * ((*m_t)[i] - m0[i]);
        total = differences == 0 ? term : total + term;
      }
      next = next - u.c_b * total;
    }
    x[i] = next;
  }
}

}  // namespace

void DiffusersUniPcSampler::sample(Tensor& x, const ModelCall& model, const Tensor*) const {
  std::vector<std::vector<float>> outputs;  // the converted model outputs, most recent first
  std::vector<float> last;                  // the sample the previous step's predictor started from
  for (int s = 0; s < num_model_calls(); ++s) {
    std::vector<float> converted = convert(s, x, model(s, x, static_cast<float>(tables_.timesteps[s])));
    if (s > 0 && tables_.corrector_after[s - 1]) {  // the corrected sample replaces the one the model saw
      x.data = last;
      apply_uni_update(corrector_[s - 1], x.data, outputs, &converted);
    }
    outputs.insert(outputs.begin(), std::move(converted));
    if (outputs.size() > static_cast<size_t>(tables_.solver_order)) outputs.pop_back();
    last = x.data;
    apply_uni_update(predictor_[s], x.data, outputs, nullptr);
  }
}

DiffusersFlowMatchEulerSampler::DiffusersFlowMatchEulerSampler(DiffusersFlowMatchTables tables)
    : tables_(std::move(tables)) {
  const size_t count = tables_.sigmas.size();
  for (size_t i = 0; i < count; ++i) {
    const float next = i + 1 < count ? static_cast<float>(tables_.sigmas[i + 1]) : 0.0f;
    dt_.push_back(next - static_cast<float>(tables_.sigmas[i]));
  }
}

const std::string& DiffusersFlowMatchEulerSampler::kind() const {
  static const std::string name = "diffusers_flow_match_euler";
  return name;
}

void DiffusersFlowMatchEulerSampler::sample(Tensor& x, const ModelCall& model, const Tensor*) const {
  const int64_t n = x.shape[0], plane = static_cast<int64_t>(x.size()) / n;
  for (int s = 0; s < num_model_calls(); ++s) {
    const Tensor& out = model(s, x, static_cast<float>(tables_.model_times[s]));
    const int64_t stride = scheduler_output_stride(x, out);
    const float dt = dt_[s];
    for (int64_t b = 0; b < n; ++b)
      for (int64_t i = 0; i < plane; ++i) {
        const float step = dt * out.data[b * stride + i];  // rounded before the add, as numpy does
        x.data[b * plane + i] = x.data[b * plane + i] + step;
      }
  }
}

namespace detail {

namespace {

std::shared_ptr<const Sampler> make_dpm_solver_2s(const Fields& section) {
  const size_t calls = section["times"].size();
  if (calls < 2 || calls % 2) section["times"].fail("has " + std::to_string(calls) + " entries; expected an even "
                                                    "number of model calls, at least 2 (two per solver step)");
  DpmSolverTables tables;
  tables.times = section["times"].numbers(calls);
  tables.alphas = section["alphas"].numbers(calls);
  tables.sigmas = section["sigmas"].numbers(calls);
  for (size_t c = 0; c < calls; ++c) {
    if (!(tables.times[c] > 0.0 && tables.times[c] <= 1.0)) section["times"][c].fail("expected a time in (0, 1]");
    if (!(tables.alphas[c] > 0.0 && tables.alphas[c] <= 1.0)) section["alphas"][c].fail("expected a value in (0, 1]");
    if (!(tables.sigmas[c] > 0.0 && tables.sigmas[c] < 1.0)) section["sigmas"][c].fail("expected a value in (0, 1)");
  }
  const std::pair<const char*, std::vector<double>*> per_step[] = {{"mid_x", &tables.mid_x},
                                                                   {"mid_x0", &tables.mid_x0},
                                                                   {"out_x", &tables.out_x},
                                                                   {"out_x0", &tables.out_x0},
                                                                   {"out_diff", &tables.out_diff}};
  for (const auto& [name, table] : per_step) *table = section[name].numbers(calls / 2);
  if (section.has("num_calls") && section["num_calls"].integer() != static_cast<int64_t>(calls))
    section["num_calls"].fail("expected " + std::to_string(calls) + ", one per entry of 'times'");
  return std::make_shared<DpmSolver2SSampler>(std::move(tables));
}


// The option `name` of a diffusers sampler section (options/NAME), which must be one of `supported`.
std::string diffusers_choice(const Fields& section, const std::string& name, const std::vector<std::string>& supported) {
  const Fields option = section["options"][name];
  std::string value;
  if (option.is_string()) value = option.str();
  else if (option.is_boolean()) value = option.boolean() ? "true" : "false";
  else if (option.is_integer()) value = std::to_string(option.integer());
  std::string listed;
  for (const std::string& choice : supported) {
    if (value == choice) return value;
    listed += (listed.empty() ? "" : ", ") + choice;
  }
  option.fail("is not one this l2c runtime implements; supported: " + listed);
}

// options/prediction_type; `flow`: the sampler takes flow_prediction too (DPM-Solver with use_flow_sigmas).
Prediction diffusers_prediction(const Fields& section, bool flow = false) {
  const std::string type = flow ? diffusers_choice(section, "prediction_type",
                                                   {"epsilon", "sample", "v_prediction", "flow_prediction"})
                                : diffusers_choice(section, "prediction_type", {"epsilon", "sample", "v_prediction"});
  return type == "epsilon" ? Prediction::Epsilon : type == "sample" ? Prediction::Sample
         : type == "flow_prediction"                ? Prediction::Flow
                                                    : Prediction::VPrediction;
}

// num_calls, num_inference_steps, timesteps (integers in 0..num_train_timesteps - 1) and model_times (the same) of a
// diffusers sampler section.
std::vector<double> diffusers_timesteps(const Fields& section) {
  const int64_t train = section["options"]["num_train_timesteps"].integer(2, 1000);
  const size_t calls = static_cast<size_t>(section["num_calls"].integer(1, train));
  section["num_inference_steps"].integer(1, train);
  if (section["timesteps"].size() != calls)
    section["timesteps"].fail("has " + std::to_string(section["timesteps"].size()) + " entries; expected num_calls (" +
                              std::to_string(calls) + ")");
  std::vector<double> timesteps;
  for (size_t i = 0; i < calls; ++i) timesteps.push_back(static_cast<double>(section["timesteps"][i].integer(0, train - 1)));
  const std::vector<double> model_times = section["model_times"].numbers(calls);
  if (model_times != timesteps) section["model_times"].fail("differs from 'timesteps'; the model sees the scheduler's timestep");
  return timesteps;
}

std::shared_ptr<const Sampler> make_diffusers_ddim(const Fields& section) {
  DiffusersDdimTables tables;
  tables.timesteps = diffusers_timesteps(section);
  const size_t calls = tables.timesteps.size();
  tables.prediction = diffusers_prediction(section);
  tables.clip_sample = section["options"]["clip_sample"].boolean();
  tables.clip_sample_range = section["options"]["clip_sample_range"].number();
  if (!(tables.clip_sample_range > 0.0)) section["options"]["clip_sample_range"].fail("expected a number > 0");
  diffusers_choice(section, "thresholding", {"false"});
  tables.alphas_cumprod = section["alphas_cumprod"].numbers(calls);
  tables.alphas_cumprod_prev = section["alphas_cumprod_prev"].numbers(calls);
  for (size_t s = 0; s < calls; ++s) {
    if (!(tables.alphas_cumprod[s] > 0.0 && tables.alphas_cumprod[s] <= 1.0))
      section["alphas_cumprod"][s].fail("expected a value in (0, 1]");
    if (!(tables.alphas_cumprod_prev[s] > 0.0 && tables.alphas_cumprod_prev[s] <= 1.0))
      section["alphas_cumprod_prev"][s].fail("expected a value in (0, 1]");
  }
  return std::make_shared<DiffusersDdimSampler>(std::move(tables));
}

std::shared_ptr<const Sampler> make_diffusers_dpm_multistep(const Fields& section) {
  DiffusersDpmTables tables;
  tables.timesteps = diffusers_timesteps(section);
  const size_t calls = tables.timesteps.size();
  tables.prediction = diffusers_prediction(section, true);
  tables.flow_sigmas = section["options"]["use_flow_sigmas"].boolean();
  if (tables.flow_sigmas != (tables.prediction == Prediction::Flow))
    section["options"]["prediction_type"].fail(tables.flow_sigmas
                                                   ? "is not flow_prediction; use_flow_sigmas goes with it only"
                                                   : "is flow_prediction; it goes with use_flow_sigmas true only");
  diffusers_choice(section, "algorithm_type", {"dpmsolver++"});
  diffusers_choice(section, "thresholding", {"false"});
  tables.heun = diffusers_choice(section, "solver_type", {"midpoint", "heun"}) == "heun";
  const int order = std::stoi(diffusers_choice(section, "solver_order", {"1", "2"}));
  tables.sigmas = section["sigmas"].numbers(calls);
  tables.final_sigma = section["final_sigma"].number();
  for (size_t s = 0; s < calls; ++s) {
    if (!(tables.sigmas[s] > 0.0)) section["sigmas"][s].fail("expected a sigma > 0");
    if (tables.flow_sigmas && !(tables.sigmas[s] < 1.0))
      section["sigmas"][s].fail("expected a flow sigma below 1 (alpha_t = 1 - sigma)");
    if (s > 0 && !(tables.sigmas[s] < tables.sigmas[s - 1]))
      section["sigmas"][s].fail("expected the steps' sigmas strictly decreasing (a step divides by the log ratio of "
                                "the last two)");
    tables.orders.push_back(static_cast<int>(section["orders"][s].integer(1, order)));
  }
  if (section["orders"].size() != calls)
    section["orders"].fail("has " + std::to_string(section["orders"].size()) + " entries; expected " + std::to_string(calls));
  if (!(tables.final_sigma >= 0.0 && tables.final_sigma <= tables.sigmas.back()))
    section["final_sigma"].fail("expected a sigma in [0, the last step's sigma]");
  if (tables.orders[0] != 1) section["orders"][0].fail("expected 1 (the first step has no history)");
  if (calls > 1 && tables.orders.back() == 2 &&
      (tables.final_sigma == 0.0 || (tables.final_sigma == tables.sigmas.back() && tables.heun)))
    section["orders"][calls - 1].fail("is 2 onto final sigma " + std::to_string(tables.final_sigma) +
                                      ", which has no finite update; expected 1");
  return std::make_shared<DiffusersDpmMultistepSampler>(std::move(tables));
}

std::shared_ptr<const Sampler> make_diffusers_unipc(const Fields& section) {
  DiffusersUniPcTables tables;
  tables.timesteps = diffusers_timesteps(section);
  const size_t calls = tables.timesteps.size();
  const Fields options = section["options"];
  tables.prediction = diffusers_prediction(section, true);
  tables.flow_sigmas = options["use_flow_sigmas"].boolean();
  if (tables.flow_sigmas != (tables.prediction == Prediction::Flow))
    options["prediction_type"].fail(tables.flow_sigmas ? "is not flow_prediction; use_flow_sigmas goes with it only"
                                                       : "is flow_prediction; it goes with use_flow_sigmas true only");
  tables.predict_x0 = options["predict_x0"].boolean();
  if (tables.prediction == Prediction::Flow && !tables.predict_x0)
    options["predict_x0"].fail("is false with flow_prediction; expected true (the data prediction)");
  for (const char* option : {"thresholding", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                             "use_dynamic_shifting"})
    diffusers_choice(section, option, {"false"});
  if (!options["solver_p"].is_null()) options["solver_p"].fail("is not one this l2c runtime implements; expected null");
  tables.bh1 = diffusers_choice(section, "solver_type", {"bh1", "bh2"}) == "bh1";
  tables.solver_order = std::stoi(diffusers_choice(section, "solver_order", {"1", "2", "3"}));
  tables.corrector_after.assign(calls, true);
  const Fields disabled = options["disable_corrector"];
  for (size_t i = 0; i < disabled.size(); ++i) {
    const int64_t step = disabled[i].integer(0);
    if (step < static_cast<int64_t>(calls)) tables.corrector_after[step] = false;
  }
  tables.sigmas = section["sigmas"].numbers(calls);
  tables.final_sigma = section["final_sigma"].number();
  if (section["orders"].size() != calls)
    section["orders"].fail("has " + std::to_string(section["orders"].size()) + " entries; expected " +
                           std::to_string(calls));
  for (size_t s = 0; s < calls; ++s) {
    if (!(tables.sigmas[s] > 0.0)) section["sigmas"][s].fail("expected a sigma > 0");
    if (tables.flow_sigmas && !(tables.sigmas[s] < 1.0))
      section["sigmas"][s].fail("expected a flow sigma below 1 (alpha_t = 1 - sigma)");
    if (s > 0 && !(tables.sigmas[s] < tables.sigmas[s - 1]))
      section["sigmas"][s].fail("expected the steps' sigmas strictly decreasing (a step divides by the log ratio of "
                                "the last two)");
    const int64_t most = std::min<int64_t>(tables.solver_order, static_cast<int64_t>(s) + 1);
    tables.orders.push_back(static_cast<int>(section["orders"][s].integer(1, most)));
  }
  if (!(tables.final_sigma >= 0.0 && tables.final_sigma <= tables.sigmas.back()))
    section["final_sigma"].fail("expected a sigma in [0, the last step's sigma]");
  auto sampler = std::make_shared<DiffusersUniPcSampler>(std::move(tables));
  if (const int step = sampler->first_infinite_step(); step >= 0)
    section["orders"][step].fail("gives step " + std::to_string(step) + " no finite update (diffusers gives NaN or "
                                 "infinity); expected solver_type bh2, predict_x0 and lower order onto a final "
                                 "sigma of zero");
  return sampler;
}

std::shared_ptr<const Sampler> make_diffusers_flow_match_euler(const Fields& section) {
  const int64_t train = section["options"]["num_train_timesteps"].integer(2, 1000);
  const size_t calls = static_cast<size_t>(section["num_calls"].integer(1, train));
  section["num_inference_steps"].integer(1, train);
  for (const char* option : {"invert_sigmas", "stochastic_sampling", "use_karras_sigmas", "use_exponential_sigmas",
                             "use_beta_sigmas"})
    diffusers_choice(section, option, {"false"});
  DiffusersFlowMatchTables tables;
  tables.sigmas = section["sigmas"].numbers(calls);
  tables.model_times = section["model_times"].numbers(calls);
  for (size_t s = 0; s < calls; ++s) {
    if (!(tables.sigmas[s] > 0.0 && tables.sigmas[s] <= 1.0)) section["sigmas"][s].fail("expected a sigma in (0, 1]");
    if (s > 0 && !(tables.sigmas[s] < tables.sigmas[s - 1]))
      section["sigmas"][s].fail("expected the steps' sigmas strictly decreasing");
    const float time = static_cast<float>(tables.sigmas[s]) * static_cast<float>(train);
    if (tables.model_times[s] != static_cast<double>(time))
      section["model_times"][s].fail("differs from sigmas * num_train_timesteps (float32); the model sees the "
                                     "scheduler's timestep");
  }
  if (section["final_sigma"].number() != 0.0) section["final_sigma"].fail("expected 0");
  return std::make_shared<DiffusersFlowMatchEulerSampler>(std::move(tables));
}

}  // namespace

std::shared_ptr<const Sampler> make_sampler(const Fields& section, bool learn_sigma) {
  const std::string kind = section["kind"].str();
  if (kind == "dpm_solver_2s") return make_dpm_solver_2s(section);
  if (kind == "diffusers_ddim") return make_diffusers_ddim(section);
  if (kind == "diffusers_dpm_multistep") return make_diffusers_dpm_multistep(section);
  if (kind == "diffusers_flow_match_euler") return make_diffusers_flow_match_euler(section);
  if (kind == "diffusers_unipc") return make_diffusers_unipc(section);
  if (kind != "ddim" && kind != "ddpm")
    section["kind"].fail("is " + kind + "; this l2c runtime knows ddim, ddpm, dpm_solver_2s, diffusers_ddim, "
                         "diffusers_dpm_multistep, diffusers_flow_match_euler and diffusers_unipc");
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
  return std::make_shared<DdpmSampler>(std::move(tables));
}

}  // namespace detail
}  // namespace l2c
