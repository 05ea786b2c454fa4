"""Triton Inference Server: a model repository that serves a build, and the ``tritonserver`` that runs it.

The repository (:func:`write_repository`)::

    REPO/NAME/config.pbtxt      Python backend, max_batch_size B, dynamic batcher, instance_group, parameters
    REPO/NAME/1/model.py        l2c_export/serving/triton_model.py
    REPO/NAME/1/build/          the build (manifest.json and its files), its sha256s checked when the model loads

The server (:class:`TritonServer`) is the real ``tritonserver`` (Triton 2.51) that the PyPI wheel ``nvidia-pytriton``
bundles with its Python backend and one backend stub per Python version; it runs without a GPU. It is started from
a Python environment of its own (``make triton-env`` makes ``.venv-triton``), because the stub needs numpy < 2 (with
numpy 2 its outputs come back empty) while the project's environment keeps numpy 2. What the stub needs, measured:
``python3`` of that environment first on PATH (the embedded interpreter finds its ``sys.prefix`` through it),
``libpython3.x.so`` on the library path, and a backend folder holding the stub of that Python version. Triton
refuses port 0 and, when a port is taken, exits only after loading every model: ports are checked free first.
The server writes nothing outside the model repository but its scratch folder and shared memory, both removed when
it stops (:func:`_scratch_env` says how; tests/test_triton.py checks it with strace).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..core import manifest as manifest_io
from ..core.util import atomic_write_text, check_finite
from .sampling import MAX_CFG_SCALE, input_ranges, served_inputs

MODEL_FILE = Path(__file__).with_name("triton_model.py")
DEFAULT_ENV = Path(".venv-triton")
ENV_VARIABLE = "L2C_TRITON_ENV"
DEFAULT_QUEUE_DELAY_US = 2000
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class ServingError(RuntimeError):
    """A server that cannot be started as asked (repository, ports); the message says what and how to fix it."""


class ServerUnavailable(ServingError):
    """No usable server environment (tritonserver, its stub, numpy < 2, l2c-export) where it was looked for."""


# ------------------------------------------------------------------------------------------------------------------
# The model repository


def default_max_batch_size(manifest: dict) -> int:
    """Images per Triton batch: the build's model batch limit, halved because guidance doubles the batch."""
    return max(1, manifest["batch"]["max"] // 2)


def model_config(manifest: dict, name: str, instances: int = 1, max_batch_size: int | None = None,
                 max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US, device: str | None = None, threads: int = 0):
    """The model's ``config.pbtxt`` as a ``ModelConfig`` message (tritonclient's generated protobuf classes, so a
    misspelt field fails here, not in the server). ``device``: ``cpu`` or ``cuda`` (default: cuda for TensorRT
    builds); ``threads``: ONNX Runtime intra-op threads per instance (0: one per core). The parameter ``input_ranges``
    states the range of every input's values (JSON, by input name), which the model enforces."""
    from tritonclient.grpc import model_config_pb2 as pb

    from ..runtime.pipeline import ModelInterface

    sample_shape = list(ModelInterface.from_manifest(manifest).sample_shape)  # (C, H, W); FLUX.1: packed (T, 4C)
    device = device or ("cuda" if manifest["backend"] == "tensorrt" else "cpu")
    model = pb.ModelConfig(name=name, backend="python",
                           max_batch_size=max_batch_size or default_max_batch_size(manifest))
    triton_types = {"float32": pb.TYPE_FP32, "int64": pb.TYPE_INT64, "bytes": pb.TYPE_STRING}
    for input_name, dtype, dims, optional in served_inputs(manifest):
        if dtype not in triton_types:
            raise manifest_io.ManifestError(f"manifest: field 'model/inputs': input {input_name!r} is {dtype}; "
                                            f"expected one of {', '.join(triton_types)} to serve it")
        model.input.add(name=input_name, data_type=triton_types[dtype], dims=dims, optional=optional)
    model.output.add(name="samples", data_type=pb.TYPE_FP32, dims=sample_shape)
    if manifest["model"]["space"] == "pixel":
        model.output.add(name="images", data_type=pb.TYPE_UINT8, dims=[sample_shape[-1], sample_shape[-1], 3])
    elif "vae_decoder" in manifest.get("components", {}):  # latents decoded by the build's VAE decoder
        _, _, *frame_axes = manifest["components"]["vae_decoder"]["outputs"][0]["shape"]  # (F,) H, W
        # a video model's clips: frames (F, H, W, 3) per request row
        model.output.add(name="frames" if len(frame_axes) == 3 else "images", data_type=pb.TYPE_UINT8,
                         dims=[*frame_axes, 3])
    model.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.KIND_GPU if device == "cuda"
                             else pb.ModelInstanceGroup.KIND_CPU)
    model.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    model.parameters["backend"].string_value = manifest["backend"]
    model.parameters["threads"].string_value = str(threads)
    model.parameters["input_ranges"].string_value = json.dumps(input_ranges(manifest))
    return model


