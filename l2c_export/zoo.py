"""Where models come from: the embedded default (a digits DiT shipped in the package) and official checkpoints.

A :class:`ModelSpec` says everything the later stages need about a model besides its weights: the architecture, whether
it samples pixels or VAE latents, and its default sampler and guidance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .diffusion import Sampler, SamplerKind
from .models import DiT, DiTConfig, dit_config
from .schedule import Schedule

DEFAULT_DIR = Path(__file__).parent / "default"
DEFAULT_NAME = "dit-digits"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: DiTConfig
    weights: Path
    space: str  # "pixel": samples are images in [-1, 1]; "latent": SD-VAE latents (scale 0.18215)
    sampler_kind: SamplerKind = "ddim"
    num_steps: int = 20
    cfg_scale: float = 4.0
    clip_denoised: bool = False
    default_schedule: Path | None = None

    def load_model(self) -> DiT:
        from .checkpoint import load_dit

        return load_dit(self.weights, self.config)

    def sampler(self, kind: SamplerKind | None = None, num_steps: int | None = None) -> Sampler:
        return Sampler.create(kind or self.sampler_kind, num_steps or self.num_steps, clip_denoised=self.clip_denoised)

    def schedule(self) -> Schedule | None:
        return Schedule.load(self.default_schedule) if self.default_schedule else None


def embedded_default() -> ModelSpec:
    """The digits DiT shipped in ``l2c_export/default/`` (see ``model.json`` there)."""
    info = json.loads((DEFAULT_DIR / "model.json").read_text())
    return ModelSpec(name=info["name"], config=DiTConfig.from_dict(info["config"]), weights=DEFAULT_DIR / info["weights"],
                     space=info["space"], sampler_kind=info["sampler"]["kind"], num_steps=info["sampler"]["num_steps"],
                     cfg_scale=info["cfg_scale"], clip_denoised=info["sampler"]["clip_denoised"],
                     default_schedule=DEFAULT_DIR / info["schedule"])


def official(checkpoint: str | Path, model: str, image_size: int, num_classes: int = 1000) -> ModelSpec:
    """An official DiT checkpoint: ``image_size`` in pixels, latents at 1/8 with 4 channels, learned sigma."""
    if image_size % 8:
        raise ValueError(f"--image-size {image_size} is not a multiple of 8 (latents are 1/8 of the image)")
    config = dit_config(model, input_size=image_size // 8, num_classes=num_classes)
    return ModelSpec(name=f"{model} {image_size}px", config=config, weights=Path(checkpoint), space="latent")


def resolve(checkpoint: str | Path | None, model: str | None, image_size: int | None,
            num_classes: int | None) -> ModelSpec:
    """The embedded default when no checkpoint is given, else the official model the flags describe."""
    if checkpoint is None:
        return embedded_default()
    if model is None or image_size is None:
        raise ValueError("--checkpoint needs --model (for example DiT-XL/2) and --image-size (pixels, for example 256)")
    return official(checkpoint, model, image_size, num_classes or 1000)
