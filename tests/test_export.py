"""Export and build: subset graphs by liveness, shared weights, parity with the PyTorch cached forward, the manifest,
atomic and incremental builds, TensorRT's op matrix and its absence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from l2c_export.builder.build import BuildRequest, build
from l2c_export.core import manifest as manifest_io
from l2c_export.core.plan import BuildPlan
from l2c_export.core.schedule import Schedule
from l2c_export.export.onnx import check_ops_supported
from l2c_export.export.opsupport import parse_support_matrix, tensorrt_supported_ops
from l2c_export.models.dit.model import DiT
from l2c_export.models.zoo import ModelSpec
from l2c_export.samplers.gaussian import GaussianSampler

from .conftest import REPO, SHARED, TINY, ort_session, run_cli

# depth 2, 5 steps. Subset A = 1111 (steps 0, 4), B = 1011 (steps 1, 3), C = 1100 (step 2).
ROWS = [[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 0], [1, 0, 1, 1], [1, 1, 1, 1]]
TINY2 = type(TINY)(**{**TINY.to_dict(), "depth": 2})


def _checkpoint(tmp_path: Path, config, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    state = {k: torch.randn_like(v) * 0.2 for k, v in DiT(config).state_dict().items()}
    path = tmp_path / f"weights-{seed}.pt"
    torch.save(state, path)
    return path


def _spec(path: Path, config) -> ModelSpec:
    return ModelSpec(name="tiny", config=config, weights=path, space="latent")


def _build(tmp_path, config, rows, out="build", precision="fp32", seed=0, **kwargs):
    spec = _spec(_checkpoint(tmp_path, config, seed), config)
    schedule = Schedule(np.array(rows, dtype=bool))
    sampler = GaussianSampler.create("ddim", len(rows))
    report = build(BuildRequest(spec=spec, schedule=schedule, sampler=sampler, out_dir=tmp_path / out,
                                precision=precision, **kwargs), progress=False)
    return spec, report


def test_liveness_plan_is_exactly_what_later_steps_read():
    plan = BuildPlan.from_schedule(Schedule(np.array(ROWS, dtype=bool)))
    assert plan.step_to_subset == (0, 1, 2, 1, 0)
    a, b, c = plan.subsets
    assert (a.reads, a.writes) == ((), (1,))  # step 0's MLP 0 is read at step 1; step 4 hands on nothing
    assert (b.reads, b.writes) == ((1,), (2, 3))  # step 1's block-1 branches are read at step 2
    assert (c.reads, c.writes) == ((2, 3), (1,))  # step 2's MLP 0 is read at step 3


def test_subset_graphs_take_and_return_only_live_values(tmp_path):
    _, report = _build(tmp_path, TINY2, ROWS)
    data = manifest_io.load(report.manifest_path.parent)
    interface = {s["name"]: ([i["name"] for i in s["inputs"]], [o["name"] for o in s["outputs"]])
                 for s in data["subsets"]}
    assert interface == {
        "full": (["x", "t", "y"], ["model_out", "fresh_mlp_0"]),
        "subset01_3of4": (["x", "t", "y", "cache_mlp_0"], ["model_out", "fresh_attn_1", "fresh_mlp_1"]),
        "subset02_2of4": (["x", "t", "y", "cache_attn_1", "cache_mlp_1"], ["model_out", "fresh_mlp_0"]),
    }
    for subset in data["subsets"]:  # the graph files say the same as the manifest
        graph = onnx.load(report.manifest_path.parent / subset["graph"]["file"], load_external_data=False)
        assert [i.name for i in graph.graph.input] == interface[subset["name"]][0]
        assert [o.name for o in graph.graph.output] == interface[subset["name"]][1]
    assert data["schedule"]["step_subset"] == [0, 1, 2, 1, 0]


def _ort_outputs(path: Path, feeds: dict) -> dict:
    session = ort_session(path)
    assert session.get_providers() == ["CPUExecutionProvider"]
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in
                                              {i.name for i in session.get_inputs()}})))


def _feeds(config, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((batch, config.in_channels, config.input_size, config.input_size),
                                      dtype=np.float32),
             "t": np.array([999.0, 500.0, 3.0][:batch], dtype=np.float32),
             "y": np.array([1, 7, config.num_classes][:batch], dtype=np.int64)}
    cache = {k: rng.standard_normal((batch, config.num_tokens, config.hidden_size), dtype=np.float32)
             for k in range(config.num_sublayers)}
    return feeds, cache


def _check_parity(folder: Path, model: DiT, rtol: float):
    data = manifest_io.load(folder)
    feeds, cache = _feeds(model.config)
    graph_dtype = np.dtype(data["cache_slots"][0]["dtype"]) if data["cache_slots"] else np.float32
    cache = {k: v.astype(graph_dtype) for k, v in cache.items()}  # what a runtime's cache buffers hold
    for subset in data["subsets"]:
        slots = {i["name"]: i["slot"] for i in subset["inputs"] + subset["outputs"] if "slot" in i}
        index = {slot["name"]: slot["index"] for slot in data["cache_slots"]}
        inputs = dict(feeds, **{name: cache[index[slot]] for name, slot in slots.items() if name.startswith("cache_")})
        got = _ort_outputs(folder / subset["graph"]["file"], inputs)
        torch_cache = {k: torch.from_numpy(v.astype(np.float32)) for k, v in cache.items()}
        with torch.no_grad():
            want = model.forward_cached(torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["t"]),
                                        torch.from_numpy(feeds["y"]), [bool(c) for c in subset["compute"]],
                                        torch_cache).numpy()
        scale = np.abs(want).max()
        assert np.abs(got["model_out"] - want).max() <= rtol * scale, subset["name"]
        for name, slot in slots.items():
            if name.startswith("fresh_"):
                fresh = torch_cache[index[slot]].numpy()
                assert np.abs(got[name].astype(np.float32) - fresh).max() <= rtol * np.abs(fresh).max(), name


def test_every_subset_graph_matches_the_pytorch_cached_forward(tmp_path):
    spec, report = _build(tmp_path, TINY2, ROWS)
    _check_parity(report.manifest_path.parent, spec.load_model(), rtol=1e-5)


def test_graphs_pass_the_checker_use_only_tensorrt_ops_and_match_their_sha256(tmp_path):
    _, report = _build(tmp_path, TINY2, ROWS)
    folder = report.manifest_path.parent
    data = manifest_io.load(folder, verify_files=False)
    supported = set(tensorrt_supported_ops())
    for subset in data["subsets"]:
        path = folder / subset["graph"]["file"]
        onnx.checker.check_model(str(path), full_check=True)
        assert {n.op_type for n in onnx.load(path, load_external_data=False).graph.node} <= supported
    on_disk = {p.name for p in folder.iterdir()}
    listed = {entry["file"] for entry in manifest_io.all_files(data)} | {"manifest.json"}
    assert on_disk == listed
    for entry in manifest_io.all_files(data):
        assert manifest_io.sha256_of(folder / entry["file"]) == entry["sha256"]


def test_weights_are_stored_once_under_parameter_names(tmp_path):
    spec, report = _build(tmp_path, TINY2, ROWS)
    folder = report.manifest_path.parent
    parameters = spec.load_model().state_dict()
    parameter_bytes = sum(v.numel() * 4 for v in parameters.values())
    weights_bytes = (folder / "weights.bin").stat().st_size
    assert parameter_bytes <= weights_bytes < parameter_bytes + 4096 * len(parameters)
    seen: dict[str, tuple] = {}
    for subset in manifest_io.load(folder)["subsets"]:
        graph = onnx.load(folder / subset["graph"]["file"], load_external_data=False)
        assert (folder / subset["graph"]["file"]).stat().st_size < 64 * 1024  # no weights inside the graph file
        for tensor in graph.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            where = {e.key: e.value for e in tensor.external_data}
            assert where["location"] == "weights.bin"
            assert tensor.name.removesuffix(".T") in parameters, tensor.name
            assert seen.setdefault(tensor.name, (where["offset"], where["length"])) == (where["offset"],
                                                                                      where["length"])
    assert "blocks.0.attn.qkv.weight.T" in seen and "blocks.0.adaLN_modulation.1.weight" in seen


def test_the_trace_holds_the_weights_once_and_gives_the_model_back_untouched(tmp_path):
    """No copy of the model for the trace, none for the transposed layout: what makes an 8 GB model export on a
    24 GiB machine. The stand-ins are swapped in and out; the real weights come back as they were."""
    from l2c_export.export.onnx import trace, weights_layout, write_weights

    model = _spec(_checkpoint(tmp_path, TINY2), TINY2).load_model()
    before = {name: (tensor, tensor.clone()) for name, tensor in model.state_dict(keep_vars=True).items()}
    universal = trace(model)
    after = model.state_dict(keep_vars=True)
    for name, (tensor, values) in before.items():
        assert after[name] is tensor and torch.equal(tensor.detach(), values), name
    transposed = 0
    for name, array in universal.weights.items():
        parameter = before[name.removesuffix(".T")][0].detach()
        assert np.shares_memory(array, parameter.numpy()), name  # a view of the model's tensor, not a copy
        np.testing.assert_array_equal(array, parameter.numpy().T if name.endswith(".T") else parameter.numpy())
        transposed += name.endswith(".T")
    assert transposed >= 4
    layout = write_weights(universal, tmp_path / "weights.bin")
    blob = np.fromfile(tmp_path / "weights.bin", dtype=np.uint8)
    assert layout == weights_layout(universal)
    for name, (offset, length) in layout.items():  # streamed in the graph layout: transposed ones laid out so
        stored = blob[offset: offset + length].view(np.float32).reshape(universal.weights[name].shape)
        np.testing.assert_array_equal(stored, universal.weights[name])


def test_initializer_names_do_not_change_between_exports(tmp_path):
    names = []
    for out in ("one", "two"):
        _, report = _build(tmp_path, TINY2, ROWS, out=out, seed=len(names))
        graph = onnx.load(report.manifest_path.parent / "full.onnx", load_external_data=False)
        names.append(sorted(t.name for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL))
    assert names[0] == names[1]


def test_fp16_graphs_keep_norm_and_softmax_in_fp32_and_stay_close(tmp_path):
    spec, report = _build(tmp_path, TINY2, ROWS, precision="fp16")
    folder = report.manifest_path.parent
    data = manifest_io.load(folder)
    assert data["precision"] == "fp16" and data["cache_slots"][0]["dtype"] == "float16"
    graph = onnx.load(folder / "full.onnx", load_external_data=False)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in onnx.shape_inference.infer_shapes(graph).graph.value_info}
    for node in graph.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax"):
            assert types.get(node.input[0]) == onnx.TensorProto.FLOAT, node.name
    matmul_weights = [t for t in graph.graph.initializer if t.name.endswith(".T")]
    assert matmul_weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in matmul_weights)
    _check_parity(folder, spec.load_model(), rtol=2e-2)


def test_bf16_graphs_evaluate_close_to_fp32_with_the_onnx_reference_evaluator(tmp_path):
    """bf16 graphs are TensorRT's (ONNX Runtime has no bfloat16 kernels for them, so an onnxruntime build refuses
    bf16, and TensorRT is not on these machines): exported and cut here as a tensorrt build does, then evaluated with
    onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    from l2c_export.export.onnx import subset_graph, trace, write_weights

    spec = _spec(_checkpoint(tmp_path, TINY2), TINY2)
    universal = trace(spec.load_model(), "bf16")
    universal.bind_weights(write_weights(universal, tmp_path / "weights.bin"))
    for subset in BuildPlan.from_schedule(Schedule(np.array(ROWS, dtype=bool))).subsets:  # cache inputs in bf16
        path = tmp_path / f"{subset.name}.onnx"
        onnx.save_model(subset_graph(universal, subset, graph_name=subset.name), str(path))
        graph = onnx.load(path, load_external_data=False)
        cache_types = {i.name: i.type.tensor_type.elem_type for i in graph.graph.input if i.name.startswith("cache_")}
        assert len(cache_types) == len(subset.reads)
        assert set(cache_types.values()) <= {onnx.TensorProto.BFLOAT16}
        onnx.checker.check_model(str(path), full_check=True)
    evaluator = ReferenceEvaluator(onnx.load(tmp_path / "full.onnx"))
    feeds, _ = _feeds(TINY2)
    (got,) = evaluator.run(["model_out"], feeds)
    with torch.no_grad():
        want = spec.load_model()(*(torch.from_numpy(feeds[k]) for k in ("x", "t", "y"))).numpy()
    assert np.abs(got - want).max() <= 5e-2 * np.abs(want).max()


