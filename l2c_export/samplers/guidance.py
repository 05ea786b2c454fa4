"""The inputs and outputs of model calls, shared by the PyTorch reference and the runtimes (which must not need
PyTorch): seeded noise, labels and the classifier-free guidance batch and mix."""

from __future__ import annotations

import math

import numpy as np

from ..core.interface import CLASSIFIER_FREE, TRUE_CFG
from ..core.latents import pack_latents
from .torch_noise import check_seed, torch_randn


def make_noise(seed: int, shape) -> np.ndarray:
    """The initial latents a diffusers pipeline draws for ``shape`` with ``generator=torch.Generator("cpu")
    .manual_seed(seed)``, bit for bit, without torch: ``randn_tensor(shape)``
    (:func:`~l2c_export.samplers.torch_noise.torch_randn`), except FLUX.1's packed (n, T, 4 C) latents (a 3-D shape,
    T a square), which ``FluxPipeline.prepare_latents`` draws as (n, C, h, w) square latents and packs. The same for
    every backend. ``seed`` as ``manual_seed`` takes it (-2**63..2**64-1; else a ValueError naming ``seed``)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) == 3 and shape[2] % 4 == 0 and math.isqrt(shape[1]) ** 2 == shape[1] and shape[1]:
        side = 2 * math.isqrt(shape[1])
        return pack_latents(torch_randn(seed, (shape[0], shape[2] // 4, side, side)))
    return torch_randn(seed, shape)


def step_noise(seed: int, step: int, shape) -> np.ndarray:
    """The noise DDPM adds after sampling step ``step``: ``numpy.random.default_rng(seed + step + 1)``'s standard
    normals (a stream of its own, not torch's, so that the first n rows of a (2n, ...) draw are those of an (n, ...)
    one; seeded apart from the initial noise ``make_noise(seed, ...)``)."""
    return np.random.default_rng(seed + step + 1).standard_normal(tuple(shape), dtype=np.float32)


class NoiseRows:
    """``step_noise``'s stream ``numpy.random.default_rng(seed)`` drawn some rows at a time: draws of k1, k2, ...
    rows are rows 0..k1, k1..k1 + k2, ... of the whole, whatever n (numpy's generator fills an array element by
    element from one stream, which continues where the last draw stopped). So a request sampled in batches gets every
    sample's own noise."""

    def __init__(self, seed: int, row_shape):
        self.generator = np.random.default_rng(seed)
        self.row_shape = tuple(row_shape)

    def draw(self, rows: int) -> np.ndarray:
        return self.generator.standard_normal((rows, *self.row_shape), dtype=np.float32)


class InitialNoiseRows:
    """``make_noise(seed, (n, *row_shape))`` handed out some rows at a time: draws of k1, k2, ... rows are rows 0..k1,
    k1..k1 + k2, ... of the whole (n, ...) draw, as diffusers draws a batch's latents with one generator in one call.
    torch's draw of n rows is not n draws of a row (its last 16 values are drawn again when the count is not a
    multiple of 16), so the whole draw is made once, at the first ``draw``."""

    def __init__(self, seed: int, row_shape, rows: int):
        self.seed, self.row_shape, self.rows = check_seed(seed), tuple(row_shape), rows
        self.noise, self.used = None, 0

    def draw(self, rows: int) -> np.ndarray:
        if self.noise is None:
            self.noise = make_noise(self.seed, (self.rows, *self.row_shape))
        if self.used + rows > self.rows:
            raise ValueError(f"{rows} more noise row(s) asked after {self.used}; the draw has {self.rows}")
        self.used += rows
        return self.noise[self.used - rows:self.used]


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


def apply_guidance(model_out, cfg_scale: float, guided_channels: int, rule: str = CLASSIFIER_FREE):
    """model_out: (2B, C_out, H, W), conditional half first -> the same shape with both halves guided:
    ``uncond + s * (cond - uncond)`` on the leading ``guided_channels``; with the ``true_cfg`` rule (Qwen-Image's
    ``true_cfg_scale``) that combination is then rescaled along the last axis to the norm of ``cond``'s
    (``QwenImagePipeline``: per token of its packed latents).

    Works on torch tensors and numpy arrays alike, so that runtimes without PyTorch share it.
    """
    eps, rest = model_out[:, :guided_channels], model_out[:, guided_channels:]
    half = len(eps) // 2
    cond_eps, uncond_eps = eps[:half], eps[half:]
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    if rule == TRUE_CFG:
        norm = np.linalg.norm if isinstance(model_out, np.ndarray) else _torch_norm
        half_eps = half_eps * (norm(cond_eps, axis=-1, keepdims=True) / norm(half_eps, axis=-1, keepdims=True))
    if isinstance(model_out, np.ndarray):
        return np.concatenate([np.concatenate([half_eps, half_eps], axis=0), rest], axis=1)
    import torch  # only reached with torch tensors, so torch is there

    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def _torch_norm(tensor, axis: int, keepdims: bool):
    """``torch.norm(tensor, dim=axis, keepdim=keepdims)``, as the pipelines compute it."""
    import torch  # only reached with torch tensors

    return torch.norm(tensor, dim=axis, keepdim=keepdims)
