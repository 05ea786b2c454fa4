"""The peer of the learned schedule on the text-to-image model: cache-dit's DBCache (the ``cache-dit`` package, PyPI)
on diffusers' own pipeline of the folder (``PixArtAlphaPipeline``, ``StableDiffusion3Pipeline``), in PyTorch, as a
diffusers user runs it.

DBCache ("dual block cache") always runs the first ``Fn`` and the last ``Bn`` transformer blocks; after
``max_warmup_steps`` it skips the blocks between them (reusing their cached residual) whenever the relative L1 change
of the first ``Fn`` blocks' residual since the last computed step is below ``residual_diff_threshold``. What it spends
is counted from the blocks that actually ran (forward hooks on each of ``transformer_blocks``) with the model's own
per-sub-layer MACs (:class:`l2c_export.core.macs.MacCount`), so its MAC fraction is comparable with a schedule's.

:func:`match_mac_fraction` searches the knobs (Fn / Bn / warmup from :data:`STRUCTURES`, the threshold by bisection)
for the settings whose MAC fraction is nearest a target (the learned schedule's).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.macs import MacCount

BLOCKS = "transformer_blocks"  # PixArtTransformer2DModel's block list, the one DBCache caches
# (Fn_compute_blocks, Bn_compute_blocks, max_warmup_steps) tried when matching a MAC fraction; the threshold is searched.
STRUCTURES = ((1, 0, 2), (1, 0, 4), (1, 1, 2))
THRESHOLD_RANGE = (1e-3, 4.0)


def import_cache_dit():
    """``cache_dit``, its log at warnings unless ``CACHE_DIT_LOG_LEVEL`` says otherwise (it logs every context at
    info)."""
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
    import cache_dit

    return cache_dit


@dataclass(frozen=True)
class DBCacheSettings:
    """DBCache's knobs (cache-dit's ``DBCacheConfig`` field names, abbreviated)."""

    Fn: int
    Bn: int
    threshold: float
    warmup: int

    def config(self, num_steps: int):
        return import_cache_dit().DBCacheConfig(Fn_compute_blocks=self.Fn, Bn_compute_blocks=self.Bn,
                                       residual_diff_threshold=float(self.threshold), max_warmup_steps=self.warmup,
                                       num_inference_steps=num_steps)

    def as_dict(self) -> dict:
        return {"Fn_compute_blocks": self.Fn, "Bn_compute_blocks": self.Bn,
                "residual_diff_threshold": float(self.threshold), "max_warmup_steps": self.warmup}


@dataclass
class PeerSamples:
    """What a DBCache run drew: decoded images (n, C, H, W) about [-1, 1], its MAC fraction counted from the blocks
    that ran, the wall-clock seconds of the pipeline calls (text encoder, sampling and VAE decoding) and the steps
    cache-dit reports as cached (per batch)."""

    images: np.ndarray
    mac_fraction: float
    seconds: float
    block_calls: list[int]
    transformer_calls: int
    cached_steps: list[list[int]]


class BlockCounter:
    """Forward hooks on the transformer and each of its blocks: how many forwards ran, and each block's calls."""

    def __init__(self, transformer):
        blocks = getattr(transformer, BLOCKS)
        self.block_calls = [0] * len(blocks)
        self.transformer_calls = 0
        self.handles = [transformer.register_forward_hook(self._count_forward)]
        for index, block in enumerate(blocks):
            self.handles.append(block.register_forward_hook(self._count_block(index)))

    def _count_forward(self, *_):
        self.transformer_calls += 1

    def _count_block(self, index: int):
        def hook(*_):
            self.block_calls[index] += 1
        return hook

    def mac_fraction(self, macs: MacCount, sublayers: Sequence[str]) -> float:
        """MACs spent / MACs of as many full forwards: the always-run part at every forward plus each block's
        sub-layers (named ``transformer_blocks.i.*``) times the calls it ran."""
        per_block = [sum(macs.sublayer(j) for j, name in enumerate(sublayers) if name.startswith(f"{BLOCKS}.{i}."))
                     for i in range(len(self.block_calls))]
        if sum(per_block) != sum(macs.sublayer(j) for j in range(macs.width)):
            raise ValueError(f"the schedule's sub-layers {list(sublayers)} are not all inside {BLOCKS}")
        spent = self.transformer_calls * macs.always + sum(c * m for c, m in zip(self.block_calls, per_block))
        return spent / (self.transformer_calls * macs.full)

    def remove(self):
        for handle in self.handles:
            handle.remove()