def test_an_unsupported_op_is_refused_by_name(tmp_path):
    _, report = _build(tmp_path, TINY2, [[1, 1, 1, 1]])
    graph = onnx.load(report.manifest_path.parent / "full.onnx", load_external_data=False)
    with pytest.raises(ValueError, match="full.onnx: uses ops outside TensorRT's ONNX parser support matrix: "
                                         "LayerNormalization"):
        check_ops_supported(graph, set(tensorrt_supported_ops()) - {"LayerNormalization"}, "full.onnx")


def test_the_shipped_op_matrix_is_the_shared_reference():
    source = SHARED / "reference" / "onnx-tensorrt-operators.md"
    if not source.is_file():
        pytest.skip(f"{source} is absent (../shared is not beside this checkout)")
    assert parse_support_matrix(source.read_text()) == tensorrt_supported_ops()
    assert "Einsum" in tensorrt_supported_ops() and "AffineGrid" not in tensorrt_supported_ops()


# ---------------------------------------------------------------------------------------------------------------------
def test_manifest_schema_is_checked_on_write_and_read(tmp_path):
    _, report = _build(tmp_path, TINY2, ROWS)
    folder = report.manifest_path.parent
    data = json.loads(report.manifest_path.read_text())
    broken = dict(data)
    del broken["sampler"]
    with pytest.raises(manifest_io.ManifestError, match="'sampler' is a required property"):
        manifest_io.write(tmp_path / "elsewhere", broken)
    assert not (tmp_path / "elsewhere" / "manifest.json").exists()
    data["subsets"][0]["inputs"][0]["dtype"] = "float64"
    report.manifest_path.write_text(json.dumps(data))
    with pytest.raises(manifest_io.ManifestError, match=r"field 'subsets/0/inputs/0/dtype'"):
        manifest_io.load(folder)
    newer = manifest_io.SCHEMA_VERSION + 1
    data["schema_version"] = newer
    report.manifest_path.write_text(json.dumps(data))
    with pytest.raises(manifest_io.ManifestError, match=f"'schema_version' is {newer}, newer than this l2c-export"):
        manifest_io.load(folder)


