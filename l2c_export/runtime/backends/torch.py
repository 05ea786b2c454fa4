"""PyTorch backend: the eager reference, built from the manifest and ``weights.bin`` alone (the initializer names are
the official parameter names; ``.T`` ones are stored transposed), and on a GPU optionally one captured CUDA graph per
subset and batch size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ...models import get_family
from ...core.manifest import ManifestError, is_folded_weight_name, parse_weight_name
from . import check_graph, selected_subsets, weight_arrays

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32,
           "fp8": torch.float32}


def model_from_manifest(manifest: dict, folder: Path, device: str = "cpu",
                        precision: str | None = None) -> torch.nn.Module:
    """The model of a build (of its family), its weights read back from ``weights.bin``, in the build's precision
    (or ``precision``). An int8/fp8 build's weights come back dequantized (the float32 model its engines stand for).
    A build of experts (``experts``): each expert from its config and its prefixed tensors, switched by timestep as
    the pipeline does (:func:`~l2c_export.models.diffusers.cache.expert_switch`)."""
    experts = manifest.get("experts")
    if experts is None:
        return _model_of(manifest, folder, manifest["model"]["config"], weight_arrays(manifest, folder), device,
                         precision)
    from ...models.diffusers.cache import expert_switch

    arrays = weight_arrays(manifest, folder)
    prefixes = [model["prefix"] for model in experts["models"]]
    models = []
    for model in experts["models"]:
        others = [p for p in prefixes if p and p != model["prefix"]]
        own = {name[len(model["prefix"]):]: array for name, array in arrays.items()
               if name.startswith(model["prefix"]) and not any(name.startswith(p) for p in others)}
        models.append(_model_of(manifest, folder, model["config"], own, device, precision))
    return expert_switch(models, experts["boundary_timestep"]).eval()


def _model_of(manifest: dict, folder: Path, config: dict, arrays: dict, device: str,
              precision: str | None) -> torch.nn.Module:
    """The model of ``config`` with the tensors ``arrays`` (weights.bin's, by parameter name)."""
    from ...core.quantized import dequantize

    dtype = _DTYPES[precision or manifest["precision"]]
    family = get_family(manifest["model"]["family"])
    model = family.create(family.config_from_dict(config))
    expected = model.state_dict()
    quantized = {e["name"]: e["quantization"] for e in manifest["weight_tensors"] if "quantization" in e}
    if quantized:
        arrays = dequantize(arrays, quantized)
    stored: dict[str, list] = {}  # parameter -> its (array (memory-mapped view), transposed, rows) in weights.bin
    for name, array in arrays.items():
        if is_folded_weight_name(name):  # computed from parameters that weights.bin holds as they are
            continue
        parameter, transposed, rows = parse_weight_name(name)
        if parameter in expected:  # else an activation scale of a qdq build
            stored.setdefault(parameter, []).append((array, transposed, rows))
    problems = [problem for parameter, pieces in stored.items()
                if (problem := _misfit(parameter, tuple(expected[parameter].shape), pieces))]
    problems += [f"{name} is not in weights.bin" for name in sorted(set(expected) - set(stored))]
    if problems:
        raise ManifestError(f"{Path(folder) / 'manifest.json'}: field 'model/config' describes a model its weights "
                            f"do not fit: {'; '.join(problems[:3])}" + (" ..." if len(problems) > 3 else ""))
    with torch.no_grad():  # one tensor at a time: the weights are never held twice
        for parameter, pieces in stored.items():
            for array, transposed, rows in pieces:
                tensor = torch.from_numpy(np.array(array.view(np.uint16) if array.dtype.name == "bfloat16"
                                                   else array))
                if array.dtype.name == "bfloat16":
                    tensor = tensor.view(torch.bfloat16)
                target = expected[parameter] if rows is None else expected[parameter][:, rows[0]:rows[1]]
                target.copy_(tensor.T if transposed else tensor)
    return model.eval().to(device, dtype)


def _misfit(parameter: str, shape: tuple[int, ...], pieces: list) -> str | None:
    """What keeps ``pieces`` (:func:`model_from_manifest`'s) from making up a parameter of ``shape``, or None: one
    whole tensor, or transposed column slices covering every column once."""
    if len(pieces) == 1 and pieces[0][2] is None:
        array, transposed, _ = pieces[0]
        got = tuple(array.shape[::-1]) if transposed else tuple(array.shape)
        return None if got == shape else f"{parameter} {shape} in the config's model, {got} in weights.bin"
    ranges = sorted(rows for _, _, rows in pieces if rows is not None)
    covered = len(ranges) == len(pieces) and len(shape) == 2 and ranges[0][0] == 0 and ranges[-1][1] == shape[1] \
        and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])) \
        and all(array.shape == (rows[1] - rows[0], shape[0]) for array, _, rows in pieces)
    return None if covered else (f"{parameter} {shape} in the config's model, pieces {ranges} in weights.bin that "
                                 f"do not make it up")


