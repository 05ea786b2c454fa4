"""The inputs and outputs of model calls, shared by the PyTorch reference and the runtimes (which must not need
PyTorch): seeded noise, labels and the classifier-free guidance batch and mix."""

from __future__ import annotations

import numpy as np


def make_noise(seed: int, shape) -> np.ndarray:
    """Standard normal float32 noise of ``shape`` from ``numpy.random.default_rng(seed)``: the same for every
    backend."""
    return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


def step_noise(seed: int, step: int, shape) -> np.ndarray:
    """The noise DDPM adds after sampling step ``step``: ``make_noise(seed + step + 1, shape)`` (step 0 of a request
    is fed ``make_noise(seed, ...)`` as its initial noise, so the two never coincide)."""
    return make_noise(seed + step + 1, shape)


class NoiseRows:
    """``make_noise(seed, (n, *row_shape))`` drawn some rows at a time: draws of k1, k2, ... rows are rows 0..k1,
    k1..k1 + k2, ... of the whole, whatever n (numpy's generator fills an array element by element from one stream,
    which continues where the last draw stopped). So a request sampled in batches gets every sample's own noise."""

    def __init__(self, seed: int, row_shape):
        self.generator = np.random.default_rng(seed)
        self.row_shape = tuple(row_shape)

    def draw(self, rows: int) -> np.ndarray:
        return self.generator.standard_normal((rows, *self.row_shape), dtype=np.float32)


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


def apply_guidance(model_out, cfg_scale: float, guided_channels: int, norm_rescale: bool = False):
    """model_out: (2B, C_out, H, W), conditional half first -> the same shape with both halves guided:
    ``u + s (c - u)``; with ``norm_rescale`` (QwenImagePipeline's true CFG, manifest ``guidance/norm_rescale``) that
    combination rescaled along the last axis to the norm of ``c``: ``comb * (||c|| / ||comb||)`` (per token of a
    packed (2B, T, C) output).

    Works on torch tensors and numpy arrays alike, so that runtimes without PyTorch share it.
    """
    eps, rest = model_out[:, :guided_channels], model_out[:, guided_channels:]
    half = len(eps) // 2
    cond_eps, uncond_eps = eps[:half], eps[half:]
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    if norm_rescale:
        if isinstance(model_out, np.ndarray):
            half_eps = half_eps * (np.linalg.norm(cond_eps, axis=-1, keepdims=True)
                                   / np.linalg.norm(half_eps, axis=-1, keepdims=True))
        else:
            half_eps = half_eps * (cond_eps.norm(dim=-1, keepdim=True) / half_eps.norm(dim=-1, keepdim=True))
    if isinstance(model_out, np.ndarray):
        return np.concatenate([np.concatenate([half_eps, half_eps], axis=0), rest], axis=1)
    import torch  # only reached with torch tensors, so torch is there

    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
