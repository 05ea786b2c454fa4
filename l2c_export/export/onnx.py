"""Export: one traced ONNX graph of the whole model, and every subset graph derived from it by graph surgery.

1. The model is traced *once* (TorchScript exporter, ``export_params=False``, no constant folding) by a wrapper that
   computes every sub-layer and returns the model output and all 2 * depth ungated branch outputs. Parameters come out
   as graph inputs named after the module path, so every initializer is named after the parameter it comes from
   (the exporter's own folding names transposed MatMul weights by a counter that changes between exports, and it
   merges parameters that happen to be equal). The trace runs on random stand-in weights for the same reason.
2. Parameter inputs become initializers holding the real weights. A weight that only feeds ``Transpose`` (a Linear
   applied to (N, T, D) tokens) is stored transposed, as ``<parameter>.T`` of shape (in, out), so that no runtime
   constant-folds a private copy of it; a weight read only through transposed column slices (a Linear on part of
   its inputs: FLUX.1's proj_out shares) is stored as those slices, ``<parameter>.T[start:stop]``, for the same
   reason; and a value computed from parameters alone by ops that only move or index data (SD3's crop of its
   position-embedding table for the build's size) is stored as a weight of its own, ``<parameter>@<value>``, the
   parameter kept whole beside it for the PyTorch reference.
3. For each subset (:mod:`l2c_export.core.plan`), the universal graph is cut: the consumers of a reused sub-layer's
   branch output read a new input ``cache_<slot>`` instead, so its producing nodes become dead and are removed;
   outputs are ``model_out`` and the live ``fresh_<slot>`` values only.
4. All subset graphs reference one external-data file, ``weights.bin``, at the same offsets, so the weights are
   stored once on disk and a runtime can hold them once in memory.

Graph interface (batch ``N`` dynamic; guidance doubles it): the family's model inputs (DiT and U-ViT: ``x`` float32
(N, C, H, W), ``t`` float32 (N,), ``y`` int64 (N,); a diffusers PixArt also ``encoder_hidden_states`` (N, L, D_text)
and ``encoder_attention_mask`` (N, L), L dynamic) and ``cache_<slot>`` (N, T, D) in the graph precision; outputs the
family's model output (``model_out`` float32 (N, C_out, H, W)) and ``fresh_<slot>`` (N, T, D) in the graph precision.
Slots are the family's sub-layer names (:meth:`l2c_export.models.ModelFamily.sublayer_names`).
"""

from __future__ import annotations

import collections
import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import torch
from onnx import TensorProto

from ..core.manifest import folded_weight_name, weight_name
from ..core.plan import SubsetPlan, cache_input_name, fresh_output_name
from ..core.util import atomic_write_with

OPSET = 20  # Gelu(approximate='tanh') is an op from 20 on; TensorRT 10 parses opsets 9 to 20
# precision -> the dtype the graph computes in between its quantized MatMuls (int8: l2c_export.export.quantize)
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32,
              "fp8": torch.float32}
ONNX_DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16,
               "int8": TensorProto.FLOAT, "fp8": TensorProto.FLOAT}
NUMPY_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "float32", "fp8": "float32"}
WEIGHTS_FILE = "weights.bin"
_ALIGNMENT = 4096  # page-aligned offsets let ONNX Runtime memory-map the weights file


class _EveryBranch(torch.nn.Module):
    """The family's model inputs (x (N, C, H, W) fp32, t (N,) fp32, y (N,) int64 for DiT and U-ViT) -> model_out
    fp32 and every ungated sub-layer output (N, T, D) in the model's dtype, every sub-layer computed."""

    def __init__(self, model: torch.nn.Module, num_sublayers: int):
        super().__init__()
        self.model = model
        self.num_sublayers = num_sublayers
        self.dtype = next(model.parameters()).dtype

    def forward(self, *inputs: torch.Tensor):
        cache: dict[int, torch.Tensor] = {}
        everything = [True] * self.num_sublayers
        inputs = tuple(i.to(self.dtype) if i.is_floating_point() and i.ndim > 1 else i for i in inputs)
        out = self.model.forward_cached(*inputs, everything, cache)
        return (out.float(),) + tuple(cache[k] for k in range(len(everything)))


