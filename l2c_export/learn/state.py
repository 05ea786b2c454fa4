"""A learning run's resume state: a safetensors checkpoint of the logits, AdamW's moments and the iteration, refused
when its settings differ from the run's.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..core.util import parse_json
from .objective import Router
from .settings import LearnSettings

STATE_FORMAT = "l2c-export-learn-state-v1"


def save_state(path: Path, router: Router, optimizer: torch.optim.Optimizer, settings: LearnSettings,
                iteration: int) -> None:
    from safetensors.torch import save

    from ..core.util import atomic_write_bytes

    state = optimizer.state.get(router.logits, {})
    tensors = {"logits": router.logits.detach().contiguous()}
    if state:
        tensors["exp_avg"] = state["exp_avg"].contiguous()
        tensors["exp_avg_sq"] = state["exp_avg_sq"].contiguous()
    metadata = {"format": STATE_FORMAT, "iteration": str(iteration),
                "adam_step": str(float(state["step"])) if state else "0", "settings": json.dumps(asdict(settings))}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_state(path: Path, router: Router, optimizer: torch.optim.Optimizer, settings: LearnSettings,
                num_calls: int, width: int) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:
        raise ValueError(f"{path}: not a readable safetensors learning state ({error})") from error
    if metadata.get("format") != STATE_FORMAT or "logits" not in tensors:
        raise ValueError(f"{path}: field 'format' is {metadata.get('format')!r}; expected {STATE_FORMAT!r} with a "
                         f"tensor 'logits'")
    saved = parse_json(metadata.get("settings", "{}"), f"{path}: metadata field 'settings'", ValueError)
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: metadata field 'settings' is not a JSON object of learning settings")
    differing = {k: (saved.get(k), v) for k, v in asdict(settings).items() if k != "iterations" and saved.get(k) != v}
    if differing:
        raise ValueError(f"{path}: field 'settings' differs from this run in "
                         + ", ".join(f"{k} (saved {a!r}, now {b!r})" for k, (a, b) in differing.items()))
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: tensor {name!r} holds NaN or infinite values; expected a finite learning state")
    if tuple(tensors["logits"].shape) != (num_calls, width):
        raise ValueError(f"{path}: tensor 'logits' has shape {tuple(tensors['logits'].shape)}; expected "
                         f"({num_calls}, {width})")
    with torch.no_grad():
        router.logits.copy_(tensors["logits"])
    if "exp_avg" in tensors:
        optimizer.state[router.logits] = {"step": torch.tensor(float(metadata["adam_step"])),
                                          "exp_avg": tensors["exp_avg"].clone(),
                                          "exp_avg_sq": tensors["exp_avg_sq"].clone()}
    return int(metadata["iteration"])
