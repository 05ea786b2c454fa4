"""The C++ runtime (cpp/): ``l2c-run`` against ``l2c-export run`` on the same noise, its refusals, threads, install.

Everything runs the real compiled binaries in subprocesses; the session fixture builds them with ``make cpp`` (a no-op
when ``make test`` has just done so).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from l2c_export.builder.build import BuildRequest, build
from l2c_export.models.zoo import embedded_default
from l2c_export.samplers import create_sampler
from l2c_export.samplers.guidance import make_noise, step_noise

from .conftest import REPO, run_cli

BUILD_DIR = REPO / "cpp" / "build"
L2C_RUN = BUILD_DIR / "l2c-run"
LABELS = [0, 3, 5, 9]


@pytest.fixture(scope="session")
def cpp_build() -> Path:
    """Builds the C++ runtime with ``make cpp`` (headers from Debian, library from the venv's onnxruntime wheel)."""
    result = subprocess.run(["make", "--no-print-directory", "cpp"], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"make cpp failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    assert L2C_RUN.is_file()
    return BUILD_DIR


@pytest.fixture(scope="module")
def ddpm_build(tmp_path_factory) -> Path:
    """The embedded default sampled with DDPM at 12 steps, half the sub-layers cached at every other step."""
    spec = embedded_default()
    schedule = spec.schedule().full(12, spec.config.depth)
    schedule.compute[1::2, 2:8] = False
    out = tmp_path_factory.mktemp("cpp-ddpm") / "engines"
    build(BuildRequest(spec=spec, schedule=schedule, sampler=spec.sampler("ddpm", 12), out_dir=out), progress=False)
    return out


@pytest.fixture(scope="module")
def dit_s2_build(tmp_path_factory) -> Path:
    """DiT-S/2 (12 blocks, hidden 384, 6 heads, learned sigma, 4 latent channels, 1000 classes) with random weights,
    at 64 px (8 x 8 latents) to stay quick, DDIM 6 steps with an official-mode schedule (4 subsets)."""
    import torch

    from l2c_export.models.dit.model import DiT, dit_config
    from l2c_export.models.zoo import official
    from l2c_export.samplers.gaussian import GaussianSampler
    from l2c_export.tools.bench_suite import synthetic_official_schedule

    folder = tmp_path_factory.mktemp("cpp-s2")
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.05 for k, v in DiT(dit_config("DiT-S/2", input_size=8)).state_dict().items()}
    checkpoint = folder / "DiT-S-2-64x64.pt"
    torch.save(state, checkpoint)
    spec = official(checkpoint, "DiT-S/2", 64)
    schedule = synthetic_official_schedule(6, spec.config.depth)
    out = folder / "engines"
    build(BuildRequest(spec=spec, schedule=schedule, sampler=GaussianSampler.create("ddim", 6), out_dir=out),
          progress=False)
    assert len(json.loads((out / "manifest.json").read_text())["subsets"]) > 1
    return out


def l2c_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(L2C_RUN), *map(str, args)], capture_output=True, text=True, timeout=300)


def _noise(folder: Path, n: int, seed: int, path: Path) -> np.ndarray:
    inputs = json.loads((folder / "manifest.json").read_text())["model"]["inputs"]
    sample = next(record for record in inputs if record["role"] == "sample")
    noise = make_noise(seed, (n, *sample["shape"][1:]))
    np.save(path, noise)
    return noise


