"""Gaussian diffusion as DiT uses it: the 1000-step linear beta schedule, uniform respacing
(``create_diffusion(str(N))``), learned-sigma handling, and the DDIM (eta 0) and DDPM update rules.

Plain numpy on purpose: the coefficients are float64 tables, and :meth:`GaussianSampler.step` does only arithmetic on
its array arguments, so the same code drives torch tensors (the reference sampler) and numpy arrays (runtimes that
must not need PyTorch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..core.vocabulary import dit_official_calls
from .base import ModelCall

SamplerKind = Literal["ddim", "ddpm"]
NUM_TRAIN_TIMESTEPS = 1000


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """DiT's ``get_named_beta_schedule("linear", T)``: float64 (T,)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """The timesteps kept by DiT's ``space_timesteps(T, str(N))``, ascending. N = 20 gives 0, 53, 105, ..., 946, 999."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"cannot take {num_steps} steps out of {num_timesteps}; expected 1..{num_timesteps}")
    stride = 1 if num_steps <= 1 else (num_timesteps - 1) / (num_steps - 1)
    # Accumulated float index and Python's round (half to even), exactly as the authors' respacing.
    kept, index = [], 0.0
    for _ in range(num_steps):
        kept.append(round(index))
        index += stride
    return sorted(set(kept))


@dataclass(frozen=True)
class GaussianSampler:
    """A respaced diffusion process in sampling order.

    ``timesteps[s]`` is the original timestep the model sees at sampling step ``s`` (999 first, 0 last); every
    coefficient table is indexed by the sampling step too. Arrays are float64 of shape (num_steps,).
    """

    kind: SamplerKind
    timesteps: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    log_betas: np.ndarray
    fixed_log_variance: np.ndarray
    clip_denoised: bool = False

    @classmethod
    def create(cls, kind: SamplerKind, num_steps: int, clip_denoised: bool = False,
               num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> "GaussianSampler":
        if kind not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {kind!r}; expected 'ddim' or 'ddpm'")
        base_alphas_cumprod = np.cumprod(1.0 - linear_betas(num_train_timesteps))
        kept = space_timesteps(num_train_timesteps, num_steps)
        # Respacing: the betas that take the kept timesteps' alphas_cumprod from one to the next.
        alphas_cumprod = base_alphas_cumprod[kept]
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        betas = 1.0 - alphas_cumprod / alphas_cumprod_prev
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        if len(kept) > 1:
            posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
            fixed_log_variance = np.log(np.append(posterior_variance[1], betas[1:]))
        else:
            posterior_log_variance_clipped = fixed_log_variance = np.log(betas)
        tables = dict(
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            log_betas=np.log(betas),
            fixed_log_variance=fixed_log_variance,
        )
        # Tables above are in ascending respaced order; sampling runs them backwards.
        return cls(kind=kind, timesteps=np.asarray(kept[::-1], dtype=np.int64), clip_denoised=clip_denoised,
                   **{name: table[::-1].copy() for name, table in tables.items()})

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def step(self, s: int, x, model_out, noise=None, learn_sigma: bool = True):
        """One update x_t -> x_{t-1} at sampling step ``s``.

        x: (N, C, H, W); model_out: (N, 2C, H, W) with learned sigma (eps, then the variance interpolation values
        in [-1, 1]), else (N, C, H, W); noise: like x, needed by DDPM except at the last step.
        """
        channels = x.shape[1]
        eps = model_out[:, :channels]
        alpha_bar = float(self.alphas_cumprod[s])
        sqrt_recip = float(np.sqrt(1.0 / alpha_bar))
        sqrt_recipm1 = float(np.sqrt(1.0 / alpha_bar - 1.0))
        pred_xstart = sqrt_recip * x - sqrt_recipm1 * eps
        if self.clip_denoised:
            pred_xstart = _clip(pred_xstart, -1.0, 1.0)
        if self.kind == "ddim":
            # eta = 0: deterministic; eps re-derived from the (possibly clipped) x0 prediction, as DiT's ddim_sample.
            eps = (sqrt_recip * x - pred_xstart) / sqrt_recipm1
            alpha_bar_prev = float(self.alphas_cumprod_prev[s])
            return pred_xstart * float(np.sqrt(alpha_bar_prev)) + float(np.sqrt(1.0 - alpha_bar_prev)) * eps
        mean = float(self.posterior_mean_coef1[s]) * pred_xstart + float(self.posterior_mean_coef2[s]) * x
        if s == self.num_steps - 1:
            return mean
        if noise is None:
            raise ValueError("the DDPM sampler needs noise at every step but the last")
        if learn_sigma:
            # LEARNED_RANGE: interpolate log variance between the clipped posterior's and beta's.
            frac = (model_out[:, channels:] + 1) / 2
            min_log, max_log = float(self.posterior_log_variance_clipped[s]), float(self.log_betas[s])
            std = _exp(0.5 * (frac * max_log + (1 - frac) * min_log))
        else:
            std = float(np.exp(0.5 * self.fixed_log_variance[s]))
        return mean + std * noise

    @property
    def num_calls(self) -> int:
        """Model calls (NFE): one per step."""
        return self.num_steps

    @property
    def model_times(self) -> np.ndarray:
        return self.timesteps.astype(np.float64)

    calls_per_step = 1

    def calls(self, x, noise=None, first_step: int = 0):
        """The sampler as model calls (see :mod:`l2c_export.samplers`): yields one call per step, receives the guided
        model output, returns the samples. ``noise(s)`` is the noise DDPM adds after step ``s``. Learned sigma is read
        off the output: twice the channels of ``x``. ``first_step``: ``x`` is the input of that step (learning
        starts there)."""
        for s in range(first_step, self.num_steps):
            out = yield ModelCall(s, x, int(self.timesteps[s]))
            noise_s = None
            if self.kind == "ddpm" and s < self.num_steps - 1:
                if noise is None:
                    raise ValueError("the DDPM sampler needs noise at every step but the last")
                noise_s = noise(s)
            x = self.step(s, x, out, noise_s, learn_sigma=out.shape[1] == 2 * x.shape[1])
        return x

    def official_cache_calls(self) -> list[int]:
        return self.official_calls(self.num_steps)

    official_calls = staticmethod(dit_official_calls)

    def noise_level(self, call: int) -> tuple[float, float]:
        alpha_bar = float(self.alphas_cumprod[call])
        return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)

    def to_dict(self) -> dict:
        """What a runtime needs to rebuild this sampler (see :meth:`from_dict`); JSON-serialisable."""
        return {"kind": self.kind, "num_calls": self.num_calls, "model_times": self.model_times.tolist(),
                "num_steps": self.num_steps, "clip_denoised": self.clip_denoised,
                "timesteps": self.timesteps.tolist(),
                **{name: getattr(self, name).tolist() for name in _TABLES}}

    @classmethod
    def from_dict(cls, data: dict) -> "GaussianSampler":
        return cls(kind=data["kind"], timesteps=np.asarray(data["timesteps"], dtype=np.int64),
                   clip_denoised=bool(data["clip_denoised"]),
                   **{name: np.asarray(data[name], dtype=np.float64) for name in _TABLES})


_TABLES = ("alphas_cumprod", "alphas_cumprod_prev", "posterior_mean_coef1", "posterior_mean_coef2",
           "posterior_log_variance_clipped", "log_betas", "fixed_log_variance")


def _exp(a):
    return a.exp() if hasattr(a, "exp") else np.exp(a)


def _clip(a, low: float, high: float):
    return a.clamp(low, high) if hasattr(a, "clamp") else np.clip(a, low, high)
