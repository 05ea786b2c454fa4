"""int8 builds: the weights quantized once and shared by every subset graph, how the manifest records them, the Q/DQ
form inside TensorRT's op matrix, verify against the fp32 model, and the benchmark's rows against fp32 full."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from l2c_export.builder.build import BuildRequest, build
from l2c_export.core import manifest as manifest_io
from l2c_export.export.opsupport import tensorrt_supported_ops
from l2c_export.core.quantized import dequantize
from l2c_export.models.zoo import embedded_default
from l2c_export.runtime.backends import weight_arrays
from l2c_export.tools.verify import DEFAULT_TOLERANCE

from .conftest import run_cli


def _build_default(out: Path, precision: str = "fp32", **kwargs):
    spec = embedded_default()
    return build(BuildRequest(spec=spec, schedule=spec.schedule(), sampler=spec.sampler(), out_dir=out,
                              precision=precision, **kwargs), progress=False)


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    """The embedded default in fp32, int8 dynamic (onnxruntime's default), int8 Q/DQ and fp8 Q/DQ."""
    root = tmp_path_factory.mktemp("int8")
    folders = {"fp32": root / "fp32", "dynamic": root / "dynamic", "qdq": root / "qdq", "fp8": root / "fp8"}
    _build_default(folders["fp32"])
    _build_default(folders["dynamic"], "int8")
    _build_default(folders["qdq"], "int8", quantization="qdq")
    _build_default(folders["fp8"], "fp8")
    return folders


def _graph(folder: Path, record: dict) -> onnx.ModelProto:
    return onnx.load(str(folder / record["graph"]["file"]), load_external_data=False)


def test_int8_weights_are_quantized_once_and_every_subset_graph_references_them(builds):
    folder = builds["dynamic"]
    data = manifest_io.load(folder)
    assert data["precision"] == "int8" and data["quantization"]["form"] == "dynamic"
    assert data["quantization"]["activations"]["mode"] == "dynamic"
    assert {slot["dtype"] for slot in data["cache_slots"]} == {"float32"}
    table = {entry["name"]: entry for entry in data["weight_tensors"]}
    quantized = {name for name, entry in table.items() if "quantization" in entry}
    # every Linear of the model: 4 per block (qkv, proj, fc1, fc2) + adaLN per block, t_embedder (2), final (2)
    depth = data["model"]["config"]["depth"]
    assert len(quantized) == 5 * depth + 4
    assert all(table[name]["dtype"] == "int8" for name in quantized)
    for subset in data["subsets"]:
        graph = _graph(folder, subset)
        inline = [t.name for t in graph.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
        assert inline == []  # nothing private to a subset: all weights, scales and zero points are in weights.bin
        for tensor in graph.graph.initializer:
            location = {e.key: e.value for e in tensor.external_data}
            assert location["location"] == "weights.bin"
            assert int(location["offset"]) == table[tensor.name]["offset"]
        ops = {node.op_type for node in graph.graph.node}
        assert "DynamicQuantizeMatMul" in ops and "MatMulInteger" not in ops  # fused at build
        assert ("MatMul" in ops) == any(subset["compute"][0::2])  # attention's products of activations stay fp32
    fp32_bytes = manifest_io.load(builds["fp32"])["weights"]["bytes"]
    assert data["weights"]["bytes"] < 0.4 * fp32_bytes


def test_int8_weights_are_symmetric_per_output_channel_and_dequantize_to_the_fp32_weights(builds):
    data = manifest_io.load(builds["dynamic"])
    arrays = weight_arrays(data, builds["dynamic"])
    fp32 = weight_arrays(manifest_io.load(builds["fp32"]), builds["fp32"])
    records = {e["name"]: e["quantization"] for e in data["weight_tensors"] if "quantization" in e}
    restored = dequantize(arrays, records)
    # An onnxruntime build's weights take 7 bits: int8 kernels without VNNI saturate on full-range weights
    assert data["quantization"]["weights"]["bits"] == 7
    for name, record in records.items():
        assert not arrays[record["zero_point"]].any()  # symmetric
        scale = arrays[record["scale"]]
        original = fp32[record["of"]]
        weight = original.T if record["transposed"] else original
        assert scale.shape == (weight.shape[record["axis"]],)  # one scale per output channel
        channel_max = np.abs(weight).max(axis=1 - record["axis"])
        np.testing.assert_allclose(scale, channel_max / 64, rtol=1e-5)  # onnxruntime maps amax to 64
        step = np.expand_dims(scale, 1 - record["axis"])
        assert np.all(np.abs((weight - (restored[record["of"]].T if record["transposed"] else
                                        restored[record["of"]]))) <= step / 2 + 1e-7)
    assert set(restored) >= set(fp32)  # every fp32 tensor has its counterpart


def _worst(stdout: str) -> dict[str, tuple[float, str]]:
    """subset name -> (worst relative difference, the output it was in), from verify's lines."""
    found = re.findall(r"^\s+(?:ok  |FAIL) (\S+)\s+step\s+\d+\s+worst (\S+) \((\S+)\)", stdout, re.MULTILINE)
    return {name: (float(value), output) for name, value, output in found}


# verify runs in subprocesses here: ONNX Runtime's global thread pool, once set up in a process, refuses the plain
# sessions other tests open.
def test_verify_reports_int8_error_against_the_fp32_model_within_the_stated_tolerance(builds):
    result = run_cli("verify", str(builds["dynamic"]), "--reference", str(builds["fp32"]))
    assert "the fp32 weights of" in result.stdout and "all 5 subset engine(s) agree" in result.stdout
    worst = _worst(result.stdout)
    assert len(worst) == 5
    assert 1e-3 < max(value for value, _ in worst.values()) <= DEFAULT_TOLERANCE["int8"]  # quantized, within it
    assert all(value < 2e-2 for value, output in worst.values() if output == "model_out")
    failing = run_cli("verify", str(builds["dynamic"]), "--reference", str(builds["fp32"]), "--tolerance", "1e-3",
                      check=False)
    assert failing.returncode != 0 and "differ from PyTorch beyond tolerance" in failing.stderr


def test_verify_refuses_a_reference_that_is_not_the_same_fp32_model(builds):
    other = run_cli("verify", str(builds["dynamic"]), "--reference", str(builds["qdq"]), check=False)
    assert other.returncode != 0 and "field 'precision'" in other.stderr and "fp32 build" in other.stderr


@pytest.mark.parametrize("kind, dtype", [("qdq", "int8"), ("fp8", "float8_e4m3fn")])
def test_qdq_graphs_stay_inside_tensorrt_matrix_with_zero_points_zero_and_run_on_onnxruntime(builds, kind, dtype):
    folder = builds[kind]
    data = manifest_io.load(folder)
    assert data["quantization"]["form"] == "qdq" and data["quantization"]["activations"]["mode"] == "static"
    assert {e["dtype"] for e in data["weight_tensors"] if "quantization" in e} == {dtype}
    arrays = weight_arrays(data, folder)
    supported = set(tensorrt_supported_ops())
    for subset in data["subsets"]:
        graph = _graph(folder, subset)
        ops = {node.op_type for node in graph.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops and ops <= supported
        for node in graph.graph.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                zero_point = arrays[node.input[2]]
                assert zero_point.dtype.name == dtype  # TensorRT: symmetric, zero point 0
                assert not zero_point.astype(np.float32).any()
            if node.op_type == "DequantizeLinear" and node.input[0] in arrays:
                assert arrays[node.input[0]].dtype.name == dtype  # no int32 bias: TensorRT's DQ has none
    result = run_cli("verify", str(folder), "--reference", str(builds["fp32"]))
    assert "on CPUExecutionProvider" in result.stdout and "all 5 subset engine(s) agree" in result.stdout
    assert max(value for value, _ in _worst(result.stdout).values()) > 1e-3


def test_int8_options_are_checked_before_anything_is_written(tmp_path):
    spec = embedded_default()
    for kwargs, message in (({"precision": "int8", "backend": "tensorrt", "quantization": "dynamic"},
                             "explicit Q/DQ"),
                            ({"precision": "fp32", "quantization": "qdq"}, "applies to --precision int8")):
        with pytest.raises(ValueError, match=message):
            build(BuildRequest(spec=spec, schedule=spec.schedule(), sampler=spec.sampler(),
                               out_dir=tmp_path / "out", **kwargs), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_an_int8_rebuild_reuses_everything_and_keeps_the_quantization_records(builds, tmp_path):
    out = tmp_path / "again"
    _build_default(out, "int8")
    report = _build_default(out, "int8")
    assert not report.traced and report.exported == []
    again, first = manifest_io.load(out), manifest_io.load(builds["dynamic"])
    assert again["quantization"] == first["quantization"]
    assert again["weight_tensors"] == first["weight_tensors"]


def test_bench_measures_fp32_and_int8_together_against_fp32_full(builds, tmp_path):
    result = run_cli("bench", str(builds["fp32"]), str(builds["dynamic"]), "--backend", "onnxruntime",
                     "--repeats", "1", "--batch", "1", "--no-memory", "--json", str(tmp_path / "b.json"))
    assert "full/fp32" in result.stdout
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    assert [row["precision"] for row in rows] == ["fp32", "int8"]
    fp32, int8 = rows
    assert fp32["full_speedup_vs_fp32"] == pytest.approx(1.0)
    for row in rows:
        assert row["fp32_full_seconds"] == pytest.approx(fp32["full_seconds"])
        assert row["full_speedup_vs_fp32"] == pytest.approx(fp32["full_seconds"] / row["full_seconds"])
        assert row["schedule_speedup_vs_fp32"] == pytest.approx(fp32["full_seconds"] / row["schedule_seconds"])
        assert row["schedule_of_target"] == pytest.approx(
            row["schedule_speedup_vs_fp32"] / (row["full_speedup_vs_fp32"] * row["ideal_speedup"]))
