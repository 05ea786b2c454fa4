"""Shared fixtures: tiny DiT configs, the authors' router file from ../shared (skipped where absent); the tiers.

Tiers (pytest.ini registers the markers): a test's tier follows from the fixtures it uses, never from a list kept by
hand. A test that uses ``triton_env`` (a real tritonserver, .venv-triton) is marked ``triton``; one that uses
``cpp_build`` (the compiled runtime, ``make cpp``), ``cpp``; a heavy round trip (a build, learn or eval through the
CLI taking tens of seconds) carries ``@pytest.mark.slow`` where it is written; every other test is ``fast``.
``make test-fast`` runs ``-m fast``; ``make test`` runs every tier, on pytest-xdist workers (``-n``): each worker
then gets its share of the cores for torch and ONNX Runtime (OMP_NUM_THREADS, which its CLI subprocesses inherit),
and the tests of one module run on one worker (``--dist loadfile``), sharing its module-scoped builds; the modules
with Triton tests all on one worker: one server at a time, so a test that checks what a stopped server left in /tmp
and /dev/shm sees no other server's files. The builds that several modules use (the embedded default's, the digits
U-ViT's, t2i-digits', ...) are made once for the whole run, by whichever worker asks first (:func:`made_once`).
"""

from __future__ import annotations

import collections
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2c_export.models.dit.model import DiT, DiTConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
AUTHORS_ROUTER = SHARED / "data" / "official-l2c" / "DDIM20_router.pt"

TIER_FIXTURES = {"triton_env": "triton", "cpp_build": "cpp"}  # fixture -> the tier of every test using it


def pytest_configure(config) -> None:
    """Under pytest-xdist, each worker's share of the cores: torch's threads here, and OMP_NUM_THREADS for the CLI
    subprocesses (torch's threads) and ONNX Runtime's global pool in and out of process (runtime/backends).
    Whatever the machine's load, the suite's commands see a quiet machine ($L2C_LOADAVG, l2c_export/core/threads.py):
    no load warning among the stderr lines the tests count; the tests of the warning set a load of their own."""
    from l2c_export.core.threads import LOADAVG_ENV

    os.environ.setdefault(LOADAVG_ENV, "0")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


HEAVY_TEST_WEIGHT = 10  # a slow, Triton or C++ test against a fast one (tens of seconds against a few), in ordering


@functools.lru_cache(maxsize=None)
def worker_group(module: str) -> str:
    """The pytest-xdist work unit of the tests in ``module`` (a path from the repository root): the module (whose
    module-scoped builds they share), or "triton" for every module that defines or imports the fixture triton_env."""
    source = (REPO / module).read_text()
    return "triton" if re.search(r"^def triton_env\(|^from .+ import .*\btriton_env\b", source, re.M) else module


@pytest.hookimpl(tryfirst=True)  # before -m selects by tier
def pytest_collection_modifyitems(config, items) -> None:
    """Marks every test with its tier (see the module's docstring); runs the groups of :func:`worker_group`
    heaviest first, each in file order."""
    for item in items:
        tiers = [tier for fixture, tier in TIER_FIXTURES.items() if fixture in getattr(item, "fixturenames", ())]
        for tier in tiers:
            item.add_marker(tier)
        if not tiers and item.get_closest_marker("slow") is None:
            item.add_marker("fast")
    groups = {item.nodeid: worker_group(item.nodeid.split("::")[0]) for item in items}
    size: collections.Counter[str] = collections.Counter()
    for item in items:
        size[groups[item.nodeid]] += 1 if item.get_closest_marker("fast") else HEAVY_TEST_WEIGHT
    # The larger groups first (a Triton, C++ or slow test counts as several fast ones), whatever their tier:
    # pytest-xdist hands a worker its next group while it runs one, so the small groups left at the end keep the other
    # worker from idling behind a large one. (By tier first, or by test count as pytest-xdist orders them, a few long
    # tests of small modules, test_docs.py's walk among them, came last; by weight alone both workers ended within a
    # second of each other in a simulation on the suite's recorded durations.)
    items.sort(key=lambda item: -size[groups[item.nodeid]])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with :func:`worker_group` as its unit: a module's tests on one worker, the Triton
    modules' all on one; the units handed out in the order :func:`pytest_collection_modifyitems` gives them (not
    pytest-xdist's own, by test count, which left the few long tests of the smallest modules to the end)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False

    class GroupScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(super()._split_scope(nodeid))

    return GroupScheduling(config, log)


TINY = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10)


@pytest.fixture
def tiny_model() -> DiT:
    """A 3-block latent-style DiT with random (non-zero) weights everywhere, gates included."""
    torch.manual_seed(0)
    model = DiT(TINY).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0.0, 0.2)
    return model


