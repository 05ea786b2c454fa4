"""Serving requests as sampling batches: each request's tensors decoded and checked, and the requests that the
dynamic batcher hands over together merged into as few ``L2CPipeline`` calls as the build allows.

No Triton imports here: the Triton model (``triton_model.py``) only moves tensors in and out. A request holds ``n``
images (Triton's batch dimension); per image:

========== ============= ====================================================================================
input      shape, dtype  meaning
========== ============= ====================================================================================
labels     (1,) int64    class label, 0 .. num_classes - 1
noise      (C, H, W) f32 optional: the initial noise, finite, within +-MAX_ABS_NOISE
seed       (1,) int64    optional, 0 .. 2**63 - 1: the initial noise is ``make_noise(seed, (1, C, H, W))``, so the
                         image equals ``L2CPipeline([label], seed=seed)``'s; with neither noise nor seed a fresh
                         random seed
cfg_scale  (1,) f32      optional: classifier-free guidance scale in [1, MAX_CFG_SCALE] (default: the build's;
                         1: none)
========== ============= ====================================================================================

:func:`input_ranges` holds those ranges, :func:`decode_request` enforces them (the only place that does), and the
Triton model config states them (its ``input_ranges`` parameter).

Images of the same guidance scale are sampled as one batch (up to the build's batch limit), whatever request they
came from: each image's sample is the same as when it is sampled alone (the model is per-sample; to float rounding).
DDPM draws its step noise per sampling batch, so DDPM images are sampled one per batch, each from its own seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.util import check_finite
from ..samplers.guidance import check_labels, make_noise

MAX_SEED = 2 ** 63 - 1  # numpy's generators take any seed >= 0; int64 caps it here
MAX_CFG_SCALE = 100.0  # far above any scale in use (DiT samples at 1.5-4, text-to-image pipelines at up to ~20);
#                        a scale of 1e30 swamps the prediction (and overflows float32 in a latent model)
MAX_ABS_NOISE = 1000.0  # standard normal noise never comes near it (|x| > 10 has probability 1e-23)


def input_ranges(num_classes: int) -> dict[str, list]:
    """The closed range of every input's values, by input name: what :func:`decode_request` enforces."""
    return {"labels": [0, num_classes - 1], "noise": [-MAX_ABS_NOISE, MAX_ABS_NOISE], "seed": [0, MAX_SEED],
            "cfg_scale": [1.0, MAX_CFG_SCALE]}


@dataclass
class SampleRequest:
    """One request's images, checked."""

    labels: np.ndarray  # (n,) int64
    noise: np.ndarray  # (n, C, H, W) float32
    seeds: np.ndarray  # (n,) int64: DDPM's step noise is drawn from them
    cfg_scales: np.ndarray  # (n,) float64