class TorchBackend:
    name = "torch"

    def __init__(self, manifest: dict, folder: Path, subsets: Sequence[int] | None = None, device: str = "cpu",
                 cuda_graphs: bool = False):
        if cuda_graphs and not device.startswith("cuda"):
            raise ValueError("CUDA graphs need --device cuda")
        self.device = torch.device(device)
        for record in selected_subsets(manifest, subsets):
            check_graph(Path(folder), record, manifest)  # what the manifest says of the interface is the graphs'
        self.model = model_from_manifest(manifest, Path(folder), device)
        self.dtype = _DTYPES[manifest["precision"]]
        self.compute = {record["index"]: [bool(c) for c in record["compute"]]
                        for record in selected_subsets(manifest, subsets)}
        self.input_names = [tensor["name"] for tensor in manifest["model"]["inputs"]]
        self._slot_index = {slot["name"]: slot["index"] for slot in manifest["cache_slots"]}
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[int, int], _CapturedStep] = {}

    @property
    def providers(self) -> list[str]:
        return [f"torch-{self.device.type}" + ("-cudagraph" if self.cuda_graphs else "")]

    @property
    def threads(self) -> int:
        """torch's intra-op threads (of this process: torch has one pool)."""
        return torch.get_num_threads()

    def new_request(self) -> dict[int, torch.Tensor]:
        return {}

    def write_cache(self, state: dict, slot: str, value: np.ndarray) -> None:
        state[self._slot_index[slot]] = torch.from_numpy(np.ascontiguousarray(value)).to(self.device, self.dtype)

    def read_cache(self, state: dict, slot: str) -> np.ndarray:
        return state[self._slot_index[slot]].float().cpu().numpy()

    @torch.no_grad()
    def run(self, subset: int, feeds: dict[str, np.ndarray], state: dict) -> np.ndarray:
        inputs = tuple(torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device)
                       for name in self.input_names)
        if self.cuda_graphs:
            key = (subset, tuple(tuple(i.shape) for i in inputs))  # a prompt's length changes the shapes too
            step = self._graphs.get(key)
            if step is None:
                step = self._graphs[key] = _CapturedStep(self.model, self.compute[subset], inputs, state,
                                                         self.dtype)
            out = step(inputs, state)
        else:
            out = self.model.forward_cached(*_cast(inputs, self.dtype), self.compute[subset], state)
        return out.float().cpu().numpy()


def _cast(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Sample inputs (floating, more than one axis) in the model's dtype; times and labels as they are."""
    return tuple(i.to(dtype) if i.is_floating_point() and i.ndim > 1 else i for i in inputs)


class _CapturedStep:
    """One subset at one set of input shapes (batch, prompt length) captured as a CUDA graph over static buffers
    shaped as the request's cache slots were at capture.

    The request's cache tensors are copied into the static input slots before replay and the fresh values out after
    it: a CUDA graph has fixed addresses, while the cache belongs to the request.
    """

    def __init__(self, model: torch.nn.Module, compute: list[bool], inputs: tuple[torch.Tensor, ...], state: dict,
                 dtype):
        self.compute = compute
        self.reads = [k for k, on in enumerate(compute) if not on]
        self.static = tuple(tensor.clone() for tensor in inputs)
        self.static_cache = {k: torch.zeros_like(state[k]) for k in self.reads}  # the request's slots, as shaped
        cache = dict(self.static_cache)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the capture, as CUDA graphs require
            model.forward_cached(*_cast(self.static, dtype), compute, dict(cache))
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = model.forward_cached(*_cast(self.static, dtype), compute, cache)
        self.fresh = {k: v for k, v in cache.items() if compute[k]}

    def __call__(self, inputs: tuple[torch.Tensor, ...], state: dict) -> torch.Tensor:
        for static, tensor in zip(self.static, inputs):
            static.copy_(tensor)
        for k in self.reads:
            self.static_cache[k].copy_(state[k])
        self.graph.replay()
        for k, value in self.fresh.items():
            state[k] = value.clone()
        return self.out
