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

import json
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


def graph_path(folder: Path, record: dict) -> Path:
    """The ONNX graph of subset ``record``, inside the build folder."""
    from ...core.manifest import file_path

    return file_path(Path(folder), record["graph"]["file"], f"manifest field 'subsets/{record['index']}/graph'")


# The manifest's dtype names of ONNX element types (TensorProto.DataType names).
_DTYPE_NAMES = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16", "INT64": "int64", "INT8": "int8",
                "UINT8": "uint8", "INT32": "int32", "FLOAT8E4M3FN": "float8_e4m3fn"}
# Nodes a label passes through unchanged on its way to the label table.
_LABEL_PASSTHROUGH = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}


def check_graph(folder: Path, record: dict, manifest: dict, path: Path | None = None) -> list[str]:
    """Cross-checks the numbers the runtime takes from the manifest against the graph of subset ``record`` (its ONNX
    file in build ``folder``, or ``path``; read without its weights) and returns the names of its initializers held
    in ``weights.bin``.
    Raises ManifestError naming the field that contradicts the graph:

    - every initializer stored outside the graph is one of ``weight_tensors``, in the build's weights file at that
      record's offset and length, with its dtype and shape (a graph can name no other file, so nothing outside the
      build folder is ever read);
    - the graph's inputs and outputs are the record's ``inputs`` and ``outputs``: names, order, dtypes and shapes;
    - where the label input indexes a table (``Gather`` over an initializer), the table has ``guidance/null_class``
      + 1 rows: the labels 0 .. null_class - 1 and the null class;
    - the fields the graph's build fixed (``model/config``, ``guidance/null_class``: its
      :data:`~l2c_export.core.manifest.GRAPH_STAMP_KEY` stamp) are the manifest's, so an edited field is refused
      whether or not this runtime reads it.
    """
    import onnx

    from ...core.manifest import ManifestError

    path = graph_path(folder, record) if path is None else Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and friends
        raise ManifestError(f"{path}: not a readable ONNX graph ({error})") from None
    graph = model.graph
    where = str(Path(folder) / "manifest.json")
    _check_stamp(model, manifest, where, path.name)

    def dtype(element_type: int) -> str:
        name = onnx.TensorProto.DataType.Name(element_type)
        return _DTYPE_NAMES.get(name, name.lower())

    tensors = {t["name"]: (position, t) for position, t in enumerate(manifest["weight_tensors"])}
    weights_file = manifest["weights"]["file"]
    external = []
    for initializer in graph.initializer:
        if initializer.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in initializer.external_data}
        position, tensor = tensors.get(initializer.name, (None, None))
        if (info.get("location") != weights_file or tensor is None
                or int(info.get("offset", 0)) != tensor["offset"] or int(info.get("length", -1)) != tensor["length"]):
            raise ManifestError(f"{path}: initializer {initializer.name!r} reads {info.get('location')!r} at offset "
                                f"{info.get('offset', 0)}, length {info.get('length')}; the manifest's weight table "
                                f"puts it in {weights_file}" + (f" at offset {tensor['offset']}, length "
                                                                 f"{tensor['length']}" if tensor else " nowhere"))
        graph_form = (dtype(initializer.data_type), list(initializer.dims))
        if graph_form != (tensor["dtype"], tensor["shape"]):
            raise ManifestError(f"{where}: field 'weight_tensors/{position}' ({tensor['name']}) says "
                                f"{tensor['dtype']} {tensor['shape']}; the graph {path.name} has "
                                f"{graph_form[0]} {graph_form[1]}")
        external.append(initializer.name)
    shapes = _boundary_shapes(model)
    for kind, actual, expected in (("inputs", graph.input, record["inputs"]),
                                   ("outputs", graph.output, record["outputs"])):
        got = [(t.name, dtype(t.type.tensor_type.elem_type)) for t in actual]
        want = [(t["name"], t["dtype"]) for t in expected]
        if got != want:
            raise ManifestError(f"{path}: the graph's {kind} {got} are not the manifest's "
                                f"(field 'subsets/{record['index']}/{kind}': {want})")
        for position, tensor in enumerate(expected):
            if not _same_shape(tensor["shape"], shapes[tensor["name"]]):
                raise ManifestError(f"{where}: field 'subsets/{record['index']}/{kind}/{position}/shape' "
                                    f"({tensor['name']}) is {tensor['shape']}; the graph {path.name} has "
                                    f"{shapes[tensor['name']]}")
    _check_label_table(graph, manifest, where, path.name)
    return external