def decode_request(pipeline, labels: np.ndarray | None, noise: np.ndarray | None = None,
                   seed: np.ndarray | None = None, cfg_scale: np.ndarray | None = None) -> SampleRequest:
    """Checks one request's tensors (shapes as in the table above, with the batch dimension first) against
    ``pipeline``'s build; raises ``ValueError`` with a message naming the input and what was expected."""
    if labels is None:
        raise ValueError("input 'labels' is missing; expected int64 class labels of shape (n, 1)")
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] != 1 or labels.shape[0] < 1:
        raise ValueError(f"input 'labels' has shape {list(labels.shape)}; expected [n, 1]")
    n = labels.shape[0]
    labels = labels.reshape(n).astype(np.int64)
    try:
        check_labels(labels, pipeline.num_classes)
    except ValueError as error:
        raise ValueError(f"input 'labels': {error}") from None

    def per_image(name: str, value: np.ndarray | None, dtype) -> np.ndarray | None:
        if value is None:
            return None
        value = np.asarray(value)
        if value.shape != (n, 1):
            raise ValueError(f"input '{name}' has shape {list(value.shape)}; expected [{n}, 1] (one per label)")
        return value.reshape(n).astype(dtype)

    ranges = input_ranges(pipeline.num_classes)
    seeds = per_image("seed", seed, np.int64)
    if seeds is not None and np.any(seeds < 0):
        raise ValueError(f"input 'seed' is {seeds.tolist()}; expected seeds in 0..{MAX_SEED}")
    scales = per_image("cfg_scale", cfg_scale, np.float64)
    if scales is None:
        scales = np.full(n, float(pipeline.manifest["guidance"]["cfg_scale"]))
    for scale in scales:
        check_finite(float(scale), "input 'cfg_scale'", *ranges["cfg_scale"])  # 1 is no guidance
    if noise is not None:
        if seeds is not None:
            raise ValueError("inputs 'noise' and 'seed' are both given; give one of them (seed draws the noise)")
        noise = np.asarray(noise)
        expected = (n, *pipeline.sample_shape)
        if noise.shape != expected:
            raise ValueError(f"input 'noise' has shape {list(noise.shape)}; expected {list(expected)} (n, C, H, W)")
        low, high = ranges["noise"]
        if not np.all(np.isfinite(noise)):
            raise ValueError(f"input 'noise' holds values that are not finite; expected finite values in "
                             f"[{low}, {high}]")
        if np.any(noise < low) or np.any(noise > high):
            raise ValueError(f"input 'noise' holds a value of magnitude {float(np.abs(noise).max())!r}; expected "
                             f"values in [{low}, {high}] (standard normal noise)")
        noise = noise.astype(np.float32)
        seeds = np.zeros(n, dtype=np.int64)  # as L2CPipeline's default seed for DDPM's step noise
    else:
        if seeds is None:
            seeds = np.random.SeedSequence().generate_state(n, dtype=np.uint64).astype(np.int64) & MAX_SEED
        noise = np.stack([make_noise(int(s), (1, *pipeline.sample_shape))[0] for s in seeds])
    return SampleRequest(labels=labels, noise=noise, seeds=seeds, cfg_scales=scales)


def images_per_batch(pipeline, cfg_scale: float) -> int:
    """The most images one sampling batch may hold: the build's model batch limit (halved when guiding, as the
    conditional and null-class halves run as one batch)."""
    limit = pipeline.manifest["batch"]["max"]
    return max(1, limit // 2) if cfg_scale > 1.0 else limit


def sample_requests(pipeline, requests: list[SampleRequest]) -> tuple[list[np.ndarray | Exception], list[int]]:
    """Samples every image of ``requests``, merged into sampling batches.

    Returns each request's samples (n, C, H, W) float32, or the exception that its sampling batch raised, and the
    size of every sampling batch that ran (for the metrics).
    """
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for r, request in enumerate(requests):
        for i, scale in enumerate(request.cfg_scales):
            key = (float(scale), (r, i) if pipeline.sampler.kind == "ddpm" else None)
            groups.setdefault(key, []).append((r, i))
    results: list[np.ndarray | Exception] = [np.empty((len(q.labels), *pipeline.sample_shape), np.float32)
                                             for q in requests]
    batch_sizes = []
    for (scale, _), members in groups.items():
        size = images_per_batch(pipeline, scale)
        for start in range(0, len(members), size):
            chunk = members[start: start + size]
            labels = [int(requests[r].labels[i]) for r, i in chunk]
            noise = np.stack([requests[r].noise[i] for r, i in chunk])
            seed = int(requests[chunk[0][0]].seeds[chunk[0][1]])
            try:
                samples = pipeline(labels, cfg_scale=scale, seed=seed, noise=noise).samples
            except Exception as error:  # noqa: BLE001 - reported to the requests of this batch, the rest go on
                for r, _ in chunk:
                    results[r] = error
                continue
            batch_sizes.append(len(chunk))
            for (r, i), sample in zip(chunk, samples):
                if not isinstance(results[r], Exception):
                    results[r][i] = sample
    return results, batch_sizes
