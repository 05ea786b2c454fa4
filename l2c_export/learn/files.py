"""A learned router's file: this project's router format (safetensors) and its string metadata."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from ..routers import RouterLogits, save_router
from ..samplers import DenoisingSampler
from .settings import LearnSettings


def router_metadata(spec_name: str, sampler: DenoisingSampler, settings: LearnSettings, data: str, seconds: float,
                    official_model: str | None = None, image_size: int | None = None,
                    num_classes: int | None = None, sublayers: Sequence[str] | None = None) -> dict[str, str]:
    """String metadata of a learned router file. ``model``/``image_size``/``num_classes`` are set only for official
    checkpoints, so that ``schedule`` counts MACs of the right model (it reads those keys); ``sublayers`` (JSON) names
    the columns of a model whose sub-layers are named (a diffusers model)."""
    meta = {"learned_by": "l2c-export learn", "spec": spec_name, "sampler": sampler.kind,
            "num_sampling_steps": str(sampler.num_calls), "timesteps": json.dumps(sampler.timesteps.tolist()),
            "data": data, "seconds": f"{seconds:.1f}", "settings": json.dumps(asdict(settings))}
    if official_model:
        meta["model"] = official_model
    if image_size:
        meta["image_size"] = str(image_size)
    if num_classes:
        meta["num_classes"] = str(num_classes)
    if sublayers:
        meta["sublayers"] = json.dumps(list(sublayers))
    return meta


def write_router(router: RouterLogits, path: Path, metadata: dict[str, str]) -> None:
    """This project's router format (see :func:`l2c_export.routers.save_router`)."""
    save_router(router, path, metadata)