def run_temp(tmp_path_factory) -> Path:
    """This run's temporary folder, shared by its pytest-xdist workers (each worker's own is a folder in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def made_once(tmp_path_factory, name: str, make) -> Path:
    """The folder ``<run's temporary folder>/name``, filled by ``make(folder)`` once for the whole run: the first
    pytest-xdist worker (or module) to ask makes it under a lock while the others wait, then all use it. Tests never
    change what is in it (they work on a copy)."""
    import fcntl

    shared = run_temp(tmp_path_factory)
    folder = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / f"{name}.made").is_file():  # one that failed half-way is made again
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            (shared / f"{name}.made").touch()
    return folder


@pytest.fixture(scope="session")
def default_build(tmp_path_factory) -> Path:
    """The embedded default (pixel digits, DDIM 20) with its own schedule, built once for ONNX Runtime (fp32) for
    every worker (:func:`made_once`). Tests that change a build work on a copy."""
    from l2c_export.builder.build import BuildRequest, build
    from l2c_export.models.zoo import embedded_default

    spec = embedded_default()
    return made_once(tmp_path_factory, "default-build", lambda folder: build(
        BuildRequest(spec=spec, schedule=spec.schedule(), sampler=spec.sampler(), out_dir=folder / "engines"),
        progress=False)) / "engines"


@pytest.fixture(scope="session")
def uvit_digits_build(tmp_path_factory) -> Path:
    """``l2c-export build --model uvit-digits``: the embedded digits U-ViT with its own DPM-Solver-2S schedule, built
    once for every worker (:func:`made_once`). Tests that change a build work on a copy."""
    def make(folder: Path) -> None:
        run_cli("build", "--model", "uvit-digits", "--out", str(folder / "engines"))

    return made_once(tmp_path_factory, "uvit-digits-build", make) / "engines"


@pytest.fixture(scope="session")
def t2i_digits_build(tmp_path_factory) -> Path:
    """``l2c-export build --model t2i-digits`` (the shipped learned schedule, with the T5, tokenizer and VAE decoder
    graphs), built once for every worker (:func:`made_once`). Tests that change a build work on a copy."""
    def make(folder: Path) -> None:
        run_cli("build", "--model", "t2i-digits", "--out", str(folder / "engines"))

    return made_once(tmp_path_factory, "t2i-digits-build", make) / "engines"


@pytest.fixture(scope="session")
def wan22_two_experts_build(tiny_diffusers, tmp_path_factory) -> Path:
    """The tiny two-expert Wan2.2 folder (no VAE) at 8 steps, 5 frames of 16 x 32 px (latents (4, 2, 2, 4)), over a
    schedule that reuses in both experts (tests/diffusers_pipelines.py's build_two_experts), built once for every
    worker (:func:`made_once`). Tests that change a build work on a copy."""
    from .diffusers_pipelines import build_two_experts

    def make(folder: Path) -> None:
        build_two_experts(tiny_diffusers("wan22", "unipc"), folder / "engines", 8, (16, 32), 5)

    return made_once(tmp_path_factory, "wan22-two-experts-build", make) / "engines"


@pytest.fixture
def authors_router() -> Path:
    if not AUTHORS_ROUTER.is_file():
        pytest.skip(f"the authors' router file is not here ({AUTHORS_ROUTER}): ../shared is absent")
    return AUTHORS_ROUTER


def restamp_graphs(folder: Path, data: dict) -> None:
    """Stamps every subset graph of build ``folder`` with the fields of manifest ``data`` (edited by a test) and fixes
    up the graphs' sha256 and sizes in ``data``: an edit made as a hostile user with the tools would make it."""
    import onnx

    from l2c_export.core import manifest as manifest_io

    stamp = manifest_io.graph_stamp({"model/config": data["model"]["config"],
                                     "guidance/null_class": data["guidance"].get("null_class")})
    for record in data["subsets"]:
        path = folder / record["graph"]["file"]
        graph = onnx.load(path, load_external_data=False)
        onnx.helper.set_model_props(graph, {manifest_io.GRAPH_STAMP_KEY: stamp})
        onnx.save_model(graph, str(path))
        record["graph"] = record["engine"] = manifest_io.file_entry(folder, record["graph"]["file"],
                                                                    record["graph"]["key"])


def ort_session(path: Path):
    """A plain ONNX Runtime CPU session that can live in a process where the runtime already runs: the first
    ``OnnxRuntimeBackend`` of a process sets up ONNX Runtime's global thread pool, after which a session with threads
    of its own is refused (``use_per_session_threads must be false``), whatever test ran first."""
    import onnxruntime as ort

    from l2c_export.runtime.backends.onnxruntime import _set_up_environment

    _set_up_environment(None)
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


CI_VARIABLES = ("CI", "CONTINUOUS_INTEGRATION", "GITHUB_ACTIONS", "GITLAB_CI", "TF_BUILD", "BUILD_BUILDID", "JENKINS_URL",
                "TEAMCITY_VERSION", "TRAVIS", "CIRCLECI", "BUILDKITE", "CODEBUILD_BUILD_ID")


def telemetry_home(home: Path, setting: str | None) -> tuple[dict[str, str], Path]:
    """An environment whose home and cache folder are ``home`` (fresh), ORT_DISABLE_TELEMETRY set to ``setting`` (None:
    unset), and the telemetry database ONNX Runtime makes there when its telemetry is on
    ($XDG_CACHE_HOME/Microsoft/DeveloperTools/.onnxruntime/onnxruntime.db)."""
    home.mkdir()
    # ONNX Runtime also keeps its telemetry off where a CI variable is set (CI=true, as .ci/run runs): unset here, so
    # that the control run with ORT_DISABLE_TELEMETRY=0 shows the database appearing.
    env = {key: value for key, value in os.environ.items() if key not in ("ORT_DISABLE_TELEMETRY", *CI_VARIABLES)}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), PYTHONUNBUFFERED="1")
    if setting is not None:
        env["ORT_DISABLE_TELEMETRY"] = setting
    return env, home / ".cache" / "Microsoft" / "DeveloperTools" / ".onnxruntime" / "onnxruntime.db"