def _check_stamp(model, manifest: dict, where: str, name: str) -> None:
    from ...core.manifest import GRAPH_STAMP_KEY, ManifestError, stamp_difference

    stamp = {prop.key: prop.value for prop in model.metadata_props}.get(GRAPH_STAMP_KEY)
    if stamp is None:
        raise ManifestError(f"{where}: the graph {name} has no '{GRAPH_STAMP_KEY}' record of what it was built for (a "
                            "build of an older l2c-export); rebuild it")
    try:
        difference = stamp_difference(manifest, json.loads(stamp))
    except ValueError:
        difference = f"the graph's '{GRAPH_STAMP_KEY}' record is not JSON"
    if difference:
        raise ManifestError(f"{where}: {difference} (graph {name})")


def _boundary_shapes(model) -> dict[str, list]:
    """Each graph input's and output's shape: an int per static dim, ``batch`` for the batch, None where unknown.
    Outputs whose sizes the exporter left symbolic get them from ONNX shape inference."""
    import onnx

    def dims(value) -> list:
        return [d.dim_value if d.HasField("dim_value") else "batch" if d.dim_param == "batch" else None
                for d in value.type.tensor_type.shape.dim]

    graph = model.graph
    shapes = {value.name: dims(value) for value in (*graph.input, *graph.output)}
    unresolved = [o.name for o in graph.output if None in shapes[o.name]]
    if unresolved:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        for output in probe.graph.output:
            if output.name in unresolved:
                output.type.tensor_type.ClearField("shape")
        try:
            inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True).graph.output
        except Exception:  # an op shape inference does not know: those sizes stay unknown
            inferred = []
        for output in inferred:
            if output.name in unresolved and len(dims(output)) == len(shapes[output.name]):
                shapes[output.name] = [known if known is not None else found if isinstance(found, int) else None
                                       for known, found in zip(shapes[output.name], dims(output))]
    return shapes


def _same_shape(recorded: list, graph: list) -> bool:
    """The manifest's shape against the graph's (None: a size the graph does not state)."""
    return len(recorded) == len(graph) and all(g is None or r == g for r, g in zip(recorded, graph))


def _check_label_table(graph, manifest: dict, where: str, name: str) -> None:
    from ...core.interface import label_record
    from ...core.manifest import ManifestError

    record = label_record(manifest["model"]["inputs"])
    if record is None:  # conditioned on something else (prompt embeddings): no label table
        return
    label = record["name"]
    tables = {t.name: list(t.dims) for t in graph.initializer}
    names, reached = {label}, []
    for node in graph.node:  # nodes are in topological order
        if node.op_type in _LABEL_PASSTHROUGH and node.input and node.input[0] in names:
            names.update(node.output)
        elif (node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in names
              and node.input[0] in tables and all(a.name != "axis" or a.i == 0 for a in node.attribute)):
            reached.append(node.input[0])
    null_class = manifest["guidance"]["null_class"]
    for table in reached:
        rows = tables[table][0]
        if rows != null_class + 1:
            raise ManifestError(f"{where}: field 'guidance/null_class' is {null_class} (labels 0..{null_class - 1}, "
                                f"null class {null_class}); the graph {name}'s label table {table!r} has {rows} rows "
                                f"(labels 0..{rows - 2} and the null class {rows - 1})")


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
