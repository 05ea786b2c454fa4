"""How many threads torch and ONNX Runtime get when the user names none, from the machine's cores and load.

Measured on the 2-core machine this project runs on (learn: 6 iterations of the embedded digits model; run: the
embedded default's build, 10 digits):

- with other jobs keeping the cores busy (load average 2.6 to 7), torch's default of 2 threads took 482.6 s to learn
  against 50.1 s with 1 thread, and ONNX Runtime's full compute 2.99 s against 1.79 s: a thread of an OpenMP region
  (or of ONNX Runtime's spinning pool) that loses its core to another process holds up every other thread at the
  region's end, for the scheduler's time slices, at every one of the thousands of small operations;
- on the quiet machine the default (all cores) was the faster: 3.3 s against 5.4 s for 6 iterations of the learning
  issue 31 reports (this machine was never quiet while this was written).

So the default is one thread per core not counted busy by the 1-minute load average (:func:`choose_threads`), and
all of them (torch's and ONNX Runtime's own default) when none is. The load average lags: a job that just ended
still counts for a minute, which errs on the side of fewer threads (a thread too few costs at most its share of the
cores, a thread too many on a busy core several times the run), and a job started seconds before is not counted yet.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

# A test hook: a number read instead of the machine's 1-minute load average (/proc/loadavg), so that the tests see
# a quiet machine, or a busy one, whatever the machine running them is doing.
LOADAVG_ENV = "L2C_LOADAVG"


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op threads of torch and ONNX Runtime for a command, and what they were chosen from."""

    threads: int
    source: str  # "--threads", "OMP_NUM_THREADS", or "cores and load average"
    cores: int  # the logical CPUs this process may run on
    load_average: float | None  # the 1-minute load average (None: unreadable here)

    @property
    def busy_cores(self) -> int:
        return busy_cores(self.load_average, self.cores)

    def warning(self) -> str | None:
        """One line for stderr when the load average shows busy cores (None on a quiet machine)."""
        if self.busy_cores == 0:
            return None
        return (f"Warning: the load average is {self.load_average:.2f} on {self.cores} core(s): about "
                f"{self.busy_cores} busy with other work; using {self.threads} thread(s) ({self.source}); speed "
                f"and timings will suffer and vary")

    def record(self) -> dict:
        """For a results JSON: the threads and what the machine's load was when they were chosen."""
        return {"threads": self.threads, "threads_from": self.source, "cores": self.cores,
                "load_average": self.load_average, "busy_cores": self.busy_cores}


def usable_cores() -> int:
    """Logical CPUs this process may run on (its affinity: taskset, a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyperthread siblings counted once): what torch and ONNX
    Runtime each take by default. The logical count where the topology cannot be read."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    try:
        for cpu in cpus:
            topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
    except OSError:
        return usable_cores()
    return max(1, len(cores))


def load_average() -> float | None:
    """The machine's 1-minute load average (runnable threads, averaged), or $L2C_LOADAVG where set (the test hook)."""
    value = os.environ.get(LOADAVG_ENV)
    if value is not None:
        try:
            load = float(value)
        except ValueError:
            load = math.nan
        if not (math.isfinite(load) and load >= 0):
            raise ValueError(f"${LOADAVG_ENV}: {value[:40]!r}; expected a finite number >= 0 (the load average to "
                             f"assume)")
        return load
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def busy_cores(load: float | None, cores: int) -> int:
    """Cores a load average counts busy (runnable threads of other processes, rounded), at most ``cores``."""
    return 0 if load is None else min(cores, int(load + 0.5))


def omp_num_threads() -> int | None:
    """OMP_NUM_THREADS where it is a positive integer (its first level), else None."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def choose_threads(requested: int | None = None) -> ThreadChoice:
    """``requested`` (``--threads``) where given, 0 meaning one per physical core whatever the load (torch's and ONNX
    Runtime's own default, as ``l2c-run --threads 0`` and ``triton --threads 0``); else OMP_NUM_THREADS where set
    (the cap a launcher or the user put on every OpenMP library: torchrun sets 1 per process, the test suite each
    worker's share); else the physical cores on a quiet machine, and on a busy one the cores the load average leaves
    free, at least 1 (see the module's docstring for why)."""
    cores, load = usable_cores(), load_average()
    if requested is not None:
        return ThreadChoice(requested or physical_cores(), "--threads", cores, load)
    if omp_num_threads() is not None:
        return ThreadChoice(omp_num_threads(), "OMP_NUM_THREADS", cores, load)
    # Free logical CPUs, not physical cores: a thread sharing a core with a busy hyperthread sibling runs slower, but
    # one with no CPU to itself is descheduled, and stalls the others (the measurements above).
    free = max(1, min(physical_cores(), cores - busy_cores(load, cores)))
    return ThreadChoice(free, "cores and load average", cores, load)