@dataclass
class UniversalGraph:
    """The traced whole-model graph with its weights named after parameters.

    ``model`` references the weights through initializers once :meth:`bind_weights` has pointed them at the shared
    file; before that the parameter names are used by nodes but not yet defined.
    """

    model: onnx.ModelProto
    weights: dict[str, np.ndarray]  # initializer name -> array in graph layout (transposed where the name ends .T)
    precision: str
    slots: tuple[str, ...]  # every sub-layer's cache slot name, in the order of the model's sub-layer indices

    @property
    def num_sublayers(self) -> int:
        return len(self.slots)

    def bind_weights(self, layout: dict[str, tuple[int, int]]) -> None:
        """Adds one initializer per weight, stored externally in ``weights.bin`` at ``layout[name]``."""
        del self.model.graph.initializer[:]
        for name, array in self.weights.items():
            tensor = TensorProto(name=name, data_type=_onnx_dtype(array), dims=list(array.shape))
            offset, length = layout[name]
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", WEIGHTS_FILE), ("offset", offset), ("length", length)):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, str(value)
            self.model.graph.initializer.append(tensor)

    def with_prefix(self, prefix: str) -> "UniversalGraph":
        """This graph as an expert's whose cache slots and weight tensors are named with ``prefix`` first (Wan2.2's
        ``transformer_2.``): its weights, its sub-layers' slots and their ``fresh_`` outputs renamed, in place."""
        if not prefix:
            return self
        renames = {name: prefix + name for name in self.weights}
        renames.update({fresh_output_name(slot): fresh_output_name(prefix + slot) for slot in self.slots})
        graph = self.model.graph
        for node in graph.node:
            node.input[:] = [renames.get(name, name) for name in node.input]
            node.output[:] = [renames.get(name, name) for name in node.output]
        for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
            value.name = renames.get(value.name, value.name)
        self.weights = {renames[name]: array for name, array in self.weights.items()}
        self.slots = tuple(prefix + slot for slot in self.slots)
        return self


def _rms_norm_symbolic(g, input, normalized_shape, weight, eps):
    """``aten::rms_norm`` (``torch.nn.RMSNorm``: FLUX.1's query/key norms), which the TorchScript exporter has no
    symbolic for below ONNX's RMSNormalization (opset 23), as its definition: ``x / sqrt(mean(x^2) + eps) * w`` over
    the normalized axes (eps None: float32's machine epsilon, as torch's default)."""
    from torch.onnx import symbolic_helper

    dims = symbolic_helper._maybe_get_const(normalized_shape, "is")
    axes = g.op("Constant", value_t=torch.tensor([-(i + 1) for i in range(len(dims))], dtype=torch.long))
    eps = symbolic_helper._maybe_get_const(eps, "f")
    eps = torch.finfo(torch.float32).eps if symbolic_helper._is_none(eps) or eps is None else float(eps)
    mean = g.op("ReduceMean", g.op("Mul", input, input), axes, keepdims_i=1)
    epsilon = g.op("CastLike", g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32)), input)
    out = g.op("Div", input, g.op("Sqrt", g.op("Add", mean, epsilon)))
    return out if symbolic_helper._is_none(weight) else g.op("Mul", out, weight)


def _movedim_symbolic(g, input, source, destination):
    """``aten::movedim`` as a Transpose with its dimensions taken modulo the rank: the exporter's own symbolic writes
    a negative source into the permutation as it is (DC-AE's ``movedim(-1, 1)`` became perm (0, -1, 1, 2), which
    ONNX Runtime refuses). Dimensions not moved keep their order, as torch's."""
    from torch.onnx import symbolic_helper

    rank = symbolic_helper._get_tensor_rank(input)
    sources = [int(d) % rank for d in symbolic_helper._get_const(source, "t", "source").view(-1).tolist()]
    targets = [int(d) % rank for d in symbolic_helper._get_const(destination, "t", "destination").view(-1).tolist()]
    perm = [None] * rank
    for src, dst in zip(sources, targets):
        perm[dst] = src
    rest = iter(d for d in range(rank) if d not in sources)
    return g.op("Transpose", input, perm_i=[next(rest) if d is None else d for d in perm])


