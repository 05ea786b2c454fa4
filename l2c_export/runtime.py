"""The runtime: reads a build's manifest, and samples by running each denoising step on that step's subset engine.

The sampler math (guidance, DDIM/DDPM updates) lives here, in numpy, so the ONNX Runtime and TensorRT backends need
no PyTorch. Each call is one request with its own cache, so a pipeline can serve requests from several threads::

    pipe = L2CPipeline.from_engine_dir("engines/dit-digits-onnxruntime-fp32")
    result = pipe(labels=[3, 7], cfg_scale=4.0, seed=0)
    result.images      # list of PIL images (pixel models) / result.samples (n, C, H, W)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import manifest as manifest_io
from .backends import Backend, load_backend
from .diffusion import (Sampler, apply_guidance, check_labels, guidance_batch, make_noise, step_noise)
from .util import check_finite


@dataclass
class SampleResult:
    samples: np.ndarray  # (n, C, H, W) float32: images in [-1, 1] for pixel models, latents for latent models
    seconds: float  # the whole sampling loop
    engine_seconds: float  # inside the engines
    step_subsets: list[int] = field(default_factory=list)

    @property
    def overhead_fraction(self) -> float:
        """Time spent outside the engines (sampler math, dispatch, binding) over the whole loop."""
        return max(0.0, 1.0 - self.engine_seconds / self.seconds) if self.seconds > 0 else 0.0

    @property
    def images(self):
        """PIL images of a pixel-space model's samples."""
        from PIL import Image

        from .images import to_uint8

        pictures = to_uint8(self.samples)
        return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pictures]


class L2CPipeline:
    """Samples from an L2C build: class labels in, images or latents out."""

    def __init__(self, manifest: dict, folder: Path, backend: Backend):
        self.manifest = manifest
        self.folder = Path(folder)
        self.backend = backend
        self.sampler = Sampler.from_dict(manifest["sampler"])
        config = manifest["model"]["config"]
        self.num_classes = config["num_classes"]
        self.sample_shape = (config["in_channels"], config["input_size"], config["input_size"])
        self.learn_sigma = config["learn_sigma"]
        self.step_subset = manifest["schedule"]["step_subset"]
        self.full_subset = next(s["index"] for s in manifest["subsets"] if all(s["compute"]))

    @classmethod
    def from_engine_dir(cls, path: str | Path, backend: str = "onnxruntime", verify: bool = True,
                        subsets: Sequence[int] | None = None, **backend_options) -> "L2CPipeline":
        """Loads ``path/manifest.json`` (checking every file's sha256 unless ``verify`` is false) and its engines."""
        data = manifest_io.load(path, verify_files=verify)
        return cls(data, Path(path), load_backend(backend, data, Path(path), subsets=subsets, **backend_options))

    @property
    def providers(self) -> list[str]:
        return self.backend.providers

    def __call__(self, labels: Sequence[int], cfg_scale: float | None = None, seed: int = 0,
                 noise: np.ndarray | None = None, full: bool = False, progress: bool = False) -> SampleResult:
        """Samples ``len(labels)`` images.

        noise: (n, C, H, W) float32 initial noise for the n conditional samples (default: ``make_noise(seed, ...)``);
        guidance duplicates it for the null-class half. DDPM draws its step noise from ``seed`` too.
        full: run the full-compute engine at every step (the reference the schedule is measured against).
        """
        labels = [int(label) for label in labels]
        if not labels:
            raise ValueError("no labels given; expected at least one class label")
        check_labels(labels, self.num_classes)
        cfg_scale = check_finite(self.manifest["guidance"]["cfg_scale"] if cfg_scale is None else cfg_scale,
                                 "cfg_scale", low=1.0)
        expected = (len(labels), *self.sample_shape)
        if noise is None:
            noise = make_noise(seed, expected)
        elif tuple(noise.shape) != expected:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {expected} (n labels, C, H, W)")
        elif not np.isfinite(noise).all():
            raise ValueError("noise holds NaN or infinite values; expected finite noise")
        guiding = cfg_scale > 1.0
        _, y = guidance_batch(noise, labels, self.num_classes, cfg_scale)
        x = np.asarray(noise, dtype=np.float32)  # the n conditional samples: DiT runs both halves on these
        guided = self.manifest["guidance"]["guided_channels"]
        state = self.backend.new_request()
        subsets = [self.full_subset] * self.sampler.num_steps if full else list(self.step_subset)
        engine_seconds = 0.0
        start = time.perf_counter()
        steps = range(self.sampler.num_steps)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"sampling ({self.backend.name})", leave=False)
        n = len(labels)
        for s in steps:
            model_x = np.concatenate([x, x]) if guiding else x
            t = np.full(len(model_x), float(self.sampler.timesteps[s]), dtype=np.float32)
            engine_start = time.perf_counter()
            out = self.backend.run(subsets[s], model_x, t, y, state)
            engine_seconds += time.perf_counter() - engine_start
            if guiding:
                out = apply_guidance(out, cfg_scale, guided)[:n]
            noise_s = None
            if self.sampler.kind == "ddpm" and s < self.sampler.num_steps - 1:
                noise_s = step_noise(seed, s, model_x.shape)[:n]  # drawn for the model batch, as DiT does
            x = self.sampler.step(s, x, out, noise_s, learn_sigma=self.learn_sigma).astype(np.float32)
        seconds = time.perf_counter() - start
        return SampleResult(samples=x, seconds=seconds, engine_seconds=engine_seconds, step_subsets=subsets)
