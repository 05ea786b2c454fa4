"""``l2c-export bench``: full compute against the schedule on the same engines, machine and batch, interleaved.

Per backend: one warm-up run of each, then ``repeats`` pairs (full, schedule) alternating (:func:`interleaved_runs`),
medians of each, and their spread: the fastest and slowest run, and the lowest and highest speedup of a pair. Builds of
one model measured together (``bench DIR_FP32 DIR_INT8``) are interleaved in the same loop, and every row also gets
its speedups against the fp32 build's full compute of that same run. Memory is
measured in a fresh subprocess per configuration, as the growth of the resident set from loading the engines and
running each once (the Python, numpy and ONNX Runtime imports come before the baseline).

Every request is the manifest's conditioning inputs filled in by kind (:func:`bench_request`): class labels 0, 1, ...
for a label model; for a text model seeded random arrays, token inputs of ``prompt_tokens`` tokens, by default the
length the build's MACs (and so the ideal speedup) are counted at (:func:`macs_prompt_tokens`: Wan's and FLUX.1's
512, PixArt-α's 120).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..core import manifest as manifest_io
from ..models.diffusers.pixart import MACS_PROMPT_TOKENS


@dataclass
class BenchResult:
    model: str
    backend: str
    precision: str  # the build's (manifest) precision
    providers: list[str]
    batch: int  # images; the model batch is twice this with guidance
    full_seconds: float
    schedule_seconds: float
    speedup: float
    ideal_speedup: float
    speedup_of_ideal: float
    step_overhead_fraction: float
    memory_all_engines_bytes: int | None
    memory_full_engine_bytes: int | None
    model_weights_bytes: int
    num_subsets: int
    repeats: int
    fp32_full_seconds: float | None = None  # the fp32 build's full compute in the same run (None: none measured)
    full_speedup_vs_fp32: float | None = None  # fp32 full / this build's full
    schedule_speedup_vs_fp32: float | None = None  # fp32 full / this build's schedule
    schedule_of_target: float | None = None  # schedule_speedup_vs_fp32 / (full_speedup_vs_fp32 x ideal_speedup)
    # The C++ runtime (cpp/, built by `make cpp`) on the same build: onnxruntime builds only, None where not built.
    cpp_memory_all_engines_bytes: int | None = None
    cpp_memory_full_engine_bytes: int | None = None
    warmup_runs: int = 1  # untimed runs of each before the timed ones
    # The spread of the ``repeats`` timed runs: the fastest and slowest of each, and the lowest and highest speedup of
    # one interleaved (full, schedule) pair.
    full_seconds_min: float | None = None
    full_seconds_max: float | None = None
    schedule_seconds_min: float | None = None
    schedule_seconds_max: float | None = None
    speedup_min: float | None = None
    speedup_max: float | None = None
    threads: int | None = None  # the backend's intra-op threads (onnxruntime: its pool, 0 = one per core)
    prompt_tokens: int | None = None  # a text model's requests' prompt length (None: a label model)


def benchmark(folder: str | Path, backend: str = "onnxruntime", batch: int = 2, repeats: int = 5,
              measure_memory: bool = True, threads: int | None = None,
              prompt_tokens: int | None = None) -> BenchResult:
    return benchmark_together([folder], backend, batch, repeats, measure_memory, threads, prompt_tokens)[0]


def macs_prompt_tokens(manifest: dict) -> int:
    """The prompt length a build's MACs and ideal speedup are counted at (``macs/prompt_tokens``; a build written
    before it was recorded: PixArt-α's 120, the length then benchmarked)."""
    return manifest["macs"].get("prompt_tokens", MACS_PROMPT_TOKENS)


def bench_request(manifest: dict, batch: int, prompt_tokens: int | None = None) -> dict:
    """The keyword arguments of a benchmark request of ``batch`` samples, sampled as one batch whatever the build's
    batch range: labels, or prompt embeddings of ``prompt_tokens`` tokens (default :func:`macs_prompt_tokens`)
    (:func:`l2c_export.runtime.conditioning.example_conditioning`)."""
    from ..runtime.conditioning import example_conditioning

    tokens = prompt_tokens or macs_prompt_tokens(manifest)
    return {**example_conditioning(manifest, batch, prompt_tokens=tokens), "batch_size": batch}


