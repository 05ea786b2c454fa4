"""Samplers: DiT's respacing, DDIM and DDPM updates, learned sigma."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l2c_export.samplers.gaussian import GaussianSampler, linear_betas, space_timesteps


def test_ddim20_timesteps_are_the_authors():
    timesteps = GaussianSampler.create("ddim", 20).timesteps.tolist()
    assert len(timesteps) == 20
    assert timesteps[:3] == [999, 946, 894]
    assert timesteps[-3:] == [105, 53, 0]
    assert timesteps == sorted(timesteps, reverse=True)


def test_ddim50_timesteps_are_the_authors():
    timesteps = GaussianSampler.create("ddim", 50).timesteps.tolist()
    assert len(set(timesteps)) == 50
    # stride 999/49 = 20.388: round(20.39) = 20, round(40.78) = 41, round(61.16) = 61, round(81.55) = 82.
    assert timesteps[-5:] == [82, 61, 41, 20, 0]
    assert timesteps[0] == 999


def test_space_timesteps_keeps_everything_at_full_length():
    assert space_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError, match="1001 steps"):
        space_timesteps(1000, 1001)


def test_respaced_alphas_are_those_of_the_kept_timesteps():
    sampler = GaussianSampler.create("ddpm", 20)
    alphas_cumprod = np.cumprod(1 - linear_betas())
    np.testing.assert_allclose(sampler.alphas_cumprod, alphas_cumprod[sampler.timesteps])
    np.testing.assert_allclose(sampler.alphas_cumprod_prev[:-1], alphas_cumprod[sampler.timesteps[1:]])
    assert sampler.alphas_cumprod_prev[-1] == 1.0


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_an_oracle_eps_model_recovers_its_data_point(kind):
    """With the exact eps of a single data point x0, both samplers land on x0 (DDPM: up to its small last noise)."""
    sampler = GaussianSampler.create(kind, 25)
    rng = np.random.default_rng(0)
    x0 = np.tanh(rng.standard_normal((1, 2, 4, 4)))
    x = rng.standard_normal(x0.shape)
    for s in range(sampler.num_steps):
        a = sampler.alphas_cumprod[s]
        eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
        model_out = np.concatenate([eps, np.zeros_like(eps)], axis=1)  # variance values 0: halfway in log space
        x = sampler.step(s, x, model_out, rng.standard_normal(x.shape))
    np.testing.assert_allclose(x, x0, atol=1e-6 if kind == "ddim" else 0.05)


def test_learned_sigma_interpolates_between_posterior_and_beta_variance():
    sampler = GaussianSampler.create("ddpm", 10)
    x = np.zeros((1, 1, 2, 2))
    noise = np.ones_like(x)
    s = 3
    eps = np.zeros_like(x)
    low = sampler.step(s, x, np.concatenate([eps, -np.ones_like(x)], axis=1), noise)  # frac 0: posterior variance
    high = sampler.step(s, x, np.concatenate([eps, np.ones_like(x)], axis=1), noise)  # frac 1: beta
    np.testing.assert_allclose(low, np.exp(0.5 * sampler.posterior_log_variance_clipped[s]))
    np.testing.assert_allclose(high, np.exp(0.5 * sampler.log_betas[s]))


def test_the_same_step_drives_numpy_and_torch():
    sampler = GaussianSampler.create("ddpm", 20, clip_denoised=True)
    rng = np.random.default_rng(3)
    x, out, noise = (rng.standard_normal(shape).astype(np.float32) for shape in [(2, 1, 4, 4), (2, 2, 4, 4), (2, 1, 4, 4)])
    with_numpy = sampler.step(5, x, out, noise)
    with_torch = sampler.step(5, torch.from_numpy(x), torch.from_numpy(out), torch.from_numpy(noise)).numpy()
    np.testing.assert_allclose(with_numpy, with_torch, rtol=1e-5, atol=1e-6)


def test_sampler_round_trips_through_its_dict():
    import json

    sampler = GaussianSampler.create("ddim", 20)
    again = GaussianSampler.from_dict(json.loads(json.dumps(sampler.to_dict())))
    assert again.timesteps.tolist() == sampler.timesteps.tolist()
    np.testing.assert_array_equal(again.posterior_mean_coef1, sampler.posterior_mean_coef1)
