"""ONNX Runtime backend: one session per subset graph, the weights held once for all of them.

- Weights: every session gets the same memory-mapped arrays through ``SessionOptions.add_initializer`` with
  ``session.disable_prepacking`` set (measured on DiT-S/2: with prepacking each session keeps its own packed copy,
  more memory than not sharing at all). Graph optimisation stops at ``ORT_ENABLE_EXTENDED`` by default: at
  ``ORT_ENABLE_ALL`` some layout optimisers re-lay-out weights read from the graph file instead of the shared arrays.
- Activations: every session allocates from one process-wide CPU arena (``session.use_env_allocators``). Measured
  on DiT-S/2 with 11 subsets: all engines loaded and run once take 1.15x the memory of the full engine alone, against
  2.1x with an arena per session.
- Threads: one process-wide intra-op pool for all subset sessions (``use_per_session_threads = False``). With a pool
  per session, the pool of the subset that just ran keeps spinning while the next subset's pool works: on two cores
  that made the schedule slower than full compute.
  Its size, unless asked for: OMP_NUM_THREADS where set (the cap torch honours too; the test suite's parallel
  workers set it to their share of the cores, the CLI's commands to their --threads or the cores the load average
  leaves free: l2c_export/core/threads.py), else one thread per core.
- Cache: a request's slots are numpy buffers wrapped as OrtValues and bound with IO binding, inputs and outputs alike,
  so a fresh branch output is written straight into the slot the next subset reads, with no copy in between. A slot
  whose size varies per request (a named size in the manifest: the prompt's tokens) is allocated by ONNX Runtime at
  each call that writes it, and that OrtValue is what the next subset reads.
- Providers: the CUDA provider where asked and present; ``onnxruntime-gpu`` falls back to the CPU silently, so
  :attr:`providers` reports what the sessions really use.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from ...core.backends import precision_refusal
from ...core.threads import omp_num_threads
from . import cache_inputs, check_graph, engine_path, fresh_outputs, model_inputs, selected_subsets, weight_arrays

_shared_arena_lock = threading.Lock()
_shared_arena_registered = False


_global_threads: int | None = None


def _default_threads() -> int:
    """The pool's size when none is asked for: OMP_NUM_THREADS where it is a positive integer, else 0 (one per
    core)."""
    return omp_num_threads() or 0


def _set_up_environment(threads: int | None) -> None:
    """Once per process, before the first session creates ONNX Runtime's environment: one global intra-op thread
    pool (``threads``, 0 = one per core, None = :func:`_default_threads`) and one shared CPU arena."""
    global _shared_arena_registered, _global_threads
    if threads is None:
        threads = _default_threads()
    with _shared_arena_lock:
        if _global_threads is None:
            from onnxruntime.capi import _pybind_state

            _pybind_state.set_global_thread_pool_sizes(threads or 0, 1)
            _global_threads = threads or 0
        elif (threads or 0) != _global_threads:
            raise ValueError(f"ONNX Runtime's global thread pool already has {_global_threads or 'one per core'} "
                             f"threads in this process; cannot change it to {threads}")
        if not _shared_arena_registered:
            memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))
            _shared_arena_registered = True

OPTIMIZATION_LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                       "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                       "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


class _RequestCache:
    """One request's cache slots: slot name -> numpy buffer (N, T, D) and its OrtValue view."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}
        self.values: dict[str, ort.OrtValue] = {}

    def slot(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> ort.OrtValue:
        array = self.arrays.get(name)
        if array is None or array.shape != shape:
            array = np.empty(shape, dtype=dtype)
            self.arrays[name] = array
            self.values[name] = ort.OrtValue.ortvalue_from_numpy(array)
        return self.values[name]

    def put(self, name: str, value: ort.OrtValue) -> None:
        """A slot ONNX Runtime allocated (its size named, not fixed, in the manifest)."""
        self.values[name] = value
        self.arrays[name] = None  # read back from the OrtValue only where asked (read_cache)

    def read(self, name: str) -> ort.OrtValue:
        try:
            return self.values[name]
        except KeyError:
            raise RuntimeError(f"cache slot {name} is read before any step wrote it") from None


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, manifest: dict, folder: Path, subsets: Sequence[int] | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), share_weights: bool = True,
                 shared_arena: bool = True, optimization: str = "extended", threads: int | None = None):
        refusal = precision_refusal(self.name, manifest["precision"])
        if refusal:
            raise ValueError(f"{Path(folder) / 'manifest.json'}: field 'precision' is {manifest['precision']}: "
                             f"{refusal}")
        if manifest["precision"] == "fp8":  # ONNX Runtime's Q/DQ fusions make float8 kernels its CPU provider lacks
            optimization = "basic"
        self.manifest = manifest
        self.folder = Path(folder)
        self._weights = {}
        if share_weights:
            self._weights = {name: _ortvalue(array) for name, array in weight_arrays(manifest, folder).items()}
        self._slot_dtype = {s["name"]: np.dtype(s["dtype"]) for s in manifest["cache_slots"]}
        self._output = manifest["model"]["output"]
        _set_up_environment(threads)
        self.sessions: dict[int, ort.InferenceSession] = {}
        self._records: dict[int, dict] = {}
        for record in selected_subsets(manifest, subsets):
            options = ort.SessionOptions()
            options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
            options.use_per_session_threads = False
            if shared_arena:
                options.add_session_config_entry("session.use_env_allocators", "1")
            path = engine_path(self.folder, record)
            external = check_graph(self.folder, record, manifest, path)
            if share_weights:
                options.add_session_config_entry("session.disable_prepacking", "1")
                for name in external:
                    options.add_initializer(name, self._weights[name])
            session = ort.InferenceSession(str(path), options, providers=list(providers))
            self.sessions[record["index"]] = session
            self._records[record["index"]] = record

    @property
    def providers(self) -> list[str]:
        used = {p for session in self.sessions.values() for p in session.get_providers()}
        return [p for p in ort.get_available_providers() if p in used]

    @property
    def threads(self) -> int:
        """The size of the process-wide intra-op pool the sessions run on (0: ONNX Runtime's one per core)."""
        return _global_threads

    def new_request(self) -> _RequestCache:
        return _RequestCache()

    def write_cache(self, state: _RequestCache, slot: str, value: np.ndarray) -> None:
        state.slot(slot, value.shape, self._slot_dtype[slot])
        state.arrays[slot][...] = value

    def read_cache(self, state: _RequestCache, slot: str) -> np.ndarray:
        value = state.read(slot)
        array = state.arrays[slot]
        return (value.numpy() if array is None else array).astype(np.float32)

    def run(self, subset: int, feeds: dict[str, np.ndarray], state: _RequestCache) -> np.ndarray:
        session = self.sessions[subset]
        record = self._records[subset]
        batch = len(next(iter(feeds.values())))
        binding = session.io_binding()
        for tensor in model_inputs(record):
            binding.bind_cpu_input(tensor["name"], feeds[tensor["name"]])
        for tensor in cache_inputs(record):
            binding.bind_ortvalue_input(tensor["name"], state.read(tensor["slot"]))
        model_out = np.empty((batch, *self._output["shape"][1:]), dtype=np.float32)
        binding.bind_ortvalue_output(self._output["name"], ort.OrtValue.ortvalue_from_numpy(model_out))
        allocated = {}  # binding position -> slot, for slots of a size named per request (ONNX Runtime allocates)
        for position, tensor in enumerate(fresh_outputs(record), start=1):
            shape = (batch, *tensor["shape"][1:])
            if all(isinstance(size, int) for size in shape[1:]):
                binding.bind_ortvalue_output(tensor["name"], state.slot(tensor["slot"], shape,
                                                                        self._slot_dtype[tensor["slot"]]))
            else:
                binding.bind_output(tensor["name"], "cpu")
                allocated[position] = tensor["slot"]
        session.run_with_iobinding(binding)
        if allocated:
            values = binding.get_outputs()  # in binding order: the model output, then the fresh outputs
            for position, slot in allocated.items():
                state.put(slot, values[position])
        return model_out


def global_threads() -> int | None:
    """The size of this process's intra-op pool (0: one per core), None before any session set it up."""
    return _global_threads


def component_session(path: Path, providers: Sequence = ("CPUExecutionProvider",)) -> ort.InferenceSession:
    """A session for a build's component graph (text encoder, VAE decoder; their weights beside them), on the
    process-wide thread pool and arena the subset sessions use (set up with one thread per core if no backend has
    set them up yet)."""
    if _global_threads is None:
        _set_up_environment(None)
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS["extended"]
    options.use_per_session_threads = False
    options.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(str(path), options, providers=list(providers))


def _ortvalue(array: np.ndarray) -> ort.OrtValue:
    """An OrtValue over ``array``'s memory (no copy); float8 (an ml_dtypes type numpy does not know) by its bytes."""
    if array.dtype.name == "float8_e4m3fn":
        import onnx

        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint8), onnx.TensorProto.FLOAT8E4M3FN)
    return ort.OrtValue.ortvalue_from_numpy(array)
