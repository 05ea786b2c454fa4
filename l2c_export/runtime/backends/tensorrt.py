"""TensorRT backend (TensorRT 10/11 Python API), as TensorRT's ``demo/Diffusion`` runs its engines:

- every subset plan deserialised once; stripped plans refitted from ``weights.bin`` by initializer name;
- contexts created with user-managed device memory and given one scratch allocation shared by all engines (only one
  engine runs at a time), the size of the largest ``device_memory_size_v2``;
- tensors bound by address (``set_tensor_address``, ``execute_async_v3``); a request's cache slots are device buffers
  bound in place, so fresh branch outputs land where the next engine reads them.

Execution is serialised by a lock (contexts and the shared scratch are not re-entrant); each request keeps its own
cache buffers, so concurrent requests give the results of serial ones. Not run in this project's CI: the PyPI
``tensorrt`` packages download their libraries from NVIDIA's index, which those machines cannot reach.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from ...core.backends import BackendUnavailable
from . import cache_inputs, check_graph, engine_path, fresh_outputs, model_inputs, selected_subsets, weight_arrays


def _import_tensorrt():
    try:
        import tensorrt as trt
        from polygraphy import cuda
    except ImportError as error:
        raise BackendUnavailable("TensorRT is not installed: the tensorrt backend needs TensorRT 10+ and an NVIDIA "
                                 "GPU (pip install tensorrt); use --backend onnxruntime or torch here") from error
    return trt, cuda


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, manifest: dict, folder: Path, subsets: Sequence[int] | None = None):
        trt, cuda = _import_tensorrt()
        self._trt, self._cuda = trt, cuda
        if manifest["backend"] != "tensorrt":
            raise ValueError(f"{folder}: built for {manifest['backend']}, not tensorrt; rebuild with "
                             f"--backend tensorrt")
        folder = Path(folder)
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        weights = weight_arrays(manifest, folder) if manifest.get("tensorrt", {}).get("stripped_plans") else None
        self.max_batch = manifest["batch"]["max"]
        self.engines, self.contexts, self.records = {}, {}, {}
        for record in selected_subsets(manifest, subsets):
            check_graph(folder, record, manifest)  # the graph the plan was built from says what the manifest says
            engine = runtime.deserialize_cuda_engine(engine_path(folder, record).read_bytes())
            if engine is None:
                raise RuntimeError(f"{engine_path(folder, record)}: TensorRT could not deserialise the plan "
                                   f"(built by another TensorRT version or for another GPU?)")
            if weights is not None:
                _refit(trt, engine, weights, logger, record["engine"]["file"])
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            self.engines[record["index"]], self.contexts[record["index"]] = engine, context
            self.records[record["index"]] = record
        scratch_bytes = max(int(engine.device_memory_size_v2) for engine in self.engines.values())
        self.scratch = cuda.DeviceArray(shape=(max(scratch_bytes, 1),), dtype=np.uint8)
        for context in self.contexts.values():
            context.set_device_memory(self.scratch.ptr, scratch_bytes)
        self.stream = cuda.Stream()
        self._io: dict[str, object] = {}
        self._lock = threading.Lock()
        self._slot_dtype = {s["name"]: np.dtype(s["dtype"]) for s in manifest["cache_slots"]}
        self._output = manifest["model"]["output"]
        self._out_shape = tuple(self._output["shape"][1:])

    @property
    def providers(self) -> list[str]:
        return [f"tensorrt-{self._trt.__version__}"]

    def new_request(self) -> dict:
        return {}

    def write_cache(self, state: dict, slot: str, value: np.ndarray) -> None:
        device = self._buffer(state, slot, value.shape, self._slot_dtype[slot])
        device.copy_from(np.ascontiguousarray(value.astype(self._slot_dtype[slot])), self.stream)
        self.stream.synchronize()

    def read_cache(self, state: dict, slot: str) -> np.ndarray:
        device = state[slot]
        host = np.empty(tuple(device.shape), dtype=self._slot_dtype[slot])
        device.copy_to(host, self.stream)
        self.stream.synchronize()
        return host.astype(np.float32)

    def _buffer(self, store: dict, name: str, shape: tuple, dtype) -> object:
        array = store.get(name)
        if array is None or tuple(array.shape) != tuple(shape):
            array = store[name] = self._cuda.DeviceArray(shape=shape, dtype=dtype)
        return array

    def run(self, subset: int, feeds: dict[str, np.ndarray], state: dict) -> np.ndarray:
        batch = len(next(iter(feeds.values())))
        if batch > self.max_batch:
            raise ValueError(f"model batch {batch} is over the engines' maximum {self.max_batch} (rebuild with a "
                             f"larger --batch)")
        record, context = self.records[subset], self.contexts[subset]
        with self._lock:
            for tensor in model_inputs(record):
                name, host = tensor["name"], feeds[tensor["name"]]
                device = self._buffer(self._io, name, host.shape, host.dtype)
                device.copy_from(np.ascontiguousarray(host), self.stream)
                context.set_input_shape(name, host.shape)
                context.set_tensor_address(name, device.ptr)
            for tensor in cache_inputs(record):
                if tensor["slot"] not in state:
                    raise RuntimeError(f"cache slot {tensor['slot']} is read before any step wrote it")
                slot = state[tensor["slot"]]
                context.set_input_shape(tensor["name"], tuple(slot.shape))
                context.set_tensor_address(tensor["name"], slot.ptr)
            model_out = self._buffer(self._io, self._output["name"], (batch, *self._out_shape), np.float32)
            context.set_tensor_address(self._output["name"], model_out.ptr)
            for tensor in fresh_outputs(record):
                shape = (batch, *tensor["shape"][1:])
                slot = self._buffer(state, tensor["slot"], shape, self._slot_dtype[tensor["slot"]])
                context.set_tensor_address(tensor["name"], slot.ptr)
            if not context.execute_async_v3(self.stream.ptr):
                raise RuntimeError(f"TensorRT failed to run {record['name']}")
            host = np.empty((batch, *self._out_shape), dtype=np.float32)
            model_out.copy_to(host, self.stream)
            self.stream.synchronize()
        return host


def _refit(trt, engine, weights: dict[str, np.ndarray], logger, where: str) -> None:
    """Puts the shared weights into a stripped plan, by initializer name."""
    refitter = trt.Refitter(engine, logger)
    for name in refitter.get_all_weights():
        array = weights.get(name)
        if array is None:
            raise RuntimeError(f"{where}: the plan wants weights {name!r}, which weights.bin does not hold")
        if array.dtype.name == "bfloat16":
            contiguous = np.ascontiguousarray(array)
            value = trt.Weights(trt.DataType.BF16, contiguous.ctypes.data, contiguous.size)
        else:
            value = trt.Weights(np.ascontiguousarray(array))
        refitter.set_named_weights(name, value)
    if not refitter.refit_cuda_engine():
        raise RuntimeError(f"{where}: TensorRT could not refit the plan from weights.bin")
