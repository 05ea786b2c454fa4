"""A fork server for the tests' CLI runs: each ``l2c-export`` command of the suite runs in a process of its own, forked
from one that has already imported PyTorch, diffusers and transformers.

Why: a fresh ``python -m l2c_export.cli`` that reads a diffusers folder spends 4-7 s of CPU importing diffusers (which
imports every transformer class it has, transformers and scipy.stats with it) before it does anything, and the suite
runs a few hundred commands. What the test sees is unchanged: the client (``python tests/cli_fork.py ARGS...``,
standard library only) is the real subprocess that ``run_cli`` starts, with its own pipes, working folder, environment
and umask; it hands its stdin, stdout and stderr to the server (SCM_RIGHTS), whose fork runs ``l2c_export.cli`` as
``python -m`` would (``runpy``, ``sys.argv``, the client's environment, folder and umask, a fresh numpy seed, torch's
thread count from OMP_NUM_THREADS) and exits with its status, which the client exits with in turn (a death by signal
too); a signal sent to the client (a test's timeout, Ctrl-C) reaches the command, and a client that goes away takes
its command with it.

Not forked: ONNX Runtime is imported by each command, never by the server (it reads ORT_DISABLE_TELEMETRY when it is
imported), and tests about a fresh interpreter (installs, imports, telemetry, peak memory, ``serve``) start
``python -m l2c_export.cli`` themselves. ``L2C_TEST_FRESH_CLI=1`` runs every command of the suite in a fresh
interpreter instead.

Python code too: with ``L2C_TEST_CLI_PYTHON=1``, ``python tests/cli_fork.py -c CODE [ARGS...]`` runs CODE as
``python -c CODE ARGS...`` would (``__main__``, ``sys.argv``, the folder first on ``sys.path``; an uncaught exception
prints its traceback and exits 1), forked the same way (tests/test_docs.py runs the docs' Python blocks so).

Usage: ``L2C_TEST_CLI_SERVE=SOCKET python tests/cli_fork.py`` (the server; it prints "ready" once it listens, and
ends when its stdin closes) and ``L2C_TEST_CLI_SOCKET=SOCKET python tests/cli_fork.py ARGS...`` (one command).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys

SOCKET_ENV = "L2C_TEST_CLI_SOCKET"  # the client's: the server to ask
SERVE_ENV = "L2C_TEST_CLI_SERVE"  # the server's: the socket to listen on
PYTHON_ENV = "L2C_TEST_CLI_PYTHON"  # the client's: "1" runs ``-c CODE ARGS...`` as Python, not l2c-export
_LENGTH = struct.Struct("!I")
_STATUS = struct.Struct("!i")  # the command's exit status, or -N for a death by signal N (as subprocess reports it)
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_REPLACED_STREAMS: list = []


# ----------------------------------------------------------------------------------------------------------- client
def client(args: list[str]) -> None:
    """Runs ``l2c-export ARGS`` through the server named by $L2C_TEST_CLI_SOCKET and exits as the command did."""
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(os.environ[SOCKET_ENV])
    umask = os.umask(0o022)
    os.umask(umask)
    python = os.environ.get(PYTHON_ENV) == "1"
    if python and (args[:1] != ["-c"] or len(args) < 2):
        sys.exit("cli_fork: with L2C_TEST_CLI_PYTHON=1 the arguments are -c CODE [ARGS...]")
    request = json.dumps({"args": args, "python": python, "cwd": os.getcwd(), "env": dict(os.environ),
                          "umask": umask}).encode()
    socket.send_fds(connection, [_LENGTH.pack(len(request))], [0, 1, 2])
    connection.sendall(request)
    for number in _FORWARDED:  # to the command, as if it had been sent to it
        signal.signal(number, lambda number, frame: connection.send(bytes([number])))
    reply = b""
    while len(reply) < _STATUS.size:
        chunk = connection.recv(_STATUS.size - len(reply))
        if not chunk:
            sys.exit("cli_fork: the server closed the connection without the command's status")
        reply += chunk
    (status,) = _STATUS.unpack(reply)
    if status < 0:
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    sys.exit(status)


# ----------------------------------------------------------------------------------------------------------- server
def _preload() -> None:
    """What the commands import, once: PyTorch, diffusers with every model class (importing any one of them imports
    ``diffusers.models.transformers``, which imports all), its schedulers and VAEs, transformers' text encoders,
    onnx, matplotlib, and l2c-export's own modules. Not ONNX Runtime (see the module's docstring)."""
    import importlib
    import pkgutil

    import diffusers
    import matplotlib
    import onnx  # noqa: F401
    import torch  # noqa: F401
    import transformers

    matplotlib.use("Agg")
    for name in ("PixArtTransformer2DModel", "DiTTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel",
                 "SanaTransformer2DModel", "AutoencoderKL", "AutoencoderDC", "DDIMScheduler",
                 "DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler"):
        getattr(diffusers, name)
    for name in ("T5EncoderModel", "CLIPTextModelWithProjection"):
        getattr(transformers, name)
    import l2c_export

    class NoOnnxRuntime:  # a module that imports ONNX Runtime is left to the command: its import fails here
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.partition(".")[0] == "onnxruntime":
                raise ModuleNotFoundError("not in the fork server", name=name)

    sys.meta_path.insert(0, NoOnnxRuntime)
    try:
        for module in pkgutil.walk_packages(l2c_export.__path__, "l2c_export."):
            if not module.name.startswith(("l2c_export.cli.__main__", "l2c_export.serving.triton_model")):
                try:
                    importlib.import_module(module.name)
                except ImportError:
                    pass
    finally:
        sys.meta_path.remove(NoOnnxRuntime)
    assert "onnxruntime" not in sys.modules


def _run_command(request: dict, fds: list[int]) -> None:
    """In the forked process: becomes ``python -m l2c_export.cli ARGS`` with the client's files, folder and environment;
    never returns."""
    import atexit
    import io
    import runpy
    import traceback

    for number in (*_FORWARDED, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own: KeyboardInterrupt
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as a Python process starts: EPIPE, not a death
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # as l2c_export/__init__.py sets it on import
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))

    def stream(fd: int, mode: str, **options):
        raw = io.FileIO(fd, mode, closefd=False)
        if mode == "r":
            return io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8", **options)
        binary = raw if unbuffered else io.BufferedWriter(raw)
        return io.TextIOWrapper(binary, encoding="utf-8", write_through=unbuffered, **options)

    _REPLACED_STREAMS.extend((sys.stdin, sys.stdout, sys.stderr))  # kept: collected, they would close fds 0-2
    sys.stdin = sys.__stdin__ = stream(0, "r")
    sys.stdout = sys.__stdout__ = stream(1, "w", line_buffering=os.isatty(1))
    sys.stderr = sys.__stderr__ = stream(2, "w", errors="backslashreplace", line_buffering=True)
    import numpy
    import torch

    numpy.random.seed()  # a fresh interpreter's global numpy state is its own (`random` reseeds itself at fork)
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else len(os.sched_getaffinity(0)))
    try:
        if request.get("python"):
            _run_python(request["args"][1], request["args"][2:])
        else:
            sys.argv = ["-m", *request["args"]]
            runpy.run_module("l2c_export.cli", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as error:  # as the interpreter turns it into a status
        if error.code is None or isinstance(error.code, int):
            code = error.code or 0
        else:
            print(error.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 (an uncaught exception: the traceback and status 1, as Python ends)
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code & 0xFF)


def _run_python(source: str, args: list[str]) -> None:
    """``python -c SOURCE ARGS...``: SOURCE as the module ``__main__``, the working folder first on ``sys.path``."""
    import types

    sys.argv = ["-c", *args]
    sys.path[0] = ""  # python -c's (the server's is tests/, this file's folder)
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = main
    exec(compile(source, "<string>", "exec"), main.__dict__)


def _serve_one(connection: socket.socket, request: dict, fds: list[int]) -> None:
    """In a forked waiter: forks the command, relays the client's signals to it, sends back its status; never
    returns."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    command = os.fork()
    if command == 0:
        connection.close()
        _run_command(request, fds)
    for fd in fds:
        os.close(fd)
    done = os.pidfd_open(command)
    while True:
        readable, _, _ = select.select([connection, done], [], [])
        if done in readable:
            break
        message = connection.recv(64)
        if not message:  # the client is gone (killed by a timeout): so is its command
            os.kill(command, signal.SIGKILL)
        for number in message:
            os.kill(command, number)
    _, status = os.waitpid(command, 0)
    code = os.waitstatus_to_exitcode(status)
    try:
        connection.sendall(_STATUS.pack(code))
    finally:
        os._exit(0)


def _receive(connection: socket.socket) -> tuple[dict, list[int]]:
    header, fds, _, _ = socket.recv_fds(connection, _LENGTH.size, 3)
    (length,) = _LENGTH.unpack(header)
    body = b""
    while len(body) < length:
        chunk = connection.recv(length - len(body))
        if not chunk:
            raise ConnectionError("the client closed the connection mid-request")
        body += chunk
    return json.loads(body), fds


def serve(path: str) -> None:
    """Listens on the Unix socket ``path`` until stdin closes (the test process that started it is gone)."""
    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the waiters reap themselves
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 1):
            return
        if listener in readable:
            connection, _ = listener.accept()
            try:
                request, fds = _receive(connection)
            except (OSError, ValueError) as error:
                print(f"cli_fork: a bad request: {error}", file=sys.stderr)
                connection.close()
                continue
            if os.fork() == 0:
                listener.close()
                _serve_one(connection, request, fds)
            connection.close()
            for fd in fds:
                os.close(fd)


if __name__ == "__main__":
    if SERVE_ENV in os.environ:  # not an argument: every argument is the command's (`l2c-export serve` is one)
        serve(os.environ.pop(SERVE_ENV))
    else:
        client(sys.argv[1:])