def write_repository(build_dir: str | Path, repo: str | Path, name: str = "l2c", instances: int = 1,
                     max_batch_size: int | None = None, max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                     device: str | None = None, threads: int = 0) -> Path:
    """Writes ``repo/name`` serving the build in ``build_dir`` (checked against its manifest first) and returns it.

    Atomic: everything goes into a staging folder beside ``repo`` (outside it, so a server polling the repository
    never sees it), which then replaces ``repo/name`` with renames; other models in ``repo`` are left alone.
    """
    from google.protobuf import text_format

    from ..core.util import replace_folder  # the builds' atomic folder exchange, one definition

    build_dir, repo = Path(build_dir), Path(repo)
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r}: expected letters, digits, '_', '.' or '-'")
    for option, value, low in (("instances", instances, 1), ("max_batch_size", max_batch_size or 1, 1),
                               ("max_queue_delay_us", max_queue_delay_us, 0), ("threads", threads, 0)):
        if not low <= value <= 2 ** 31 - 1:
            raise ValueError(f"{option} is {value}; expected an integer >= {low}")
    if not build_dir.is_dir():
        raise ValueError(f"{build_dir}: no such folder; expected an l2c-export build (a folder with manifest.json)")
    manifest = manifest_io.load(build_dir, verify_files=True)
    check_finite(manifest["guidance"]["cfg_scale"], f"{build_dir / manifest_io.MANIFEST_NAME}: guidance.cfg_scale "
                 f"(the served default)", 1.0, MAX_CFG_SCALE)
    _check_replaceable(repo / name)
    config = model_config(manifest, name, instances, max_batch_size, max_queue_delay_us, device, threads)
    repo.mkdir(parents=True, exist_ok=True)
    staging = repo.parent / f".{repo.name}.{name}.staging"
    if staging.exists():
        shutil.rmtree(staging)  # left by a write that was killed
    try:
        version = staging / "1"
        (version / "build").mkdir(parents=True)
        where = str(build_dir / manifest_io.MANIFEST_NAME)
        for file in [manifest_io.MANIFEST_NAME] + [entry["file"] for entry in manifest_io.all_files(manifest)]:
            target = version / "build" / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(manifest_io.file_path(build_dir, file, where), target)
        shutil.copy2(MODEL_FILE, version / "model.py")
        atomic_write_text(staging / "config.pbtxt", text_format.MessageToString(config))
        replace_folder(staging, repo / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return repo / name


def _check_replaceable(model: Path) -> None:
    """Nothing lost: an existing ``model`` folder is replaced only if it is a model this function's writer made
    (config.pbtxt and version 1 holding model.py and build/, plus the __pycache__ the Python backend may leave)."""
    if not model.exists() and not model.is_symlink():
        return
    expected = {model / "config.pbtxt", model / "1"}
    version = {model / "1" / name for name in ("model.py", "build", "__pycache__")}
    ours = (model.is_dir() and not model.is_symlink() and set(model.iterdir()) <= expected
            and (model / "1").is_dir() and set((model / "1").iterdir()) <= version
            and (model / "1" / "build" / manifest_io.MANIFEST_NAME).is_file())
    if not ours:
        raise ValueError(f"{model}: exists and is not a model written by l2c-export triton; refusing to replace it "
                         f"(remove it, or choose another --name or --repo)")


# ------------------------------------------------------------------------------------------------------------------
# The server


@dataclass
class ServerEnvironment:
    """Where the bundled ``tritonserver`` and the Python its stub embeds live, probed from the environment's python."""

    prefix: Path  # the environment (a venv)
    python_version: str  # "3.11"
    libpython_dir: Path  # holds libpython3.x.so
    pytriton_dir: Path  # the installed pytriton package

    @property
    def binary(self) -> Path:
        return self.pytriton_dir / "tritonserver" / "bin" / "tritonserver"

    @property
    def libraries(self) -> Path:
        return self.pytriton_dir.parent / "nvidia_pytriton.libs"

    @property
    def python_backend(self) -> Path:
        return self.pytriton_dir / "tritonserver" / "backends" / "python"

    @property
    def stub(self) -> Path:
        return (self.pytriton_dir / "tritonserver" / "python_backend_stubs" / self.python_version
                / "triton_python_backend_stub")


_PROBE = """
import json, pathlib, sys, sysconfig
try:
    import numpy, pytriton
    import l2c_export.serving.sampling
except ImportError as error:
    print(json.dumps({"missing": str(error)})); sys.exit()
print(json.dumps({"numpy": numpy.__version__, "version": "%d.%d" % sys.version_info[:2],
                  "libdir": sysconfig.get_config_var("LIBDIR"), "pytriton": str(pathlib.Path(pytriton.__file__).parent)}))
"""


def server_environment(env: str | Path | None = None) -> ServerEnvironment:
    """The server's Python environment: ``env``, else ``$L2C_TRITON_ENV``, else ``.venv-triton`` here."""
    prefix = Path(env or os.environ.get(ENV_VARIABLE) or DEFAULT_ENV).absolute()
    hint = "make triton-env creates .venv-triton; or point --env / $L2C_TRITON_ENV at one"
    python = prefix / "bin" / "python3"
    if not python.is_file():
        raise ServerUnavailable(f"{prefix}: no Triton server environment there (no bin/python3); {hint}")
    probe = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, env=_clean_env())
    try:
        facts = json.loads(probe.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise ServerUnavailable(f"{python}: could not be probed ({probe.stderr.strip()[-300:]}); {hint}") from None
    if "missing" in facts:
        raise ServerUnavailable(f"{prefix}: {facts['missing']}; the environment needs nvidia-pytriton, numpy<2 and "
                           f"l2c-export; {hint}")
    if int(facts["numpy"].split(".")[0]) >= 2:
        raise ServerUnavailable(f"{prefix}: numpy {facts['numpy']}; the Triton Python backend stub needs numpy < 2 "
                           f"(with numpy 2 its outputs come back empty)")
    found = ServerEnvironment(prefix, facts["version"], Path(facts["libdir"]), Path(facts["pytriton"]))
    for path in (found.binary, found.stub, found.python_backend / "libtriton_python.so", found.libraries):
        if not path.exists():
            raise ServerUnavailable(f"{path} is missing: nvidia-pytriton in {prefix} has no tritonserver for Python "
                               f"{found.python_version} there")
    return found


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (Triton refuses port 0, so the caller picks one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_port_free(port: int, option: str) -> None:
    if not 1 <= port <= 65535:
        raise ServingError(f"{option} is {port}; expected a port in 1..65535 (Triton refuses port 0)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ServingError(f"{option} {port}: the port is in use on 127.0.0.1; choose another") from None


def _scratch_env(work: Path) -> dict[str, str]:
    """What keeps the server's writes inside the model repository and ``work`` (its scratch folder, removed by
    :meth:`TritonServer.stop`), measured with strace: DCGM (GPU metrics) logs to /var/log/nv-hostengine.log unless
    ``__DCGM_DBG_FILE`` says otherwise, ONNX Runtime keeps a telemetry database under ~/.cache/Microsoft unless
    ``ORT_DISABLE_TELEMETRY`` is set, and temporary files go to ``TMPDIR``. (The stub's interpreter ignores
    PYTHONDONTWRITEBYTECODE: the model turns bytecode writing off itself.)"""
    (work / "tmp").mkdir(exist_ok=True)
    return {"__DCGM_DBG_FILE": str(work / "nv-hostengine.log"), "ORT_DISABLE_TELEMETRY": "1",
            "TMPDIR": str(work / "tmp")}


def _clean_env() -> dict[str, str]:
    """This process's environment without what would point a Python at the project's own environment."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


class TritonServer:
    """The bundled ``tritonserver`` on ``repository``, on 127.0.0.1, in a process group of its own (its backend
    stubs included) so that :meth:`stop` ends all of it. Use as a context manager, or ``start()`` / ``stop()``::

        with TritonServer("repo", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()) as server:
            tritonclient.http.InferenceServerClient(server.http_url) ...
    """

    def __init__(self, repository: str | Path, env: str | Path | None = None, http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, log: str | Path | None = None):
        self.repository = Path(repository).absolute()
        self.env = server_environment(env)
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.log = None if log is None else Path(log)
        self.process: subprocess.Popen | None = None
        self._work: Path | None = None
        self._shm_prefix = f"l2c-triton-{os.getpid()}-{os.urandom(4).hex()}-"
        self._python_envs: set[Path] = set()

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    def command(self) -> list[str]:
        backends = self._work / "backends"
        return [str(self.env.binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
                "--model-control-mode=explicit", "--load-model=*", "--exit-on-error=false",
                "--strict-readiness=false", "--exit-timeout-secs=5", "--log-verbose=0",
                # gRPC request objects kept for reuse keep the capacity of the largest request they held: with the
                # default pool of 8, a burst of 64 MB requests left ~700 MB resident; with none, ~100-250 MB
                "--grpc-infer-allocation-pool-size=0",
                f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
                *(f"--{kind}-address=127.0.0.1" for kind in self.ports),
                *(f"--{kind}-port={port}" for kind, port in self.ports.items())]

    def start(self, timeout: float = 180.0) -> "TritonServer":
        """Starts the server and waits until it answers and has tried loading every model."""
        if not (self.repository.is_dir()):
            raise ServingError(f"{self.repository}: no such model repository (l2c-export triton writes one)")
        for kind, port in self.ports.items():
            _check_port_free(port, f"--{kind}-port")
        if len(set(self.ports.values())) < len(self.ports):
            raise ServingError(f"ports {self.ports} must differ")
        self._work = Path(tempfile.mkdtemp(prefix="l2c-triton-"))
        # The backend folder Triton is given: the Python backend and the stub of the environment's Python version.
        backend = self._work / "backends" / "python"
        backend.mkdir(parents=True)
        for file in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(self.env.python_backend / file, backend / file)
        shutil.copy2(self.env.stub, backend / "triton_python_backend_stub")
        env = _clean_env()
        env["PATH"] = f"{self.env.prefix / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(self.env.libraries), str(self.env.libpython_dir),
                                                        env.get("LD_LIBRARY_PATH")]))
        env.update(_scratch_env(self._work))
        output = subprocess.DEVNULL
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            output = open(self.log, "wb")
        envs_before = set(_python_env_folders())
        try:
            self.process = subprocess.Popen(self.command(), env=env, stdout=None if self.log is None else output,
                                            stderr=subprocess.STDOUT if self.log is not None else None,
                                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=self._work)
        finally:
            if self.log is not None:
                output.close()
        ready = False
        try:
            self._wait_ready(timeout)
            ready = True
        finally:
            self._python_envs = set(_python_env_folders()) - envs_before
            if not ready:
                self.stop()
        return self

    def _wait_ready(self, timeout: float) -> None:
        import tritonclient.http as httpclient

        deadline = time.monotonic() + timeout
        client = httpclient.InferenceServerClient(self.http_url)
        try:
            while True:
                if self.process.poll() is not None:
                    raise ServingError(f"tritonserver exited with code {self.process.returncode} before it was "
                                       f"ready{self._log_tail()}")
                try:
                    if client.is_server_live():
                        return
                except Exception:  # noqa: BLE001 - not listening yet
                    pass
                if time.monotonic() > deadline:
                    raise ServingError(f"tritonserver was not ready after {timeout:.0f} s{self._log_tail()}")
                time.sleep(0.2)
        finally:
            client.close()

    def _log_tail(self, lines: int = 30) -> str:
        if self.log is None or not self.log.is_file():
            return ""
        return "; its log ends:\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def model_states(self) -> dict[str, tuple[str, str]]:
        """Every model of the repository: name -> (state, reason), as Triton's repository index says."""
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.http_url)
        try:
            return {m["name"]: (m.get("state", "UNKNOWN"), m.get("reason", ""))
                    for m in client.get_model_repository_index()}
        finally:
            client.close()

    def wait(self) -> int:
        return self.process.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group (Triton unloads its models and ends the stubs), SIGKILL after
        ``timeout``; then the shared-memory regions and the backend folder are removed."""
        process, self.process = self.process, None
        if process is not None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process.pid, signal.SIGKILL)  # stubs that outlived the server, or a server that hung
            process.wait()
        for region in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            region.unlink(missing_ok=True)
        for folder in self._python_envs:  # left when the server's exit timed out (see _python_env_folders)
            try:
                folder.rmdir()
            except OSError:
                pass  # removed by the server itself, or not empty: not the backend's empty folder
        self._python_envs = set()
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _python_env_folders() -> list[Path]:
    """The empty folders ``/tmp/python_env_XXXXXX`` that Triton's Python backend makes when it starts (the path is
    fixed in the backend) and removes when the server exits cleanly. A server whose exit times out (Triton 2.51
    waits up to --exit-timeout-secs for clients' open HTTP connections to close, then exits at once) leaves its
    folder: :meth:`TritonServer.stop` removes the ones that appeared while its server started."""
    return list(Path("/tmp").glob("python_env_??????"))


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


class _Stop(Exception):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""


def serve_forever(repository: str | Path, env: str | Path | None = None, http_port: int = 8000,
                  grpc_port: int = 8001, metrics_port: int = 8002, echo=print) -> int:
    """``l2c-export serve``: runs the server (its log on this terminal) until Ctrl-C or SIGTERM, then stops it and
    its stubs. Returns the exit code: 0 when stopped, the server's when it ended by itself."""
    def on_sigterm(signum, frame):
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    server = TritonServer(repository, env, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    try:
        server.start()
        states = server.model_states()
        for name, (state, reason) in sorted(states.items()):
            echo(f"model {name}: {state}" + (f": {reason}" if reason else ""))
        if not any(state == "READY" for state, _ in states.values()):
            raise ServingError(f"{server.repository}: no model is ready (the reasons are above)")
        echo(f"ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url} "
             f"(Ctrl-C stops)")
        code = server.wait()
        echo(f"tritonserver exited by itself with code {code}")
        return code or 1
    except (KeyboardInterrupt, _Stop):
        echo("stopping tritonserver ...")
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