def register_symbolics() -> None:
    """The TorchScript exporter's symbolics this project replaces or adds (``aten::rms_norm``, ``aten::movedim``);
    every export calls it first."""
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, OPSET)
    torch.onnx.register_custom_op_symbolic("aten::movedim", _movedim_symbolic, OPSET)


def trace(model: torch.nn.Module, precision: str = "fp32", family=None) -> UniversalGraph:
    """Traces ``model`` once in ``precision`` and returns the universal graph and its weights. The graph interface
    (input names, shapes, dummy inputs) and the cached shape come from the model's family."""
    from ..models import family_of_config

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    config = model.config
    family = family or family_of_config(config)
    slots = tuple(family.sublayer_names(config))
    num_sublayers = len(slots)
    input_specs = family.graph_inputs(config)
    inputs = [spec.name for spec in input_specs]
    outputs = [family.graph_output(config).name] + [fresh_output_name(slot) for slot in slots]
    dynamic_axes = {name: {0: "batch"} for name in [*inputs, *outputs]}
    for spec in input_specs:  # axes that vary per request (a prompt's tokens) keep their names
        dynamic_axes[spec.name].update({1 + i: dim for i, dim in enumerate(spec.shape) if isinstance(dim, str)})
    buffer = io.BytesIO()
    register_symbolics()
    with warnings.catch_warnings(), family.export_context(), _stand_in_weights(model, dtype):
        warnings.simplefilter("ignore")
        torch.onnx.export(_EveryBranch(model, num_sublayers).eval(), family.dummy_inputs(config, 2), buffer,
                          input_names=inputs, output_names=outputs, opset_version=OPSET, dynamo=False,
                          export_params=False, do_constant_folding=False, dynamic_axes=dynamic_axes)
    graph_model = onnx.load_from_string(buffer.getvalue())
    _fold_static_shape_ifs(graph_model)
    weights = _attach_parameters(graph_model, model, dtype)
    _fold_parameter_chains(graph_model, weights)
    _merge_equal_constants(graph_model)
    _name_dims(graph_model, dict(zip(slots, family.cached_shapes(config))))
    return UniversalGraph(graph_model, weights, precision, slots)


@contextlib.contextmanager
def _stand_in_weights(model: torch.nn.Module, dtype: torch.dtype):
    """Within the block, every parameter of ``model`` is a random stand-in in ``dtype`` (and every floating buffer
    is cast to ``dtype``); the real tensors are put back after, untouched.

    Random, so that no two parameters are equal (the exporter would merge them); each a random row broadcast over
    its leading axes (a stride-0 view), so that the stand-ins of a multi-GB model take kilobytes: the model is never
    held twice, which is what lets SD3-medium (8 GB in fp32) export on a 24 GiB machine.
    """
    generator = torch.Generator().manual_seed(0)
    swapped: list[tuple[torch.nn.Module, str, str, torch.Tensor]] = []
    stand_ins: dict[int, torch.Tensor] = {}  # a tensor shared by several modules gets one stand-in, shared too

    def stand_in(kind: str, tensor: torch.Tensor) -> torch.Tensor:
        if kind == "_buffers":
            return tensor.to(dtype)
        row = torch.randn(tensor.shape[-1:] or (1,), generator=generator).to(dtype)
        return torch.nn.Parameter(row.expand(tensor.shape) if tensor.ndim else row[0], requires_grad=False)

    try:
        with torch.no_grad():
            for module in model.modules():
                for kind in ("_parameters", "_buffers"):
                    for name, tensor in getattr(module, kind).items():
                        if tensor is None or (kind == "_buffers" and not tensor.is_floating_point()):
                            continue
                        swapped.append((module, kind, name, tensor))
                        if id(tensor) not in stand_ins:
                            stand_ins[id(tensor)] = stand_in(kind, tensor)
                        getattr(module, kind)[name] = stand_ins[id(tensor)]
        yield model
    finally:
        for module, kind, name, tensor in swapped:
            getattr(module, kind)[name] = tensor