def _compare(engines: Path, tmp_path: Path, labels: list[int], cfg_scale: float, full: bool, seed: int = 1) -> float:
    """Samples with l2c-run and with l2c-export run on the same noise; returns max |diff| / sample range."""
    noise_path = tmp_path / "z.npy"
    noise = _noise(engines, len(labels), seed, noise_path)
    common = ["--labels", ",".join(map(str, labels)), "--noise", noise_path, "--cfg-scale", str(cfg_scale)]
    common += ["--full"] if full else []
    kind = json.loads((engines / "manifest.json").read_text())["sampler"]
    cpp_args = []
    if kind["kind"] == "ddpm":
        # The Python runtime draws DDPM's step noise from numpy with its seed; l2c-run takes the same draws as a file.
        model_shape = ((2 if cfg_scale > 1 else 1) * len(labels), *noise.shape[1:])
        draws = np.stack([step_noise(seed, s, model_shape)[: len(labels)] for s in range(kind["num_steps"] - 1)])
        np.save(tmp_path / "step-noise.npy", draws)
        cpp_args = ["--step-noise", tmp_path / "step-noise.npy"]
    result = l2c_run(engines, *common, *cpp_args, "--out", tmp_path / "cpp.npy")
    assert result.returncode == 0, result.stderr
    run_cli("run", str(engines), *map(str, common), "--seed", str(seed), "--save-latents", str(tmp_path / "py.npy"))
    cpp, python = np.load(tmp_path / "cpp.npy"), np.load(tmp_path / "py.npy")
    assert cpp.shape == python.shape == noise.shape and cpp.dtype == np.float32
    assert np.isfinite(cpp).all()
    return float(np.abs(cpp - python).max() / (python.max() - python.min()))


@pytest.mark.parametrize("full", [False, True], ids=["schedule", "full"])
@pytest.mark.parametrize("cfg_scale", [4.0, 1.0], ids=["guided", "unguided"])
def test_l2c_run_equals_the_python_runtime_on_the_embedded_default(cpp_build, default_build, tmp_path, full,
                                                                    cfg_scale):
    assert _compare(default_build, tmp_path, LABELS, cfg_scale, full) <= 1e-5


@pytest.mark.parametrize("cfg_scale", [4.0, 1.0], ids=["guided", "unguided"])
def test_l2c_run_equals_the_python_runtime_with_ddpm_step_noise(cpp_build, ddpm_build, tmp_path, cfg_scale):
    assert _compare(ddpm_build, tmp_path, LABELS, cfg_scale, full=False, seed=4) <= 1e-5


def test_l2c_run_equals_the_python_runtime_with_dpm_solver(cpp_build, tmp_path):
    spec = embedded_default()
    out = tmp_path / "engines"
    build(BuildRequest(spec=spec, schedule=spec.schedule(), sampler=create_sampler("dpm_solver_2s", 20),
                       out_dir=out), progress=False)
    assert json.loads((out / "manifest.json").read_text())["sampler"]["kind"] == "dpm_solver_2s"
    assert _compare(out, tmp_path, LABELS, 4.0, full=False) <= 1e-5


@pytest.mark.parametrize("full", [False, True], ids=["schedule", "full"])
def test_l2c_run_equals_the_python_runtime_on_the_digits_uvit(cpp_build, tmp_path, full):
    """The second family (long skips, no gates, label and time tokens) with its own DPM-Solver-2S schedule."""
    spec = embedded_default("uvit-digits")
    out = tmp_path / "engines"
    build(BuildRequest(spec=spec, schedule=spec.schedule(), sampler=spec.sampler(), out_dir=out), progress=False)
    assert _compare(out, tmp_path, LABELS, spec.cfg_scale, full=full) <= 1e-5


@pytest.mark.parametrize("full,cfg_scale", [(False, 4.0), (True, 4.0), (False, 1.0), (True, 1.0)],
                         ids=["schedule-guided", "full-guided", "schedule-unguided", "full-unguided"])
def test_l2c_run_equals_the_python_runtime_on_dit_s2(cpp_build, dit_s2_build, tmp_path, full, cfg_scale):
    assert _compare(dit_s2_build, tmp_path, [207, 992], cfg_scale, full, seed=5) <= 1e-5


def test_the_schedule_differs_from_full_compute(cpp_build, default_build, tmp_path):
    """Guards the parity tests above: l2c-run really runs the schedule's subsets, not the full engine throughout."""
    noise_path = tmp_path / "z.npy"
    _noise(default_build, len(LABELS), 1, noise_path)
    for name, extra in (("schedule", []), ("full", ["--full"])):
        result = l2c_run(default_build, "--labels", "0,3,5,9", "--noise", noise_path, *extra, "--out",
                         tmp_path / f"{name}.npy")
        assert result.returncode == 0, result.stderr
    assert np.abs(np.load(tmp_path / "schedule.npy") - np.load(tmp_path / "full.npy")).max() > 1e-4


