"""The C++ runtime (cpp/): ``l2c-run`` against ``l2c-export run`` on the same noise, its refusals, threads, install.

Everything runs the real compiled binaries in subprocesses; the session fixture builds them with ``make cpp`` (a no-op
when ``make test`` has just done so). With ``L2C_CPP_SANITIZE=1`` (``make cpp-asan-test``) every test runs against
the AddressSanitizer + UndefinedBehaviorSanitizer build of ``make cpp-asan`` (cpp/build/asan) instead, and every
binary's stderr must hold no sanitizer report.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from l2c_export.builder.build import BuildRequest, build
from l2c_export.models.zoo import embedded_default
from l2c_export.samplers import create_sampler
from l2c_export.samplers.guidance import make_noise, step_noise

from .conftest import REPO, restamp_graphs, run_cli

SANITIZE = os.environ.get("L2C_CPP_SANITIZE", "0") not in ("", "0")
BUILD_DIR = REPO / "cpp" / "build" / ("asan" if SANITIZE else "")
MAKE_TARGET = "cpp-asan" if SANITIZE else "cpp"
L2C_RUN = BUILD_DIR / "l2c-run"
LABELS = [0, 3, 5, 9]
# Leak detection stays on and nothing is suppressed: ONNX Runtime (dlopen'ed, not instrumented, but its allocations go
# through ASan's malloc) leaves no leak in these runs. Any report ends the process non-zero.
SANITIZER_ENV = {
    "ASAN_OPTIONS": "detect_leaks=1:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
} if SANITIZE else {}
SANITIZER_REPORTS = ("AddressSanitizer", "LeakSanitizer", "UndefinedBehaviorSanitizer", "runtime error:")


@pytest.fixture(scope="session")
def cpp_build(tmp_path_factory) -> Path:
    """Builds the C++ runtime with ``make cpp`` (headers from Debian, library from the venv's onnxruntime wheel), or
    its sanitizer build with ``make cpp-asan`` under L2C_CPP_SANITIZE=1; one pytest-xdist worker at a time (a lock
    in the run's shared temporary folder), the others then find it built."""
    import fcntl

    with open(tmp_path_factory.getbasetemp().parent / "cpp-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run(["make", "--no-print-directory", MAKE_TARGET], cwd=REPO, capture_output=True,
                                text=True)
    if result.returncode != 0:
        raise AssertionError(f"make {MAKE_TARGET} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    assert L2C_RUN.is_file()
    return BUILD_DIR


def run_binary(program: Path, *args, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs a compiled program of the C++ runtime (with the sanitizers' settings under L2C_CPP_SANITIZE=1; in ``env``
    where given, else this process's environment) and checks that its stderr holds no sanitizer report."""
    result = subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                            env={**(os.environ if env is None else env), **SANITIZER_ENV})
    reports = [line for line in result.stderr.splitlines() if any(mark in line for mark in SANITIZER_REPORTS)]
    assert not reports, f"{program.name}: sanitizer report:\n{result.stderr[-6000:]}"
    return result


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
    return run_binary(L2C_RUN, *args)


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


def test_onnx_runtime_telemetry_is_off_in_l2c_run_unless_asked_for(cpp_build, default_build, tmp_path):
    """l2c-run leaves no ONNX Runtime telemetry database in the home folder (the runtime sets ORT_DISABLE_TELEMETRY=1
    before it loads ONNX Runtime, as the Triton server's environment does); an explicit ORT_DISABLE_TELEMETRY=0 is
    kept (ONNX Runtime then makes its database, which shows this test can see it)."""
    from .conftest import telemetry_home

    noise = tmp_path / "z.npy"
    _noise(default_build, 2, 0, noise)
    for setting, made in ((None, False), ("0", True)):
        env, database = telemetry_home(tmp_path / f"home-{setting}", setting)
        result = run_binary(L2C_RUN, default_build, "--labels", "1,2", "--noise", noise, "--out", tmp_path / "o.npy",
                            env=env)
        assert result.returncode == 0, result.stderr
        assert database.is_file() is made, setting


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
def test_l2c_run_equals_the_python_runtime_on_the_digits_uvit(cpp_build, uvit_digits_build, tmp_path, full):
    """The second family (long skips, no gates, label and time tokens) with its own DPM-Solver-2S schedule."""
    cfg_scale = embedded_default("uvit-digits").cfg_scale
    assert _compare(uvit_digits_build, tmp_path, LABELS, cfg_scale, full=full) <= 1e-5


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


def test_l2c_run_writes_the_png_grid_python_writes(cpp_build, default_build, tmp_path):
    """--png of a pixel model: the grid l2c-export run --out writes of the same samples (save_grid: enlarged 8x by
    Pillow's bicubic resize, 2 px gaps), pixel for pixel."""
    from PIL import Image

    from l2c_export.core.images import save_grid

    _noise(default_build, 3, 2, tmp_path / "z.npy")
    result = l2c_run(default_build, "--labels", "3,1,4", "--noise", tmp_path / "z.npy", "--out", tmp_path / "s.npy",
                     "--png", tmp_path / "grid.png")
    assert result.returncode == 0, result.stderr
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 + 8 * 8 + 2, 3 * (8 * 8 + 2) + 2)  # three 8x8 digits upscaled 8x, 2 px gaps
    save_grid(np.load(tmp_path / "s.npy"), tmp_path / "python.png", columns=3)
    assert np.array_equal(grid, np.asarray(Image.open(tmp_path / "python.png")))


def test_concurrent_requests_from_threads_equal_serial_ones(cpp_build, dit_s2_build, tmp_path):
    _noise(dit_s2_build, 2, 3, tmp_path / "z.npy")
    result = run_binary(cpp_build / "l2c-embed-example", dit_s2_build, tmp_path / "z.npy", "207,992", "6")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 concurrent requests == serial" in result.stdout


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one line naming what is wrong, a non-zero exit, nothing written.

def _refused(tmp_path: Path, engines: Path, *args: str, labels: str = "0,3", status: int = 2) -> str:
    """Runs l2c-run on ``engines``; it must exit with ``status`` (2: the library threw an l2c::Error, bad input)
    and one line on stderr, leaving nothing written. Returns that line."""
    if not (tmp_path / "z.npy").exists():
        _noise(engines, 2, 0, tmp_path / "z.npy")
    out = tmp_path / "out.npy"
    result = l2c_run(engines, "--labels", labels, "--noise", tmp_path / "z.npy", "--out", out, *args)
    assert result.returncode == status, result.stdout + result.stderr
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
    assert "manifest.json" in line and "'schema_version' is 99, newer than this l2c runtime reads (3)" in line


def test_an_older_manifest_is_refused_naming_the_rebuild(cpp_build, default_build, tmp_path):
    """A version 2 manifest (conditioning inputs by a closed list of roles) is refused by its version, not misread:
    l2c-export upgrades it when it reads it, and a rebuild writes version 3."""
    engines = shutil.copytree(default_build, tmp_path / "engines")
    data = json.loads((engines / "manifest.json").read_text())
    data["schema_version"] = 2
    (engines / "manifest.json").write_text(json.dumps(data))
    line = _refused(tmp_path, engines)
    assert "'schema_version' is 2, older than this l2c runtime reads (3" in line and "rebuild the engines" in line


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

def _tensorrt_refusal(default_build: Path, tmp_path: Path) -> tuple[int, str] | None:
    _noise(default_build, 2, 0, tmp_path / "z.npy")
    result = l2c_run(default_build, "--labels", "0,3", "--noise", tmp_path / "z.npy", "--provider", "tensorrt",
                     "--out", tmp_path / "trt.npy")
    return None if result.returncode == 0 else (result.returncode, result.stderr.strip())


def test_the_tensorrt_provider_is_guarded_with_a_clear_message(cpp_build, default_build, tmp_path):
    refusal = _tensorrt_refusal(default_build, tmp_path)
    if refusal is None:
        pytest.skip("TensorRT is usable here: the guard has nothing to refuse (the parity test below runs instead)")
    status, refusal = refusal
    assert status == 3 and len(refusal.splitlines()) == 1  # 3: the provider asked for is not usable here
    assert "TensorRT is not usable by ONNX Runtime" in refusal and "run with the CPU provider" in refusal
    assert not (tmp_path / "trt.npy").exists()


def test_the_tensorrt_provider_matches_the_cpu(cpp_build, default_build, tmp_path):
    refusal = _tensorrt_refusal(default_build, tmp_path)
    if refusal is not None:
        pytest.skip(f"TensorRT is not available to ONNX Runtime on this machine (no NVIDIA GPU / TensorRT "
                    f"libraries): {refusal[1]}")
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
    result = run_binary(consumer / "embed", default_build, tmp_path / "z.npy", "0,3", "2", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 concurrent requests == serial (dit-digits, (2, 1, 8, 8))" in result.stdout


@pytest.mark.skipif(SANITIZE, reason="measures the memory of the release build (cpp/build/l2c-memory-probe); a "
                                      "sanitizer build's memory is not the product's")
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


# ---------------------------------------------------------------------------------------------------------------------
# Tried as a hostile client would: each refused with one line, exit 2 (the library threw a typed l2c::Error), nothing
# written, and no sanitizer report under L2C_CPP_SANITIZE=1.

def _weights(engines: Path) -> Path:
    return engines / json.loads((engines / "manifest.json").read_text())["weights"]["file"]


def _truncate(path: Path, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def test_a_truncated_weights_file_is_refused(cpp_build, default_build, tmp_path):
    engines = shutil.copytree(default_build, tmp_path / "engines")
    weights = _weights(engines)
    size = weights.stat().st_size
    _truncate(weights, size // 2)
    line = _refused(tmp_path, engines)
    assert f"{weights}: sha256 cannot match: {size // 2} bytes where the manifest says {size}" in line


def test_a_truncated_weights_file_with_its_hash_fixed_up_is_refused(cpp_build, default_build, tmp_path):
    """The manifest's size and sha256 of weights.bin rewritten to the truncated file's: its weight table still says
    where each tensor lies, and a tensor past the end is refused before anything is mapped."""
    import hashlib

    engines = shutil.copytree(default_build, tmp_path / "engines")
    weights = _weights(engines)
    _truncate(weights, weights.stat().st_size // 2)
    data = weights.read_bytes()
    _rewrite_manifest(engines, lambda d: d["weights"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    tensors = json.loads((engines / "manifest.json").read_text())["weight_tensors"]
    first_past = next(i for i, t in enumerate(tensors) if t["offset"] + t["length"] > len(data))
    assert (f"field 'weight_tensors/{first_past}/offset' reaches past the end of {weights.name} ({len(data)} bytes)"
            in _refused(tmp_path, engines))


def _swap_graph(engines: Path, into: int, taken_from: int) -> dict:
    """Copies subset ``taken_from``'s graph over subset ``into``'s and fixes up the manifest's size and sha256 of
    ``into``'s graph and engine to match; returns ``into``'s record."""
    data = json.loads((engines / "manifest.json").read_text())
    target, source = data["subsets"][into], data["subsets"][taken_from]
    shutil.copy(engines / source["engine"]["file"], engines / target["engine"]["file"])

    def swap(d):
        for key in ("graph", "engine"):
            d["subsets"][into][key].update(sha256=source["engine"]["sha256"], bytes=source["engine"]["bytes"])
    _rewrite_manifest(engines, swap)
    return target


@pytest.mark.parametrize("into,taken_from", [(1, 2), (4, 3), (2, 0)], ids=["partial-for-partial", "fewer-reads",
                                                                        "full-for-partial"])
def test_a_graph_swapped_for_another_subsets_is_refused(cpp_build, default_build, tmp_path, into, taken_from):
    """Any two subsets differ in the sub-layers they reuse, so in their cache inputs: the session's interface,
    compared with the record of the subset it was loaded for, gives the swap away, naming that subset."""
    engines = shutil.copytree(default_build, tmp_path / "engines")
    record = _swap_graph(engines, into, taken_from)
    line = _refused(tmp_path, engines)
    assert record["engine"]["file"] in line
    assert f"(field 'subsets/{into}/inputs' of subset {record['name']}:" in line


def _set_everywhere(data: dict, name_matches, shape: list) -> None:
    """Gives every record of a tensor (cache slots, subset inputs and outputs) that ``name_matches`` ``shape``: a
    manifest consistent in itself that its graphs contradict."""
    for slot in data["cache_slots"]:
        if name_matches(slot["name"]):
            slot["shape"] = shape
    for subset in data["subsets"]:
        for tensor in (*subset["inputs"], *subset["outputs"]):
            if name_matches(tensor.get("slot", "")) or name_matches(tensor["name"]):
                tensor["shape"] = shape


@pytest.mark.parametrize("change,expected", [
    (lambda d: (_set_everywhere(d, lambda n: n == "x", ["batch", 1, 4, 4]),
                _set_everywhere(d, lambda n: n == "model_out", ["batch", 2, 4, 4])),
     "field 'subsets/0/inputs/0/shape' (x of subset full) is (batch, 1, 4, 4); the graph full.onnx has (?, 1, 8, 8)"),
    (lambda d: _set_everywhere(d, lambda n: n == "attn_0", ["batch", 16, 64]),
     "field 'subsets/0/outputs/1/shape' (fresh_attn_0 of subset full) is (batch, 16, 64); the graph full.onnx has "
     "(?, 16, 128)"),
], ids=["sample", "cache-slot"])
def test_a_manifest_whose_shapes_its_graphs_contradict_is_refused(cpp_build, default_build, tmp_path, change,
                                                                   expected):
    engines = shutil.copytree(default_build, tmp_path / "engines")
    _rewrite_manifest(engines, change)
    assert expected in _refused(tmp_path, engines)


HUGE = 2 ** 40


@pytest.mark.parametrize("change,expected", [
    (lambda d: d["cache_slots"][0]["shape"].__setitem__(1, -16),
     "field 'cache_slots/0/shape/1' is -16; expected 1..2147483647"),
    (lambda d: d["subsets"][0]["inputs"][0]["shape"].__setitem__(2, 0),
     "field 'subsets/0/inputs/0/shape/2' is 0; expected 1..2147483647"),
    (lambda d: d["weight_tensors"][0]["shape"].__setitem__(0, -1),
     "field 'weight_tensors/0/shape/0' is -1; expected 0..2147483647"),
    (lambda d: d["cache_slots"][0]["shape"].__setitem__(1, HUGE),
     f"field 'cache_slots/0/shape/1' is {HUGE}; expected 1..2147483647"),
    (lambda d: d["cache_slots"][0].update(shape=["batch", 2 ** 31 - 1, 2 ** 31 - 1]),
     "field 'cache_slots/0/shape' has more than 2147483648 elements per sample"),
    (lambda d: d["weight_tensors"][0].update(shape=[2 ** 31 - 1] * 3, length=8),
     "field 'weight_tensors/0/shape' has more than 2147483648 elements"),
    (lambda d: d["batch"].update(max=2 ** 40),
     f"field 'batch/max' is {2 ** 40}; expected 1..1048576"),
    (lambda d: d["weight_tensors"][0].update(offset=d["weight_tensors"][0]["offset"] + 2),
     "field 'weight_tensors/0/offset' is"),
], ids=["negative-slot-dim", "zero-sample-dim", "negative-weight-dim", "huge-dim", "huge-slot", "huge-weight",
        "huge-batch", "misaligned-weight"])
def test_a_manifest_with_a_negative_or_huge_shape_is_refused(cpp_build, default_build, tmp_path, change, expected):
    """Shapes are positive and bounded (each size below 2^31, at most 2^31 elements per sample or weight) before the
    runtime allocates anything from them."""
    engines = shutil.copytree(default_build, tmp_path / "engines")
    _rewrite_manifest(engines, change)
    line = _refused(tmp_path, engines)
    assert "manifest.json: " + expected in line


def test_records_that_disagree_with_one_another_are_refused(cpp_build, default_build, tmp_path):
    """A sample input of another shape in one subset than in the full one: the runtime feeds every subset the
    same samples, so the manifest is refused at load, naming the subset's field."""
    engines = shutil.copytree(default_build, tmp_path / "engines")
    _rewrite_manifest(engines, lambda d: d["subsets"][3]["inputs"][0].update(shape=["batch", 1, 4, 4]))
    assert ("field 'subsets/3/inputs/0' (x float32 (batch, 1, 4, 4)) differs from the full subset's x float32 "
            "(batch, 1, 8, 8)") in _refused(tmp_path, engines)


def _npy_bytes(header: str, data: bytes = b"", version: int = 1) -> bytes:
    header = header.ljust(118) + "\n"
    length = len(header).to_bytes(2 if version == 1 else 4, "little")
    return b"\x93NUMPY" + bytes([version, 0]) + length + header.encode() + data


_GOOD_HEADER = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 1, 8, 8), }"


@pytest.mark.parametrize("write,expected", [
    (lambda p: np.save(p, make_noise(0, (2, 1, 8, 8)).astype(np.float64)), "z.npy: dtype <f8; expected float32"),
    (lambda p: np.save(p, make_noise(0, (2, 1, 8, 8)).astype(">f4")), "z.npy: dtype >f4; expected float32"),
    (lambda p: np.save(p, np.zeros((2, 1, 8, 8), np.int64)), "z.npy: dtype <i8; expected float32"),
    (lambda p: np.save(p, np.asfortranarray(make_noise(0, (2, 1, 8, 8)))), "z.npy: Fortran order"),
    (lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True), "z.npy: dtype |O; expected"),
    (lambda p: np.save(p, make_noise(0, (3, 1, 8, 8))), "noise has shape (3, 1, 8, 8); expected (2, 1, 8, 8)"),
    (lambda p: np.save(p, make_noise(0, (2, 1, 8)).reshape(2, 1, 8)), "noise has shape (2, 1, 8); expected"),
    (lambda p: p.write_bytes(_npy_bytes(_GOOD_HEADER, b"\0" * (2 * 64 * 4 - 4))),
     "z.npy: holds 508 bytes of data; its shape (2, 1, 8, 8) says 128 float32 values"),
    (lambda p: p.write_bytes(_npy_bytes(_GOOD_HEADER, b"\0" * (2 * 64 * 4 + 4))),
     "z.npy: holds 516 bytes of data; its shape (2, 1, 8, 8) says 128 float32 values"),
    (lambda p: p.write_bytes(_npy_bytes(_GOOD_HEADER.replace("(2, 1, 8, 8)", "(4294967296, 4294967296, 16)"))),
     "z.npy: shape (4294967296, 4294967296, 16) has more elements than this machine can address"),
    (lambda p: p.write_bytes(_npy_bytes(_GOOD_HEADER.replace("(2, 1, 8, 8)", "(2, -1, 8, 8)"))),
     "z.npy: header has no shape of non-negative integers"),
    (lambda p: p.write_bytes(_npy_bytes(_GOOD_HEADER, version=2)[:12] + b"x" * 64),
     "z.npy: truncated header"),
    (lambda p: p.write_bytes(b"\x93NUMPY\x02\x00" + (2 ** 31).to_bytes(4, "little")),
     "z.npy: header of 2147483648 bytes; expected at most 10000"),
    (lambda p: p.write_bytes(b"P6 8 8 255\n" + b"\0" * 64), "z.npy: not a .npy file"),
], ids=["float64", "big-endian", "int64", "fortran", "pickle", "shape", "rank", "short-data", "long-data",
        "overflowing-shape", "negative-shape", "truncated-header", "huge-header", "not-npy"])
def test_bad_noise_files_are_refused(cpp_build, default_build, tmp_path, write, expected):
    write(tmp_path / "z.npy")
    assert expected in _refused(tmp_path, default_build)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_noise_that_is_not_finite_is_refused(cpp_build, default_build, tmp_path, value):
    noise = make_noise(0, (2, 1, 8, 8))
    noise[1, 0, 3, 5] = value
    np.save(tmp_path / "z.npy", noise)
    assert "noise holds a value that is not finite" in _refused(tmp_path, default_build)


def test_step_noise_that_is_not_finite_is_refused(cpp_build, ddpm_build, tmp_path):
    draws = make_noise(1, (11, 2, 1, 8, 8))
    draws[4, 1, 0, 0, 0] = np.nan
    np.save(tmp_path / "s.npy", draws)
    assert "step noise holds a value that is not finite" in \
        _refused(tmp_path, ddpm_build, "--step-noise", tmp_path / "s.npy")


@pytest.mark.parametrize("labels,expected", [
    ("0,99999999999999999999", "--labels: '99999999999999999999' is not an integer"),
    ("0,9223372036854775807", "labels (9223372036854775807,) are out of range; expected class indices in 0..9"),
    ("0,10", "labels (10,) are out of range; expected class indices in 0..9"),
], ids=["past-int64", "int64-max", "the-null-class"])
def test_labels_past_the_class_count_are_refused(cpp_build, default_build, tmp_path, labels, expected):
    assert expected in _refused(tmp_path, default_build, labels=labels)


def test_labels_past_the_graphs_label_table_are_refused(cpp_build, default_build, tmp_path):
    """A manifest whose class count was raised past the graph's label table (10 -> 1000), every graph re-stamped for
    it and the hashes fixed up: the label the manifest allows fails in the graph's Gather, and that reaches the caller
    as an l2c::Error naming the graph, not a crash."""
    engines = shutil.copytree(default_build, tmp_path / "engines")

    def raise_and_restamp(data):
        data["guidance"]["null_class"] = 1000
        restamp_graphs(engines, data)

    _rewrite_manifest(engines, raise_and_restamp)
    line = _refused(tmp_path, engines, labels="0,500")
    assert "full.onnx: ONNX Runtime failed to run subset full" in line and "idx=500" in line


@pytest.mark.parametrize("args,expected", [
    (["--threads", "-1"], "--threads: Value -1 not in range 0 to 1024"),
    (["--threads", "100000"], "--threads: Value 100000 not in range 0 to 1024"),
    (["--cfg-scale", "nan"], "cfg_scale is nan; expected a finite number at least 1"),
    (["--cfg-scale", "1e400"], "cfg_scale is inf; expected a finite number at least 1"),
    (["--provider", "cuda"], "--provider: cuda not in {cpu,tensorrt}"),
], ids=["negative-threads", "huge-threads", "nan-guidance", "overflowing-guidance", "provider"])
def test_bad_flags_are_one_line_and_exit_2(cpp_build, default_build, tmp_path, args, expected):
    assert expected in _refused(tmp_path, default_build, *args)


def test_an_output_the_file_system_refuses_exits_4(cpp_build, default_build, tmp_path):
    _noise(default_build, 2, 0, tmp_path / "z.npy")
    out = tmp_path / "no-such-folder" / "s.npy"
    result = l2c_run(default_build, "--labels", "0,3", "--noise", tmp_path / "z.npy", "--out", out)
    assert result.returncode == 4, result.stderr
    assert result.stderr.strip() == f"l2c-run: error: {out}: cannot be written (does its folder exist?)"
    assert not (tmp_path / "no-such-folder").exists()


def test_sixteen_threads_on_one_pipeline_then_destroyed_by_another(cpp_build, default_build, tmp_path):
    """cpp/tests/concurrency.cpp: 16 threads sample from one l2c::Pipeline (schedule, full, unguided, and a refused
    request), a 17th destroys it after they finish; each sample equals the serial one, each bad request is an
    l2c::Error, and a new Pipeline samples the same. Under L2C_CPP_SANITIZE=1, with ASan and UBSan watching."""
    _noise(default_build, 4, 7, tmp_path / "z.npy")
    result = run_binary(cpp_build / "l2c-concurrency-test", default_build, tmp_path / "z.npy", "0,3,5,9")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("16 threads on one Pipeline: 12 samples == serial, 4 bad requests refused with l2c::Error; destroyed on "
            "another thread; a new Pipeline samples the same") in result.stdout


@pytest.mark.skipif(not SANITIZE, reason="checks the sanitizer build; set L2C_CPP_SANITIZE=1 (make cpp-asan-test)")
def test_the_sanitizer_build_is_instrumented(cpp_build):
    """Guards the L2C_CPP_SANITIZE=1 run: the binaries it tests really carry ASan and UBSan."""
    for program in ("l2c-run", "l2c-concurrency-test", "libl2c_runtime.so"):
        needed = subprocess.run(["readelf", "-d", str(cpp_build / program)], capture_output=True, text=True,
                                check=True).stdout
        assert "[libasan.so" in needed and "[libubsan.so" in needed, program


@pytest.mark.parametrize("change,expected", [
    (lambda d: d["model"]["config"].update(num_classes=1000),
     "field 'model/config/num_classes' is 1000; the graph was built for 10 (graph full.onnx)"),
    (lambda d: d["model"]["config"].update(learn_sigma=False),
     "field 'model/config/learn_sigma' is false; the graph was built for true (graph full.onnx)"),
    (lambda d: d["guidance"].update(null_class=5),
     "field 'guidance/null_class' is 5; the graph was built for 10 (graph full.onnx)"),
    (lambda d: d["guidance"].update(null_class=1000),
     "field 'guidance/null_class' is 1000; the graph was built for 10 (graph full.onnx)"),
], ids=["num-classes", "flag", "null-class-down", "null-class-up"])
def test_a_field_the_graphs_fix_edited_after_the_build_is_refused(cpp_build, default_build, tmp_path, change,
                                                                  expected):
    """Each graph carries the manifest fields its build fixed (model/config, guidance/null_class): an edit is refused
    even where l2c-run never reads the field itself, and a lowered null class, which indexes the label table without
    an error, too."""
    engines = shutil.copytree(default_build, tmp_path / "engines")
    _rewrite_manifest(engines, change)
    assert expected in _refused(tmp_path, engines)


# ---------------------------------------------------------------------------------------------------------------------
# diffusers folders (issue 19): their schedulers (DDIM, DPM-Solver++ 2M) and conditioning (labels; PixArt's prompt
# embeddings by role, from --conditioning cond.npz).

DIFFUSERS_STEPS = 8
MMDIT_IMAGE_SIZE = 8  # FLUX.1 has no sample_size: 8 px, the tiny VAE's scale factor 1, 8 x 8 latents, 16 packed tokens
# --image-size of the families without a sample_size (Qwen-Image's tiny VAE has a scale factor of 2: 16 packed tokens)
IMAGE_SIZES = {"flux": MMDIT_IMAGE_SIZE, "flux-text": MMDIT_IMAGE_SIZE, "qwen": 16, "qwen-text": 16, "wan": (16, 32)}
NUM_FRAMES = {"wan": 5}  # the video families' clips: Wan's 5 frames, 2 latent frames


@pytest.fixture(scope="module")
def diffusers_cpp_builds(tiny_diffusers, tmp_path_factory):
    """(family, scheduler) -> a build of the tiny diffusers folder at 8 steps over a general schedule of its named
    sub-layers that reuses some at every other call (tests/diffusers_pipelines.py's folders)."""
    from l2c_export.core.schedule import Schedule
    from l2c_export.models.zoo import from_diffusers

    def make(family: str, scheduler: str) -> Path:
        key = (family, scheduler)
        if key not in builds:
            spec = from_diffusers(tiny_diffusers(family, scheduler), IMAGE_SIZES.get(family),
                                  num_frames=NUM_FRAMES.get(family))
            rows = np.ones((DIFFUSERS_STEPS, len(spec.sublayer_names)), dtype=bool)
            rows[1::2, 1::2] = False
            rows[2::3, 0] = False
            out = tmp_path_factory.mktemp(f"cpp-{family}-{scheduler}") / "engines"
            build(BuildRequest(spec=spec, schedule=Schedule(rows, sublayers=spec.sublayer_names, mode="general"),
                               sampler=spec.sampler(None, DIFFUSERS_STEPS), out_dir=out), progress=False)
            builds[key] = out
        return builds[key]

    builds: dict[tuple[str, str], Path] = {}
    return make


def _flow_matching_build(engines: Path, tmp_path: Path, **options) -> Path:
    """The tiny diffusers DiT build with its sampler section replaced by FlowMatchEulerDiscreteScheduler's (8 steps,
    ``options``): the Python and C++ samplers then drive the same engines with flow matching (a sampler's test, not a
    model DiT is sampled with)."""
    from l2c_export.samplers import PipelineTimesteps, sampler_from_scheduler_config

    copy = shutil.copytree(engines, tmp_path / "flow-engines")
    sampler = sampler_from_scheduler_config({"_class_name": "FlowMatchEulerDiscreteScheduler", **options},
                                            DIFFUSERS_STEPS, "s", PipelineTimesteps(16, linspace_sigmas=True))
    _rewrite_manifest(copy, lambda data: data.__setitem__("sampler", sampler.to_dict()))
    return copy


@pytest.mark.parametrize("options", [{"shift": 3.0}, {"use_dynamic_shifting": True}], ids=["shift", "dynamic"])
def test_l2c_run_flow_matching_equals_the_python_sampler(cpp_build, diffusers_cpp_builds, tmp_path, options):
    """The C++ diffusers_flow_match_euler sampler (SD3's and FLUX.1's scheduler) equals the numpy one to 1e-5 of the
    range on the same engines, guided and with the schedule; an option it does not implement is refused by field."""
    engines = _flow_matching_build(diffusers_cpp_builds("dit", "ddim"), tmp_path, **options)
    assert json.loads((engines / "manifest.json").read_text())["sampler"]["kind"] == "diffusers_flow_match_euler"
    assert _compare_request(engines, tmp_path, ["--labels", "207,3"], 2, 3.0, False) <= 1e-5
    flow = np.load(tmp_path / "cpp.npy")
    assert _compare_request(diffusers_cpp_builds("dit", "ddim"), tmp_path, ["--labels", "207,3"], 2, 3.0, False) \
        <= 1e-5
    assert np.abs(np.load(tmp_path / "cpp.npy") - flow).max() > 1e-3  # the other sampler: another result
    _rewrite_manifest(engines, lambda data: data["sampler"]["options"].__setitem__("invert_sigmas", True))
    refused = l2c_run(engines, "--labels", "207,3", "--noise", tmp_path / "z.npy", "--out", tmp_path / "x.npy")
    assert refused.returncode == 2 and "field 'sampler/options/invert_sigmas'" in refused.stderr


# Wan2.1's scheduler (UniPC bh2, order 2, flow sigmas shifted by 3, the velocity), and UniPC's other branches: order 3
# with the solved weights, bh1, the noise prediction onto sigma_min, a corrector left out
UNIPC_CONFIGS = {"wan": dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0),
                 "order3": dict(solver_order=3, solver_type="bh1", predict_x0=False, final_sigmas_type="sigma_min",
                                prediction_type="v_prediction", disable_corrector=[2], timestep_spacing="trailing")}


@pytest.mark.parametrize("config", UNIPC_CONFIGS, ids=list(UNIPC_CONFIGS))
def test_l2c_run_unipc_equals_the_python_sampler(cpp_build, diffusers_cpp_builds, tmp_path, config):
    """The C++ diffusers_unipc sampler (UniPCMultistepScheduler: predictor, corrector, Wan's flow sigmas) equals the
    numpy one to 1e-5 of the range on the same engines (the tiny DiT's, its sampler section swapped: a sampler's
    test), guided and with the schedule; an option it does not implement, and an order with no finite update, are
    refused by field."""
    from l2c_export.samplers import sampler_from_scheduler_config

    engines = shutil.copytree(diffusers_cpp_builds("dit", "ddim"), tmp_path / "unipc-engines")
    sampler = sampler_from_scheduler_config({"_class_name": "UniPCMultistepScheduler", **UNIPC_CONFIGS[config]},
                                            DIFFUSERS_STEPS, "s")
    assert max(sampler.orders) == sampler.options["solver_order"]  # the multistep update really runs
    _rewrite_manifest(engines, lambda data: data.__setitem__("sampler", sampler.to_dict()))
    assert _compare_request(engines, tmp_path, ["--labels", "207,3"], 2, 3.0, False) <= 1e-5
    unipc = np.load(tmp_path / "cpp.npy")
    assert _compare_request(engines, tmp_path, ["--labels", "207,3"], 2, 3.0, True) <= 1e-5
    assert np.abs(np.load(tmp_path / "cpp.npy") - unipc).max() > 1e-4  # the schedule reused something
    _rewrite_manifest(engines, lambda data: data["sampler"]["options"].__setitem__("solver_p", {"a": 1}))
    assert "field 'sampler/options/solver_p' is not one" in _refused_request(tmp_path, engines, "--labels", "207,3")
    _rewrite_manifest(engines, lambda data: data["sampler"]["options"].__setitem__("solver_p", None))
    last = DIFFUSERS_STEPS - 1
    change = {"wan": lambda s: s["orders"].__setitem__(last, 2),  # order 2 onto sigma 0: infinite in diffusers
              "order3": lambda s: s.__setitem__("final_sigma", 0.0)}[config]  # the noise prediction onto sigma 0
    _rewrite_manifest(engines, lambda data: change(data["sampler"]))
    assert f"field 'sampler/orders/{last}' gives step {last} no finite update" in _refused_request(
        tmp_path, engines, "--labels", "207,3")


def _prompt_conditioning(path: Path, n: int = 2, length: int = 5, seed: int = 1) -> dict:
    """PixArt conditioning by the pipelines' argument names, the first prompt padded (a 0/1 int64 mask, as a
    tokenizer's), saved with np.savez at ``path``."""
    from .diffusers_pipelines import CAPTION_CHANNELS

    generator = np.random.default_rng(seed)
    shape = (n, length, CAPTION_CHANNELS)
    mask = np.ones((n, length), dtype=np.int64)
    mask[0, 3:] = 0
    negative_mask = np.zeros((n, length), dtype=np.int64)
    negative_mask[:, :1] = 1
    conditioning = {"prompt_embeds": generator.standard_normal(shape).astype(np.float32),
                    "prompt_attention_mask": mask,
                    "negative_prompt_embeds": generator.standard_normal(shape).astype(np.float32),
                    "negative_prompt_attention_mask": negative_mask}
    np.savez(path, **conditioning)
    return conditioning


def _compare_request(engines: Path, tmp_path: Path, request: list, n: int, cfg_scale: float, full: bool,
                     seed: int = 2, options: tuple = ()) -> float:
    """l2c-run and l2c-export run on the same noise and request (--labels or --conditioning) and ``options`` (flags
    both take); returns max |diff| / sample range."""
    noise = _noise(engines, n, seed, tmp_path / "z.npy")
    common = [*request, "--noise", tmp_path / "z.npy", "--cfg-scale", str(cfg_scale), *(["--full"] if full else []),
              *options]
    result = l2c_run(engines, *common, "--out", tmp_path / "cpp.npy")
    assert result.returncode == 0, result.stderr
    run_cli("run", str(engines), *map(str, common), "--save-latents", str(tmp_path / "py.npy"))
    cpp, python = np.load(tmp_path / "cpp.npy"), np.load(tmp_path / "py.npy")
    assert cpp.shape == python.shape == noise.shape and cpp.dtype == np.float32 and np.isfinite(cpp).all()
    return float(np.abs(cpp - python).max() / (python.max() - python.min()))


def _parity_guided_and_scheduled(engines: Path, tmp_path: Path, request: list) -> dict:
    """``request`` (2 samples) through l2c-run and l2c-export run, guided (3.0) and not (1.0), full and with the
    schedule: each equal to 1e-5 of the range, the schedule reusing something and the scale changing the result.
    Returns l2c-run's samples by (full, cfg_scale)."""
    results = {}
    for full in (True, False):
        for cfg_scale in (3.0, 1.0):
            assert _compare_request(engines, tmp_path, request, 2, cfg_scale, full) <= 1e-5
            results[full, cfg_scale] = np.load(tmp_path / "cpp.npy")
    assert np.abs(results[True, 3.0] - results[False, 3.0]).max() > 1e-4  # the schedule reused something
    assert np.abs(results[False, 3.0] - results[False, 1.0]).max() > 1e-4  # guidance changed the result
    return results


@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
def test_l2c_run_equals_the_python_runtime_on_a_diffusers_dit(cpp_build, diffusers_cpp_builds, tmp_path, scheduler):
    """DiT with labels and a learned sigma (the sampler steps on the first half, sampler_channels), guided and not,
    full and with the schedule, under DDIMScheduler and DPMSolverMultistepScheduler (2M)."""
    engines = diffusers_cpp_builds("dit", scheduler)
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["sampler"]["kind"] == {"ddim": "diffusers_ddim", "dpm": "diffusers_dpm_multistep"}[scheduler]
    assert manifest["guidance"]["sampler_channels"] == 4
    if scheduler == "dpm":
        assert 2 in manifest["sampler"]["orders"]  # the multistep update really runs
    _parity_guided_and_scheduled(engines, tmp_path, ["--labels", "207,3"])


@pytest.mark.parametrize("scheduler", ["dpm", "ddim"])
def test_l2c_run_equals_the_python_runtime_on_a_pixart_with_prompts(cpp_build, diffusers_cpp_builds, tmp_path,
                                                                    scheduler):
    """PixArt conditioned on prompt embeddings by role (--conditioning cond.npz, a padded mask, a negative prompt for
    guidance): guided and not, full and with the schedule."""
    engines = diffusers_cpp_builds("pixart", scheduler)
    inputs = json.loads((engines / "manifest.json").read_text())["model"]["inputs"]
    assert [(t["role"], t.get("argument")) for t in inputs][2:] == [("conditioning", "prompt_embeds"),
                                                                      ("conditioning", "prompt_attention_mask")]
    _prompt_conditioning(tmp_path / "cond.npz")
    request = ["--conditioning", tmp_path / "cond.npz"]
    results = _parity_guided_and_scheduled(engines, tmp_path, request)
    # The mask is used: unpadding the first prompt changes its sample, not the second's.
    conditioning = dict(np.load(tmp_path / "cond.npz"))
    conditioning["prompt_attention_mask"][0] = 1
    np.savez(tmp_path / "unpadded.npz", **conditioning)
    assert l2c_run(engines, "--conditioning", tmp_path / "unpadded.npz", "--noise", tmp_path / "z.npy",
                   "--cfg-scale", "1", "--out", tmp_path / "unpadded.npy").returncode == 0
    unpadded = np.load(tmp_path / "unpadded.npy")
    assert np.abs(unpadded[0] - results[False, 1.0][0]).max() > 1e-4
    assert np.abs(unpadded[1] - results[False, 1.0][1]).max() <= 1e-6 * np.abs(unpadded[1]).max()


def _refused_request(tmp_path: Path, engines: Path, *request) -> str:
    """l2c-run on ``engines`` with ``request`` must exit 2 with one line on stderr and write nothing; returns it."""
    if not (tmp_path / "z.npy").exists():
        _noise(engines, 2, 0, tmp_path / "z.npy")
    out = tmp_path / "out.npy"
    result = l2c_run(engines, *request, "--noise", tmp_path / "z.npy", "--cfg-scale", "3", "--out", out)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("l2c-run: error: "), result.stderr
    assert not out.exists() and not list(tmp_path.glob("out.npy*")), "a refused run left output behind"
    return lines[0]


def _bad_npz(path: Path, conditioning: dict) -> None:
    path.write_bytes(b"")  # np.savez appends .npz to a name without it
    with open(path, "wb") as file:
        np.savez(file, **conditioning)


@pytest.mark.parametrize("change,expected", [
    (lambda c: c.update(prompt_embedz=c.pop("prompt_embeds")), "unknown array 'prompt_embedz'; expected"),
    (lambda c: c.pop("negative_prompt_embeds"), "array 'negative_prompt_embeds' is missing (guidance runs the "
                                                "negative prompt as the unconditional half)"),
    (lambda c: c.pop("prompt_attention_mask"), "array 'prompt_attention_mask' is missing"),
    (lambda c: c.update(prompt_embeds=c["prompt_embeds"][..., :5].copy()),
     "array 'prompt_embeds' has shape (2, 5, 5); expected (n, L, 12)"),
    (lambda c: c.update(prompt_embeds=c["prompt_embeds"][0].copy()),
     "array 'prompt_embeds' has shape (5, 12); expected (n, L, 12)"),
    (lambda c: c.update(prompt_embeds=c["prompt_embeds"].astype(np.int32)),
     "array 'prompt_embeds': dtype <i4; expected float32 embeddings"),
    (lambda c: c["negative_prompt_embeds"].__setitem__((0, 0, 0), np.nan),
     "array 'negative_prompt_embeds': 1 of its 120 values are NaN or infinite"),
    (lambda c: c.update(negative_prompt_embeds=c["negative_prompt_embeds"][:, :4].copy()),
     "array 'negative_prompt_embeds' has shape (2, 4, 12); expected (2, 5, 12), that of 'prompt_embeds'"),
    (lambda c: c.update(prompt_attention_mask=np.ones((2, 4), dtype=np.int64)),
     "array 'prompt_attention_mask' has shape (2, 4); expected (2, 5) (n, L of the embeddings)"),
    (lambda c: c.update(negative_prompt_attention_mask=np.ones((3, 5), dtype=np.int64)),
     "array 'negative_prompt_attention_mask' has shape (3, 5); expected (2, 5)"),
    (lambda c: c.update(prompt_attention_mask=np.full((2, 5), 2)),
     "array 'prompt_attention_mask' holds values other than 0 and 1"),
    (lambda c: c["prompt_attention_mask"].__setitem__(1, 0),
     "array 'prompt_attention_mask' masks every token of a prompt"),
    (lambda c: c.update(prompt_attention_mask=np.array(["1"] * 10).reshape(2, 5)),
     "array 'prompt_attention_mask': dtype <U1; expected a 0/1 mask"),
    (lambda c: c.update({name: np.ones((2, 121, *value.shape[2:]), dtype=value.dtype) for name, value in c.items()}),
     "array 'prompt_embeds' has shape (2, 121, 12): 121 prompt tokens; expected at most the model's "
     "max_sequence_length 120"),
], ids=["unknown-name", "missing-negative", "missing-mask", "width", "rank", "int-embeddings", "nan", "negative-shape",
        "mask-length", "negative-mask-rows", "mask-values", "all-padding", "string-mask", "too-long"])
def test_bad_conditioning_is_refused_naming_the_array(cpp_build, diffusers_cpp_builds, tmp_path, change, expected):
    engines = diffusers_cpp_builds("pixart", "dpm")
    conditioning = _prompt_conditioning(tmp_path / "cond.npz")
    change(conditioning)
    _bad_npz(tmp_path / "bad.npz", conditioning)
    line = _refused_request(tmp_path, engines, "--conditioning", tmp_path / "bad.npz")
    assert f"--conditioning {tmp_path / 'bad.npz'}: {expected}" in line, line


def test_conditioning_archives_that_cannot_be_read_are_refused(cpp_build, diffusers_cpp_builds, tmp_path):
    engines = diffusers_cpp_builds("pixart", "dpm")
    conditioning = _prompt_conditioning(tmp_path / "cond.npz")
    np.save(tmp_path / "single.npy", conditioning["prompt_embeds"])
    assert "single.npy: not a zip archive" in _refused_request(tmp_path, engines, "--conditioning",
                                                               tmp_path / "single.npy")
    archive = (tmp_path / "cond.npz").read_bytes()
    corrupted = bytearray(archive)
    corrupted[200] ^= 0xFF  # inside the first member's data
    (tmp_path / "corrupt.npz").write_bytes(bytes(corrupted))
    assert "fails its CRC-32 check" in _refused_request(tmp_path, engines, "--conditioning", tmp_path / "corrupt.npz")
    (tmp_path / "cut.npz").write_bytes(archive[: len(archive) // 2])
    assert "cut.npz: not a zip archive" in _refused_request(tmp_path, engines, "--conditioning", tmp_path / "cut.npz")
    objects = dict(conditioning, prompt_embeds=np.array([{"a": 1}], dtype=object))
    with open(tmp_path / "pickle.npz", "wb") as file:
        np.savez(file, **objects)
    assert "array 'prompt_embeds': dtype |O; expected float32" in _refused_request(
        tmp_path, engines, "--conditioning", tmp_path / "pickle.npz")
    assert "no-such.npz: cannot be read" in _refused_request(tmp_path, engines, "--conditioning",
                                                             tmp_path / "no-such.npz")


def test_compressed_conditioning_equals_stored(cpp_build, diffusers_cpp_builds, tmp_path):
    """np.savez_compressed (deflate) reads as np.savez (stored) does."""
    engines = diffusers_cpp_builds("pixart", "dpm")
    conditioning = _prompt_conditioning(tmp_path / "cond.npz")
    np.savez_compressed(tmp_path / "packed.npz", **conditioning)
    _noise(engines, 2, 0, tmp_path / "z.npy")
    for name in ("cond", "packed"):
        result = l2c_run(engines, "--conditioning", tmp_path / f"{name}.npz", "--noise", tmp_path / "z.npy",
                         "--out", tmp_path / f"{name}.npy")
        assert result.returncode == 0, result.stderr
    assert np.array_equal(np.load(tmp_path / "cond.npy"), np.load(tmp_path / "packed.npy"))


def test_the_wrong_conditioning_for_the_model_is_refused(cpp_build, diffusers_cpp_builds, tmp_path):
    pixart, dit = diffusers_cpp_builds("pixart", "dpm"), diffusers_cpp_builds("dit", "dpm")
    _prompt_conditioning(tmp_path / "cond.npz")
    assert "--labels: this model is conditioned on prompt embeddings (--conditioning)" in _refused_request(
        tmp_path, pixart, "--labels", "1,2")
    assert "this model is conditioned on class labels (--labels), not on prompt embeddings" in _refused_request(
        tmp_path, dit, "--conditioning", tmp_path / "cond.npz")
    assert "--labels excludes --conditioning" in _refused_request(tmp_path, pixart, "--labels", "1,2",
                                                                  "--conditioning", tmp_path / "cond.npz")
    assert "give either --labels" in _refused_request(tmp_path, pixart)


def test_l2c_run_equals_the_python_runtime_on_a_sana_with_flow_sigmas(cpp_build, diffusers_cpp_builds, tmp_path):
    """Sana (issue 29): its DPM-Solver++ on flow sigmas with the velocity (prediction_type flow_prediction,
    use_flow_sigmas), prompt embeddings by role with a padded mask and negatives: guided and not, full and with the
    schedule; the velocity without flow sigmas is refused by field."""
    engines = diffusers_cpp_builds("sana", "flow")
    sampler = json.loads((engines / "manifest.json").read_text())["sampler"]
    assert sampler["kind"] == "diffusers_dpm_multistep" and sampler["options"]["use_flow_sigmas"] is True
    assert 2 in sampler["orders"]  # the multistep update really runs
    _prompt_conditioning(tmp_path / "cond.npz")
    request = ["--conditioning", tmp_path / "cond.npz"]
    _parity_guided_and_scheduled(engines, tmp_path, request)
    copy = shutil.copytree(engines, tmp_path / "engines")
    _rewrite_manifest(copy, lambda data: data["sampler"]["options"].update(use_flow_sigmas=False))
    line = _refused_request(tmp_path, copy, *request)
    assert "manifest.json: field 'sampler/options/prediction_type' is flow_prediction" in line, line


@pytest.mark.parametrize("scheduler,change,expected", [
    ("ddim", lambda s: s["alphas_cumprod"].__setitem__(0, 1.5), "field 'sampler/alphas_cumprod/0' expected a value "
                                                                "in (0, 1]"),
    ("ddim", lambda s: s["alphas_cumprod_prev"].pop(), "field 'sampler/alphas_cumprod_prev' has 7 entries; expected 8"),
    ("ddim", lambda s: s["options"].update(prediction_type="flow"), "field 'sampler/options/prediction_type' is not "
                                                                    "one this l2c runtime implements"),
    ("ddim", lambda s: s["timesteps"].__setitem__(0, 1000), "field 'sampler/timesteps/0' is 1000; expected 0..999"),
    ("ddim", lambda s: s["model_times"].__setitem__(1, 3.5), "field 'sampler/model_times' differs from 'timesteps'"),
    ("dpm", lambda s: s["sigmas"].__setitem__(3, s["sigmas"][2]), "field 'sampler/sigmas/3' expected the steps' "
                                                                  "sigmas strictly decreasing"),
    ("dpm", lambda s: s["sigmas"].__setitem__(0, "1.0"), "field 'sampler/sigmas/0' expected a number"),
    ("dpm", lambda s: s["orders"].__setitem__(0, 2), "field 'sampler/orders/0' expected 1"),
    ("dpm", lambda s: s["orders"].__setitem__(7, 2), "field 'sampler/orders/7' is 2 onto final sigma"),
    ("dpm", lambda s: s["options"].update(solver_order=3), "field 'sampler/options/solver_order' is not one"),
    ("dpm", lambda s: s.update(final_sigma=-1.0), "field 'sampler/final_sigma' expected a sigma in [0"),
], ids=["ddim-alpha", "ddim-length", "ddim-prediction", "ddim-timestep", "ddim-model-times", "dpm-sigmas",
        "dpm-string", "dpm-first-order", "dpm-last-order", "dpm-solver-order", "dpm-final-sigma"])
def test_a_bad_diffusers_sampler_table_is_refused(cpp_build, diffusers_cpp_builds, tmp_path, scheduler, change,
                                                  expected):
    engines = shutil.copytree(diffusers_cpp_builds("dit", scheduler), tmp_path / "engines")
    _rewrite_manifest(engines, lambda data: change(data["sampler"]))
    line = _refused_request(tmp_path, engines, "--labels", "1,2")
    assert f"manifest.json: {expected}" in line, line


# ---------------------------------------------------------------------------------------------------------------------
# MMDiTs (issue 21): SD3 (prompt and pooled embeddings, their negatives for classifier-free guidance) and FLUX.1
# (guidance-distilled: --cfg-scale feeds the guidance input, no negative batch; packed (n, T, C) latents), sampled with
# flow matching; their joint-attention cache slots are (batch, joint_tokens, D), sized per request by the prompt.


def _mmdit_conditioning(path: Path, family: str, n: int = 2, length: int = 7, seed: int = 3) -> dict:
    """SD3's or FLUX.1's conditioning by the pipelines' argument names (SD3 with negatives), saved at ``path``."""
    from .diffusers_pipelines import FLUX_CONFIG, SD3_CONFIG

    config = FLUX_CONFIG if family == "flux" else SD3_CONFIG
    generator = np.random.default_rng(seed)
    width, pooled = config["joint_attention_dim"], config["pooled_projection_dim"]
    prefixes = ("",) if family == "flux" else ("", "negative_")
    conditioning = {}
    for prefix in prefixes:
        conditioning[f"{prefix}prompt_embeds"] = generator.standard_normal((n, length, width)).astype(np.float32)
        conditioning[f"{prefix}pooled_prompt_embeds"] = generator.standard_normal((n, pooled)).astype(np.float32)
    np.savez(path, **conditioning)
    return conditioning


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_l2c_run_equals_the_python_runtime_on_sd3_and_flux(cpp_build, diffusers_cpp_builds, tmp_path, family):
    """SD3 and FLUX.1 builds: full and with the schedule, at two guidance scales and two prompt lengths (the
    joint-attention slots are sized per request), equal to l2c-export run to 1e-5 of the range; SD3 guides with the
    negatives, FLUX.1's scale reaches its guidance embedding."""
    engines = diffusers_cpp_builds(family, "flow")
    manifest = json.loads((engines / "manifest.json").read_text())
    assert [t.get("argument") for t in manifest["model"]["inputs"]][2:] == [
        "prompt_embeds", "pooled_prompt_embeds", *(["guidance_scale"] if family == "flux" else [])]
    assert any("joint_tokens" in slot["shape"] for slot in manifest["cache_slots"])
    assert len(manifest["model"]["inputs"][0]["shape"]) == (3 if family == "flux" else 4)  # FLUX.1: packed
    results = {}
    for length in (7, 3):
        _mmdit_conditioning(tmp_path / "cond.npz", family, length=length)
        request = ["--conditioning", tmp_path / "cond.npz"]
        for full in (True, False):
            for cfg_scale in (3.0, 1.0):
                assert _compare_request(engines, tmp_path, request, 2, cfg_scale, full) <= 1e-5
                results[length, full, cfg_scale] = np.load(tmp_path / "cpp.npy")
    assert np.abs(results[7, True, 3.0] - results[7, False, 3.0]).max() > 1e-4  # the schedule reused something
    assert np.abs(results[7, False, 3.0] - results[7, False, 1.0]).max() > 1e-4  # guidance changed the result
    assert np.abs(results[7, False, 3.0] - results[3, False, 3.0]).max() > 1e-4  # another prompt, another sample


@pytest.mark.parametrize("family,change,expected", [
    ("sd3", lambda c: c.pop("pooled_prompt_embeds"), "array 'pooled_prompt_embeds' is missing; expected "
                                                     "prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, "
                                                     "negative_pooled_prompt_embeds"),
    ("sd3", lambda c: c.pop("negative_pooled_prompt_embeds"), "array 'negative_pooled_prompt_embeds' is missing "
                                                              "(guidance runs the negative prompt"),
    ("sd3", lambda c: c.update(prompt_attention_mask=np.ones((2, 7), dtype=np.int64)),
     "unknown array 'prompt_attention_mask'; expected prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds"),
    ("sd3", lambda c: c.update(pooled_prompt_embeds=c["pooled_prompt_embeds"][:, :4].copy()),
     "array 'pooled_prompt_embeds' has shape (2, 4); expected (2, 6) (one pooled embedding per prompt)"),
    ("sd3", lambda c: c.update(negative_pooled_prompt_embeds=c["negative_pooled_prompt_embeds"][:1].copy()),
     "array 'negative_pooled_prompt_embeds' has shape (1, 6); expected (2, 6)"),
    ("sd3", lambda c: c["pooled_prompt_embeds"].__setitem__((0, 0), np.inf),
     "array 'pooled_prompt_embeds': 1 of its 12 values are NaN or infinite"),
    ("sd3", lambda c: c.update(pooled_prompt_embeds=c["pooled_prompt_embeds"].astype(np.int32)),
     "array 'pooled_prompt_embeds': dtype <i4; expected float32 embeddings"),
    ("flux", lambda c: c.update(negative_prompt_embeds=c["prompt_embeds"]),
     "array 'negative_prompt_embeds' is not used: this model is guidance-distilled"),
    ("flux", lambda c: c.update(prompt_embeds=np.ones((2, 513, 12), dtype=np.float32)),
     "array 'prompt_embeds' has shape (2, 513, 12): 513 prompt tokens; expected at most the model's "
     "max_sequence_length 512"),
], ids=["missing-pooled", "missing-negative-pooled", "mask", "pooled-width", "pooled-rows", "pooled-inf",
        "pooled-int", "flux-negative", "flux-too-long"])
def test_bad_mmdit_conditioning_is_refused_naming_the_array(cpp_build, diffusers_cpp_builds, tmp_path, family, change,
                                                            expected):
    engines = diffusers_cpp_builds(family, "flow")
    conditioning = _mmdit_conditioning(tmp_path / "cond.npz", family)
    change(conditioning)
    _bad_npz(tmp_path / "bad.npz", conditioning)
    line = _refused_request(tmp_path, engines, "--conditioning", tmp_path / "bad.npz")
    assert f"--conditioning {tmp_path / 'bad.npz'}: {expected}" in line, line


def test_flux_noise_must_be_the_packed_latents(cpp_build, diffusers_cpp_builds, tmp_path):
    engines = diffusers_cpp_builds("flux", "flow")
    _mmdit_conditioning(tmp_path / "cond.npz", "flux")
    np.save(tmp_path / "z.npy", np.zeros((2, 16, 8, 8), dtype=np.float32))  # unpacked (n, C, H, W)
    line = _refused_request(tmp_path, engines, "--conditioning", tmp_path / "cond.npz")
    assert "noise has shape (2, 16, 8, 8); expected (2, 16, 16) (n prompts, T, C), the pipeline's packed latents" \
        in line, line


# ---------------------------------------------------------------------------------------------------------------------
# Seeds that match (issue 31): l2c::torch_randn is torch's CPU randn for torch.Generator().manual_seed(seed), as numpy's
# make_noise; l2c-run --seed draws the whole batch's noise with it.

def test_cpp_torch_randn_equals_numpy_and_torch_bit_for_bit(cpp_build, tmp_path):
    """cpp/tests/torch_randn.cpp over every family's latent shape (4-D, packed, 5-D, counts under 16 and not a
    multiple of 16), seeds up to 2**64 - 1 (negative ones as torch takes them, modulo 2**64) and counts 1..48, with
    both kernels: equal to numpy's torch_randn, and to torch's where this CPU runs the AVX2 kernel."""
    import torch

    from l2c_export.samplers.torch_noise import torch_randn

    from .test_torch_noise import SEEDS, SHAPES

    cases = [(seed % 2 ** 64, shape, kernel) for seed in SEEDS for shape in SHAPES.values()
             for kernel in ("avx2", "scalar")]
    cases += [(7, (count,), kernel) for count in range(1, 49) for kernel in ("avx2", "scalar")]
    lines = "".join(f"{seed} {kernel} {' '.join(map(str, shape))}\n" for seed, shape, kernel in cases)
    result = subprocess.run([str(cpp_build / "l2c-torch-randn-test"), str(tmp_path)], capture_output=True, text=True,
                            input=lines, timeout=120, env={**os.environ, **SANITIZER_ENV})
    assert result.returncode == 0, result.stderr
    for index, (seed, shape, kernel) in enumerate(cases):
        cpp = np.load(tmp_path / f"{index}.npy")
        assert cpp.shape == shape and np.array_equal(cpp.view(np.uint32),
                                                     torch_randn(seed, shape, kernel).view(np.uint32))
        if kernel == "avx2" and torch.backends.cpu.get_cpu_capability() == "AVX2":
            want = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy()
            assert np.array_equal(cpp.view(np.uint32), want.view(np.uint32)), (seed, shape)


@pytest.mark.parametrize("family", ["default", "flux"])
def test_l2c_run_seed_draws_the_noise_diffusers_draws(cpp_build, default_build, diffusers_cpp_builds, tmp_path,
                                                      family):
    """l2c-run --seed S starts from torch's randn for torch.Generator().manual_seed(S) over the whole (n, ...)
    batch (the embedded default's (n, 1, 8, 8) from --labels; FLUX.1's packed (n, T, C) from --conditioning): the
    samples of --noise make_noise(S, ...) bit for bit, and of l2c-export run --seed S to 1e-5 of the range."""
    if family == "default":
        engines, request, n = default_build, ["--labels", "0,3,5"], 3
    else:
        engines, n = diffusers_cpp_builds("flux", "flow"), 2
        _mmdit_conditioning(tmp_path / "cond.npz", "flux", length=3)
        request = ["--conditioning", tmp_path / "cond.npz"]
    seed = 2 ** 63 - 1
    _noise(engines, n, seed, tmp_path / "z.npy")
    common = [*request, "--cfg-scale", "3"]
    for source, out in ((["--seed", str(seed)], "seeded.npy"), (["--noise", tmp_path / "z.npy"], "file.npy")):
        result = l2c_run(engines, *common, *source, "--out", tmp_path / out)
        assert result.returncode == 0, result.stderr
    seeded = np.load(tmp_path / "seeded.npy")
    assert np.array_equal(seeded, np.load(tmp_path / "file.npy"))
    run_cli("run", str(engines), *map(str, common), "--seed", str(seed), "--save-latents", str(tmp_path / "py.npy"))
    python = np.load(tmp_path / "py.npy")
    assert seeded.shape == python.shape and np.abs(seeded - python).max() <= 1e-5 * (python.max() - python.min())


@pytest.mark.parametrize("args,expected", [
    (["--seed", str(2 ** 64)], f"--seed: {2 ** 64} is out of range; expected an integer in -2**63..2**64-1"),
    (["--seed", str(-(2 ** 63) - 1)], f"--seed: {-(2 ** 63) - 1} is out of range; expected an integer in "),
    (["--seed", "1.5"], "--seed: '1.5' is not an integer"),
    (["--seed", "1", "--noise", "z.npy"], "--noise excludes --seed"),
    ([], "give either --noise z.npy or --seed S"),
], ids=["above", "below", "not-an-integer", "both", "neither"])
def test_a_bad_seed_is_refused_in_one_line(cpp_build, default_build, tmp_path, args, expected):
    out = tmp_path / "out.npy"
    result = l2c_run(default_build, "--labels", "0,3", *args, "--out", out)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("l2c-run: error: "), result.stderr
    assert expected in lines[0] and not out.exists()


def _qwen_conditioning(path: Path, n: int = 2, seed: int = 4) -> dict:
    """Qwen-Image's conditioning by the pipeline's argument names: a prompt of 7 tokens (the second padded after 5)
    and a negative prompt of 4 (the first padded after 3), saved at ``path``."""
    from .diffusers_pipelines import QWEN_CONFIG

    generator = np.random.default_rng(seed)
    width = QWEN_CONFIG["joint_attention_dim"]
    mask, negative_mask = np.ones((n, 7), np.float32), np.ones((n, 4), np.float32)
    mask[1, 5:] = 0
    negative_mask[0, 3:] = 0
    conditioning = {"prompt_embeds": generator.standard_normal((n, 7, width)).astype(np.float32),
                    "prompt_embeds_mask": mask,
                    "negative_prompt_embeds": generator.standard_normal((n, 4, width)).astype(np.float32),
                    "negative_prompt_embeds_mask": negative_mask}
    np.savez(path, **conditioning)
    return conditioning


def test_l2c_run_equals_the_python_runtime_on_qwen_image(cpp_build, diffusers_cpp_builds, tmp_path):
    """Qwen-Image: a token mask that pads_negative (a negative prompt shorter than the prompt, the shorter half padded
    under mask 0), the true_cfg rule (rescaled per token to the conditional norm), flow matching with
    shift_terminal: guided and not, full and with the schedule, equal to l2c-export run to 1e-5 of the range; a
    negative prompt of another batch is refused by name."""
    engines = diffusers_cpp_builds("qwen", "flow")
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["guidance"]["rule"] == "true_cfg" and manifest["sampler"]["options"]["shift_terminal"] == 0.02
    conditioning = _qwen_conditioning(tmp_path / "cond.npz")
    _parity_guided_and_scheduled(engines, tmp_path, ["--conditioning", tmp_path / "cond.npz"])
    one_negative = conditioning["negative_prompt_embeds"][:1]
    _bad_npz(tmp_path / "bad.npz", {**conditioning, "negative_prompt_embeds": one_negative})
    line = _refused_request(tmp_path, engines, "--conditioning", tmp_path / "bad.npz")
    assert "array 'negative_prompt_embeds' has shape (1, 4, 12); expected (2, L, 12), as many prompts as " \
           "'prompt_embeds' (any length L" in line, line


# ---------------------------------------------------------------------------------------------------------------------
# Prompts in, PNG out: the build's tokenizers (onnxruntime-extensions' tokenizer, in onnxruntime-genai-core's library),
# text encoder graphs and VAE decoder graph, against l2c-export run --prompt on the same build.


def _tokenizer_file(tokenizer, folder: Path) -> tuple[Path, int, str]:
    """``tokenizer`` saved and written as a build writes it (builder/components.py _write_tokenizer: reloaded as
    transformers loads it, truncation and padding cleared): (tokenizer.json, pad id, pad token)."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(folder)
    loaded = AutoTokenizer.from_pretrained(str(folder))
    backend = loaded.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    (folder / "build.json").write_text(backend.to_str())
    return folder / "build.json", loaded.pad_token_id, loaded.pad_token


# What the C++ tokenizer refuses (PromptEncoder names the prompt): texts the library would read otherwise.
REFUSED_MARKS = ("\u00a0", "\u0301", "\t", "\n", "</s>", "<pad>", "<|endoftext|>", "<|startoftext|>")


def _word_level_tokenizer():
    """The t2i-digits demo's tokenizer (WordLevel over the caption words), as transformers loads it."""
    from transformers import AutoTokenizer

    from l2c_export.demo.t2i import T2I_DIR

    return AutoTokenizer.from_pretrained(str(T2I_DIR / "tokenizer"))


@pytest.mark.parametrize("kind", ["t5", "clip", "clip-g", "word-level"])
def test_the_cpp_tokenizer_gives_the_ids_tokenizers_gives(cpp_build, tmp_path, kind):
    """The runtime's tokenizer (l2c-tokenize-test) against the tokenizers library set up as the Python runtime sets
    it up (stack_tokenizer: special tokens, truncation, right padding), on a hundred texts of the tiny T5 (Unigram)
    and CLIP (byte-level BPE; CLIP-G padding with "!") tokenizers and the t2i-digits demo's (WordLevel, read by the
    runtime itself; with forty more ASCII texts of its caption words, unknown words, punctuation runs, underscores,
    capitals and spaces): vocabulary words, capitals, digits, punctuation, non-ASCII letters and emoji, runs of
    spaces, the empty text, texts past max_length. Equal ids and masks everywhere, but for the texts it refuses, each
    holding what it names (a no-break space, a combining mark, a control character, a special token written out, only
    spaces; for WordLevel, any non-ASCII character)."""
    from l2c_export.runtime.components import stack_tokenizer

    from .diffusers_pipelines import CLIP_WORDS, PROMPT_WORDS, tiny_clip_tokenizer, tiny_t5

    tokenizer, length = {"t5": (lambda: tiny_t5()[0], 120), "clip": (tiny_clip_tokenizer, 77),
                         "clip-g": (lambda: tiny_clip_tokenizer("!"), 77),
                         "word-level": (_word_level_tokenizer, 120)}[kind]
    path, pad_id, pad_token = _tokenizer_file(tokenizer(), tmp_path / kind)
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'-:;\"()/&")
    alphabet += ["\u00e9", "\u00fc", "\u00df", "\u732b", "\U0001f431", "\u00a0", "\u03a9"]
    words = [*PROMPT_WORDS, *CLIP_WORDS]
    texts = ["", "a", "A", "the digit seven", "The Digit Seven", "a handwritten 7!", "hello!", "!", "seven!!",
             "it's", "don't", "  a  b   c ", "x" * 300, " ".join(["seven"] * 200), "caf\u00e9", "\u732b \U0001f431",
             "cafe\u0301", "a\tb", "a\nb", " ", "</s>", "<pad> a", "<|endoftext|>"]
    for _ in range(40):
        texts.append(" ".join(rng.choice(words, rng.integers(1, 8))))
        texts.append("".join(rng.choice(alphabet, rng.integers(1, 30))))
    if kind == "word-level":
        pieces = [*PROMPT_WORDS, "sevens", "seven_", "_", "77", "a7", "SEVEN", "Nine", "x", "!", "?!", "...", "-", "'s"]
        texts += ["sevens", "seven.", "seven...nine", "a7 7a", "snake_case seven", "NUMBER  Two!", "(one)", "  ",
                  "\u2581"]
        for _ in range(40):
            texts.append("".join(rng.choice([*pieces, " ", "  "], rng.integers(1, 12))))
    result = subprocess.run([str(cpp_build / "l2c-tokenize-test"), str(path), str(pad_id), str(length)],
                            input="".join(json.dumps(text) + "\n" for text in texts), capture_output=True, text=True,
                            env={**os.environ, **SANITIZER_ENV}, timeout=120)
    assert result.returncode == 0 and not any(mark in result.stderr for mark in SANITIZER_REPORTS), result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(texts)
    reference = stack_tokenizer(path, length, pad_id, pad_token)
    compared = 0
    for text, line in zip(texts, lines):
        if line.startswith("refused: "):
            spaces_only = text and not text.strip(" ") and kind != "word-level"
            non_ascii = kind == "word-level" and not text.isascii() and "non-ASCII" in line
            assert any(mark in text for mark in REFUSED_MARKS) or spaces_only or non_ascii, (text, line)
            continue
        ids, ones = line.rsplit(" ", 1)
        expected = reference.encode(text)
        assert (json.loads(ids), int(ones)) == (expected.ids, sum(expected.attention_mask)), (text, line)
        compared += 1
    assert compared >= 80  # most texts are read alike, refused ones are the exceptions


def _prompt_parity(engines: Path, tmp_path: Path, *request: str, tolerance: float = 1e-4) -> np.ndarray:
    """l2c-run ``request`` --png and l2c-export run ``request`` --out on ``engines``: the latents equal to
    ``tolerance`` of their range and the PNGs pixel for pixel; returns the PNG's pixels."""
    from PIL import Image

    result = l2c_run(engines, *request, "--out", tmp_path / "cpp.npy", "--png", tmp_path / "cpp.png")
    assert result.returncode == 0, result.stderr
    run_cli("run", str(engines), *request, "--save-latents", str(tmp_path / "py.npy"), "--out",
            str(tmp_path / "py.png"))
    cpp, python = np.load(tmp_path / "cpp.npy"), np.load(tmp_path / "py.npy")
    assert cpp.shape == python.shape
    assert np.abs(cpp - python).max() <= tolerance * (python.max() - python.min())
    pixels = np.asarray(Image.open(tmp_path / "cpp.png"))
    assert np.array_equal(pixels, np.asarray(Image.open(tmp_path / "py.png")))
    return pixels


def test_l2c_run_turns_prompts_into_the_png_l2c_export_run_writes(cpp_build, diffusers_cpp_builds, tmp_path):
    """A PixArt build with its T5 encoder (tiny, Unigram tokenizer): --prompt (two, one capitalised and padded with
    spaces: lower-cased and stripped), --seed, guided against the default negative prompt "" and against
    --negative-prompt, and unguided: the latents and the PNG (the VAE decoder graph's images) of l2c-export run."""
    engines = diffusers_cpp_builds("pixart-t5", "dpm")
    request = ["--prompt", "a handwritten seven", "--prompt", " The Digit 3 ", "--seed", "3"]
    guided = _prompt_parity(engines, tmp_path, *request)
    negative = _prompt_parity(engines, tmp_path, *request, "--negative-prompt", "a blurry digit")
    unguided = _prompt_parity(engines, tmp_path, *request, "--cfg-scale", "1")
    assert guided.shape == (2 + 64 + 2, 2 * (64 + 2) + 2, 3)  # two 8 px images enlarged 8x, as run writes them
    assert not np.array_equal(guided, negative) and not np.array_equal(guided, unguided)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3-text", "flux-text"])
def test_l2c_run_turns_prompts_into_pngs_with_clip_and_t5(cpp_build, diffusers_cpp_builds, tmp_path, family):
    """SD3 (CLIP-L + CLIP-G padding with "!" + T5, pooled and token arrays, a negative prompt) and FLUX.1 (CLIP-L +
    T5, guidance-distilled, packed latents unpacked for the VAE): the latents and PNG of l2c-export run."""
    engines = diffusers_cpp_builds(family, "flow")
    request = ["--prompt", "a handwritten seven!", "--prompt", "The Digit 3", "--seed", "5"]
    _prompt_parity(engines, tmp_path, *request, *(["--negative-prompt", "blurry"] if family == "sd3-text" else []))


def _refused_prompt_run(engines: Path, tmp_path: Path, *request: str) -> str:
    """l2c-run ``request`` --png must exit 2 with one line and write nothing; returns the line."""
    result = l2c_run(engines, *request, "--seed", "1", "--png", tmp_path / "out.png", "--out", tmp_path / "out.npy")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("l2c-run: error: "), result.stderr
    assert not list(tmp_path.glob("out.*")), "a refused run left output behind"
    return lines[0]


def test_prompts_and_pngs_that_cannot_be_made_are_refused_in_one_line(cpp_build, diffusers_cpp_builds, tmp_path):
    """--prompt on a build without text encoders; --png of a latent build without a VAE decoder; a tokenizer the C++
    tokenizer does not read (a WordPiece one); prompts it would read otherwise than tokenizers; a --negative-prompt
    that is not used."""
    plain, with_text = diffusers_cpp_builds("pixart", "dpm"), diffusers_cpp_builds("pixart-t5", "dpm")
    assert "--prompt: the build" in _refused_prompt_run(plain, tmp_path, "--prompt", "a cat") and \
        "carries no text encoders" in _refused_prompt_run(plain, tmp_path, "--prompt", "a cat")
    no_decoder = shutil.copytree(with_text, tmp_path / "no-decoder")
    _rewrite_manifest(no_decoder, lambda data: data["components"].pop("vae_decoder"))
    assert "carries no VAE decoder" in _refused_prompt_run(no_decoder, tmp_path, "--prompt", "a cat")
    word_piece = shutil.copytree(with_text, tmp_path / "word-piece")
    tokenizer = json.loads((word_piece / "tokenizer.json").read_text())
    tokenizer["model"] = {"type": "WordPiece", "vocab": {"<pad>": 0, "</s>": 1, "<unk>": 2}, "unk_token": "<unk>"}
    (word_piece / "tokenizer.json").write_text(json.dumps(tokenizer))

    def restamp(data):
        record = data["components"]["tokenizer"]["file"]
        record.update(bytes=(word_piece / "tokenizer.json").stat().st_size,
                      sha256=hashlib.sha256((word_piece / "tokenizer.json").read_bytes()).hexdigest())

    _rewrite_manifest(word_piece, restamp)
    assert "field 'model/type' is WordPiece" in _refused_prompt_run(word_piece, tmp_path, "--prompt", "a cat")
    for prompt, expected in (("a\tcat", "--prompt: a control character (U+0009 at byte 1)"),
                             ("caf\u00e9", "--prompt: non-ASCII text (byte 3); this build lower-cases prompts"),
                             ("a </s> cat", "--prompt: the special token </s>"), ("  ", "--prompt: empty prompt")):
        assert expected in _refused_prompt_run(with_text, tmp_path, "--prompt", prompt)
    assert "--negative-prompt: a control character (U+0009 at byte 1)" in _refused_prompt_run(
        with_text, tmp_path, "--prompt", "a cat", "--negative-prompt", "a\tdog")
    assert "--negative-prompt is not used: no classifier-free batch runs" in _refused_prompt_run(
        with_text, tmp_path, "--prompt", "a cat", "--negative-prompt", "dog", "--cfg-scale", "1")
    assert "--negative-prompt needs --prompt" in _refused_prompt_run(plain, tmp_path, "--negative-prompt", "dog")


@pytest.mark.parametrize("family", ["sana-text", "qwen-text"])
def test_l2c_run_refuses_prompts_it_cannot_template_but_runs_their_embeddings(cpp_build, diffusers_cpp_builds,
                                                                              tmp_path, family):
    """l2c-run does not yet put prompts in a decoder LLM's template (Sana's Gemma-2, Qwen-Image's Qwen2.5-VL): a
    prompt is refused in one line naming the manifest's field, nothing written, while the same build's embeddings
    (made by the Python runtime from the same prompts, Qwen-Image's negative of another length) run equal to it."""
    from l2c_export.runtime.pipeline import L2CPipeline

    engines = diffusers_cpp_builds(family, "flow")
    noise = _noise(engines, 2, 3, tmp_path / "z.npy")
    refused = l2c_run(engines, "--prompt", "a seven", "--noise", tmp_path / "z.npy", "--out", tmp_path / "x.npy")
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert "field 'components/prompt_encoding/encoders/0/template'" in lines[0] and "--conditioning" in lines[0]
    assert not (tmp_path / "x.npy").exists()
    pipe = L2CPipeline.from_engine_dir(engines)
    conditioning = pipe.prompt_encoder(["a seven", "an eight"], "a blurry picture of a digit")
    np.savez(tmp_path / "cond.npz", **conditioning)
    ran = l2c_run(engines, "--conditioning", tmp_path / "cond.npz", "--noise", tmp_path / "z.npy", "--cfg-scale", "3",
                  "--out", tmp_path / "cpp.npy")
    assert ran.returncode == 0, ran.stderr
    python = pipe(conditioning=conditioning, noise=noise, cfg_scale=3.0).samples
    cpp = np.load(tmp_path / "cpp.npy")
    assert np.abs(cpp - python).max() <= 1e-5 * (python.max() - python.min())


def test_l2c_run_equals_the_python_runtime_on_wan(cpp_build, diffusers_cpp_builds, tmp_path):
    """Wan2.1: 5-D latents (n, C, F', H', W') as model/latent_layout "ncfhw" says, prompt embeddings guided against
    negative ones (no mask): guided and not, full and with the schedule, equal to l2c-export run to 1e-5 of the
    range; --seed draws torch's randn of the 5-D batch (the samples of --noise make_noise(S, ...)); noise of 4 axes
    is refused naming the 5-D shape."""
    from .diffusers_pipelines import WAN_CONFIG

    engines = diffusers_cpp_builds("wan", "flow")
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["model"]["latent_layout"] == "ncfhw" and len(manifest["model"]["inputs"][0]["shape"]) == 5
    generator = np.random.default_rng(6)
    shape = (2, 5, WAN_CONFIG["text_dim"])
    conditioning = {"prompt_embeds": generator.standard_normal(shape).astype(np.float32),
                    "negative_prompt_embeds": generator.standard_normal(shape).astype(np.float32)}
    conditioning["prompt_embeds"][1, 3:] = 0  # the rows past a prompt, zeroed as the pipeline leaves them
    np.savez(tmp_path / "cond.npz", **conditioning)
    request = ["--conditioning", tmp_path / "cond.npz"]
    _parity_guided_and_scheduled(engines, tmp_path, request)
    noise = _noise(engines, 2, 5, tmp_path / "z.npy")
    assert noise.shape == (2, WAN_CONFIG["in_channels"], 2, 4, 8)
    for source, out in ((["--seed", "5"], "seeded.npy"), (["--noise", tmp_path / "z.npy"], "file.npy")):
        result = l2c_run(engines, *request, "--cfg-scale", "3", *source, "--out", tmp_path / out)
        assert result.returncode == 0, result.stderr
    assert np.array_equal(np.load(tmp_path / "seeded.npy"), np.load(tmp_path / "file.npy"))
    np.save(tmp_path / "z.npy", noise[:, :, 0])
    line = _refused_request(tmp_path, engines, *request)
    assert "noise has shape (2, 4, 4, 8); expected (2, 4, 2, 4, 8) (n prompts, C, F, H, W)" in line, line
    refused = l2c_run(engines, *request, "--seed", "5", "--png", tmp_path / "clip.png")
    assert refused.returncode == 2 and "'components/vae_decoder/latent_layout' is ncfhw" in refused.stderr
    assert not (tmp_path / "clip.png").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Wan2.2's two experts (issue 30): manifest 'experts', each call on its expert's subsets with its expert's cache, the
# second expert's calls guided with --cfg-scale-2.

@pytest.fixture(scope="module")
def wan22_cpp_build(wan22_two_experts_build, tmp_path_factory) -> tuple[Path, list]:
    """The tiny two-expert folder (tests/diffusers_pipelines.py's "wan22": transformer_2 below boundary_ratio 0.9,
    UniPC, no VAE) at 8 steps, 5 frames of 16 x 32 px (latents (4, 2, 2, 4)), over a general schedule that reuses in
    both experts (tests/conftest.py's, shared with tests/test_triton_mmdit.py); (build, the conditioning request:
    prompt embeddings and negatives)."""
    from .diffusers_pipelines import WAN_CONFIG

    assert (DIFFUSERS_STEPS, IMAGE_SIZES["wan"], NUM_FRAMES["wan"]) == (8, (16, 32), 5)  # the shared build's
    root = tmp_path_factory.mktemp("cpp-wan22")
    generator = np.random.default_rng(7)
    shape = (2, 5, WAN_CONFIG["text_dim"])
    conditioning = {"prompt_embeds": generator.standard_normal(shape).astype(np.float32),
                    "negative_prompt_embeds": generator.standard_normal(shape).astype(np.float32)}
    conditioning["prompt_embeds"][1, 3:] = 0  # the rows past a prompt, zeroed as the pipeline leaves them
    np.savez(root / "cond.npz", **conditioning)
    return wan22_two_experts_build, ["--conditioning", root / "cond.npz"]


def test_l2c_run_equals_the_python_runtime_on_wan22s_two_experts(cpp_build, wan22_cpp_build, tmp_path):
    """Wan2.2's two experts: every call runs a subset of its expert (its own cache slots, its own weights), the
    second expert's calls guided with --cfg-scale-2 (default --cfg-scale's): l2c-run equals l2c-export run to 1e-5 of
    the range with --full (each expert's full subset) and with a schedule that reuses in both experts, with and
    without --cfg-scale-2; the second scale and the schedule each change the result."""
    engines, request = wan22_cpp_build
    manifest = json.loads((engines / "manifest.json").read_text())
    step_expert = manifest["experts"]["step_expert"]
    assert 0 < step_expert.count(0) < len(step_expert)
    reusing = {record["expert"] for record in manifest["subsets"] if not all(record["compute"])}
    assert reusing == {0, 1}, manifest["subsets"]
    results = {}
    for full, scale_2 in ((True, "2"), (False, "2"), (False, None)):
        options = ("--cfg-scale-2", scale_2) if scale_2 else ()
        assert _compare_request(engines, tmp_path, request, 2, 4.0, full, options=options) <= 1e-5
        results[full, scale_2] = np.load(tmp_path / "cpp.npy")
    assert np.abs(results[False, "2"] - results[False, None]).max() > 1e-4  # the second expert's scale is applied
    assert np.abs(results[True, "2"] - results[False, "2"]).max() > 1e-4  # the schedule reused something


def _first_call_of_second_expert_reuses(data: dict) -> None:
    """The first call of transformer_2 runs one of its subsets that reuses (its compute row to match)."""
    call = data["experts"]["step_expert"].index(1)
    partial = next(r for r in data["subsets"] if r["expert"] == 1 and not all(r["compute"]))
    data["schedule"]["step_subset"][call] = partial["index"]
    data["schedule"]["compute"][call] = partial["compute"]


@pytest.mark.parametrize("change,expected", [
    (_first_call_of_second_expert_reuses, "which reuses sub-layers at the first call of transformer_2; the first "
                                          "call of each expert must compute every sub-layer"),
    (lambda d: d["experts"]["step_expert"].__setitem__(0, 1), "field 'experts/step_expert/0' is 1; the call's "
                                                              "timestep"),
    (lambda d: d["experts"].update(boundary_ratio=1.5), "field 'experts/boundary_ratio' is 1.5; expected a number "
                                                        "in (0, 1)"),
    (lambda d: d["subsets"][0].pop("expert"), "field 'subsets/0/expert' is missing"),
    (lambda d: d["experts"]["models"][1].update(prefix=""), "field 'experts/models' has prefixes ['', '']; expected "
                                                            "the first empty and each different"),
    (lambda d: d["experts"]["models"][1]["config"]["transformer"].update(ffn_dim=32),
     "field 'experts/models/1/config/transformer/ffn_dim' is 32; the graph was built for 24"),
], ids=["first-call-reuses", "step-expert", "boundary-ratio", "subset-expert", "prefixes", "second-config"])
def test_a_bad_experts_record_is_refused(cpp_build, wan22_cpp_build, tmp_path, change, expected):
    """The 'experts' record is checked as strictly as the others: one line naming the manifest and the field, exit 2,
    nothing written (a second expert's config edited after the build: its graphs' stamp)."""
    engines = shutil.copytree(wan22_cpp_build[0], tmp_path / "engines")
    _rewrite_manifest(engines, change)
    line = _refused_request(tmp_path, engines, *wan22_cpp_build[1])
    assert str(engines / "manifest.json") in line and expected in line, line


def test_cfg_scale_2_on_a_build_of_one_transformer_is_refused(cpp_build, default_build, tmp_path):
    """--cfg-scale-2 (the second expert's guidance scale) on a build without experts: one line, exit 2."""
    line = _refused(tmp_path, default_build, "--cfg-scale-2", "2")
    assert "--cfg-scale-2: the build" in line and "has one transformer" in line, line
