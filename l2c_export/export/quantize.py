"""int8 (and fp8) quantization of the universal graph, once, before the subset graphs are cut from it.

Quantizing the traced whole-model graph (not each subset) is what keeps the weights stored once: every subset graph is
cut from the same quantized graph, so all of them reference the same int8 weights, scales and zero points in
``weights.bin``, and the ONNX Runtime backend shares them across sessions exactly as it shares fp32 weights.

Every MatMul and Gemm with a constant weight is quantized (the attention products of two activations, the patch
convolution, the embedding table, the norms and the softmax stay fp32); weights per output channel, symmetric int8.
Cache slots and the graph boundary stay float32: the cached branch outputs are MatMul outputs plus bias, and holding
them in fp32 adds no error beyond the int8 MatMuls'. Two forms, both written by ``onnxruntime.quantization``:

- ``dynamic`` (the onnxruntime default): ``DynamicQuantizeLinear`` + ``MatMulInteger``, fused into ONNX Runtime's
  ``DynamicQuantizeMatMul``; every call quantizes each MatMul input to uint8 from its own range. Chosen for ONNX
  Runtime by measurement: on DiT-S/2 at 256 px (this CPU, AVX-512 VNNI) it ran the full forward 1.66x faster than
  fp32 with the weights shared across sessions and prepacking off (1.77x with a private prepacked copy per
  session), needs no calibration, and on the embedded default its samples are closer to fp32 full compute than the
  static form's (PSNR 40.8 dB against 33.0 dB): the activation range of a diffusion model moves with the timestep,
  which per-call scales follow and one static scale cannot.
- ``qdq`` (TensorRT's form; runs on ONNX Runtime too): ``QuantizeLinear``/``DequantizeLinear`` pairs with static
  int8 activation scales (symmetric, zero point 0, as TensorRT requires), calibrated (min/max) on the inputs the
  full model itself sees along its own sampling trajectories, so no data set is needed.

``fp8`` (precision): the ``qdq`` form in float8 E4M3 (weights and activations, opset 19+ Q/DQ, which TensorRT's parser
takes for FP8 GPUs): the int8 Q/DQ graph with the same min/max calibration, each scale set so that the range maps onto
E4M3's +-448 (:func:`_to_float8`). ONNX Runtime's CPU provider runs these graphs unfused (its Q/DQ fusions have no
float8 kernels), which is how they are verified here.

The inverse, the float32 weights a quantized build stands for, is :func:`l2c_export.core.quantized.dequantize` (the
runtime's PyTorch backend reads it without the exporter).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

QUANTIZED_PRECISIONS = ("int8", "fp8")
FORMS = ("dynamic", "qdq")
QUANTIZED_OPS = ["MatMul", "Gemm"]
_OPTIONS = {"MatMulConstBOnly": True, "WeightSymmetric": True}  # constant weights only; symmetric int8 weights


def default_form(backend: str, precision: str = "int8") -> str:
    """The quantized form a backend runs: explicit Q/DQ for TensorRT (and for fp8), dynamic int8 for ONNX Runtime."""
    return "qdq" if backend == "tensorrt" or precision == "fp8" else "dynamic"


def quantize_universal(universal, form: str, calibration: list[dict[str, np.ndarray]] | None = None,
                       precision: str = "int8", reduce_range: bool = True) -> dict:
    """Replaces ``universal.model`` and ``universal.weights`` by their quantized form; returns the manifest's
    ``quantization`` record. ``calibration``: graph inputs ``{"x", "t", "y"}`` per batch (``qdq`` only).

    ``reduce_range``: int8 weights in 7 bits (amax onto 64), for graphs ONNX Runtime runs: its x86 int8 kernels multiply
    with ``vpmaddubsw``, whose int16 pair sums saturate with full-range weights on CPUs without VNNI (AVX2 only; on
    an AMD EPYC the tiny DiT's full-compute error went from 0.52 to within 0.1 this way), and an engine built on one
    CPU runs on others. TensorRT builds keep 8 bits."""
    import onnx
    import onnxruntime
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if form not in FORMS:
        raise ValueError(f"--quantization must be one of {', '.join(FORMS)}; got {form!r}")
    if precision == "fp8" and form != "qdq":
        raise ValueError("fp8 exists only in the qdq form (ONNX Runtime has no dynamic float8 MatMul)")
    originals = dict(universal.weights)
    read = {name for node in universal.model.graph.node for name in node.input}
    # Parameters no node reads (folded into weights of their own at export): the quantizer drops them, the PyTorch
    # reference reads them.
    unread = {name: array for name, array in originals.items() if name not in read}
    transposed_b = {node.input[1] for node in universal.model.graph.node if node.op_type == "Gemm" and
                    any(a.name == "transB" and a.i == 1 for a in node.attribute)}
    model = onnx.ModelProto()
    model.CopyFrom(universal.model)
    del model.graph.initializer[:]
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(array), name)
                                   for name, array in universal.weights.items())
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "quantized.onnx"
        if form == "dynamic":
            quantize_dynamic(model, out, op_types_to_quantize=QUANTIZED_OPS, per_channel=True,
                             reduce_range=reduce_range and precision == "int8",
                             weight_type=QuantType.QInt8, extra_options=_OPTIONS)
            activations = {"mode": "dynamic", "dtype": "uint8", "granularity": "per-tensor, per call",
                           "symmetric": False}
        else:
            if not calibration:
                raise ValueError("qdq quantization needs calibration batches (graph inputs x, t, y)")

            # In a fresh process: the calibrator opens its own session with per-session threads, which ONNX
            # Runtime refuses in a process whose backend already set up the global thread pool.
            import subprocess

            source, data = Path(scratch) / "float.onnx", Path(scratch) / "calibration.npz"
            onnx.save_model(model, str(source), save_as_external_data=True, location="float.bin")
            np.savez(data, **{f"{i}/{key}": value for i, batch in enumerate(calibration)
                              for key, value in batch.items()})
            result = subprocess.run([sys.executable, "-m", "l2c_export.export.quantize", str(source), str(out),
                                     str(data), str(int(reduce_range and precision == "int8"))],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"static {precision} quantization failed:\n{result.stderr[-4000:]}")
            activations = {"mode": "static", "dtype": _DTYPE[precision], "granularity": "per-tensor",
                           "symmetric": True,
                           "calibration": {"method": "minmax", "batches": len(calibration),
                                           "data": "inputs of the full model along its own sampling trajectories"}}
        quantized = onnx.load(str(out))
    if form == "dynamic":
        quantized = _fuse_dynamic_matmuls(quantized)
    if precision == "fp8":
        _to_float8(quantized, originals)
    del quantized.graph.value_info[:]  # the quantizer's inferred shapes: each session would hold them again
    universal.weights = {**unread, **{t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer}}
    del quantized.graph.initializer[:]
    universal.model = quantized
    tensors = _quantized_tensors(quantized, universal.weights, transposed_b)
    return {"form": form, "tool": f"onnxruntime.quantization {onnxruntime.__version__}",
            "weights": {"dtype": _DTYPE[precision], "granularity": "per output channel", "symmetric": True,
                        "op_types": QUANTIZED_OPS,
                        **({"bits": 7 if reduce_range else 8} if precision == "int8" else {})},
            "activations": activations, "cache_slots": "float32", "tensors": tensors}


_DTYPE = {"int8": "int8", "fp8": "float8_e4m3fn"}
_FLOAT8_MAX = 448.0  # the largest finite E4M3 value


def _to_float8(model, originals: dict[str, np.ndarray]) -> None:
    """Turns an int8 Q/DQ graph (symmetric, min/max calibrated) into float8 E4M3 in place: activation scales grow by
    128 / 448 (the calibrated range onto +-448), each weight is requantized from its fp32 values with one scale per
    output channel, amax / 448, and every zero point becomes a float8 zero.

    Written by hand: ``onnxruntime.quantization`` calibrates float8 only from the activations' standard deviation,
    which on DiT saturates (the timestep input, up to 999, got a range of +-3): 16 dB PSNR against fp32 full compute
    on the embedded default, 27 dB with these scales."""
    import ml_dtypes
    from onnx import numpy_helper

    tensors = {t.name: t for t in model.graph.initializer}
    activation_scales = {n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    zero_points = {n.input[2] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                   and len(n.input) > 2}

    def put(name: str, array: np.ndarray) -> None:
        tensors[name].CopyFrom(numpy_helper.from_array(array, name))

    for name in activation_scales:
        put(name, (numpy_helper.to_array(tensors[name]) * (128.0 / _FLOAT8_MAX)).astype(np.float32))
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in tensors or node.input[1] in activation_scales:
            continue
        weight = originals[node.input[0].removesuffix("_quantized")].astype(np.float32)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        amax = np.abs(weight).max(axis=tuple(i for i in range(weight.ndim) if i != axis), keepdims=True)
        scale = np.where(amax > 0, amax / _FLOAT8_MAX, 1.0).astype(np.float32)
        put(node.input[0], (weight / scale).astype(ml_dtypes.float8_e4m3fn))
        put(node.input[1], scale.reshape(-1))
    for name in zero_points:
        put(name, np.zeros(tuple(tensors[name].dims), dtype=ml_dtypes.float8_e4m3fn))


def _quantize_static(source: str, out: str, data: str, reduce_range: str = "0") -> None:
    """``python -m l2c_export.export.quantize FLOAT.onnx OUT.onnx CALIBRATION.npz REDUCE_RANGE`` (keys
    ``<batch>/<input>``; REDUCE_RANGE 1: 7-bit weights, see :func:`quantize_universal`)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    with np.load(data) as arrays:
        batches: dict[int, dict] = {}
        for key in arrays.files:
            index, name = key.split("/")
            batches.setdefault(int(index), {})[name] = arrays[key]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches[i] for i in sorted(batches))

        def get_next(self):
            return next(self.batches, None)

    quantize_static(source, out, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    reduce_range=reduce_range == "1",
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={**_OPTIONS, "ActivationSymmetric": True, "QuantizeBias": False})


