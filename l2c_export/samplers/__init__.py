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

from ..core.vocabulary import SAMPLER_KINDS, official_cache_calls
from .base import CallGenerator, DenoisingSampler, ModelCall, denoise
from .diffusers import (DiffusersDDIM, DiffusersDPMMultistep, DiffusersFlowMatchEuler, PipelineTimesteps,
                        SchedulerConfigError)
from .schedulers import sampler_from_scheduler_config
from .unipc import DiffusersUniPC
from .dpm_solver import DiscreteVPSchedule, DPMSolver2S, stable_diffusion_betas
from .gaussian import NUM_TRAIN_TIMESTEPS, GaussianSampler, linear_betas, space_timesteps
from .guidance import apply_guidance, check_labels, guidance_batch, make_noise, step_noise

# kind -> the class that implements it (``create(kind, num_calls, clip_denoised)``, ``from_dict``,
# ``official_calls``); adding a sampler is a class, a line here and its kind and official rule in
# :mod:`l2c_export.core.vocabulary` (the manifest's vocabulary, which ``core`` checks).
SAMPLERS = {"ddim": GaussianSampler, "ddpm": GaussianSampler, "dpm_solver_2s": DPMSolver2S,
            "diffusers_ddim": DiffusersDDIM, "diffusers_dpm_multistep": DiffusersDPMMultistep,
            "diffusers_flow_match_euler": DiffusersFlowMatchEuler, "diffusers_unipc": DiffusersUniPC}

__all__ = ["SAMPLERS", "SAMPLER_KINDS", "CallGenerator", "DenoisingSampler", "ModelCall", "denoise",
           "official_cache_calls", "create_sampler", "sampler_from_dict", "GaussianSampler", "DPMSolver2S",
           "DiscreteVPSchedule", "DiffusersDDIM", "DiffusersDPMMultistep", "DiffusersFlowMatchEuler", "DiffusersUniPC",
           "PipelineTimesteps", "SchedulerConfigError", "sampler_from_scheduler_config",
           "NUM_TRAIN_TIMESTEPS", "linear_betas", "space_timesteps", "stable_diffusion_betas", "apply_guidance",
           "check_labels", "guidance_batch", "make_noise", "step_noise"]


def _sampler_class(kind, what: str):
    if kind not in SAMPLERS:
        raise ValueError(f"{what} {kind!r}; expected one of {', '.join(SAMPLER_KINDS)}")
    return SAMPLERS[kind]


def create_sampler(kind: str, num_calls: int, clip_denoised: bool = False) -> DenoisingSampler:
    """The sampler ``kind`` with ``num_calls`` model calls (NFE). The diffusers kinds get their scheduler's default
    config here; a diffusers folder's sampler comes from its ``scheduler_config.json``
    (:func:`sampler_from_scheduler_config`)."""
    return _sampler_class(kind, "unknown sampler").create(kind, num_calls, clip_denoised=clip_denoised)


def sampler_from_dict(data: dict) -> DenoisingSampler:
    """The sampler of a manifest's sampler section, by its ``kind``."""
    return _sampler_class(data.get("kind"), "sampler: field 'kind' is").from_dict(data)