def benchmark_together(folders: list[str | Path], backend: str = "onnxruntime", batch: int = 2, repeats: int = 5,
                       measure_memory: bool = True, threads: int | None = None,
                       prompt_tokens: int | None = None) -> list[BenchResult]:
    """One row per build, all measured in one interleaved loop (each repeat runs every build's full compute and
    schedule in turn), so that ratios between builds (int8 against fp32) share the machine's load; a text model's
    requests ``prompt_tokens`` long (default each build's :func:`macs_prompt_tokens`)."""
    from ..runtime.conditioning import takes_labels
    from ..runtime.pipeline import L2CPipeline

    folders = [Path(folder) for folder in folders]
    options = {"threads": threads} if backend == "onnxruntime" and threads else {}
    pipes = [L2CPipeline.from_engine_dir(folder, backend=backend, **options) for folder in folders]
    tokens = [prompt_tokens or macs_prompt_tokens(pipe.manifest) for pipe in pipes]
    requests = [bench_request(pipe.manifest, batch, length) for pipe, length in zip(pipes, tokens)]
    calls = [call for pipe, request in zip(pipes, requests)
             for call in (functools.partial(pipe, **request, full=True), functools.partial(pipe, **request))]
    runs = interleaved_runs(calls, repeats)
    results = []
    for i, (folder, pipe) in enumerate(zip(folders, pipes)):
        full, scheduled = runs[2 * i], runs[2 * i + 1]
        (full_seconds, full_min, full_max), (schedule_seconds, schedule_min, schedule_max), (_, low, high) = \
            timing_summary(full, scheduled)
        data = pipe.manifest
        memory_all = memory_full = cpp_all = cpp_full = None
        if measure_memory:
            memory_all = measure_engine_memory(folder, backend, batch, "all", tokens[i])
            memory_full = measure_engine_memory(folder, backend, batch, "full", tokens[i])
            # The C++ runtime reads fp32 and fp16 builds (not yet int8's quantization records); its memory probe
            # feeds class labels (a text model's prompts: not yet).
            if backend == "onnxruntime" and data["precision"] in ("fp32", "fp16") and CPP_MEMORY_PROBE.is_file() \
                    and takes_labels(data):
                cpp_all, cpp_full = (measure_cpp_engine_memory(folder, batch, which) for which in ("all", "full"))
        ideal = data["macs"]["ideal_speedup"]
        results.append(BenchResult(model=data["name"], backend=backend, precision=data["precision"],
                                   providers=pipe.providers, batch=batch, full_seconds=full_seconds,
                                   schedule_seconds=schedule_seconds, speedup=full_seconds / schedule_seconds,
                                   ideal_speedup=ideal, speedup_of_ideal=full_seconds / schedule_seconds / ideal,
                                   step_overhead_fraction=statistics.median(r.overhead_fraction for r in scheduled),
                                   memory_all_engines_bytes=memory_all, memory_full_engine_bytes=memory_full,
                                   model_weights_bytes=data["weights"]["bytes"], num_subsets=len(data["subsets"]),
                                   repeats=repeats, cpp_memory_all_engines_bytes=cpp_all,
                                   cpp_memory_full_engine_bytes=cpp_full, warmup_runs=WARMUP_RUNS,
                                   full_seconds_min=full_min, full_seconds_max=full_max,
                                   schedule_seconds_min=schedule_min, schedule_seconds_max=schedule_max,
                                   speedup_min=low, speedup_max=high,
                                   threads=getattr(pipe.backend, "threads", None),
                                   prompt_tokens=None if takes_labels(data) else tokens[i]))
    _against_fp32(results, [pipe.manifest for pipe in pipes])
    return results


WARMUP_RUNS = 1  # the first run of a pipeline loads its sessions' kernels and grows its arena: never timed


