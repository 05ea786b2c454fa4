"""The PyTorch reference sampler: eager DiT, the L2C cached forward per step, classifier-free guidance as one 2B batch.

This is the numerical reference every exported backend is compared with. Noise comes from numpy's generator
(:func:`make_noise`), so a seed gives the same noise to every backend, PyTorch or not.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion import Sampler
from .models import DiT, default_guided_channels
from .schedule import Schedule


def make_noise(seed: int, shape: Sequence[int]) -> np.ndarray:
    """Standard normal float32 noise of ``shape`` from ``numpy.random.default_rng(seed)``."""
    return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


def guidance_batch(noise: np.ndarray, labels: Sequence[int], num_classes: int, cfg_scale: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The batch the model runs: (n, C, H, W) noise and n labels -> x (2n, ...) and y (2n,) with the null class in
    the second half when guiding (cfg_scale > 1, as DiT's sample.py), else the inputs unchanged."""
    labels = np.asarray(labels, dtype=np.int64)
    if cfg_scale > 1.0:
        return (np.concatenate([noise, noise], axis=0),
                np.concatenate([labels, np.full_like(labels, num_classes)]))
    return noise, labels


def check_labels(labels: Sequence[int], num_classes: int) -> None:
    bad = [int(label) for label in labels if not 0 <= int(label) < num_classes]
    if bad:
        raise ValueError(f"labels {bad} are out of range; expected class indices in 0..{num_classes - 1}")


@torch.no_grad()
def sample_reference(model: DiT, sampler: Sampler, labels: Sequence[int], noise: np.ndarray,
                     cfg_scale: float = 1.0, schedule: Schedule | None = None, guide_all_channels: bool = False,
                     step_noise_seed: int | None = None, progress: bool = True) -> np.ndarray:
    """Samples n images (latents) for ``labels`` from ``noise`` (n, C, H, W) -> float32 (n, C, H, W).

    With ``schedule`` the model runs the L2C cached forward (one cache per call, i.e. per request); without it, the
    plain forward. DDPM draws its per-step noise (2n, C, H, W) from ``make_noise(step_noise_seed + s, ...)``.
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
            noise_s = torch.from_numpy(make_noise((step_noise_seed or 0) + s + 1, tuple(x.shape))).to(device)
        x = sampler.step(s, x, out, noise_s, learn_sigma=config.learn_sigma)
    return x[: len(labels)].float().cpu().numpy()