def _attach_parameters(graph_model: onnx.ModelProto, model: torch.nn.Module, dtype: torch.dtype) -> dict[str, np.ndarray]:
    """Renames the parameter inputs (``model.<name>``) to ``<name>``, or ``<name>.T`` for a weight that only feeds
    Transpose (whose data is then stored transposed and the Transpose removed), or ``<name>.T[start:stop]`` for each
    column slice of a weight read only through transposed column slices; returns their arrays (views of the model's
    tensors: see :func:`l2c_export.core.manifest.weight_name`)."""
    graph = graph_model.graph
    state = {f"model.{name}": tensor for name, tensor in model.state_dict().items()}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {output: node for node in graph.node for output in node.output}
    weights: dict[str, np.ndarray] = {}
    kept_inputs = []
    removed_nodes = set()
    for graph_input in graph.input:
        if graph_input.name not in state:
            kept_inputs.append(graph_input)
            continue
        array = _to_numpy(state[graph_input.name].to(dtype))
        name = graph_input.name[len("model."):]
        users = consumers.get(graph_input.name, [])
        slices = _transposed_column_slices(users, consumers, producers, array.shape)
        if users and all(_is_transpose(node) for node in users):
            transposed_name = weight_name(name, transposed=True)
            weights[transposed_name] = array.T  # a view: laid out transposed only when written
            for node in users:  # every reader of the Transpose reads the stored transposed weight instead
                _rename_uses(graph, node.output[0], transposed_name)
                removed_nodes.add(id(node))
        elif slices:
            # Stored as the slices' own tensors, not the whole weight: a runtime would fold Transpose(Slice(W))
            # into a private copy per session (FLUX.1's proj_out shares, 7 GB per subset at full size).
            for node, (start, stop) in slices:
                sliced_name = weight_name(name, transposed=True, rows=(start, stop))
                weights[sliced_name] = array.T[start:stop]
                removed_nodes.add(id(node))
                for transpose in consumers[node.output[0]]:
                    _rename_uses(graph, transpose.output[0], sliced_name)
                    removed_nodes.add(id(transpose))
        else:
            weights[name] = array
            _rename_uses(graph, graph_input.name, name)
    nodes = [node for node in graph.node if id(node) not in removed_nodes]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.extend(kept_inputs)
    return weights


# Ops that only move or index data, and integer arithmetic (shape computations), evaluated in numpy exactly as ONNX
# defines them: a chain of them over parameters and constants is folded at export (:func:`_fold_parameter_chains`).
def _reshape(node, data, shape):
    shape = [data.shape[i] if size == 0 and not _attribute(node, "allowzero", 0) else size
             for i, size in enumerate(shape.tolist())]
    return data.reshape(shape)


def _slice(node, data, starts, ends, axes=None, steps=None):
    axes = range(len(starts)) if axes is None else axes.tolist()
    steps = [1] * len(starts) if steps is None else steps.tolist()
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts.tolist(), ends.tolist(), axes, steps):
        index[axis] = slice(start, end, step)
    return data[tuple(index)]


def _unsqueeze(node, data, axes):
    rank = data.ndim + len(axes)
    return np.expand_dims(data, tuple(sorted(axis % rank for axis in axes.tolist())))


def _integers(operation):
    """An elementwise op on integer tensors only (None: not folded), with numpy's broadcasting (ONNX's)."""
    def apply(node, a, b):
        if not (np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)):
            return None
        return operation(a, b).astype(np.result_type(a, b))
    return apply