def interleaved_runs(calls: list, repeats: int) -> list[list]:
    """Runs every call of ``calls`` (no arguments, a result with ``.seconds``) :data:`WARMUP_RUNS` times untimed, then
    ``repeats`` rounds of each in turn, so that a change in the machine's load falls on all of them alike rather than
    on whichever ran then. Returns each call's timed results, by call."""
    for _ in range(WARMUP_RUNS):
        for call in calls:
            call()
    runs = [[] for _ in calls]
    for _ in range(repeats):
        for i, call in enumerate(calls):
            runs[i].append(call())
    return runs


def timing_summary(full: list, scheduled: list) -> tuple[tuple[float, float, float], ...]:
    """Of interleaved runs (:func:`interleaved_runs`) of full compute and the schedule: (median, min, max) of each's
    seconds, and (median, min, max) of the speedups of the pairs run one after the other (the medians' ratio is the
    figure reported; the pairs' give its spread)."""
    full_seconds, schedule_seconds = [r.seconds for r in full], [r.seconds for r in scheduled]
    pairs = [f / s for f, s in zip(full_seconds, schedule_seconds)]
    return tuple((statistics.median(values), min(values), max(values))
                 for values in (full_seconds, schedule_seconds, pairs))


def _against_fp32(results: list[BenchResult], manifests: list[dict]) -> None:
    """Fills each row's speedups against the full compute of an fp32 build of the same checkpoint and model config
    measured in the same run (the first such build given)."""
    for result, data in zip(results, manifests):
        baseline = next((r for r, d in zip(results, manifests) if d["precision"] == "fp32"
                         and d["model"]["weights_sha256"] == data["model"]["weights_sha256"]
                         and d["model"]["config"] == data["model"]["config"]), None)
        if baseline is None:
            continue
        result.fp32_full_seconds = baseline.full_seconds
        result.full_speedup_vs_fp32 = baseline.full_seconds / result.full_seconds
        result.schedule_speedup_vs_fp32 = baseline.full_seconds / result.schedule_seconds
        result.schedule_of_target = result.schedule_speedup_vs_fp32 / (result.full_speedup_vs_fp32
                                                                       * result.ideal_speedup)