def _as_version_2(data: dict) -> dict:
    """A label model's current manifest as version 2 wrote it: its label input of role ``label`` (no argument, kind or
    partner), ``guidance/classifier_free`` in place of the rule, no latent layout."""
    data["schema_version"] = 2
    del data["model"]["latent_layout"]
    if data["guidance"].pop("rule") != "classifier_free":
        data["guidance"]["classifier_free"] = False
    del data["guidance"]["scale_argument"]
    for tensor in (*data["model"]["inputs"], *(t for subset in data["subsets"] for t in subset["inputs"])):
        if tensor["role"] == "conditioning":
            assert tensor.pop("kind") == "label"
            del tensor["argument"]
            tensor["role"] = "label"
    return data


def test_a_version_1_or_2_manifest_is_read_by_upgrading_it(tmp_path):
    """A build made before model families (schema 1: DiT fields, no roles, sampler without calls), or before inputs
    named their pipeline argument and kind (schema 2: a closed list of roles), still runs, to the same samples."""
    _, report = _build(tmp_path, TINY2, ROWS)
    folder = report.manifest_path.parent

    def run_samples(name: str) -> np.ndarray:  # in a subprocess: this process keeps its own ONNX Runtime settings
        run_cli("run", str(folder), "--labels", "1,2", "--seed", "3", "--save-latents", str(tmp_path / name))
        return np.load(tmp_path / name)

    before = run_samples("before.npy")
    data = _as_version_2(json.loads(report.manifest_path.read_text()))
    report.manifest_path.write_text(json.dumps(data))
    upgraded = manifest_io.load(folder)
    assert upgraded["schema_version"] == manifest_io.SCHEMA_VERSION and upgraded["model"]["latent_layout"] == "nchw"
    assert [t.get("argument") for t in upgraded["model"]["inputs"]] == [None, None, "class_labels"]
    np.testing.assert_array_equal(run_samples("after-2.npy"), before)
    data["schema_version"] = 1
    for key in ("family", "inputs", "output"):
        del data["model"][key]
    for key in ("num_calls", "model_times"):
        del data["sampler"][key]
    for subset in data["subsets"]:
        for tensor in (*subset["inputs"], *subset["outputs"]):
            del tensor["role"]
    report.manifest_path.write_text(json.dumps(data))
    after = run_samples("after.npy")
    np.testing.assert_array_equal(after, before)
    del data["sampler"]["timesteps"]
    report.manifest_path.write_text(json.dumps(data))
    with pytest.raises(manifest_io.ManifestError, match="version 1 manifest without the field 'timesteps'"):
        manifest_io.load(folder)


