"""Samplers as sequences of model calls, and the one denoising loop that drives any of them.

A sampler *yields model calls and owns its state*: :meth:`calls` is a generator that yields a :class:`ModelCall`
(which samples the model sees, at which timestep) and receives the guided model output for it; when it is done it
returns the final samples. DDIM and DDPM make one call per step, DPM-Solver-2S two (the step's start and its
midpoint). A schedule has one row per model call, and ``--steps N`` counts model calls (NFE) for every sampler.

:func:`denoise` is the one loop over those calls; the PyTorch reference sampler, the runtime (numpy, no torch), verify
and learning all go through it. Plain numpy tables, plain arithmetic: the same code runs on torch tensors and on numpy
arrays.
"""

from __future__ import annotations

from .base import CallGenerator, DenoisingSampler, ModelCall, denoise
from .dpm_solver import DiscreteVPSchedule, DPMSolver2S, stable_diffusion_betas
from .gaussian import NUM_TRAIN_TIMESTEPS, GaussianSampler, linear_betas, space_timesteps
from .guidance import apply_guidance, check_labels, guidance_batch, make_noise, step_noise

# kind -> the class that implements it; adding a sampler is a class and a line here.
SAMPLERS = {"ddim": GaussianSampler, "ddpm": GaussianSampler, "dpm_solver_2s": DPMSolver2S}
SAMPLER_KINDS = tuple(SAMPLERS)

__all__ = ["SAMPLERS", "SAMPLER_KINDS", "CallGenerator", "DenoisingSampler", "ModelCall", "denoise",
           "official_cache_calls", "create_sampler", "sampler_from_dict", "GaussianSampler", "DPMSolver2S", "DiscreteVPSchedule",
           "NUM_TRAIN_TIMESTEPS", "linear_betas", "space_timesteps", "stable_diffusion_betas", "apply_guidance",
           "check_labels", "guidance_batch", "make_noise", "step_noise"]


def create_sampler(kind: str, num_calls: int, clip_denoised: bool = False) -> DenoisingSampler:
    """The sampler ``kind`` with ``num_calls`` model calls (NFE)."""
    if kind in ("ddim", "ddpm"):
        return GaussianSampler.create(kind, num_calls, clip_denoised=clip_denoised)
    if kind == "dpm_solver_2s":
        return DPMSolver2S.create(num_calls)
    raise ValueError(f"unknown sampler {kind!r}; expected one of {', '.join(SAMPLER_KINDS)}")


def sampler_from_dict(data: dict) -> DenoisingSampler:
    """The sampler of a manifest's sampler section, by its ``kind``."""
    kind = data.get("kind")
    if kind in ("ddim", "ddpm"):
        return GaussianSampler.from_dict(data)
    if kind == "dpm_solver_2s":
        return DPMSolver2S.from_dict(data)
    raise ValueError(f"sampler: field 'kind' is {kind!r}; expected one of {', '.join(SAMPLER_KINDS)}")


def official_cache_calls(kind: str, num_calls: int) -> list[int]:
    """The official rule: the model calls of ``kind`` where the authors' samplers consult their routers (every other
    call computes everything). DDIM/DDPM: the steps whose router index ``N - 1 - s`` is even, except the first;
    DPM-Solver-2S: the first call of solver steps 1 .. K-1."""
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; expected one of {', '.join(SAMPLER_KINDS)}")
    return SAMPLERS[kind].official_calls(num_calls)