def _cast(node, data):
    """Cast between integer types only (a float cast would round: not data movement)."""
    to = onnx.helper.tensor_dtype_to_np_dtype(_attribute(node, "to", 0))
    return data.astype(to) if np.issubdtype(data.dtype, np.integer) and np.issubdtype(to, np.integer) else None


_FOLDABLE = {
    "Identity": lambda node, data: data,
    "Reshape": _reshape,
    "Slice": _slice,
    "Unsqueeze": _unsqueeze,
    "Squeeze": lambda node, data, axes=None: np.squeeze(data, None if axes is None else tuple(axes.tolist())),
    "Transpose": lambda node, data: data.transpose(_perm(node) or None),
    "Gather": lambda node, data, indices: np.take(data, indices, axis=_attribute(node, "axis", 0)),
    "Concat": lambda node, *parts: np.concatenate(parts, axis=_attribute(node, "axis", 0)),
    "Shape": lambda node, data: np.array(data.shape[_attribute(node, "start", 0):_attribute(node, "end", None)],
                                         dtype=np.int64),
    "Cast": _cast,
    "Add": _integers(np.add),
    "Sub": _integers(np.subtract),
    "Mul": _integers(np.multiply),
    "Div": _integers(lambda a, b: np.trunc(a / b)),  # ONNX's integer Div truncates toward zero
}


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _fold_parameter_chains(graph_model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> None:
    """Folds every value the graph computes from parameters alone (with constants and the static sizes of its inputs),
    through ops that only move or index data or compute shapes (:data:`_FOLDABLE`), into a weight of its own named
    after them (:func:`l2c_export.core.manifest.folded_weight_name`), and removes the chain. Else each runtime session
    folds it into a private copy: SD3 reads its 226 MB position-embedding table (pos_embed_max_size 192) through
    Reshape, two Slices (the crop for the build's image size, from the sample's static height and width) and a
    Reshape. The parameters stay in ``weights`` as they are (the PyTorch reference reads them); one that no node
    reads any more is in no graph, so no session loads it."""
    from onnx import numpy_helper

    graph = graph_model.graph
    inferred = onnx.shape_inference.infer_shapes(graph_model)
    dims = {info.name: [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
            for info in (*inferred.graph.value_info, *inferred.graph.input) if info.type.tensor_type.HasField("shape")}
    values: dict[str, np.ndarray] = {}  # name -> value, for what is computed from parameters, constants, static sizes
    sources: dict[str, set[str]] = {}  # name -> the parameters it is computed from (none: not a weight's)
    sizes: dict[str, list] = {}  # a Shape's output over a tensor of partly static shape: its sizes (None: dynamic)
    folded_nodes = []
    for node in graph.node:
        inputs = list(node.input)
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]], sources[node.output[0]] = numpy_helper.to_array(node.attribute[0].t), set()
            continue
        if node.op_type == "Shape" and inputs[0] not in values and inputs[0] not in weights and inputs[0] in dims:
            sizes[node.output[0]] = dims[inputs[0]][_attribute(node, "start", 0):_attribute(node, "end", None)]
            folded_nodes.append(node)
            continue
        if node.op_type == "Gather" and inputs[0] in sizes and inputs[1] in values:
            known, index = sizes[inputs[0]], values[inputs[1]]
            if not np.issubdtype(index.dtype, np.integer) or not np.all((-len(known) <= index) & (index < len(known))):
                continue
            picked = np.take(np.array(known, dtype=object), index)
            if any(size is None for size in np.ravel(picked)):
                continue
            values[node.output[0]], sources[node.output[0]] = np.asarray(picked, dtype=np.int64), set()
            folded_nodes.append(node)
            continue
        if node.op_type not in _FOLDABLE or len(node.output) != 1 \
                or not all(name == "" or name in values or name in weights for name in inputs):
            continue
        arguments = [None if name == "" else values[name] if name in values else weights[name] for name in inputs]
        while arguments and arguments[-1] is None:
            arguments.pop()
        value = _FOLDABLE[node.op_type](node, *arguments)
        if value is None:
            continue
        values[node.output[0]] = value
        # a Shape's value depends on no parameter's data: the shape arithmetic after it is not stored
        sources[node.output[0]] = set() if node.op_type == "Shape" else \
            set().union(*({name} if name in weights else sources.get(name, set()) for name in inputs if name))
        folded_nodes.append(node)
    computed = {node.output[0] for node in folded_nodes}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {output.name for output in graph.output}
    for node in folded_nodes:
        name = node.output[0]
        if not sources.get(name):
            continue  # not computed from a parameter: small, and every runtime folds it alike
        if name in outputs or any(reader.output[0] not in computed for reader in readers.get(name, [])):
            stored = folded_weight_name(sorted(sources[name]), name)
            weights[stored] = np.ascontiguousarray(values[name])
            _rename_uses(graph, name, stored)
    reads = collections.Counter(name for node in graph.node for name in node.input)
    dead = set()
    for node in reversed(folded_nodes):  # the folded chains' nodes that nothing reads any more, readers first
        if node.output[0] not in outputs and reads[node.output[0]] == 0:
            dead.add(id(node))
            reads.subtract(node.input)
    kept = [node for node in graph.node if id(node) not in dead]
    del graph.node[:]
    graph.node.extend(kept)