def test_a_tampered_file_fails_its_sha256(tmp_path):
    _, report = _build(tmp_path, TINY2, ROWS)
    folder = report.manifest_path.parent
    with open(folder / "weights.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\x01\x02")
    with pytest.raises(manifest_io.ManifestError, match="weights.bin: sha256 .* does not match"):
        manifest_io.load(folder)


def test_incremental_rebuild_exports_only_what_changed(tmp_path):
    config = TINY2
    spec = _spec(_checkpoint(tmp_path, config), config)
    sampler = GaussianSampler.create("ddim", 5)
    out = tmp_path / "build"

    def run(rows):
        return build(BuildRequest(spec=spec, schedule=Schedule(np.array(rows, dtype=bool)), sampler=sampler,
                                  out_dir=out), progress=False)

    first = run(ROWS)
    assert first.traced and len(first.exported) == 3
    again = run(ROWS)
    assert not again.traced and again.exported == []
    assert sorted(again.reused) == sorted(["weights.bin", "full.onnx", "subset01_3of4.onnx", "subset02_2of4.onnx"])
    changed = [list(r) for r in ROWS]
    changed[2] = [1, 1, 1, 0]  # subset C changes (and with it what B must hand on)
    third = run(changed)
    assert "weights.bin" in third.reused and "full.onnx" in third.reused
    assert sorted(third.exported) == ["subset01_3of4.onnx", "subset02_3of4.onnx"]
    manifest_io.load(out)  # the result is complete and consistent


