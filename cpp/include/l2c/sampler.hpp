// Samplers: the denoising loop of a build, as its manifest's `sampler` section describes it.
//
// A sampler owns its model calls: DDIM and DDPM make one per step; a sampler that makes two (DPM-Solver-2S) calls the
// model twice per step. The schedule has one row per model call, so the pipeline only answers "run model call k on
// x at timestep t" and never needs to know the sampler. Adding a sampler kind is one class here plus one line in
// `make_sampler` (src/sampler.cpp).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "l2c/tensor.hpp"

namespace l2c {

// One model call: x (n, C, H, W) at model timestep t -> model_out (n, C_out, H, W), guidance already applied.
using ModelCall = std::function<const Tensor&(int call, const Tensor& x, float t)>;

class Sampler {
 public:
  virtual ~Sampler() = default;
  virtual const std::string& kind() const = 0;
  // The schedule's rows: how many times `sample` calls the model.
  virtual int num_model_calls() const = 0;
  // How many noise draws (each like x) the loop adds after the initial noise: DDPM one per step but the last.
  virtual int num_step_noises() const { return 0; }
  // Runs the whole loop on x (n, C, H, W) in place. step_noise: (num_step_noises(), n, C, H, W) or null when none.
  virtual void sample(Tensor& x, const ModelCall& model, const Tensor* step_noise) const = 0;
};

// The respaced Gaussian diffusion of DiT (`create_diffusion(str(N))`): per sampling step the model timestep and the
// float64 coefficient tables, in sampling order (as `l2c_export.samplers.gaussian.GaussianSampler`). DDIM and DDPM differ only in
// `update`.
struct RespacedTables {
  std::vector<double> timesteps, alphas_cumprod, alphas_cumprod_prev, posterior_mean_coef1, posterior_mean_coef2,
      posterior_log_variance_clipped, log_betas, fixed_log_variance;
  bool clip_denoised = false;
  bool learn_sigma = true;  // model_out has 2C channels: eps, then the variance interpolation values in [-1, 1]
};

class OneCallPerStepSampler : public Sampler {
 public:
  explicit OneCallPerStepSampler(RespacedTables tables) : tables_(std::move(tables)) {}
  int num_model_calls() const override { return static_cast<int>(tables_.timesteps.size()); }
  void sample(Tensor& x, const ModelCall& model, const Tensor* step_noise) const override;

 protected:
  // One update x_t -> x_{t-1} at step s, in float32 arithmetic with float64 coefficients rounded to float32, exactly
  // as numpy evaluates the Python sampler. noise: like x (null where the step adds none).
  virtual void update(int s, Tensor& x, const Tensor& model_out, const float* noise) const = 0;
  // x0 prediction (clipped where the tables say) from x and the eps channels of model_out.
  std::vector<float> predict_xstart(int s, const Tensor& x, const Tensor& model_out) const;
  RespacedTables tables_;
};

class DdimSampler : public OneCallPerStepSampler {  // eta = 0, deterministic
 public:
  using OneCallPerStepSampler::OneCallPerStepSampler;
  const std::string& kind() const override;

 protected:
  void update(int s, Tensor& x, const Tensor& model_out, const float* noise) const override;
};

class DdpmSampler : public OneCallPerStepSampler {
 public:
  using OneCallPerStepSampler::OneCallPerStepSampler;
  const std::string& kind() const override;
  int num_step_noises() const override { return num_model_calls() - 1; }

 protected:
  void update(int s, Tensor& x, const Tensor& model_out, const float* noise) const override;
};

// DPM-Solver++ (data prediction), singlestep, order 2 (r1 = 0.5), as Learning-to-Cache samples U-ViT
// (l2c_export.samplers.DPMSolver2S): K steps of two model calls each, at the step's start s and its midpoint s1.
//   x0 = (x - sigma * eps) / alpha                       at each call, with that call's alpha and sigma
//   x_s1 = mid_x * x + mid_x0 * x0_s                      the midpoint call's input
//   x <- out_x * x + out_x0 * x0_s + out_diff * (x0_s1 - x0_s)
// The model sees 1000 * t as a float.
struct DpmSolverTables {
  std::vector<double> times, alphas, sigmas;                  // per call (2K)
  std::vector<double> mid_x, mid_x0, out_x, out_x0, out_diff;  // per step (K)
};

class DpmSolver2SSampler : public Sampler {
 public:
  explicit DpmSolver2SSampler(DpmSolverTables tables) : tables_(std::move(tables)) {}
  const std::string& kind() const override;
  int num_model_calls() const override { return static_cast<int>(tables_.times.size()); }
  void sample(Tensor& x, const ModelCall& model, const Tensor* step_noise) const override;

 private:
  // x0 = (x - sigma * eps) / alpha at model call `call`.
  std::vector<float> predict_x0(int call, const std::vector<float>& x, const Tensor& model_out) const;
  DpmSolverTables tables_;
};

// diffusers' schedulers as its pipelines run them (l2c_export/samplers/diffusers.py: kinds diffusers_ddim and
// diffusers_dpm_multistep): one model call per step at the integer timestep, eta 0, the model output cut to the
// sample's channels (the learned-sigma half dropped) before the step, every coefficient formed in float32 from the
// manifest's float32 tables, operation by operation, as the Python sampler forms it.
// Flow: the velocity of flow matching (DPM-Solver with use_flow_sigmas, as Sana's folders ship it).
enum class Prediction { Epsilon, Sample, VPrediction, Flow };

// DDIMScheduler.step: per step the float32 alphas_cumprod at the timestep and at the previous one.
struct DiffusersDdimTables {
  std::vector<double> timesteps, alphas_cumprod, alphas_cumprod_prev;
  Prediction prediction = Prediction::Epsilon;
  bool clip_sample = false;
  double clip_sample_range = 1.0;
};

class DiffusersDdimSampler : public Sampler {
 public:
  explicit DiffusersDdimSampler(DiffusersDdimTables tables) : tables_(std::move(tables)) {}
  const std::string& kind() const override;
  int num_model_calls() const override { return static_cast<int>(tables_.timesteps.size()); }
  void sample(Tensor& x, const ModelCall& model, const Tensor* step_noise) const override;