def _is_transpose(node: onnx.NodeProto) -> bool:
    return node.op_type == "Transpose" and _perm(node) == [1, 0]


def _transposed_column_slices(users: list[onnx.NodeProto], consumers: dict[str, list[onnx.NodeProto]],
                              producers: dict[str, onnx.NodeProto],
                              shape: tuple[int, ...]) -> list[tuple[onnx.NodeProto, tuple[int, int]]]:
    """Where a 2-D weight (out, in) is read only through ``Slice`` nodes over its columns (axis 1, step 1, constant
    bounds) each read only through ``Transpose`` (a Linear on part of its inputs), the slices and their column
    ranges; else []."""
    if len(shape) != 2 or not users:
        return []
    found = []
    for node in users:
        bounds = [_constant_ints(name, producers) for name in node.input[1:]] if node.op_type == "Slice" else []
        if len(bounds) < 3 or any(b is None or len(b) != 1 for b in bounds):
            return []
        start, stop, axis = bounds[0][0], min(bounds[1][0], shape[1]), bounds[2][0]
        step = bounds[3][0] if len(bounds) > 3 else 1
        readers = consumers.get(node.output[0], [])
        if axis not in (1, -1) or step != 1 or not 0 <= start < stop or not readers \
                or not all(_is_transpose(reader) for reader in readers):
            return []
        found.append((node, (start, stop)))
    return found


def _constant_ints(name: str, producers: dict[str, onnx.NodeProto]) -> list[int] | None:
    """The value of ``name`` as a flat list of ints where a ``Constant``, or an ``Unsqueeze`` of one (how the
    TorchScript exporter writes a Slice's bounds), produces it; else None."""
    from onnx import numpy_helper

    node = producers.get(name)
    if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
        return [int(v) for v in numpy_helper.to_array(node.attribute[0].t).reshape(-1)]
    if node is not None and node.op_type == "Unsqueeze":
        return _constant_ints(node.input[0], producers)
    return None