def _fuse_dynamic_matmuls(model):
    """``DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(a_scale * b_scale) [-> Add(bias)]`` -> one
    ``DynamicQuantizeMatMul`` (ONNX Runtime's contrib op, per-column ``b_scale``): the fusion ONNX Runtime applies when it loads the graph,
    done once here because every subset session holds its graph as loaded. Measured on DiT-S/2 with 11 subsets,
    each session then costs about as much memory as an fp32 one (2.6 MB) instead of 3.6 MB. Hand-written: the
    quantizer has no option for it and ONNX Runtime saves optimized graphs only with their weights re-laid-out."""
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    fused = 0
    for node in list(graph.nodes):
        if node.op != "MatMulInteger" or not isinstance(node.inputs[1], gs.Constant):
            continue
        quantize = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        casts = node.outputs[0].outputs
        if quantize is None or quantize.op != "DynamicQuantizeLinear" or len(casts) != 1 or casts[0].op != "Cast":
            continue
        muls = casts[0].outputs[0].outputs
        if len(muls) != 1 or muls[0].op != "Mul":
            continue
        mul = muls[0]
        scales = next(t for t in mul.inputs if t is not casts[0].outputs[0])
        producer = scales.inputs[0] if scales.inputs else None
        if producer is None or producer.op != "Mul":
            continue
        b_scale = next((t for t in producer.inputs if isinstance(t, gs.Constant)), None)
        if b_scale is None:
            continue
        inputs = [quantize.inputs[0], node.inputs[1], b_scale, node.inputs[3]]
        last = mul
        adds = mul.outputs[0].outputs
        if len(adds) == 1 and adds[0].op == "Add" and mul.outputs[0] not in graph.outputs:
            bias = next((t for t in adds[0].inputs if isinstance(t, gs.Constant) and t.values.ndim == 1), None)
            if bias is not None:  # the bias add folds in too
                inputs.append(bias)
                last = adds[0]
        output = last.outputs[0]
        last.outputs.clear()
        graph.nodes.append(gs.Node("DynamicQuantizeMatMul", name=f"{node.name}_fused", domain="com.microsoft",
                                   inputs=inputs, outputs=[output]))
        fused += 1
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    result = gs.export_onnx(graph)
    del result.opset_import[:]
    result.opset_import.extend(o for o in model.opset_import if o.domain != "com.microsoft")
    result.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return result


