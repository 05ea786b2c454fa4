"""Router files: the authors' ``.pt`` (Learning-to-Cache's ``DiT/ckpt/DDIM20_router.pt``) and their decoding into
schedules.

Authors' format: a torch archive holding ``{"routers": {"{i}.prob": (2 * depth,) logits}, "opt": ..., "args":
argparse.Namespace}`` with one entry per sampling step. Router index ``i`` is the step's position in the *ascending*
timestep list, so ``i = N - 1`` is the first sampling step (t = 999). Their sampler computes everything at odd ``i``
(clearing the cache) and, at even ``i``, computes sub-layer ``j`` when ``sigmoid(logit[j]) > threshold``.

Here router logits are always held in *sampling order*: ``logits[s]`` is the router of sampling step ``s``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ..core.schedule import Schedule, ScheduleMode, check_mode
from ..core.util import check_finite, short_repr
from ..models.checkpoint import CheckpointError, load_torch_file


class RouterError(ValueError):
    """A router file that cannot be read; the message names the file and the field."""


@dataclass
class RouterLogits:
    logits: np.ndarray  # (num_steps, num_sublayers) float32, sampling order
    source: str
    meta: dict = field(default_factory=dict)  # what the file says of its model: model, image_size, num_classes, ...

    @property
    def sublayers(self) -> list[str] | None:
        """The columns' names where the model names its sub-layers (a diffusers model); None: attn_j/mlp_j."""
        return self.meta.get("sublayers")

    @property
    def num_steps(self) -> int:
        return self.logits.shape[0]

    @property
    def depth(self) -> int:
        return self.logits.shape[1] // 2

    def probabilities(self) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logits.astype(np.float64)))

    @property
    def sampler(self) -> str:
        """The sampler the router was made for (its rows are that sampler's model calls); DDIM unless it says."""
        return str(self.meta.get("sampler", "ddim"))

    def save(self, path: str | Path) -> None:
        """Writes the router as :func:`load_router` reads it back: :func:`save_router` with :attr:`meta` as string
        metadata (a string as it is, anything else as JSON)."""
        save_router(self, path, {key: value if isinstance(value, str) else json.dumps(value)
                                 for key, value in self.meta.items()})

    def to_schedule(self, threshold: float, mode: ScheduleMode = "official",
                    timesteps: list[int] | None = None) -> Schedule:
        """Decode into a schedule with one row per model call.

        ``official``: as the authors' samplers; only the calls where they consult the router
        (:func:`l2c_export.samplers.official_cache_calls`: for DDIM the steps whose router index ``N - 1 - s`` is
        even, for DPM-Solver-2S the first call of solver steps 1 .. K-1) compute sub-layer j where sigmoid(logit j) >
        threshold; every other call computes everything.
        ``general``: every call but the first is decided by its router.
        """
        from ..samplers import official_cache_calls

        check_mode(mode)
        threshold = check_finite(threshold, "threshold", 0.0, 1.0)
        decided = self.probabilities() > threshold
        n = self.num_steps
        if mode == "official":
            compute = np.ones_like(decided)
            cache_calls = official_cache_calls(self.sampler, n)
            compute[cache_calls] = decided[cache_calls]
        else:
            compute = decided
            compute[0] = True
        return Schedule(compute, timesteps=timesteps, source=self.source, threshold=float(threshold), mode=mode,
                        sampler=self.sampler, sublayers=self.sublayers)


_AUTHORS_KEY = re.compile(r"^(\d+)\.prob$")
ALWAYS_COMPUTE = 1e4  # a finite logit whose sigmoid is 1.0 in float64: the call computes every sub-layer


