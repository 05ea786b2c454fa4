"""The runtime: reads a build's manifest, and samples by running each model call on that call's subset engine.

It drives the one denoising loop (:func:`l2c_export.samplers.denoise`) with numpy arrays, so the ONNX Runtime and
TensorRT backends need no PyTorch; every name and shape comes from the manifest. Each call is one request with its
own cache, so a pipeline can serve requests from several threads::

    pipe = L2CPipeline.from_engine_dir("engines/dit-digits-onnxruntime-fp32")
    result = pipe(labels=[3, 7], cfg_scale=4.0, seed=0)
    result.images      # list of PIL images (pixel models) / result.samples (n, C, H, W)

A build that carries a text encoder and tokenizer takes prompts, and one with a VAE decoder gives images of its
latents (the manifest's ``components``, :mod:`.components`)::

    result = pipe(prompt=["a handwritten seven"], negative_prompt="", seed=0, decode=True)
    result.images      # PIL images decoded from the latents, as the diffusers pipeline's output_type="pil"
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..core import manifest as manifest_io
from ..core.util import check_finite
from ..samplers import ModelCall, denoise, sampler_from_dict
from ..samplers.guidance import InitialNoiseRows, NoiseRows, apply_guidance
from .backends import Backend, load_backend
from .components import (ImageDecoder, PromptEncoder, PromptError, check_prompt, negative_prompts,
                         refuse_unused_negative_prompt)


@dataclass(frozen=True)
class ModelInterface:
    """The model's graph interface as the manifest records it: which input is the sample and the time, the
    conditioning inputs (:mod:`.conditioning`: a label, or prompt embeddings and their mask), their shapes, and the
    output. Every shape and name a runtime uses comes from here."""

    sample: str
    time: str
    label: str | None  # the label input's name; None for a model conditioned otherwise
    output: str
    sample_shape: tuple[int, ...]  # per sample: (C, H, W)
    output_shape: tuple[int, ...]  # per sample: (C_out, H, W)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "ModelInterface":
        from ..core.interface import CONDITIONING, label_record

        by_role = {tensor["role"]: tensor for tensor in manifest["model"]["inputs"]}
        missing = {"sample", "time", CONDITIONING} - set(by_role)
        if missing:
            raise manifest_io.ManifestError(f"manifest: field 'model/inputs' has no input with role "
                                            f"{', '.join(sorted(missing))}")
        output = manifest["model"]["output"]
        label = label_record(manifest["model"]["inputs"])
        return cls(sample=by_role["sample"]["name"], time=by_role["time"]["name"],
                   label=None if label is None else label["name"], output=output["name"],
                   sample_shape=tuple(by_role["sample"]["shape"][1:]), output_shape=tuple(output["shape"][1:]))

    def feeds(self, x: np.ndarray, t: np.ndarray, condition) -> dict[str, np.ndarray]:
        """Input name -> array for one model call: x (N, C, H, W) float32, t (N,) float32, and ``condition``: the
        conditioning inputs by name (:func:`.conditioning.model_batch_conditioning`), or the labels y (N,) int64."""
        if not isinstance(condition, dict):
            condition = {self.label: np.ascontiguousarray(condition, dtype=np.int64)}
        return {self.sample: np.ascontiguousarray(x, dtype=np.float32),
                self.time: np.ascontiguousarray(t, dtype=np.float32), **condition}


@dataclass
class SampleResult:
    samples: np.ndarray  # (n, C, H, W) float32: images in [-1, 1] for pixel models, latents for latent models
    seconds: float  # the whole sampling loop
    engine_seconds: float  # inside the engines
    step_subsets: list[int] = field(default_factory=list)  # the subset of each model call
    # latent models decoded by the build's VAE decoder: (n, 3, H, W) in about [-1, 1]; a video model's (n, 3, F, H, W)
    decoded: np.ndarray | None = None

    @property
    def overhead_fraction(self) -> float:
        """Time spent outside the engines (sampler math, dispatch, binding) over the whole loop."""
        return max(0.0, 1.0 - self.engine_seconds / self.seconds) if self.seconds > 0 else 0.0

    @property
    def pixels(self) -> np.ndarray:
        """The images (n, C, H, W) in [-1, 1] before clamping: a pixel model's samples, or the decoded latents."""
        if self.decoded is not None:
            return self.decoded
        if self.samples.shape[1] not in (1, 3):
            raise ValueError("latent samples: decode them (decode=True, with a build that has a VAE decoder)")
        return self.samples

    @property
    def frames(self) -> np.ndarray:
        """A video model's decoded clips as ``WanPipeline(output_type="np").frames``: (n, F, H, W, 3) float32 in
        [0, 1] (the decoded (n, 3, F, H, W) halved and shifted, clamped)."""
        if self.decoded is None or self.decoded.ndim != 5:
            raise ValueError("frames are a video model's decoded clips: sample a clip build with decode=True")
        return np.clip(np.moveaxis(self.decoded, 1, -1) / 2 + 0.5, 0, 1).astype(np.float32)

    @property
    def images(self):
        """PIL images of a pixel-space model's samples, or of the decoded latents."""
        from PIL import Image

        from ..core.images import to_uint8

        pictures = to_uint8(self.pixels)
        return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pictures]


