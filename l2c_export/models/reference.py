"""The PyTorch reference sampler: the eager model of any family, the L2C cached forward per model call, classifier-free
guidance as one 2B batch, driven by the one denoising loop (:func:`l2c_export.samplers.denoise`).

This is the numerical reference every exported backend is compared with. Noise comes from
:func:`l2c_export.samplers.make_noise` (numpy, torch's CPU randn for ``torch.Generator().manual_seed(seed)`` bit for
bit), so a seed gives the same noise to every backend, PyTorch or not, and the noise diffusers draws for it.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.schedule import Schedule
from ..samplers import DenoisingSampler, ModelCall, denoise
from ..samplers.conditioning import ARGUMENT_NAMES, batch_conditioning
from ..samplers.guidance import apply_guidance, make_noise, step_noise
from . import family_of_config


@torch.no_grad()
def sample_reference(model: torch.nn.Module, sampler: DenoisingSampler, labels: Sequence[int] | None,
                     noise: np.ndarray | None, cfg_scale: float = 1.0, schedule: Schedule | None = None,
                     guide_all_channels: bool = False, step_noise_seed: int | None = None, progress: bool = True,
                     conditioning: Mapping[str, np.ndarray] | None = None,
                     where: str = "conditioning", names: Mapping[str, str] | None = None) -> np.ndarray:
    """Samples n images (latents) from ``noise`` (n, C, H, W; None: ``make_noise(step_noise_seed or 0, ...)``, as
    the runtime draws it) -> float32 (n, C, H, W), one per label (a label model)
    or per prompt (``conditioning``: a text model's arrays by the pipelines' argument names, checked as the runtime
    checks them, :func:`l2c_export.samplers.conditioning.batch_conditioning`; ``where`` names them in errors, and
    ``names`` the request's parts: default the Python arguments, the CLI passes its flags).

    With ``schedule`` (one row per model call) the model runs the L2C cached forward, one cache per request; without
    it, the plain forward. Guidance mixes the family's guided channels and the sampler takes the family's sampler
    channels (a diffusers pipeline drops the learned-sigma half). DDPM draws the noise of step s from
    ``step_noise(step_noise_seed, s, (2n, C, H, W))[:n]`` when guiding (as the runtime does), else ``(n, C, H, W)``.
    """
    config = model.config
    family = family_of_config(config)
    graph_inputs = family.graph_inputs(config)
    guiding = family.classifier_free and cfg_scale > 1.0  # False: a guidance-distilled model (FLUX.1)
    n, by_name = batch_conditioning([tensor.record() for tensor in graph_inputs], family.guidance_record(config),
                                    guiding, labels, conditioning, where, guidance_scale=cfg_scale,
                                    names=names or ARGUMENT_NAMES)
    sample_shape = graph_inputs[0].shape
    expected = (n, *sample_shape)
    if noise is None:
        noise = make_noise(step_noise_seed or 0, expected)
    if tuple(noise.shape) != expected:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {expected} (n samples, C, H, W)")
    if schedule is not None:
        schedule.check_fits(sampler.num_calls, family.sublayer_names(config))
    device = next(model.parameters()).device
    # the model's forward takes (x, t, *conditioning), the conditioning in graph-input order
    condition = [torch.from_numpy(by_name[tensor.name]).to(device) for tensor in graph_inputs
                 if tensor.name in by_name]
    batch = 2 * n if guiding else n
    guided = family.guided_channels(config, guide_all_channels)
    sampler_channels = family.sampler_channels(config)
    cache: dict[int, torch.Tensor] = {}

    def run_model(call: ModelCall) -> torch.Tensor:
        x = torch.cat([call.x, call.x]) if guiding else call.x
        t = torch.full((len(x),), call.t, device=device, dtype=torch.float32)
        if schedule is None:
            out = model(x, t, *condition)
        else:
            out = model.forward_cached(x, t, *condition, schedule.compute[call.index].tolist(), cache)
        out = apply_guidance(out, cfg_scale, guided, family.guidance_rule)[:n] if guiding else out
        return out if sampler_channels is None else out[:, :sampler_channels]

    def ddpm_noise(s: int) -> torch.Tensor:
        return torch.from_numpy(step_noise(step_noise_seed or 0, s, (batch, *sample_shape))[:n]).to(device)

    with tqdm(total=sampler.num_calls, desc="sampling (torch)", disable=not progress, leave=False) as bar:
        x = denoise(sampler, torch.from_numpy(noise).to(device), run_model, ddpm_noise, progress=bar.update)
    return x.float().cpu().numpy()