def measure_engine_memory(folder: Path, backend: str, batch: int, which: str,
                          prompt_tokens: int = MACS_PROMPT_TOKENS) -> int:
    """Resident-set growth (bytes) of loading ``which`` ("all" or "full") engines and running each once, measured
    in a fresh interpreter so that nothing loaded before skews it."""
    command = [sys.executable, "-m", "l2c_export.tools.bench", str(folder), backend, str(batch), which,
               str(prompt_tokens)]
    result = subprocess.run(command, capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return int(result.stdout.strip().splitlines()[-1])


CPP_MEMORY_PROBE = Path(__file__).resolve().parents[2] / "cpp" / "build" / "l2c-memory-probe"


def measure_cpp_engine_memory(folder: Path, batch: int, which: str) -> int:
    """The same measurement for the C++ runtime: ``l2c-memory-probe`` (cpp/tools/memory_probe.cpp) loads ONNX
    Runtime, then the engines, samples once with each, and prints its resident-set growth."""
    result = subprocess.run([str(CPP_MEMORY_PROBE), str(folder), str(batch), which], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{CPP_MEMORY_PROBE} {folder} {batch} {which} failed: {result.stderr.strip()}")
    return int(result.stdout.strip().splitlines()[-1])


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_probe(folder: str, backend: str, batch: int, which: str, prompt_tokens: int) -> int:
    import onnxruntime  # noqa: F401  (imported before the baseline: its libraries are not the engines' cost)

    if backend == "torch":
        import torch  # noqa: F401
    from ..runtime.backends import load_backend
    from ..runtime.pipeline import ModelInterface
    from ..runtime.conditioning import classifier_free_batch, model_batch_conditioning
    from ..samplers.guidance import make_noise

    data = manifest_io.load(folder, verify_files=False)
    before = _resident_bytes()
    full = next(s["index"] for s in data["subsets"] if all(s["compute"]))
    subsets = None if which == "all" else [full]
    engines = load_backend(backend, data, Path(folder), subsets=subsets)
    interface = ModelInterface.from_manifest(data)
    guiding = classifier_free_batch(data, data["guidance"]["cfg_scale"])
    example = bench_request(data, batch, prompt_tokens)
    _, condition = model_batch_conditioning(data, guiding, example.get("labels"), example.get("conditioning"))
    noise = make_noise(0, (batch, *interface.sample_shape))
    x = np.concatenate([noise, noise]) if guiding else noise
    feeds = interface.feeds(x, np.full(len(x), 500.0, dtype=np.float32), condition)
    state = engines.new_request()
    order = [full] + [s["index"] for s in data["subsets"] if s["index"] != full] if subsets is None else [full]
    for index in order:  # the full subset first: it writes every slot the others read
        engines.run(index, feeds, state)
    return _resident_bytes() - before


def machine_description() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def write_results(results: list[BenchResult], path: Path, machine: dict) -> None:
    from ..core.util import atomic_write_text

    atomic_write_text(Path(path), json.dumps({"machine": machine, "results": [asdict(r) for r in results]},
                                             indent=1, allow_nan=False) + "\n")


def table(results: list[BenchResult]) -> str:
    header = (f"{'model':<14} {'backend':<12} {'prec':<5} {'batch':>5} {'full s':>8} {'L2C s':>8} {'speedup':>8} "
              f"{'spread':>11} {'ideal':>6} {'of ideal':>8} {'overhead':>8} {'mem all':>9} {'mem full':>9} "
              f"{'weights':>9} {'full/fp32':>9} {'L2C/fp32':>9}")
    rows = [header, "-" * len(header)]
    for r in results:
        spread = "-" if r.speedup_min is None else f"{r.speedup_min:.2f}-{r.speedup_max:.2f}x"
        rows.append(f"{r.model:<14} {r.backend:<12} {r.precision:<5} {r.batch:>5} {r.full_seconds:>8.3f} "
                    f"{r.schedule_seconds:>8.3f} {r.speedup:>7.3f}x {spread:>11} {r.ideal_speedup:>5.3f}x "
                    f"{r.speedup_of_ideal:>8.3f} "
                    f"{100 * r.step_overhead_fraction:>7.2f}% {_mib(r.memory_all_engines_bytes):>9} "
                    f"{_mib(r.memory_full_engine_bytes):>9} {_mib(r.model_weights_bytes):>9} "
                    f"{_times(r.full_speedup_vs_fp32):>9} {_times(r.schedule_speedup_vs_fp32):>9}")
    return "\n".join(rows)


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2 ** 20:.1f}M"


def plot(results: list[BenchResult], path: Path) -> None:
    """Achieved against ideal speedup, one marker per (model, backend), with the y = x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.images import figure_to_png

    figure, axis = plt.subplots(figsize=(6, 4.5))
    top = max([r.ideal_speedup for r in results] + [r.speedup for r in results]) * 1.08
    axis.plot([1, top], [1, top], color="#999999", linestyle="--", label="achieved = ideal")
    axis.plot([1, top], [0.98, 0.98 * top], color="#bbbbbb", linestyle=":", label="0.98 of ideal (target)")
    for r in results:
        axis.scatter([r.ideal_speedup], [r.speedup], s=60,
                     label=f"{r.model} / {r.backend} / {r.precision} ({r.speedup:.2f}x)")
    axis.set_xlabel("ideal speedup (MACs of full / MACs of schedule)")
    axis.set_ylabel("achieved speedup (wall time of full / schedule)")
    axis.set_xlim(0.95, top)
    axis.set_ylim(0.95, top)
    axis.legend(fontsize=7, loc="upper left")
    axis.set_title("L2C schedule vs full compute, same engines and machine", fontsize=9)
    figure_to_png(figure, path)


if __name__ == "__main__":  # the memory probe, run in a fresh interpreter by measure_engine_memory
    folder_arg, backend_arg, batch_arg, which_arg, tokens_arg = sys.argv[1:6]
    print(_memory_probe(folder_arg, backend_arg, int(batch_arg), which_arg, int(tokens_arg)))