class L2CPipeline:
    """Samples from an L2C build: class labels in, images or latents out."""

    def __init__(self, manifest: dict, folder: Path, backend: Backend, component_providers: Sequence | None = None):
        """``component_providers``: ONNX Runtime providers of the text encoder and VAE decoder sessions (default:
        the CPU; the onnxruntime backend's own where it runs the subsets)."""
        self.manifest = manifest
        self.folder = Path(folder)
        self.backend = backend
        self.sampler = sampler_from_dict(manifest["sampler"])
        self.interface = ModelInterface.from_manifest(manifest)
        self.num_classes = manifest["guidance"].get("null_class")  # labels 0 .. null_class - 1 (label models)
        self.sampler_channels = manifest["guidance"].get("sampler_channels")  # None: the sampler takes every channel
        self.sample_shape = self.interface.sample_shape
        self.step_subset = manifest["schedule"]["step_subset"]
        self.full_subset = next(s["index"] for s in manifest["subsets"] if all(s["compute"]))
        components = manifest.get("components", {})
        providers = component_providers or ("CPUExecutionProvider",)
        self.prompt_encoder = PromptEncoder(manifest, self.folder, providers) if "prompt_encoding" in components else None
        self.decoder = ImageDecoder(manifest, self.folder, providers) if "vae_decoder" in components else None

    @classmethod
    def from_engine_dir(cls, path: str | Path, backend: str = "onnxruntime", verify: bool = True,
                        subsets: Sequence[int] | None = None, **backend_options) -> "L2CPipeline":
        """Loads ``path/manifest.json`` (checking every file's sha256 unless ``verify`` is false) and its engines."""
        data = manifest_io.load(path, verify_files=verify)
        providers = backend_options.get("providers") if backend == "onnxruntime" else None
        return cls(data, Path(path), load_backend(backend, data, Path(path), subsets=subsets, **backend_options),
                   component_providers=providers)

    @property
    def providers(self) -> list[str]:
        return self.backend.providers

    def __call__(self, labels: Sequence[int] | None = None, cfg_scale: float | None = None, seed: int = 0,
                 noise: np.ndarray | None = None, full: bool = False, progress: bool = False,
                 conditioning: dict[str, np.ndarray] | None = None, where: str = "conditioning",
                 prompt: Sequence[str] | str | None = None, negative_prompt: Sequence[str] | str | None = None,
                 decode: bool = False, batch_size: int | None = None,
                 names: Mapping[str, str] | None = None) -> SampleResult:
        """Samples one image per label (a label model) or per prompt (``prompt``: texts, for a build with a text
        encoder; or ``conditioning``: the text arrays by the pipelines' argument names, :mod:`.conditioning`;
        ``where`` names it in errors; or the path of an .npz of them).

        noise: (n, C, H, W) float32 initial noise for the n conditional samples (default: ``make_noise(seed, ...)``,
        the latents diffusers draws for ``generator=torch.Generator().manual_seed(seed)``);
        guidance duplicates it for the unconditional half. DDPM draws its step noise from ``seed`` too.
        full: run the full-compute engine at every call (the reference the schedule is measured against).
        negative_prompt: with ``prompt`` only, when guiding: the unconditional half's text (default "", as the PixArt
        pipelines; one, or one per prompt); refused rather than dropped where it would not be used.
        decode: decode latents with the build's VAE decoder into ``result.decoded``.
        batch_size: images encoded, sampled and decoded at once (default: the build's largest model batch, halved
        when guiding, :func:`.conditioning.images_per_batch`), so that a long list of prompts takes the memory of
        one batch; the samples are those of one batch of all n, since every sample's noise is its own rows of the
        seeded streams.
        names: how messages call the arguments (default their Python names; the CLI passes its flags,
        :data:`.conditioning.FLAG_NAMES`).
        """
        from ..core.memory import check_run_fits
        from .conditioning import (ARGUMENT_NAMES, ConditioningError, classifier_free_batch, images_per_batch,
                                   load_conditioning, model_batch_conditioning, request_arguments)

        names = names or ARGUMENT_NAMES

        cfg_scale = check_finite(self.manifest["guidance"]["cfg_scale"] if cfg_scale is None else cfg_scale,
                                 "cfg_scale", low=1.0)
        guiding = classifier_free_batch(self.manifest, cfg_scale)
        if batch_size is None:
            batch_size = images_per_batch(self.manifest, cfg_scale)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size is {batch_size!r}; expected a positive integer (images sampled at once)")
        if decode and self.decoder is None and self.manifest["model"]["space"] == "latent":
            raise ValueError(f"{self.folder}: the build has no VAE decoder (field 'components/vae_decoder'); build "
                             f"from a diffusers folder with a vae/ to decode, or save the latents")
        negatives = None
        if prompt is not None:
            if conditioning is not None:
                raise ValueError("give prompts or conditioning arrays, not both")
            if self.prompt_encoder is None:
                raise ValueError(f"{self.folder}: the build has no text encoder and tokenizer (field "
                                 f"'components/text_encoder'); give prompt embeddings (conditioning) instead, or "
                                 f"build from a diffusers folder with text_encoder/ and tokenizer/")
            prompts = [prompt] if isinstance(prompt, (str, bytes)) else list(prompt)
            if not prompts:
                raise PromptError("prompt: expected one or more prompts")
            prompts = [check_prompt(text, f"prompt {i + 1}" if len(prompts) > 1 else "prompt")
                       for i, text in enumerate(prompts)]
            if negative_prompt is not None and not guiding:
                refuse_unused_negative_prompt(guiding, True, False, names)
            if guiding:
                negatives = negative_prompts("" if negative_prompt is None else negative_prompt, len(prompts))
            n, where = len(prompts), "prompt"
        else:
            if negative_prompt is not None:
                refuse_unused_negative_prompt(guiding, False, conditioning is not None, names)
            if isinstance(conditioning, (str, os.PathLike)):  # an .npz file
                where = f"conditioning {conditioning}"
                conditioning = load_conditioning(conditioning, where, request_arguments(self.manifest))
            elif conditioning is not None and not isinstance(conditioning, Mapping):
                raise ConditioningError(f"conditioning is a {type(conditioning).__name__}; expected a dict of arrays "
                                        f"by the pipelines' argument names "
                                        f"({', '.join(request_arguments(self.manifest, negatives=True))}), or the "
                                        f"path of an .npz of them")
            # the whole request checked once, so that a message names what is wrong in it, not in one batch
            n, _ = model_batch_conditioning(self.manifest, guiding, labels, conditioning, where, cfg_scale, names)
        check_run_fits(self.manifest, n, guiding, f"{n} {'labels' if labels is not None else where}",
                       batch=batch_size)
        expected = (n, *self.sample_shape)
        if noise is not None and tuple(noise.shape) != expected:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {expected} (n samples, C, H, W)")
        if noise is not None and not np.isfinite(noise).all():
            raise ValueError("noise holds NaN or infinite values; expected finite noise")
        # make_noise(seed, (n, ...)) (diffusers' draw for torch.Generator().manual_seed(seed)) and the first n rows of
        # each DDPM step's step_noise(seed, s, ...), drawn a batch at a time
        initial_noise = InitialNoiseRows(seed, self.sample_shape, n) if noise is None else None
        ddpm_streams: dict[int, NoiseRows] = {}

        def ddpm_noise(s: int, rows: int) -> np.ndarray:
            if s not in ddpm_streams:
                ddpm_streams[s] = NoiseRows(seed + s + 1, self.sample_shape)
            return ddpm_streams[s].draw(rows)

        starts = range(0, n, batch_size)
        subsets = [self.full_subset] * self.sampler.num_calls if full else list(self.step_subset)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.sampler.num_calls * len(starts), leave=False,
                       desc=f"sampling {n} image(s) ({self.backend.name})")
        samples, decoded, seconds, engine_seconds = [], [], 0.0, 0.0
        try:
            for start in starts:
                stop = min(n, start + batch_size)
                if prompt is not None:
                    batch_conditioning = self.prompt_encoder(prompts[start:stop], negatives[start:stop] if guiding
                                                             else "", guiding)
                    batch_labels = None
                else:
                    batch_conditioning = None if conditioning is None else {
                        name: np.asarray(array)[start:stop] for name, array in conditioning.items()}
                    batch_labels = None if labels is None else list(labels)[start:stop]
                _, condition = model_batch_conditioning(self.manifest, guiding, batch_labels, batch_conditioning,
                                                        where, cfg_scale, names)
                batch_noise = noise[start:stop] if noise is not None else initial_noise.draw(stop - start)
                x, batch_seconds, batch_engine_seconds = self._sample(
                    np.asarray(batch_noise, dtype=np.float32), condition, guiding, cfg_scale, subsets,
                    lambda s, rows=stop - start: ddpm_noise(s, rows), bar)
                samples.append(x)
                seconds += batch_seconds
                engine_seconds += batch_engine_seconds
                if decode and self.decoder is not None:
                    decoded.append(self.decoder(x))
        finally:
            if bar is not None:
                bar.close()
        return SampleResult(samples=np.concatenate(samples), seconds=seconds, engine_seconds=engine_seconds,
                            step_subsets=subsets, decoded=np.concatenate(decoded) if decoded else None)

    def _sample(self, noise: np.ndarray, condition: dict, guiding: bool, cfg_scale: float, subsets: list[int],
                ddpm_noise, bar) -> tuple[np.ndarray, float, float]:
        """One batch: initial noise (b, C, H, W), the model batch's conditioning inputs (2b rows when ``guiding``),
        ``ddpm_noise(call) -> (b, C, H, W)`` -> (samples (b, C, H, W) float32, seconds of the loop, seconds in the
        engines)."""
        n = len(noise)
        guided, rule = self.manifest["guidance"]["guided_channels"], self.manifest["guidance"]["rule"]
        state = self.backend.new_request()
        engine_seconds = 0.0

        def run_model(call: ModelCall) -> np.ndarray:
            nonlocal engine_seconds
            model_x = np.concatenate([call.x, call.x]) if guiding else call.x  # both halves run on the same samples
            t = np.full(len(model_x), call.t, dtype=np.float32)
            engine_start = time.perf_counter()
            out = self.backend.run(subsets[call.index], self.interface.feeds(model_x, t, condition), state)
            engine_seconds += time.perf_counter() - engine_start
            out = apply_guidance(out, cfg_scale, guided, rule)[:n] if guiding else out
            return out if self.sampler_channels is None else out[:, :self.sampler_channels]

        start = time.perf_counter()
        x = denoise(self.sampler, noise, run_model, ddpm_noise, progress=bar.update if bar is not None else None)
        return np.asarray(x, dtype=np.float32), time.perf_counter() - start, engine_seconds