def _fold_static_shape_ifs(graph_model: onnx.ModelProto) -> None:
    """Replaces each ``If(Equal(Gather(Shape(x), k), v))`` whose dimension ``k`` of ``x`` shape inference proves
    static by the branch it always takes.

    The TorchScript exporter writes ``x.squeeze(1)`` (diffusers' PixArt does it after ``proj_out``) as such an If
    when it cannot prove the size itself; ONNX Runtime then infers both branches' types and refuses the Squeeze of
    the branch never taken (a dimension of 16, not 1).
    """
    from onnx import numpy_helper

    graph = graph_model.graph
    inferred = onnx.shape_inference.infer_shapes(graph_model)
    dims = {}
    for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
    producer = {output: node for node in graph.node for output in node.output}

    def constant(name):
        node = producer.get(name)
        if node is None or node.op_type != "Constant":
            return None
        return numpy_helper.to_array(node.attribute[0].t)

    nodes = []
    for node in graph.node:
        equal = producer.get(node.input[0]) if node.op_type == "If" else None
        gather = producer.get(equal.input[0]) if equal is not None and equal.op_type == "Equal" else None
        shape = producer.get(gather.input[0]) if gather is not None and gather.op_type == "Gather" else None
        index, value = (constant(gather.input[1]), constant(equal.input[1])) if shape is not None else (None, None)
        if shape is None or shape.op_type != "Shape" or shape.attribute or index is None or value is None \
                or index.size != 1 or value.size != 1:
            nodes.append(node)
            continue
        size = (dims.get(shape.input[0]) or [])[int(index.reshape(()))] \
            if int(index.reshape(())) < len(dims.get(shape.input[0]) or []) else None
        if size is None:
            nodes.append(node)
            continue
        taken = next(a.g for a in node.attribute if a.name == ("then_branch" if size == int(value.reshape(()))
                                                              else "else_branch"))
        nodes.extend(taken.node)
        nodes.extend(onnx.helper.make_node("Identity", [branch.name], [output], name=f"{node.name}/taken_{i}")
                     for i, (branch, output) in enumerate(zip(taken.output, node.output)))
    del graph.node[:]
    graph.node.extend(nodes)


def _merge_equal_constants(graph_model: onnx.ModelProto) -> None:
    """Keeps one ``Constant`` node per distinct value (the trace emits one per use: 367 on DiT-S/2, 18 distinct).
    Every subset session holds its graph, so this is memory: measured on DiT-S/2 with 11 int8 subsets, 0.3 MB less
    per session."""
    graph = graph_model.graph
    outputs = {output.name for output in graph.output}
    first: dict[bytes, str] = {}
    renamed: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] not in outputs:
            value = b"".join(attribute.SerializeToString() for attribute in node.attribute)
            if value in first:
                renamed[node.output[0]] = first[value]
                continue
            first[value] = node.output[0]
        kept.append(node)
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)


def _perm(node: onnx.NodeProto) -> list[int]:
    for attribute in node.attribute:
        if attribute.name == "perm":
            return list(attribute.ints)
    return []


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.detach().contiguous().numpy()


def _onnx_dtype(array: np.ndarray) -> int:
    if array.dtype.name == "bfloat16":
        return TensorProto.BFLOAT16
    return onnx.helper.np_dtype_to_tensor_dtype(array.dtype)


def _name_dims(graph_model: onnx.ModelProto, cached_shapes: dict[str, tuple[int | str, ...]]) -> None:
    """The branch outputs' shapes on the graph boundary: (batch, T, D) with each slot's sizes (static, or named
    where they vary per request)."""
    for output in graph_model.graph.output:
        if output.name.startswith("fresh_"):
            dims = output.type.tensor_type.shape.dim
            del dims[:]
            for value in ("batch", *cached_shapes[output.name[len("fresh_"):]]):
                dim = dims.add()
                if isinstance(value, str):
                    dim.dim_param = value
                else:
                    dim.dim_value = value


# ---------------------------------------------------------------------------------------------------------------------
def all_weights(*universals: UniversalGraph) -> dict[str, np.ndarray]:
    """The weights of one or more universal graphs (a pipeline's experts, their names prefixed apart), by name."""
    weights: dict[str, np.ndarray] = {}
    for universal in universals:
        weights.update(universal.weights)
    return weights


def weights_layout(*universals: UniversalGraph) -> dict[str, tuple[int, int]]:
    """name -> (offset, length) of every initializer of ``universals`` in the shared weights file: sorted by name,
    page-aligned."""
    weights = all_weights(*universals)
    layout, offset = {}, 0
    for name in sorted(weights):
        offset += (-offset) % _ALIGNMENT
        layout[name] = (offset, weights[name].nbytes)
        offset += weights[name].nbytes
    return layout


