"""Where the input of a learned step comes from, and what it is conditioned on: clean data noised to the step's
noise level (:class:`NoisedData`; an image folder, latents), or the states of trajectories the full model samples
(:class:`Trajectories`); labels, or a text model's prompts (:class:`Condition`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..models import family_of_config
from ..samplers import DenoisingSampler
from ..samplers.guidance import apply_guidance

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Condition:
    """Per-sample conditioning, the model's inputs after (x, t), for a batch of B: ``cond`` and, as the guidance
    batch's unconditional half, ``uncond``. Label models: the labels (B,) and the null class; text models: prompt
    embeddings (B, L, D) and masks (B, L), and the negative prompt's."""

    cond: tuple[torch.Tensor, ...]
    uncond: tuple[torch.Tensor, ...]

    @classmethod
    def of_labels(cls, labels: torch.Tensor, null_class: int) -> "Condition":
        labels = torch.as_tensor(labels, dtype=torch.int64)
        return cls((labels,), (torch.full_like(labels, null_class),))

    @classmethod
    def of_prompts(cls, arrays: dict, records: list[dict], guidance: dict, guiding: bool, where: str,
                   guidance_scale: float | None = None, max_tokens: int | None = None) -> "Condition":
        """A set of prompts from arrays by the pipelines' argument names, checked as the runtime checks them (the
        negative ones needed when ``guiding``): ``records`` the model's conditioning input records in its argument
        order, ``guidance`` its guidance record (``rule``, ``scale_argument``). An input fed the guidance scale (a
        guidance-distilled FLUX.1's) is fed ``guidance_scale``, (P,) for P prompts; prompts are at most
        ``max_tokens`` long (the pipeline's max_sequence_length: the longest a build of the model takes)."""
        from ..core.interface import request_records, scale_fed
        from ..samplers.conditioning import check_text_conditioning, pad_halves

        requested = request_records(records, guidance)
        checked = check_text_conditioning(arrays, requested, guiding, where, max_tokens=max_tokens)
        if guiding:  # a negative prompt of another length (a mask that pads_negative) padded to the longer
            checked = pad_halves(checked, requested)
        count = len(next(iter(checked.values()))[0])
        halves = []
        for record in records:
            if scale_fed(record, guidance):
                scale = np.full(count, guidance_scale, dtype=np.float32)
                halves.append((scale, scale))
            else:
                halves.append(checked[record["argument"]])
        cond = tuple(torch.from_numpy(c) for c, _ in halves)
        return cls(cond, tuple(torch.from_numpy(u) for _, u in halves) if guiding else cond)

    def __len__(self) -> int:
        return len(self.cond[0])

    def __getitem__(self, index) -> "Condition":
        return Condition(tuple(t[index] for t in self.cond), tuple(t[index] for t in self.uncond))

    def model_batch(self, guiding: bool) -> tuple[torch.Tensor, ...]:
        """The model batch's conditioning inputs: conditional half first, then the unconditional one when guiding."""
        return tuple(torch.cat([c, u]) for c, u in zip(self.cond, self.uncond)) if guiding else self.cond


class StepSource(Protocol):
    def draw(self, generator: torch.Generator, batch_size: int, call: int) -> tuple[torch.Tensor, object]:
        """x (batch, C, H, W) at the input of model call ``call`` and its conditioning: labels (batch,) int64 or a
        :class:`Condition`."""


class NoisedData:
    """Clean data x0 (images in [-1, 1], or latents as the model sees them) noised to a step's timestep."""

    def __init__(self, x0: np.ndarray, labels: np.ndarray, sampler: DenoisingSampler, description: str):
        if len(x0) == 0:
            raise ValueError(f"{description}: no samples")
        self.x0 = torch.from_numpy(np.ascontiguousarray(x0, dtype=np.float32))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.sampler = sampler
        self.description = description

    def draw(self, generator, batch_size, call):
        index = torch.randint(len(self.x0), (batch_size,), generator=generator)
        noise = torch.randn(self.x0[index].shape, generator=generator)
        alpha, sigma = self.sampler.noise_level(call)
        return alpha * self.x0[index] + sigma * noise, self.labels[index]


class Trajectories:
    """States the full model passes through when it samples from noise: the teacher needs no data.

    states: (P, num_calls, C, H, W), ``states[p, c]`` is the input of model call ``c``; labels: (P,), or the
    trajectories' :class:`Condition`.
    """

    def __init__(self, states: torch.Tensor, labels):
        self.states = states
        self.labels = labels
        self.description = f"{len(states)} trajectories sampled from the model"

    def draw(self, generator, batch_size, call):
        index = torch.randint(len(self.states), (batch_size,), generator=generator)
        return self.states[index, call], self.labels[index]


