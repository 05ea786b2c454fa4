"""The suite's CLI runs (tests/cli_fork.py) behave as a fresh ``python -m l2c_export.cli`` does: the same output, exit
status, files and modes, working folder and environment, and a signal or a lost client ends the command."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from .conftest import REPO, cli_command, run_cli

FRESH = [sys.executable, "-m", "l2c_export.cli"]


def _both(*args: str, env=None):
    """(fresh, forked) results of ``l2c-export ARGS`` run from the repository root; ``env``: variables added."""
    command, variables = cli_command()
    if command[:3] == FRESH:
        pytest.skip("L2C_TEST_FRESH_CLI=1: every command already runs fresh")
    results = []
    for line in (FRESH, command):
        results.append(subprocess.run([*line, *args], capture_output=True, text=True, cwd=REPO,
                                      env={**os.environ, **(env or {}), **variables, "PYTHONUNBUFFERED": "1"}))
    return results


@pytest.mark.parametrize("args", [("--help",), ("build", "--no-such-flag"), ("schedule", "--diffusers", "missing"),
                                  ("schedule", "--schedule", "l2c_export/demo/dit-digits/schedule.json")])
def test_a_forked_run_prints_and_exits_as_a_fresh_one(args):
    fresh, forked = _both(*args)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)


def test_a_forked_run_has_the_clients_folder_environment_and_umask(tmp_path):
    """A relative output path lands in the client's folder, with the modes of its umask; a variable set for the client
    reaches the command (COLUMNS: click wraps its help to it)."""
    rows = {"num_steps": 2, "depth": 6, "compute": [[1] * 12, [1, 0] * 6]}
    (tmp_path / "s.json").write_text(json.dumps(rows))
    for name, folder in (("fresh", tmp_path / "a"), ("forked", tmp_path / "b")):
        folder.mkdir()
    fresh, forked = (subprocess.run([*line, "schedule", "--schedule", "../s.json", "--json", "out.json"],
                                    capture_output=True, text=True, cwd=tmp_path / folder,
                                    env={**os.environ, **cli_command()[1]}, preexec_fn=lambda: os.umask(0o077))
                     for line, folder in ((FRESH, "a"), (cli_command()[0], "b")))
    assert fresh.returncode == forked.returncode == 0, (fresh.stderr, forked.stderr)
    for folder in ("a", "b"):
        written = tmp_path / folder / "out.json"
        assert json.loads(written.read_text())["compute"] == rows["compute"]
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
    narrow, wide = (_both("build", "--help", env={"COLUMNS": columns}) for columns in ("50", "200"))
    assert narrow[0].stdout == narrow[1].stdout != wide[0].stdout == wide[1].stdout


def test_a_signal_to_the_client_ends_the_command_and_a_lost_client_takes_it_along(tmp_path):
    """A command blocked opening a FIFO that no one writes: SIGTERM to the client ends it as it ends a fresh one
    (status -15); SIGKILL to the client (nothing can be relayed) still ends it: the server is left with no process
    of the command's."""
    from . import conftest

    command, variables = cli_command()
    if command[:3] == FRESH:
        pytest.skip("L2C_TEST_FRESH_CLI=1: every command already runs fresh")
    server = conftest._cli_server["server"].pid
    for sent in (signal.SIGTERM, signal.SIGKILL):
        fifo = tmp_path / f"fifo-{sent}"
        os.mkfifo(fifo)
        client = subprocess.Popen([*command, "schedule", "--schedule", str(fifo)], env={**os.environ, **variables},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert _wait(lambda: any(_opening_a_fifo(pid) for pid in _descendants(server))), \
                "the command never reached the FIFO"
            client.send_signal(sent)
            assert client.wait(timeout=30) == -sent
        finally:
            client.kill()  # a failed check leaves no client (and so no command) behind
        assert _wait(lambda: not _descendants(server)), f"the command outlived its client ({signal.Signals(sent).name})"


def _wait(condition, seconds: float = 60) -> bool:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.05)
    return condition()


def _descendants(root: int) -> list[int]:
    """The processes below ``root`` (from /proc/PID/stat's parent ids)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[0] != "Z":  # a zombie is a process that has ended
                parents[int(entry)] = int(fields[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _opening_a_fifo(pid: int) -> bool:
    """Whether process ``pid`` waits in the kernel for a FIFO's other end (its wait channel)."""
    try:
        return open(f"/proc/{pid}/wchan").read() in ("wait_for_partner", "fifo_open")
    except OSError:
        return False


def test_run_cli_reports_a_failed_command_with_its_output(tmp_path):
    with pytest.raises(AssertionError, match=r"failed \(2\)"):
        run_cli("schedule", "--schedule", str(tmp_path / "missing.json"))


PYTHON_CODE = """
import os, sys
import helper_here  # from the working folder: python -c puts it first on sys.path
print(__name__, sys.argv, os.getcwd() == os.environ["WANT_CWD"], helper_here.VALUE)
print("to stderr", file=sys.stderr)
if sys.argv[1] == "raise":
    raise ValueError("raised in the block")
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("argument", ["0", "3", "raise"])
def test_forked_python_code_runs_as_python_c_does(tmp_path, argument):
    """``python -c CODE ARGS`` through the server (the docs' Python blocks, tests/test_docs.py) prints, exits and
    fails as a fresh interpreter does: ``__main__``, its argv, the client's folder (first on sys.path) and
    environment; an uncaught exception ends with its traceback's last line and status 1."""
    from .conftest import python_command

    command, variables = python_command()
    if command == [sys.executable]:
        pytest.skip("L2C_TEST_FRESH_CLI=1: Python code already runs fresh")
    (tmp_path / "helper_here.py").write_text("VALUE = 42\n")
    env = {**os.environ, "WANT_CWD": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    fresh, forked = (subprocess.run([*line, "-c", PYTHON_CODE, argument], capture_output=True, text=True,
                                    cwd=tmp_path, env={**env, **extra})
                     for line, extra in (([sys.executable], {}), (command, variables)))
    assert fresh.stdout == forked.stdout == f"__main__ ['-c', '{argument}'] True 42\n"
    assert (forked.returncode, forked.stderr.splitlines()[-1]) == (fresh.returncode, fresh.stderr.splitlines()[-1])
    assert forked.returncode == {"0": 0, "3": 3, "raise": 1}[argument]
    assert forked.stderr.startswith("to stderr\n")