def write_weights(universal: UniversalGraph, path: Path, *others: UniversalGraph) -> dict[str, tuple[int, int]]:
    """Writes every initializer of ``universal`` (and of ``others``: a pipeline's further experts) once to ``path``
    at :func:`weights_layout`; returns the layout.

    Written by hand because onnx's ``save_as_external_data`` writes one file per model, and the point here is one
    file that every subset graph shares.
    """
    layout = weights_layout(universal, *others)
    weights = all_weights(universal, *others)

    def write(f) -> None:  # one tensor at a time: a transposed weight is laid out only while it is written
        end = 0
        for name, (offset, length) in layout.items():
            f.write(b"\0" * (offset - end))
            f.write(np.ascontiguousarray(weights[name]).reshape(-1).view(np.uint8).data)
            end = offset + length

    atomic_write_with(path, write)
    return layout


_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast"})


def _feeds_the_model(graph, fresh) -> bool:
    """Whether a branch output ``fresh`` (a graphsurgeon tensor), or what it is a layout op (transpose, reshape...)
    of, is on the path of a model output (a graph output other than the ``fresh_`` ones)."""
    needed, stack = set(), [t for t in graph.outputs if not t.name.startswith("fresh_")]
    while stack:
        tensor = stack.pop()
        if tensor.name in needed:
            continue
        needed.add(tensor.name)
        for node in tensor.inputs:
            stack.extend(node.inputs)
    tensor = fresh
    while True:
        if tensor.name in needed:
            return True
        layout = [node for node in tensor.inputs if node.op in _LAYOUT_OPS]
        if not layout or not layout[0].inputs:
            return False
        tensor = layout[0].inputs[0]


def subset_graph(universal: UniversalGraph, subset: SubsetPlan, graph_name: str) -> onnx.ModelProto:
    """The graph of one subset: reused branches read ``cache_<slot>`` inputs, dead nodes pruned, live outputs only.
    Call after :meth:`UniversalGraph.bind_weights`; the result references the shared weights file."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(universal.model)
    tensors = graph.tensors()
    precision_dtype = ONNX_DTYPES[universal.precision]
    for k in subset.reads:
        fresh = tensors[fresh_output_name(universal.slots[k])]
        if not fresh.outputs and _feeds_the_model(graph, fresh):
            # the exporter routed the consumers around the cached value (transpose pairs cancelled, say): the graph
            # would recompute the branch instead of reading its cache, silently. (A branch whose value feeds no model
            # output, Qwen-Image's last text MLP, is dead in every graph: its cache input is read by nothing.)
            raise ValueError(f"sub-layer {universal.slots[k]}: no node of the traced graph reads its output, so a "
                             f"subset cannot reuse it; the family's OutputPacking must keep the cached value on the "
                             f"path")
        # The ONNX type enum, not a numpy dtype: numpy has no bfloat16, and graphsurgeon takes either.
        cached = gs.Variable(cache_input_name(universal.slots[k]), dtype=precision_dtype, shape=fresh.shape)
        for consumer in list(fresh.outputs):
            consumer.inputs[consumer.inputs.index(fresh)] = cached
        graph.inputs.append(cached)
    model_outputs = {tensor.name for tensor in graph.outputs if not tensor.name.startswith("fresh_")}
    keep = model_outputs | {fresh_output_name(universal.slots[k]) for k in subset.writes}
    graph.outputs = [tensor for tensor in graph.outputs if tensor.name in keep]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    graph.name = graph_name
    result = gs.export_onnx(graph)
    for opset in result.opset_import:
        if opset.domain in ("", "ai.onnx"):  # an int8 graph also imports com.microsoft (l2c_export.export.quantize)
            opset.version = OPSET
    return result


def used_ops(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node}


def check_ops_supported(model: onnx.ModelProto, supported: Iterable[str], where: str) -> None:
    """Raises ValueError naming every op of ``model`` that is not in ``supported``."""
    missing = sorted(used_ops(model) - set(supported))
    if missing:
        raise ValueError(f"{where}: uses ops outside TensorRT's ONNX parser support matrix: {', '.join(missing)}")