CLI_FORK = Path(__file__).with_name("cli_fork.py")
_cli_server: dict[str, object] = {}


def cli_command() -> tuple[list[str], dict[str, str]]:
    """The command line that runs ``l2c-export`` in this test process, and the variables it needs: a client of the
    fork server (tests/cli_fork.py: a process of its own for each command, without the 4-7 s of imports), started on
    first use, or ``python -m l2c_export.cli`` where L2C_TEST_FRESH_CLI=1."""
    if os.environ.get("L2C_TEST_FRESH_CLI") == "1":
        return [sys.executable, "-m", "l2c_export.cli"], {}
    if "socket" not in _cli_server:
        import atexit
        import tempfile

        folder = tempfile.mkdtemp(prefix="l2c-cli-")
        path = os.path.join(folder, "socket")
        server = subprocess.Popen([sys.executable, str(CLI_FORK)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO), "L2C_TEST_CLI_SERVE": path})
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the CLI fork server did not start ({server.wait()})")

        def stop() -> None:
            server.stdin.close()  # the server ends when its stdin closes
            server.wait(timeout=30)
            shutil.rmtree(folder, ignore_errors=True)

        atexit.register(stop)
        _cli_server.update(socket=path, server=server)
    return [sys.executable, str(CLI_FORK)], {"L2C_TEST_CLI_SOCKET": str(_cli_server["socket"])}


def python_command() -> tuple[list[str], dict[str, str]]:
    """As :func:`cli_command`, for ``python -c CODE``: the fork server runs the code (its imports already done), or a
    fresh interpreter where L2C_TEST_FRESH_CLI=1."""
    command, variables = cli_command()
    return (command, {**variables, "L2C_TEST_CLI_PYTHON": "1"}) if variables else ([sys.executable], variables)


def run_cli(*args: str, check: bool = True, cwd: Path | None = None,
            env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """Runs ``l2c-export`` in a real subprocess (:func:`cli_command`), in this process's environment with ``env``'s
    variables set (None: removed)."""
    command, variables = cli_command()
    env = {name: value for name, value in {**os.environ, "PYTHONUNBUFFERED": "1", **variables, **(env or {})}.items()
           if value is not None}
    result = subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=cwd or REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"l2c-export {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n"
                             f"{result.stderr}")
    return result


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory):
    """``tiny_diffusers(family, scheduler)``: a tiny random diffusers pipeline folder ("dit" or "pixart"; "ddim" or
    "dpm"), saved once per session with ``save_pretrained`` (tests/diffusers_pipelines.py)."""
    from .diffusers_pipelines import save_tiny_pipeline

    folders: dict[tuple[str, str], Path] = {}

    def folder(family: str, scheduler: str = "ddim") -> Path:
        if (family, scheduler) not in folders:
            root = tmp_path_factory.mktemp(f"{family}-{scheduler}")
            folders[(family, scheduler)] = save_tiny_pipeline(root / "pipeline", family, scheduler)
        return folders[(family, scheduler)]

    return folder