def test_l2c_run_writes_a_png_grid(cpp_build, default_build, tmp_path):
    from PIL import Image

    _noise(default_build, 3, 2, tmp_path / "z.npy")
    result = l2c_run(default_build, "--labels", "3,1,4", "--noise", tmp_path / "z.npy", "--out", tmp_path / "s.npy",
                     "--png", tmp_path / "grid.png")
    assert result.returncode == 0, result.stderr
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 + 8 * 8 + 2, 3 * (8 * 8 + 2) + 2)  # three 8x8 digits upscaled 8x, 2 px gaps
    samples = np.load(tmp_path / "s.npy")
    expected = np.clip((samples[1, 0] + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)  # label 1, nearest-upscaled
    assert np.array_equal(grid[2:66:8, 68:132:8], expected)


def test_concurrent_requests_from_threads_equal_serial_ones(cpp_build, dit_s2_build, tmp_path):
    _noise(dit_s2_build, 2, 3, tmp_path / "z.npy")
    result = subprocess.run([str(cpp_build / "l2c-embed-example"), str(dit_s2_build), str(tmp_path / "z.npy"),
                             "207,992", "6"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 concurrent requests == serial" in result.stdout


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming what is wrong, a non-zero exit, nothing written.

def _refused(tmp_path: Path, engines: Path, *args: str, labels: str = "0,3") -> str:
    if not (tmp_path / "z.npy").exists():
        _noise(engines, 2, 0, tmp_path / "z.npy")
    out = tmp_path / "out.npy"
    result = l2c_run(engines, "--labels", labels, "--noise", tmp_path / "z.npy", "--out", out, *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("l2c-run: error: "), result.stderr
    assert not out.exists() and not list(tmp_path.glob("out.npy*")), "a refused run left output behind"
    return lines[0]


def test_a_tampered_engine_is_refused(cpp_build, default_build, tmp_path):
    engines = shutil.copytree(default_build, tmp_path / "engines")
    graph = sorted(engines.glob("*.onnx"))[-1]
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0xFF
    graph.write_bytes(bytes(data))
    line = _refused(tmp_path, engines)
    assert graph.name in line and "does not match the manifest" in line


def test_tampered_weights_are_refused(cpp_build, default_build, tmp_path):
    engines = shutil.copytree(default_build, tmp_path / "engines")
    weights = engines / json.loads((engines / "manifest.json").read_text())["weights"]["file"]
    with open(weights, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    assert weights.name in _refused(tmp_path, engines)


def test_a_missing_engine_is_named(cpp_build, default_build, tmp_path):
    engines = shutil.copytree(default_build, tmp_path / "engines")
    graph = sorted(engines.glob("*.onnx"))[0]
    graph.unlink()
    line = _refused(tmp_path, engines)
    assert graph.name in line and "missing" in line


def test_a_newer_manifest_is_refused(cpp_build, default_build, tmp_path):
    engines = shutil.copytree(default_build, tmp_path / "engines")
    data = json.loads((engines / "manifest.json").read_text())
    data["schema_version"] = 99
    data["sampler"] = {"kind": "something-new"}  # a newer manifest may change anything: the version is read first
    (engines / "manifest.json").write_text(json.dumps(data))
    line = _refused(tmp_path, engines)
    assert "manifest.json" in line and "'schema_version' is 99, newer than this l2c runtime reads (2)" in line


def test_a_bad_manifest_field_is_named(cpp_build, default_build, tmp_path):
    engines = shutil.copytree(default_build, tmp_path / "engines")
    data = json.loads((engines / "manifest.json").read_text())
    data["sampler"]["alphas_cumprod"][3] = "NaN"
    (engines / "manifest.json").write_text(json.dumps(data))
    line = _refused(tmp_path, engines)
    assert "manifest.json: field 'sampler/alphas_cumprod/3' expected a number" in line


@pytest.mark.parametrize("labels,expected", [
    ("0,10", "labels (10,) are out of range; expected class indices in 0..9"),
    ("0,-1", "labels (-1,) are out of range"),
    ("0,three", "--labels: 'three' is not an integer"),
])
def test_bad_labels_are_refused(cpp_build, default_build, tmp_path, labels, expected):
    assert expected in _refused(tmp_path, default_build, labels=labels)


def test_noise_of_the_wrong_shape_is_refused(cpp_build, default_build, tmp_path):
    np.save(tmp_path / "z.npy", make_noise(0, (3, 1, 8, 8)))
    assert "noise has shape (3, 1, 8, 8); expected (2, 1, 8, 8)" in _refused(tmp_path, default_build)


def test_noise_of_the_wrong_dtype_is_refused(cpp_build, default_build, tmp_path):
    np.save(tmp_path / "z.npy", make_noise(0, (2, 1, 8, 8)).astype(np.float64))
    assert "z.npy: dtype <f8; expected float32" in _refused(tmp_path, default_build)


def test_ddpm_without_step_noise_is_refused(cpp_build, ddpm_build, tmp_path):
    assert "pass step noise of shape (11, 2, 1, 8, 8)" in _refused(tmp_path, ddpm_build)


def test_a_model_batch_beyond_the_engines_is_refused(cpp_build, default_build, tmp_path):
    _noise(default_build, 9, 0, tmp_path / "z.npy")
    line = _refused(tmp_path, default_build, labels="0,1,2,3,4,5,6,7,8")
    assert "model batch of 18 (guidance doubles it); the engines take 1..16" in line


# ---------------------------------------------------------------------------------------------------------------------
# TensorRT (ONNX Runtime's TensorRT execution provider) and the installed CMake package.

def _tensorrt_refusal(default_build: Path, tmp_path: Path) -> str | None:
    _noise(default_build, 2, 0, tmp_path / "z.npy")
    result = l2c_run(default_build, "--labels", "0,3", "--noise", tmp_path / "z.npy", "--provider", "tensorrt",
                     "--out", tmp_path / "trt.npy")
    return None if result.returncode == 0 else result.stderr.strip()


def test_the_tensorrt_provider_is_guarded_with_a_clear_message(cpp_build, default_build, tmp_path):
    refusal = _tensorrt_refusal(default_build, tmp_path)
    if refusal is None:
        pytest.skip("TensorRT is usable here: the guard has nothing to refuse (the parity test below runs instead)")
    assert len(refusal.splitlines()) == 1
    assert "TensorRT is not usable by ONNX Runtime" in refusal and "run with the CPU provider" in refusal
    assert not (tmp_path / "trt.npy").exists()


def test_the_tensorrt_provider_matches_the_cpu(cpp_build, default_build, tmp_path):
    refusal = _tensorrt_refusal(default_build, tmp_path)
    if refusal is not None:
        pytest.skip(f"TensorRT is not available to ONNX Runtime on this machine (no NVIDIA GPU / TensorRT "
                    f"libraries): {refusal}")
    result = l2c_run(default_build, "--labels", "0,3", "--noise", tmp_path / "z.npy", "--out", tmp_path / "cpu.npy")
    assert result.returncode == 0, result.stderr
    cpu, trt = np.load(tmp_path / "cpu.npy"), np.load(tmp_path / "trt.npy")
    assert np.abs(cpu - trt).max() / (cpu.max() - cpu.min()) <= 1e-3  # TF32/fp32 kernels on the GPU


def test_the_installed_package_is_found_by_find_package(cpp_build, default_build, tmp_path):
    """cmake --install, then the embedding example built as a separate project with find_package(l2c)."""
    prefix = tmp_path / "prefix"
    subprocess.run(["cmake", "--install", str(cpp_build), "--prefix", str(prefix)], check=True, capture_output=True)
    assert (prefix / "lib" / "cmake" / "l2c" / "l2cConfig.cmake").is_file()
    consumer = tmp_path / "consumer"
    configure = subprocess.run(["cmake", "-S", str(REPO / "cpp" / "examples"), "-B", str(consumer),
                                f"-DCMAKE_PREFIX_PATH={prefix}"], capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compile_ = subprocess.run(["cmake", "--build", str(consumer)], capture_output=True, text=True)
    assert compile_.returncode == 0, compile_.stdout + compile_.stderr
    _noise(default_build, 2, 0, tmp_path / "z.npy")
    result = subprocess.run([str(consumer / "embed"), str(default_build), str(tmp_path / "z.npy"), "0,3", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 concurrent requests == serial (dit-digits, (2, 1, 8, 8))" in result.stdout


def test_the_benchmark_measures_the_cpp_runtime_memory(cpp_build, dit_s2_build, tmp_path):
    """`make bench` records the C++ runtime's resident memory with all subsets loaded and with the full one alone
    (in a subprocess: ONNX Runtime's global thread pool would outlive the benchmark in this process)."""
    run_cli("bench", str(dit_s2_build), "--backend", "onnxruntime", "--repeats", "1", "--batch", "1", "--json",
            str(tmp_path / "b.json"), "--png", str(tmp_path / "b.png"))
    [row] = json.loads((tmp_path / "b.json").read_text())["results"]
    assert row["cpp_memory_full_engine_bytes"] > 0.5 * row["model_weights_bytes"]  # it loaded and ran the engine
    assert row["cpp_memory_all_engines_bytes"] > 0


def _rewrite_manifest(engines: Path, change) -> None:
    path = engines / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_symbolic_link_in_the_build_is_refused(cpp_build, default_build, tmp_path):
    engines = shutil.copytree(default_build, tmp_path / "engines")
    graph = sorted(engines.glob("*.onnx"))[0]
    (tmp_path / "elsewhere.onnx").write_bytes(graph.read_bytes())
    graph.unlink()
    graph.symlink_to(tmp_path / "elsewhere.onnx")
    line = _refused(tmp_path, engines)
    assert graph.name in line and "symbolic link" in line


def test_a_path_leading_out_of_the_build_is_refused(cpp_build, default_build, tmp_path):
    engines = shutil.copytree(default_build, tmp_path / "engines")
    _rewrite_manifest(engines, lambda d: d["subsets"][0]["graph"].update(file="../elsewhere.onnx"))
    assert "field 'subsets/0/graph/file' is '../elsewhere.onnx'; expected a plain relative path" in \
        _refused(tmp_path, engines)


def test_a_schedule_that_reads_before_writing_is_refused(cpp_build, default_build, tmp_path):
    engines = shutil.copytree(default_build, tmp_path / "engines")
    data = json.loads((engines / "manifest.json").read_text())
    partial = next(s["index"] for s in data["subsets"] if not all(s["compute"]))
    _rewrite_manifest(engines, lambda d: d["schedule"]["step_subset"].__setitem__(0, partial))
    assert f"field 'schedule/step_subset/0' names subset {partial}, which reuses sub-layers" in \
        _refused(tmp_path, engines)


def test_a_graph_whose_interface_differs_from_its_record_is_refused(cpp_build, default_build, tmp_path):
    """A subset's graph swapped for another subset's (sha256 updated to match): the session's inputs give it away."""
    engines = shutil.copytree(default_build, tmp_path / "engines")
    data = json.loads((engines / "manifest.json").read_text())
    full, other = data["subsets"][data["schedule"]["step_subset"][0]], data["subsets"][-1]
    assert full["index"] != other["index"]
    shutil.copy(engines / other["engine"]["file"], engines / full["engine"]["file"])

    def swap(d):
        for key in ("graph", "engine"):
            d["subsets"][full["index"]][key].update(sha256=other["engine"]["sha256"], bytes=other["engine"]["bytes"])
    _rewrite_manifest(engines, swap)
    line = _refused(tmp_path, engines)
    assert full["engine"]["file"] in line and f"are not the manifest's (field 'subsets/{full['index']}/inputs'" in line


def test_a_guidance_scale_below_one_is_refused(cpp_build, default_build, tmp_path):
    assert "cfg_scale is 0.500000; expected a finite number at least 1" in \
        _refused(tmp_path, default_build, "--cfg-scale", "0.5")