 private:
  DiffusersDdimTables tables_;
};

// DPMSolverMultistepScheduler (dpmsolver++, order 1 or 2, midpoint or heun): per step the float32 sigma, the sigma
// after the last step (final_sigma) and the solver order; a second-order step also uses the previous step's x0.
struct DiffusersDpmTables {
  std::vector<double> timesteps, sigmas;
  std::vector<int> orders;
  double final_sigma = 0.0;
  Prediction prediction = Prediction::Epsilon;
  bool heun = false;  // solver_type heun (else midpoint)
  bool flow_sigmas = false;  // use_flow_sigmas: alpha_t = 1 - sigma, sigma_t = sigma
};

class DiffusersDpmMultistepSampler : public Sampler {
 public:
  explicit DiffusersDpmMultistepSampler(DiffusersDpmTables tables);
  const std::string& kind() const override;
  int num_model_calls() const override { return static_cast<int>(tables_.timesteps.size()); }
  void sample(Tensor& x, const ModelCall& model, const Tensor* step_noise) const override;

 private:
  DiffusersDpmTables tables_;
  // Per step, float32: the data prediction's alpha_t and sigma_t, and the update's coefficients.
  std::vector<float> alpha_, sigma_, c_sample_, c_x0_, c_d1_, inv_r0_;
};

// UniPCMultistepScheduler (kind diffusers_unipc; Wan's, l2c_export/samplers/unipc.py): per step the float32 sigma, the
// sigma after the last step and the predictor's order (1-3); the corrector after step i (unless i is in
// disable_corrector) at step i's order. A step converts the model output into a data prediction (predict_x0; else a
// noise prediction) at the sample the model saw, corrects that sample, then predicts the next:
//   x_next = c_x * x - c_m0 * m0 - c_b * (sum_k rhos[k] * (m_k - m0) / rks[k]  [+ rhos.back() * (m_t - m0)])
// c_x, c_m0, c_b and rks in float32 as diffusers forms them, the rhos in float64 (solve_small), rounded to float32.
struct DiffusersUniPcTables {
  std::vector<double> timesteps, sigmas;
  std::vector<int> orders;
  std::vector<bool> corrector_after;  // per step: whether the next step starts with the corrector
  double final_sigma = 0.0;
  Prediction prediction = Prediction::Epsilon;
  int solver_order = 2;
  bool predict_x0 = true;
  bool bh1 = false;          // solver_type bh1 (else bh2)
  bool flow_sigmas = false;  // use_flow_sigmas: alpha_t = 1 - sigma, sigma_t = sigma
};

class DiffusersUniPcSampler : public Sampler {
 public:
  explicit DiffusersUniPcSampler(DiffusersUniPcTables tables);
  const std::string& kind() const override;
  int num_model_calls() const override { return static_cast<int>(tables_.timesteps.size()); }
  void sample(Tensor& x, const ModelCall& model, const Tensor* step_noise) const override;
  // The first step whose predictor (or the corrector after it) has no finite update (diffusers gives NaN or
  // infinity there), or -1.
  int first_infinite_step() const { return first_infinite_step_; }

  struct Update {
    float c_x = 0.0f, c_m0 = 0.0f, c_b = 0.0f;
    std::vector<float> rks, rhos;
  };

 private:
  Update make_update(int s0, int order, bool corrector) const;
  std::vector<float> convert(int s, const Tensor& x, const Tensor& out) const;
  DiffusersUniPcTables tables_;
  std::vector<float> alpha_, sigma_t_, lambdas_;  // per sigma (steps and final), float32
  std::vector<double> lambdas64_;
  std::vector<Update> predictor_, corrector_;  // per step; corrector_[i]: the one after step i
  int first_infinite_step_ = -1;
};

// FlowMatchEulerDiscreteScheduler (kind diffusers_flow_match_euler; SD3/3.5, FLUX.1): deterministic Euler on the
// velocity, x + (sigma_next - sigma) * v in float32 (sigma after the last step 0), the model given the float32 timestep
// sigma * num_train_timesteps (the manifest's model_times).
struct DiffusersFlowMatchTables {
  std::vector<double> model_times, sigmas;
};

class DiffusersFlowMatchEulerSampler : public Sampler {
 public:
  explicit DiffusersFlowMatchEulerSampler(DiffusersFlowMatchTables tables);
  const std::string& kind() const override;
  int num_model_calls() const override { return static_cast<int>(tables_.sigmas.size()); }
  void sample(Tensor& x, const ModelCall& model, const Tensor* step_noise) const override;

 private:
  DiffusersFlowMatchTables tables_;
  std::vector<float> dt_;  // per step, float32: sigma_next - sigma
};

}  // namespace l2c