@torch.no_grad()
def sample_trajectories(model: nn.Module, sampler: DenoisingSampler, count: int, cfg_scale: float, seed: int,
                        batch_size: int = 256, progress: bool = True,
                        prompts: Condition | None = None) -> Trajectories:
    """Samples ``count`` trajectories with the full model (random labels, or random prompts of ``prompts`` for a text
    model; guidance as the sampler runs it) through the one denoising loop, and keeps every model call's input."""
    from ..samplers import ModelCall, denoise

    config = model.config
    family = family_of_config(config)
    sample_shape = next(spec.shape for spec in family.graph_inputs(config) if spec.role == "sample")
    generator = torch.Generator().manual_seed(seed)
    if prompts is None:
        labels = torch.randint(family.null_class(config), (count,), generator=generator)
        condition = Condition.of_labels(labels, family.null_class(config))
    else:
        labels = condition = prompts[torch.randint(len(prompts), (count,), generator=generator)]
    noise = torch.randn((count, *sample_shape), generator=generator)
    states = torch.empty((count, sampler.num_calls) + tuple(noise.shape[1:]))
    bar = tqdm(total=count * sampler.num_calls, desc="sampling trajectories", disable=not progress, leave=False)
    for begin in range(0, count, batch_size):
        x, y = noise[begin: begin + batch_size], condition[begin: begin + batch_size]

        def run_model(call: ModelCall) -> torch.Tensor:
            states[begin: begin + len(call.x), call.index] = call.x
            xb = torch.cat([call.x, call.x]) if cfg_scale > 1.0 else call.x
            t = torch.full((len(xb),), call.t, dtype=torch.float32)
            out = sampler_output(model(xb, t, *y.model_batch(cfg_scale > 1.0)), cfg_scale, family, config)
            bar.update(len(call.x))
            return out[: len(call.x)]

        denoise(sampler, x, run_model, lambda s: torch.randn(x.shape, generator=generator))
    bar.close()
    return Trajectories(states, labels)


def sampler_output(model_out: torch.Tensor, cfg_scale: float, family, config) -> torch.Tensor:
    """The model output as the sampler takes it: guided (as the family's pipeline guides), and only the channels the
    sampler steps on (a diffusers pipeline drops the learned-sigma half)."""
    if cfg_scale > 1.0:
        model_out = apply_guidance(model_out, cfg_scale, family.guided_channels(config), family.guidance_rule)
    channels = family.sampler_channels(config)
    return model_out if channels is None else model_out[:, :channels]


def load_image_folder(folder: Path, size: int, channels: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images of ``folder`` -> (n, channels, size, size) float32 in [-1, 1], labels (n,) and class names.

    ImageFolder layout: one subfolder per class, classes numbered in sorted order. Images directly in ``folder``
    have no class; they get label -1 (a random class is drawn for them)."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(p, -1) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    for index, name in enumerate(classes):
        files += [(p, index) for p in sorted((folder / name).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or in its class subfolders")
    images = []
    for path, _ in files:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            side = min(image.size)  # centre crop, then resize (the authors' center_crop_arr, simplified)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        images.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
    return np.stack(images), np.array([label for _, label in files], dtype=np.int64), classes


def load_latents(path: Path, labels_path: Path | None, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(n, C, H, W) latents of a ``.npy`` file, already scaled as the model sees them (SD-VAE: x 0.18215), and
    labels (n,) from ``labels_path`` (``.npy``), else -1 (a random class is drawn for each). ``shape``: the model's
    per-sample input (C, H, W)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    latents = np.load(path, allow_pickle=False)
    expected = tuple(shape)
    if latents.ndim != 4 or tuple(latents.shape[1:]) != expected:
        raise ValueError(f"{path}: latents of shape {latents.shape}; expected (n, {', '.join(map(str, expected))})")
    if not np.issubdtype(latents.dtype, np.floating) or not np.isfinite(latents).all():
        raise ValueError(f"{path}: latents must be finite floating-point numbers (found {latents.dtype} with NaN, "
                         f"infinite or non-float values)")
    if labels_path is None:
        return latents.astype(np.float32), np.full(len(latents), -1, dtype=np.int64)
    labels = np.load(labels_path, allow_pickle=False)
    if labels.shape != (len(latents),):
        raise ValueError(f"{labels_path}: labels of shape {labels.shape}; expected ({len(latents)},), one per latent")
    return latents.astype(np.float32), labels.astype(np.int64)


def with_random_labels(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Labels -1 (no class known) replaced by random classes; labels out of range refused."""
    labels = np.asarray(labels, dtype=np.int64).copy()
    bad = labels[(labels >= num_classes) | (labels < -1)]
    if len(bad):
        raise ValueError(f"labels {sorted(set(bad.tolist()))[:5]} are out of range for {num_classes} classes")
    missing = labels < 0
    labels[missing] = np.random.default_rng(seed).integers(num_classes, size=int(missing.sum()))
    return labels