def _quantized_tensors(graph_model, weights: dict[str, np.ndarray], transposed_b: set[str]) -> dict[str, dict]:
    """int8 weight name -> how it dequantizes: ``of`` (the parameter it stands for), ``scale`` and ``zero_point``
    (tensor names), ``axis`` (the per-channel axis of the int8 tensor), ``transposed`` (the int8 tensor is the
    transpose of ``of``: the quantizer turns ``Gemm(transB=1)`` into a MatMul on the transposed weight)."""
    axes, matmul_integer = {}, set()
    for node in graph_model.graph.node:
        if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") and node.input[1] in weights:
            axes[node.input[1]] = weights[node.input[1]].ndim - 1
            matmul_integer.add(node.input[1])
        elif node.op_type == "DequantizeLinear" and node.input[0] in weights:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            axes[node.input[0]] = axis
    tensors = {}
    for name, axis in sorted(axes.items()):
        if weights[name].dtype.name not in ("int8", "float8_e4m3fn") or not name.endswith("_quantized"):
            continue
        of = name[: -len("_quantized")]
        scale, zero_point = f"{of}_scale", f"{of}_zero_point"
        if scale not in weights or zero_point not in weights:
            raise AssertionError(f"{name}: the quantizer wrote no {scale} / {zero_point}")
        transposed = of in transposed_b and name in matmul_integer  # a Gemm(transB=1) turned into a MatMul
        tensors[name] = {"of": of, "scale": scale, "zero_point": zero_point, "axis": int(axis),
                         "transposed": bool(transposed)}
    return tensors


