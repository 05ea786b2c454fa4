"""The inputs and outputs of model calls, shared by the PyTorch reference and the runtimes (which must not need
PyTorch): seeded noise, labels and the classifier-free guidance batch and mix."""

from __future__ import annotations

import numpy as np

from ..core.interface import CLASSIFIER_FREE, TRUE_CFG


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
