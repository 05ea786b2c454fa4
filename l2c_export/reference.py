"""The PyTorch reference sampler: eager DiT, the L2C cached forward per step, classifier-free guidance as one 2B batch.

This is the numerical reference every exported backend is compared with. Noise comes from numpy's generator
(:func:`l2c_export.diffusion.make_noise`), so a seed gives the same noise to every backend, PyTorch or not.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion import Sampler, check_labels, default_guided_channels, guidance_batch, step_noise
from .models import DiT
from .schedule import Schedule


@torch.no_grad()
def sample_reference(model: DiT, sampler: Sampler, labels: Sequence[int], noise: np.ndarray,
                     cfg_scale: float = 1.0, schedule: Schedule | None = None, guide_all_channels: bool = False,
                     step_noise_seed: int | None = None, progress: bool = True) -> np.ndarray:
    """Samples n images (latents) for ``labels`` from ``noise`` (n, C, H, W) -> float32 (n, C, H, W).

    With ``schedule`` the model runs the L2C cached forward (one cache per call, i.e. per request); without it, the
    plain forward. DDPM draws its per-step noise (2n, C, H, W) from ``step_noise(step_noise_seed, s, ...)``.
    """
    config = model.config
    check_labels(labels, config.num_classes)
    expected = (len(labels), config.in_channels, config.input_size, config.input_size)
    if tuple(noise.shape) != expected:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {expected} (n labels, C, H, W)")
    if schedule is not None:
        schedule.check_fits(sampler.num_steps, config.depth)
    x_np, y_np = guidance_batch(noise, labels, config.num_classes, cfg_scale)
    device = next(model.parameters()).device
    x = torch.from_numpy(x_np).to(device)
    y = torch.from_numpy(y_np).to(device)
    guided = config.in_channels if guide_all_channels else default_guided_channels(config.in_channels)
    cache: dict[int, torch.Tensor] = {}
    for s in tqdm(range(sampler.num_steps), desc="sampling (torch)", disable=not progress, leave=False):
        t = torch.full((len(x),), int(sampler.timesteps[s]), device=device, dtype=torch.int64)
        compute = None if schedule is None else schedule.compute[s].tolist()
        if cfg_scale > 1.0:
            out = model.forward_with_cfg(x, t, y, cfg_scale, guided, compute=compute, cache=cache)
        elif compute is None:
            out = model(x, t, y)
        else:
            out = model.forward_cached(x, t, y, compute, cache)
        noise_s = None
        if sampler.kind == "ddpm" and s < sampler.num_steps - 1:
            noise_s = torch.from_numpy(step_noise(step_noise_seed or 0, s, tuple(x.shape))).to(device)
        x = sampler.step(s, x, out, noise_s, learn_sigma=config.learn_sigma)
    return x[: len(labels)].float().cpu().numpy()