def calibration_batches(model, sampler, cfg_scale: float, num_classes: int, images: int = 4,
                        seed: int = 0) -> list[dict[str, np.ndarray]]:
    """The graph inputs (by name: x, t, y for DiT and U-ViT) of every model call of the full model sampling
    ``images`` images from noise of ``seed`` (labels 0, 1, ... in turn; guidance doubles the batch as at run time):
    calibration needs no data set."""
    from ..models import family_of_config
    from ..samplers.guidance import make_noise
    from ..models.reference import sample_reference

    family = family_of_config(model.config)
    inputs = family.graph_inputs(model.config)
    labels = [i % num_classes for i in range(images)]
    noise = make_noise(seed, (images, *next(spec.shape for spec in inputs if spec.role == "sample")))
    batches: list[dict[str, np.ndarray]] = []

    def record(module, args):  # the reference sampler calls model(*inputs) once per model call without a schedule
        batches.append({spec.name: value.detach().cpu().numpy().astype(spec.dtype)
                        for spec, value in zip(inputs, args)})

    handle = model.register_forward_pre_hook(record)
    try:
        sample_reference(model, sampler, labels, noise, cfg_scale, progress=False)
    finally:
        handle.remove()
    return batches


if __name__ == "__main__":  # the static quantization, run in a fresh process by quantize_universal
    _quantize_static(*sys.argv[1:5])