def sample_dbcache(folder: str | Path, settings: DBCacheSettings | None, captions: Sequence[str], noise: np.ndarray,
                   num_steps: int, cfg_scale: float, macs: MacCount, sublayers: Sequence[str],
                   batch_size: int = 50) -> PeerSamples:
    """diffusers' own pipeline of the folder (:func:`l2c_export.demo.t2i.load_pipeline`; or ``folder`` itself when it
    is such a pipeline, loaded once for many calls) with ``cache_dit.enable_cache(pipe, DBCacheConfig(...))``:
    ``captions`` (n) from ``noise`` (n, C, h, w) latents, ``batch_size`` prompts per pipeline call, the negative
    prompt "" (the pipeline's), PixArt's caption cleaning and resolution binning off; the latents decoded by the
    folder's VAE as the pipeline decodes them (:func:`l2c_export.demo.t2i.decode_latents`), timed with the call.
    ``settings`` None: the pipeline without cache-dit (full compute)."""
    import torch

    from .t2i import call_options, decode_latents, load_pipeline

    cache_dit = import_cache_dit()

    pipe = folder if not isinstance(folder, (str, Path)) else load_pipeline(folder)
    if settings is not None:
        cache_dit.enable_cache(pipe, cache_config=settings.config(num_steps))
    images, cached, seconds = [], [], 0.0
    with torch.no_grad():  # one untimed, uncounted call first: PyTorch's first-call set-up is no part of the cost
        pipe(list(captions[:1]), negative_prompt="", num_inference_steps=num_steps, guidance_scale=cfg_scale,
             latents=torch.from_numpy(np.ascontiguousarray(noise[:1])), output_type="latent", **call_options(pipe))
    counter = BlockCounter(pipe.transformer)
    try:
        with torch.no_grad():
            for start in range(0, len(captions), batch_size):
                chunk = list(captions[start: start + batch_size])
                latents = torch.from_numpy(np.ascontiguousarray(noise[start: start + len(chunk)]))
                begin = time.perf_counter()
                out = pipe(chunk, negative_prompt="", num_inference_steps=num_steps, guidance_scale=cfg_scale,
                           latents=latents, output_type="latent", **call_options(pipe)).images
                decoded = decode_latents(pipe, out)
                seconds += time.perf_counter() - begin
                images.append(decoded.numpy())
                if settings is not None:
                    stats = cache_dit.summary(pipe.transformer, logging=False)
                    cached.append(sorted(int(step) for step in stats[0].cached_steps) if stats else [])
        fraction = counter.mac_fraction(macs, sublayers)
    finally:
        counter.remove()
        if settings is not None:
            cache_dit.disable_cache(pipe)
    return PeerSamples(images=np.concatenate(images), mac_fraction=fraction, seconds=seconds,
                       block_calls=list(counter.block_calls), transformer_calls=counter.transformer_calls,
                       cached_steps=cached)


def match_mac_fraction(folder, target: float, captions: Sequence[str], noise: np.ndarray, num_steps: int,
                       cfg_scale: float, macs: MacCount, sublayers: Sequence[str], batch_size: int = 50,
                       structures=STRUCTURES, iterations: int = 6, tolerance: float = 0.01) -> tuple[DBCacheSettings, list[dict]]:
    """The DBCache settings whose MAC fraction on ``captions``/``noise`` (a calibration set) is nearest ``target``:
    for each (Fn, Bn, warmup) of ``structures`` the threshold is bisected (geometrically, in
    :data:`THRESHOLD_RANGE`; a higher threshold caches more); of the settings within ``tolerance`` of the target
    the one with the highest PSNR against DBCache-off (full compute) on the calibration set wins (the peer's best
    shot), else the nearest. Returns it and every setting tried (``settings``, ``mac_fraction``, ``psnr``)."""
    from .metrics import psnr
    from .t2i import load_pipeline

    folder = load_pipeline(folder)  # one pipeline for every setting: cache-dit's hooks are released after each
    reference = sample_dbcache(folder, None, captions, noise, num_steps, cfg_scale, macs, sublayers,
                               batch_size).images
    tried: list[dict] = []

    def measure(settings: DBCacheSettings) -> float:
        drawn = sample_dbcache(folder, settings, captions, noise, num_steps, cfg_scale, macs, sublayers, batch_size)
        tried.append({"settings": settings.as_dict(), "mac_fraction": drawn.mac_fraction,
                      "psnr": psnr(drawn.images, reference)})
        return drawn.mac_fraction

    best_per_structure = []
    for fn, bn, warmup in structures:
        low, high = np.log(THRESHOLD_RANGE[0]), np.log(THRESHOLD_RANGE[1])
        nearest = None
        for _ in range(iterations):
            settings = DBCacheSettings(Fn=fn, Bn=bn, threshold=float(np.exp((low + high) / 2)), warmup=warmup)
            fraction = measure(settings)
            if nearest is None or abs(fraction - target) < abs(nearest[1] - target):
                nearest = (settings, fraction, tried[-1]["psnr"])
            if fraction > target:
                low = (low + high) / 2  # computes too much: cache more
            else:
                high = (low + high) / 2
        best_per_structure.append(nearest)
    close = [entry for entry in best_per_structure if abs(entry[1] - target) <= tolerance]
    if close:
        chosen = max(close, key=lambda entry: -np.inf if entry[2] is None else entry[2])
    else:
        chosen = min(best_per_structure, key=lambda entry: abs(entry[1] - target))
    return chosen[0], tried
