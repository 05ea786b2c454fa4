"""The PyTorch reference sampler: the eager model of any family, the L2C cached forward per model call, classifier-free
guidance as one 2B batch, driven by the one denoising loop (:func:`l2c_export.samplers.denoise`).

This is the numerical reference every exported backend is compared with. Noise comes from numpy's generator
(:func:`l2c_export.samplers.make_noise`), so a seed gives the same noise to every backend, PyTorch or not.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.schedule import Schedule
from ..models import family_of_config
from . import DenoisingSampler, ModelCall, denoise
from .guidance import apply_guidance, check_labels, guidance_batch, step_noise


@torch.no_grad()
def sample_reference(model: torch.nn.Module, sampler: DenoisingSampler, labels: Sequence[int], noise: np.ndarray,
                     cfg_scale: float = 1.0, schedule: Schedule | None = None, guide_all_channels: bool = False,
                     step_noise_seed: int | None = None, progress: bool = True) -> np.ndarray:
    """Samples n images (latents) for ``labels`` from ``noise`` (n, C, H, W) -> float32 (n, C, H, W).

    With ``schedule`` (one row per model call) the model runs the L2C cached forward, one cache per request; without
    it, the plain forward. DDPM draws the noise of step s from ``step_noise(step_noise_seed, s, (2n, C, H, W))[:n]``
    when guiding (as the runtime does), else ``(n, C, H, W)``.
    """
    config = model.config
    family = family_of_config(config)
    null_class = family.null_class(config)
    check_labels(labels, null_class)
    sample_shape = family.graph_inputs(config)[0].shape
    expected = (len(labels), *sample_shape)
    if tuple(noise.shape) != expected:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {expected} (n labels, C, H, W)")
    if schedule is not None:
        schedule.check_fits(sampler.num_calls, family.sublayer_names(config))
    _, y_np = guidance_batch(noise, labels, null_class, cfg_scale)
    device = next(model.parameters()).device
    y = torch.from_numpy(y_np).to(device)
    n, guiding = len(labels), cfg_scale > 1.0
    guided = family.guided_channels(config, guide_all_channels)
    cache: dict[int, torch.Tensor] = {}

    def run_model(call: ModelCall) -> torch.Tensor:
        x = torch.cat([call.x, call.x]) if guiding else call.x
        t = torch.full((len(x),), call.t, device=device, dtype=torch.float32)
        if schedule is None:
            out = model(x, t, y)
        else:
            out = model.forward_cached(x, t, y, schedule.compute[call.index].tolist(), cache)
        return apply_guidance(out, cfg_scale, guided)[:n] if guiding else out

    def ddpm_noise(s: int) -> torch.Tensor:
        return torch.from_numpy(step_noise(step_noise_seed or 0, s, (len(y_np), *sample_shape))[:n]).to(device)

    with tqdm(total=sampler.num_calls, desc="sampling (torch)", disable=not progress, leave=False) as bar:
        x = denoise(sampler, torch.from_numpy(noise).to(device), run_model, ddpm_noise, progress=bar.update)
    return x.float().cpu().numpy()
