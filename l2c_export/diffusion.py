"""Gaussian diffusion as DiT uses it: the 1000-step linear beta schedule, uniform respacing
(``create_diffusion(str(N))``), learned-sigma handling, and the DDIM (eta 0) and DDPM update rules.

Plain numpy on purpose: the coefficients are float64 tables, and :meth:`Sampler.step` does only arithmetic on its
array arguments, so the same code drives torch tensors (the reference sampler) and numpy arrays (runtimes that must
not need PyTorch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

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
class Sampler:
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
               num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> "Sampler":
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

    def calls(self, x, noise=None):
        """The sampler as model calls (see :mod:`l2c_export.samplers`): yields one call per step, receives the guided
        model output, returns the samples. ``noise(s)`` is the noise DDPM adds after step ``s``. Learned sigma is read
        off the output: twice the channels of ``x``."""
        from .samplers import ModelCall

        for s in range(self.num_steps):
            out = yield ModelCall(s, x, int(self.timesteps[s]))
            noise_s = None
            if self.kind == "ddpm" and s < self.num_steps - 1:
                if noise is None:
                    raise ValueError("the DDPM sampler needs noise at every step but the last")
                noise_s = noise(s)
            x = self.step(s, x, out, noise_s, learn_sigma=out.shape[1] == 2 * x.shape[1])
        return x

    def official_cache_calls(self) -> list[int]:
        from .samplers import official_cache_calls

        return official_cache_calls(self.kind, self.num_steps)

    def to_dict(self) -> dict:
        """What a runtime needs to rebuild this sampler (see :meth:`from_dict`); JSON-serialisable."""
        return {"kind": self.kind, "num_calls": self.num_calls, "model_times": self.model_times.tolist(),
                "num_steps": self.num_steps, "clip_denoised": self.clip_denoised,
                "timesteps": self.timesteps.tolist(),
                **{name: getattr(self, name).tolist() for name in _TABLES}}

    @classmethod
    def from_dict(cls, data: dict) -> "Sampler":
        return cls(kind=data["kind"], timesteps=np.asarray(data["timesteps"], dtype=np.int64),
                   clip_denoised=bool(data["clip_denoised"]),
                   **{name: np.asarray(data[name], dtype=np.float64) for name in _TABLES})


_TABLES = ("alphas_cumprod", "alphas_cumprod_prev", "posterior_mean_coef1", "posterior_mean_coef2",
           "posterior_log_variance_clipped", "log_betas", "fixed_log_variance")


def _exp(a):
    return a.exp() if hasattr(a, "exp") else np.exp(a)


def _clip(a, low: float, high: float):
    return a.clamp(low, high) if hasattr(a, "clamp") else np.clip(a, low, high)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling inputs and guidance, shared by the PyTorch reference and the runtimes (which must not need PyTorch).

def make_noise(seed: int, shape) -> np.ndarray:
    """Standard normal float32 noise of ``shape`` from ``numpy.random.default_rng(seed)``: the same for every backend."""
    return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


def step_noise(seed: int, step: int, shape) -> np.ndarray:
    """The noise DDPM adds after sampling step ``step``: ``make_noise(seed + step + 1, shape)`` (step 0 of a request
    is fed ``make_noise(seed, ...)`` as its initial noise, so the two never coincide)."""
    return make_noise(seed + step + 1, shape)


def check_labels(labels, num_classes: int) -> None:
    bad = [int(label) for label in labels if not 0 <= int(label) < num_classes]
    if bad:
        raise ValueError(f"labels {bad} are out of range; expected class indices in 0..{num_classes - 1}")


def guidance_batch(noise: np.ndarray, labels, num_classes: int, cfg_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The batch the model runs: (n, C, H, W) noise and n labels -> x (2n, ...) and y (2n,) with the null class in
    the second half when guiding (cfg_scale > 1, as DiT's sample.py), else the inputs unchanged."""
    labels = np.asarray(labels, dtype=np.int64)
    if cfg_scale > 1.0:
        return (np.concatenate([noise, noise], axis=0),
                np.concatenate([labels, np.full_like(labels, num_classes)]))
    return noise, labels


def default_guided_channels(in_channels: int) -> int:
    """DiT's ``forward_with_cfg`` guides ``model_out[:, :3]``: the first three eps channels of a 4-channel latent
    model. Reproduce that for 4 channels; for other models guide all eps channels (``[:, :3]`` would reach into the
    learned-sigma channels of a 1-channel model)."""
    return 3 if in_channels == 4 else in_channels


def apply_guidance(model_out, cfg_scale: float, guided_channels: int):
    """model_out: (2B, C_out, H, W), conditional half first -> the same shape with both halves guided.

    Works on torch tensors and numpy arrays alike, so that runtimes without PyTorch share it.
    """
    eps, rest = model_out[:, :guided_channels], model_out[:, guided_channels:]
    half = len(eps) // 2
    cond_eps, uncond_eps = eps[:half], eps[half:]
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    if isinstance(model_out, np.ndarray):
        return np.concatenate([np.concatenate([half_eps, half_eps], axis=0), rest], axis=1)
    import torch  # only reached with torch tensors, so torch is there

    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
