"""Runtime backends behind one small interface. Each reads only the manifest and the files it lists.

A backend runs one model call on one subset engine::

    state = backend.new_request()                      # the request's cache: one buffer per cache slot
    model_out = backend.run(subset_index, feeds, state)

``feeds`` maps the model's input names (the manifest's ``model/inputs``: for DiT and U-ViT ``x`` (N, C, H, W)
float32, ``t`` (N,) float32, ``y`` (N,) int64) to numpy arrays; ``model_out`` is the manifest's ``model/output``,
(N, C_out, H, W) float32 numpy. The engine reads the slots its subset reuses from ``state`` and writes its fresh
branch outputs into ``state``; the cache belongs to the request, so requests in different threads never share one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np


class Backend(Protocol):
    name: str

    @property
    def providers(self) -> list[str]:
        """What really executes (for ONNX Runtime, the providers the sessions report, not those asked for)."""

    def new_request(self) -> object:
        """A fresh per-request cache."""

    def run(self, subset: int, feeds: dict[str, np.ndarray], state: object) -> np.ndarray:
        """One model call on subset engine ``subset``; returns the model output (N, C_out, H, W) float32."""

    def write_cache(self, state: object, slot: str, value: np.ndarray) -> None:
        """Sets cache slot ``slot`` of a request to ``value`` (N, T, D) (for verification)."""

    def read_cache(self, state: object, slot: str) -> np.ndarray:
        """A copy of cache slot ``slot`` of a request as float32 (N, T, D)."""


BACKENDS = ("onnxruntime", "tensorrt", "torch")


def load_backend(name: str, manifest: dict, folder: Path, subsets: Sequence[int] | None = None, **options) -> Backend:
    """The backend ``name`` with the engines of ``subsets`` (default: all) loaded."""
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(manifest, folder, subsets=subsets, **options)
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(manifest, folder, subsets=subsets, **options)
    if name == "torch":
        from .torch import TorchBackend

        return TorchBackend(manifest, folder, subsets=subsets, **options)
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def weight_arrays(manifest: dict, folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of ``weights.bin`` as a read-only memory-mapped numpy view (nothing is copied)."""
    from ...core.manifest import file_path

    path = file_path(Path(folder), manifest["weights"]["file"], "manifest field 'weights'")
    blob = np.memmap(path, dtype=np.uint8, mode="r")
    arrays = {}
    for entry in manifest["weight_tensors"]:
        dtype = _numpy_dtype(entry["dtype"])
        raw = blob[entry["offset"]: entry["offset"] + entry["length"]]
        arrays[entry["name"]] = raw.view(dtype).reshape(entry["shape"])
    return arrays


def engine_path(folder: Path, record: dict) -> Path:
    """The engine file of subset ``record``, inside the build folder (see
    :func:`l2c_export.core.manifest.file_path`)."""
    from ...core.manifest import file_path

    return file_path(Path(folder), record["engine"]["file"], f"manifest field 'subsets/{record['index']}/engine'")


def _numpy_dtype(name: str) -> np.dtype:
    if name in ("bfloat16", "float8_e4m3fn"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def model_inputs(record: dict) -> list[dict]:
    """A subset's inputs that the caller feeds (not cache inputs)."""
    return [tensor for tensor in record["inputs"] if tensor["role"] != "cache"]


def cache_inputs(record: dict) -> list[dict]:
    return [tensor for tensor in record["inputs"] if tensor["role"] == "cache"]


def fresh_outputs(record: dict) -> list[dict]:
    return [tensor for tensor in record["outputs"] if tensor["role"] == "fresh"]


def selected_subsets(manifest: dict, subsets: Sequence[int] | None) -> list[dict]:
    records = manifest["subsets"]
    if subsets is None:
        return list(records)
    return [records[i] for i in subsets]