def test_the_exporter_digest_changes_with_the_exporters_source_and_only_with_it(tmp_path):
    import shutil

    from l2c_export.builder.reuse import PACKAGE, exporter_digest

    copy = tmp_path / "l2c_export"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert exporter_digest(copy) == exporter_digest()
    with open(copy / "cli" / "run.py", "a") as f:  # not a stage that makes a build's files
        f.write("# edited\n")
    assert exporter_digest.__wrapped__(copy) == exporter_digest()
    with open(copy / "export" / "onnx.py", "a") as f:
        f.write("# edited\n")
    assert exporter_digest.__wrapped__(copy) != exporter_digest()


def test_a_changed_exporter_rebuilds_what_an_unchanged_one_reuses(tmp_path, monkeypatch):
    """The exporter's digest is part of every key: the same request rebuilds everything once it changes."""
    import l2c_export.builder.build as build_module

    spec = _spec(_checkpoint(tmp_path, TINY2), TINY2)
    sampler = GaussianSampler.create("ddim", 5)

    def run():
        return build(BuildRequest(spec=spec, schedule=Schedule(np.array(ROWS, dtype=bool)), sampler=sampler,
                                  out_dir=tmp_path / "build"), progress=False)

    first = run()
    unchanged = run()
    assert not unchanged.traced and unchanged.exported == [] and "weights.bin" in unchanged.reused
    monkeypatch.setattr(build_module, "exporter_digest", lambda: "another exporter")
    changed = run()
    assert changed.traced and changed.reused == [] and sorted(changed.exported) == sorted(first.exported)
    manifest_io.load(tmp_path / "build")


