"""Engine builders: what turns a subset's ONNX graph into what a backend runs. One small interface, two backends.

- ``onnxruntime``: the engine *is* the ONNX graph (sessions are created at run time, sharing the weights); nothing is
  built ahead of time, so a graph optimised per session cannot re-lay-out weights that other sessions share.
- ``tensorrt``: a strongly typed plan per subset (TensorRT 10/11: precision comes from the graph), built through
  Polygraphy with one optimisation profile over the batch and one timing cache shared by every subset. Plans are
  built stripped of their weights (``strip_plan``, TensorRT >= 10) and refitted at load time from ``weights.bin``,
  so the weights stay on disk once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..core.backends import BackendUnavailable


@dataclass(frozen=True)
class BatchRange:
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"--batch must satisfy 1 <= min <= opt <= max; got {self.min},{self.opt},{self.max}")

    @classmethod
    def parse(cls, text: str) -> "BatchRange":
        """``"8"`` (1..8, opt 8) or ``"1,4,16"``."""
        try:
            parts = [int(p) for p in str(text).split(",")]
        except ValueError:
            raise ValueError(f"--batch: expected N or MIN,OPT,MAX; got {text!r}") from None
        if len(parts) == 1:
            return cls(1, parts[0], parts[0])
        if len(parts) == 3:
            return cls(*parts)
        raise ValueError(f"--batch: expected N or MIN,OPT,MAX; got {text!r}")

    def to_dict(self) -> dict:
        return {"min": self.min, "opt": self.opt, "max": self.max}


class EngineBuilder(Protocol):
    name: str

    def check_available(self) -> None:
        """Raises BackendUnavailable before anything is written."""

    def engine_file(self, graph_file: str, graph_key: str) -> str:
        """The engine's file name for a graph (the graph itself where the backend runs ONNX)."""

    def build(self, graph_path: Path, engine_path: Path, inputs: list[dict], batch: BatchRange,
              dims: dict[str, tuple[int, int, int]]) -> None:
        """Builds ``engine_path`` from ``graph_path``; ``inputs`` are the manifest's tensor records, ``dims`` the
        (min, opt, max) of the sizes they name besides the batch (:meth:`ModelFamily.dim_ranges`)."""


class OnnxRuntimeBuilder:
    name = "onnxruntime"

    def check_available(self) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as error:
            raise BackendUnavailable("ONNX Runtime is not installed: pip install onnxruntime-gpu "
                                     "(it runs its CPU provider where there is no GPU)") from error

    def engine_file(self, graph_file: str, graph_key: str) -> str:
        return graph_file

    def build(self, graph_path: Path, engine_path: Path, inputs: list[dict], batch: BatchRange,
              dims: dict[str, tuple[int, int, int]]) -> None:
        assert engine_path == graph_path, "ONNX Runtime runs the graph itself"


class TensorRTBuilder:
    name = "tensorrt"

    def __init__(self, timing_cache: Path):
        self.timing_cache = timing_cache

    def check_available(self) -> None:
        try:
            import tensorrt as trt
        except ImportError as error:
            raise BackendUnavailable(
                "TensorRT is not installed. Install it on a machine with an NVIDIA GPU (pip install tensorrt, which "
                "downloads its libraries from NVIDIA's package index at install time), or build with "
                "--backend onnxruntime. Nothing was written.") from error
        try:
            builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
            if builder is None:
                raise RuntimeError("trt.Builder returned None")
        except Exception as error:
            raise BackendUnavailable(f"TensorRT {trt.__version__} is installed but cannot create a builder (no usable "
                                     f"NVIDIA GPU or driver?): {error}. Nothing was written.") from error

    def engine_file(self, graph_file: str, graph_key: str) -> str:
        """Plans are named by a hash of what built them: graph key, TensorRT version, GPU."""
        import tensorrt as trt

        digest = hashlib.sha256(f"{graph_key}|{trt.__version__}|{_gpu_name()}".encode()).hexdigest()[:16]
        return f"{Path(graph_file).stem}-{digest}.plan"

    def build(self, graph_path: Path, engine_path: Path, inputs: list[dict], batch: BatchRange,
              dims: dict[str, tuple[int, int, int]]) -> None:
        from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

        from ..core.util import atomic_write_bytes

        profile = Profile()
        for name, shapes in profile_shapes(inputs, batch, dims).items():
            profile.add(name, min=shapes[0], opt=shapes[1], max=shapes[2])
        config = CreateConfig(profiles=[profile], load_timing_cache=str(self.timing_cache)
                              if self.timing_cache.exists() else None, refittable=True, strip_plan=True)
        network = NetworkFromOnnxPath(str(graph_path), strongly_typed=True)
        plan = EngineBytesFromNetwork(network, config=config, save_timing_cache=str(self.timing_cache))()
        atomic_write_bytes(engine_path, bytes(plan))


def profile_shapes(inputs: list[dict], batch: BatchRange,
                   dims: dict[str, tuple[int, int, int]]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Input name -> its (min, opt, max) shapes for TensorRT's optimisation profile: the batch from ``batch``, every
    other named size from ``dims``, the fixed sizes as they are."""
    def size(dim, which: int) -> int:
        if dim == "batch":
            return (batch.min, batch.opt, batch.max)[which]
        if isinstance(dim, str):
            if dim not in dims:
                raise ValueError(f"the graph interface names a size {dim!r} with no range; known: "
                                 f"{', '.join(['batch', *dims])}")
            return dims[dim][which]
        return dim

    return {tensor["name"]: tuple(tuple(size(d, which) for d in tensor["shape"]) for which in range(3))
            for tensor in inputs}


def _gpu_name() -> str:
    """The GPU a plan is built for (plans are specific to the GPU model and compute capability)."""
    import subprocess

    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30, check=True)
        return result.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown-gpu"


def get_builder(backend: str, out_dir: Path) -> EngineBuilder:
    if backend == "onnxruntime":
        return OnnxRuntimeBuilder()
    if backend == "tensorrt":
        return TensorRTBuilder(out_dir / "timing.cache")
    raise ValueError(f"unknown backend {backend!r}; expected 'onnxruntime' or 'tensorrt'")
