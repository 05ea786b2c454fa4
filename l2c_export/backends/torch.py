"""PyTorch backend: the eager reference, built from the manifest and ``weights.bin`` alone (the initializer names are
the official parameter names; ``.T`` ones are stored transposed), and on a GPU optionally one captured CUDA graph per
subset and batch size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..models import DiT, DiTConfig
from . import selected_subsets, weight_arrays

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32,
           "fp8": torch.float32}


def model_from_manifest(manifest: dict, folder: Path, device: str = "cpu", precision: str | None = None) -> DiT:
    """The DiT of a build, its weights read back from ``weights.bin``, in the build's precision (or ``precision``).
    An int8 build's weights come back dequantized (the float32 model its engines stand for), in float32."""
    from ..quantize import dequantize

    dtype = _DTYPES[precision or manifest["precision"]]
    model = DiT(DiTConfig.from_dict(manifest["model"]["config"]))
    parameters = set(model.state_dict())
    arrays = weight_arrays(manifest, folder)
    quantized = {e["name"]: e["quantization"] for e in manifest["weight_tensors"] if "quantization" in e}
    if quantized:
        arrays = dequantize(arrays, quantized)
    state = {}
    for name, array in arrays.items():
        if name.removesuffix(".T") not in parameters:  # an activation scale of a qdq build
            continue
        tensor = torch.from_numpy(np.array(array.view(np.uint16) if array.dtype.name == "bfloat16" else array))
        if array.dtype.name == "bfloat16":
            tensor = tensor.view(torch.bfloat16)
        state[name.removesuffix(".T")] = tensor.T.contiguous() if name.endswith(".T") else tensor
    model.load_state_dict({name: tensor.float() for name, tensor in state.items()})
    return model.eval().to(device, dtype)


class TorchBackend:
    name = "torch"

    def __init__(self, manifest: dict, folder: Path, subsets: Sequence[int] | None = None, device: str = "cpu",
                 cuda_graphs: bool = False):
        if cuda_graphs and not device.startswith("cuda"):
            raise ValueError("CUDA graphs need --device cuda")
        self.device = torch.device(device)
        self.model = model_from_manifest(manifest, Path(folder), device)
        self.dtype = _DTYPES[manifest["precision"]]
        self.compute = {record["index"]: [bool(c) for c in record["compute"]]
                        for record in selected_subsets(manifest, subsets)}
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[int, int], _CapturedStep] = {}

    @property
    def providers(self) -> list[str]:
        return [f"torch-{self.device.type}" + ("-cudagraph" if self.cuda_graphs else "")]

    def new_request(self) -> dict[int, torch.Tensor]:
        return {}

    def write_cache(self, state: dict, slot: str, value: np.ndarray) -> None:
        state[_slot_index(slot)] = torch.from_numpy(np.ascontiguousarray(value)).to(self.device, self.dtype)

    def read_cache(self, state: dict, slot: str) -> np.ndarray:
        return state[_slot_index(slot)].float().cpu().numpy()

    @torch.no_grad()
    def run(self, subset: int, x: np.ndarray, t: np.ndarray, y: np.ndarray, state: dict) -> np.ndarray:
        x_t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        t_t = torch.from_numpy(np.ascontiguousarray(t)).to(self.device)
        y_t = torch.from_numpy(np.ascontiguousarray(y)).to(self.device)
        if self.cuda_graphs:
            step = self._graphs.get((subset, len(x)))
            if step is None:
                step = self._graphs[(subset, len(x))] = _CapturedStep(self.model, self.compute[subset], x_t, t_t,
                                                                      y_t, self.dtype)
            out = step(x_t, t_t, y_t, state)
        else:
            out = self.model.forward_cached(x_t.to(self.dtype), t_t, y_t, self.compute[subset], state)
        return out.float().cpu().numpy()


def _slot_index(slot: str) -> int:
    """``attn_j`` -> 2j, ``mlp_j`` -> 2j + 1."""
    kind, block = slot.split("_")
    return 2 * int(block) + (kind == "mlp")


class _CapturedStep:
    """One subset at one batch size captured as a CUDA graph over static buffers.

    The request's cache tensors are copied into the static input slots before replay and the fresh values out after
    it: a CUDA graph has fixed addresses, while the cache belongs to the request.
    """

    def __init__(self, model: DiT, compute: list[bool], x, t, y, dtype):
        self.compute = compute
        self.reads = [k for k, on in enumerate(compute) if not on]
        self.static = {"x": x.clone(), "t": t.clone(), "y": y.clone()}
        shape = (len(x), model.config.num_tokens, model.config.hidden_size)
        self.static_cache = {k: torch.zeros(shape, dtype=dtype, device=x.device) for k in self.reads}
        cache = dict(self.static_cache)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the capture, as CUDA graphs require
            model.forward_cached(self.static["x"].to(dtype), self.static["t"], self.static["y"], compute, dict(cache))
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = model.forward_cached(self.static["x"].to(dtype), self.static["t"], self.static["y"], compute,
                                            cache)
        self.fresh = {k: v for k, v in cache.items() if compute[k]}

    def __call__(self, x, t, y, state: dict) -> torch.Tensor:
        self.static["x"].copy_(x)
        self.static["t"].copy_(t)
        self.static["y"].copy_(y)
        for k in self.reads:
            self.static_cache[k].copy_(state[k])
        self.graph.replay()
        for k, value in self.fresh.items():
            state[k] = value.clone()
        return self.out