def _default_schedule_file(tmp_path: Path, rows) -> Path:
    path = tmp_path / f"schedule-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps({"num_steps": len(rows), "depth": len(rows[0]) // 2, "compute": rows}))
    return path


@pytest.mark.slow
def test_a_build_killed_half_way_leaves_the_previous_output(tmp_path):
    """The embedded default (depth 6, 20 steps), killed once its staging folder holds the weights."""
    out, staging = tmp_path / "engines", tmp_path / ".engines.staging"
    full = _default_schedule_file(tmp_path, [[1] * 12] * 20)
    rows = [[1] * 12 if s % 2 == 0 else [int((k + s) % 3 != 0) for k in range(12)] for s in range(20)]
    scheduled = _default_schedule_file(tmp_path, rows)
    run_cli("build", "--out", str(out), "--schedule", str(full))
    before = (out / "manifest.json").read_bytes()
    # A fresh interpreter, not the fork server's client: SIGKILL must end the build itself, at once.
    command = [sys.executable, "-m", "l2c_export.cli", "build", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command + ["--schedule", str(scheduled)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    deadline = time.time() + 120
    while not (staging / "weights.bin").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert process.poll() is None, "the build finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert staging.exists()  # killed mid-way indeed
    assert (out / "manifest.json").read_bytes() == before
    manifest_io.load(out)  # the previous build, complete and consistent
    run_cli("build", "--out", str(out), "--schedule", str(scheduled))
    assert not staging.exists()
    assert len(manifest_io.load(out)["subsets"]) == 4


def test_tensorrt_missing_is_a_clear_error_and_writes_nothing(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here; this test covers machines without it")
    except ImportError:
        pass
    out = tmp_path / "trt"
    result = run_cli("build", "--backend", "tensorrt", "--out", str(out), check=False)
    assert result.returncode == 3
    assert "TensorRT is not installed" in result.stderr and "Nothing was written" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def dit_s2_checkpoint(tmp_path_factory) -> Path:
    """DiT-S/2 at 256 px in the official layout, random weights (timing and parity do not depend on values)."""
    from l2c_export.models.dit.model import dit_config

    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.05 for k, v in DiT(dit_config("DiT-S/2", input_size=32)).state_dict().items()}
    path = tmp_path_factory.mktemp("dit-s2") / "DiT-S-2-256x256.pt"
    torch.save(state, path)
    return path


@pytest.mark.slow
def test_build_cli_on_a_dit_s2_checkpoint_in_the_official_layout(tmp_path, dit_s2_checkpoint):
    from l2c_export.models.checkpoint import load_dit
    from l2c_export.models.dit.model import dit_config

    rows = [[1] * 24] + [[1] * 24 if s % 2 == 0 else [int(k % 4 != 1) for k in range(24)] for s in range(1, 6)]
    rows[3] = [int(k < 12) for k in range(24)]
    out = tmp_path / "s2"
    result = run_cli("build", "--checkpoint", str(dit_s2_checkpoint), "--model", "DiT-S/2", "--image-size", "256",
                     "--schedule", str(_default_schedule_file(tmp_path, rows)), "--steps", "6", "--out", str(out))
    assert "built 3 subset(s) for onnxruntime (fp32)" in result.stdout
    data = manifest_io.load(out)
    assert data["model"]["space"] == "latent" and data["model"]["config"]["input_size"] == 32
    supported = set(tensorrt_supported_ops())
    for subset in data["subsets"]:
        onnx.checker.check_model(str(out / subset["graph"]["file"]))
        assert {n.op_type for n in onnx.load(out / subset["graph"]["file"], load_external_data=False).graph.node} \
            <= supported
    _check_parity(out, load_dit(dit_s2_checkpoint, dit_config("DiT-S/2", input_size=32)), rtol=1e-5)