def load_router(path: str | Path) -> RouterLogits:
    """Router logits of an authors' ``.pt`` file (restricted unpickling), in sampling order."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _load_router_safetensors(path)
    try:
        data = load_torch_file(path)
    except CheckpointError as error:
        raise RouterError(str(error)) from error
    if isinstance(data, Mapping) and data and all(_AUTHORS_KEY.match(str(key)) for key in data):
        return _authors_dpm_router(data, path)
    routers = data.get("routers") if isinstance(data, Mapping) else None
    if not isinstance(routers, Mapping):
        raise RouterError(f"{path}: expected a dict with field 'routers' mapping '{{i}}.prob' to logit tensors "
                          f"(the authors' DiT file), or a bare '{{i}}.prob' dict (their U-ViT file)")
    args = vars(data["args"]) if hasattr(data.get("args"), "__dict__") else {}
    meta = {key: args[key] for key in ("model", "image_size", "num_classes", "num_sampling_steps") if key in args}
    meta["sampler"] = "ddim"
    return RouterLogits(_stack_by_index(routers, str(path)), source=str(path), meta=meta)


def _authors_dpm_router(routers: Mapping, path: Path) -> RouterLogits:
    """The authors' U-ViT router (``U-ViT/ckpt/dpm20_router.pth``): a bare ``{i}.prob`` dict with one entry per model
    call of DPM-Solver-2S, of which router ``k`` serves the first call of solver step ``k`` (call ``2k``), as their
    ``load_ranking`` reads it. Held per call in sampling order: row ``2k`` is router ``k``; midpoint rows (odd) hold
    :data:`ALWAYS_COMPUTE`, since their sampler computes everything there."""
    by_index = _stack_by_index(routers, str(path))[::-1]  # back to the file's index order
    calls = np.full_like(by_index, ALWAYS_COMPUTE)
    calls[0::2] = by_index[: (len(by_index) + 1) // 2]
    return RouterLogits(calls, source=str(path), meta={"sampler": "dpm_solver_2s"})


def _stack_by_index(routers: Mapping, where: str) -> np.ndarray:
    by_index = {}
    for key, value in routers.items():
        match = _AUTHORS_KEY.match(str(key))
        if not match or getattr(value, "ndim", None) != 1:
            raise RouterError(f"{where}: field 'routers' key {short_repr(key)}: expected '{{i}}.prob' -> a 1-D logit "
                              f"tensor")
        by_index[int(match.group(1))] = np.asarray(value.detach().float().numpy() if hasattr(value, "detach")
                                                    else value, dtype=np.float32)
    for index, logits in by_index.items():
        if not np.isfinite(logits).all():
            raise RouterError(f"{where}: field 'routers' key '{index}.prob' holds NaN or infinite logits; expected "
                              f"finite numbers")
    n = len(by_index)
    if sorted(by_index) != list(range(n)):
        raise RouterError(f"{where}: field 'routers' must hold indices 0..{n - 1}; got {sorted(by_index)}")
    widths = {v.shape[0] for v in by_index.values()}
    if len(widths) != 1 or next(iter(widths)) % 2:
        raise RouterError(f"{where}: field 'routers' logits must all have the same even length 2 * depth; "
                          f"got lengths {sorted(widths)}")
    # Router index i belongs to sampling step N - 1 - i.
    return np.stack([by_index[n - 1 - s] for s in range(n)])


def _load_router_safetensors(path: Path) -> RouterLogits:
    from safetensors import safe_open

    if not path.is_file():
        raise RouterError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            meta = dict(f.metadata() or {})
    except Exception as error:
        raise RouterError(f"{path}: not a readable safetensors file ({error})") from error
    if "sublayers" in meta:
        try:
            meta["sublayers"] = json.loads(meta["sublayers"])
        except ValueError:
            meta["sublayers"] = None
        names = meta["sublayers"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise RouterError(f"{path}: metadata field 'sublayers' must be a JSON list of sub-layer names")
    width = len(meta["sublayers"]) if "sublayers" in meta else None
    if "logits" not in tensors or tensors["logits"].ndim != 2 or (
            tensors["logits"].shape[1] % 2 if width is None else tensors["logits"].shape[1] != width):
        raise RouterError(f"{path}: expected tensor 'logits' of shape (num_steps, "
                          f"{'2 * depth' if width is None else f'{width} (metadata sublayers)'}) in sampling order")
    if not np.issubdtype(tensors["logits"].dtype, np.floating) or not np.isfinite(tensors["logits"]).all():
        raise RouterError(f"{path}: tensor 'logits' holds NaN or infinite values; expected finite float logits")
    for key in ("image_size", "num_classes"):
        if key in meta:
            if not meta[key].isdigit() or int(meta[key]) < 1:
                raise RouterError(f"{path}: metadata field {short_repr(key)} is {short_repr(meta[key])}; expected a "
                                  f"positive integer")
            meta[key] = int(meta[key])
    return RouterLogits(tensors["logits"].astype(np.float32), source=str(path), meta=meta)


def save_router(router: RouterLogits, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """This project's router format: safetensors with one tensor ``logits`` (num_steps, 2 * depth), float32, in
    sampling order (row 0 is the first step), and string metadata (sampler, model, lambda, ...)."""
    from safetensors.numpy import save

    from ..core.util import atomic_write_bytes

    atomic_write_bytes(Path(path), save({"logits": np.ascontiguousarray(router.logits, dtype=np.float32)},
                                        metadata={"format": "l2c-export-router-v1", **(metadata or {})}))
