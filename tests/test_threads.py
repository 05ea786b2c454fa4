"""--threads and the default thread count (l2c_export/core/threads.py): the count reaches torch and ONNX Runtime's
pool as the commands report them, a busy machine (its load average given by $L2C_LOADAVG, the test hook) gets fewer
threads and one warning line, and run --compare-full reports its warm-up, repeats and spread. No timing is asserted."""

from __future__ import annotations

import re

from l2c_export.core.threads import LOADAVG_ENV, choose_threads, physical_cores, usable_cores

from .conftest import run_cli

SAMPLE = ("sample", "--steps", "2", "--labels", "1", "--full")  # the embedded digits DiT, 2 model calls: ~1 s


def test_the_default_is_every_core_when_quiet_and_the_free_ones_when_busy(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv(LOADAVG_ENV, "0.4")  # under half a core busy: quiet
    quiet = choose_threads()
    assert (quiet.threads, quiet.busy_cores, quiet.warning()) == (physical_cores(), 0, None)
    monkeypatch.setenv(LOADAVG_ENV, str(usable_cores() + 3))  # more runnable threads than cores: every core busy
    busy = choose_threads()
    assert (busy.threads, busy.busy_cores, busy.source) == (1, usable_cores(), "cores and load average")
    assert busy.warning().startswith(f"Warning: the load average is {usable_cores() + 3:.2f} on {usable_cores()} "
                                     f"core(s)")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a launcher's cap (torchrun, the suite's workers) wins
    assert (choose_threads().threads, choose_threads().source) == (3, "OMP_NUM_THREADS")
    assert (choose_threads(5).threads, choose_threads(5).source) == (5, "--threads")
    assert choose_threads(5).warning() is not None  # the load is the machine's, whoever chose the threads
    assert choose_threads(0).threads == physical_cores()  # 0: one per core whatever the load, as l2c-run takes it


def test_threads_reach_torch_and_a_busy_machine_warns_on_one_line(tmp_path):
    chosen = run_cli(*SAMPLE, "--threads", "2", "--out", str(tmp_path / "a.png"))
    assert "(2 thread(s))" in chosen.stdout and "Warning" not in chosen.stderr  # (stderr: the progress bar)
    busy = run_cli(*SAMPLE, "--out", str(tmp_path / "b.png"), env={LOADAVG_ENV: "64", "OMP_NUM_THREADS": None})
    assert "(1 thread(s))" in busy.stdout
    assert busy.stderr.splitlines()[0] == (f"Warning: the load average is 64.00 on {usable_cores()} core(s): about "
                                        f"{usable_cores()} busy with other work; using 1 thread(s) (cores and load "
                                        f"average); speed and timings will suffer and vary")
    assert busy.stderr.count("Warning") == 1
    bad = run_cli(*SAMPLE, "--out", str(tmp_path / "c.png"), env={LOADAVG_ENV: "nan"}, check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == (f"Error: ${LOADAVG_ENV}: 'nan'; expected a finite number "
                                                          f">= 0 (the load average to assume)")
    assert not (tmp_path / "c.png").exists()
    refused = run_cli(*SAMPLE, "--threads", "-1", check=False)
    assert refused.returncode == 2 and "--threads" in refused.stderr and len(refused.stderr.splitlines()) == 1


def test_run_compare_full_times_interleaved_repeats_after_a_warm_up_on_the_threads_asked(default_build):
    result = run_cli("run", str(default_build), "--labels", "1", "--compare-full", "--repeats", "2", "--threads", "1")
    assert "backend onnxruntime on CPUExecutionProvider, 1 thread(s)" in result.stdout  # ONNX Runtime's pool
    line = next(line for line in result.stdout.splitlines() if line.startswith("full compute:"))
    number = r"(\d+\.\d+)"
    seconds = rf"{number} s \[{number}-{number}\]"  # median [min-max]
    match = re.fullmatch(rf"full compute: {seconds}; L2C schedule: {seconds}; speedup {number}x \[{number}-{number}\] "
                         rf"\(ideal {number}x\): medians \[min-max\] of 2 interleaved run\(s\) of each after 1 "
                         r"warm-up run\(s\)", line)
    assert match, line
    full, full_low, full_high, l2c, l2c_low, l2c_high, _, low, high, _ = map(float, match.groups())
    assert full_low <= full <= full_high and l2c_low <= l2c <= l2c_high and low <= high


def test_run_on_torch_uses_the_threads_asked(default_build):
    result = run_cli("run", str(default_build), "--labels", "1", "--backend", "torch", "--threads", "1")
    assert "backend torch on torch-cpu, 1 thread(s)" in result.stdout
