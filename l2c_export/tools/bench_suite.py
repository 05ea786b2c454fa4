"""``make bench``: the benchmark on the embedded default and on DiT-S/2 at 256 px, onnxruntime and torch, writing
``docs/bench.json``, ``docs/bench.md`` (the table) and ``docs/bench.png`` (achieved against ideal speedup); then the
serving figure, the embedded default through a real Triton server with 1 and 8 concurrent clients
(``docs/bench-serving.json``, ``docs/bench-serving.png``; ``--serving-only`` runs just that).

Each model is built in fp32 and in int8 (dynamic, :mod:`l2c_export.export.quantize`); on onnxruntime both builds are
measured in one interleaved loop, so the int8 rows' speedups against fp32 full compute share the machine's load.
torch runs the fp32 build only.

DiT-S/2 uses random weights in the official layout (timing does not depend on the values) and a fixed synthetic
schedule in the authors' official mode: every other step computes everything; the 10 cache steps in between drop a
share of sub-layers falling from 80% at the first cache step to 10% at the last (the authors' routers reuse most early
on), which gives 11 distinct subsets.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def synthetic_official_schedule(num_steps: int, depth: int, seed: int = 0):
    """DDIM, official mode: each cache step drops a random share of sub-layers, from 80% at the first to 10% at the
    last."""
    from ..core.schedule import Schedule
    from ..samplers import official_cache_calls
    from ..samplers.gaussian import GaussianSampler

    rng = np.random.default_rng(seed)
    compute = np.ones((num_steps, 2 * depth), dtype=bool)
    cache_steps = official_cache_calls("ddim", num_steps)
    for position, s in enumerate(cache_steps):
        drop = 0.8 - 0.7 * position / max(1, len(cache_steps) - 1)
        compute[s, rng.choice(2 * depth, size=int(round(drop * 2 * depth)), replace=False)] = False
    return Schedule(compute, timesteps=GaussianSampler.create("ddim", num_steps).timesteps.tolist(), mode="official",
                    sampler="ddim",
                    source=f"synthetic official-mode schedule (seed {seed}), l2c_export.tools.bench_suite")


def dit_s2_checkpoint(path: Path) -> Path:
    import torch

    from ..models.dit.model import DiT, dit_config

    if not path.exists():
        torch.manual_seed(0)
        model = DiT(dit_config("DiT-S/2", input_size=32))
        state = {k: torch.randn_like(v) * 0.02 for k, v in model.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("engines/bench"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2, help="images per request (the model batch is twice this)")
    parser.add_argument("--serving-only", action="store_true", help="only the serving figure")
    args = parser.parse_args(argv)
    if args.serving_only:
        return serving_benchmark(args.work, args.docs)

    import torch

    from ..builder.build import BuildRequest, build
    from ..models.zoo import embedded_default, official
    from .bench import benchmark_together, machine_description, plot, table, write_results

    torch.set_num_threads(torch.get_num_threads())
    default = embedded_default()
    s2 = official(dit_s2_checkpoint(args.work / "DiT-S-2-256x256.pt"), "DiT-S/2", 256)
    builds = [(default, default.schedule(), args.work / "dit-digits"),
              (s2, synthetic_official_schedule(20, s2.num_layers), args.work / "dit-s2-256")]
    results = []
    for spec, schedule, out in builds:
        int8_out = out.parent / f"{out.name}-int8"
        for folder, precision in ((out, "fp32"), (int8_out, "int8")):
            build(BuildRequest(spec=spec, schedule=schedule, sampler=spec.sampler(num_steps=20), out_dir=folder,
                               precision=precision))
        for backend, folders in (("onnxruntime", [out, int8_out]), ("torch", [out])):
            print(f"benchmarking {spec.name} on {backend} ...", flush=True)
            rows = benchmark_together(folders, backend, batch=args.batch, repeats=args.repeats)
            results += rows
            print(table(rows), flush=True)
    machine = machine_description()
    args.docs.mkdir(parents=True, exist_ok=True)
    write_results(results, args.docs / "bench.json", machine)
    plot(results, args.docs / "bench.png")
    text = table(results)
    exported = {r.model: r for r in results if r.backend == "onnxruntime" and r.precision == "fp32"}
    eager = {r.model: r for r in results if r.backend == "torch"}
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores; onnxruntime {machine['onnxruntime']}, "
             f"torch {machine['torch']} ({machine['torch_threads']} threads). Batch {args.batch} images with "
             f"guidance (model batch {2 * args.batch}), DDIM 20 steps, medians of {args.repeats} interleaved runs.",
             "", "```", text, "```", ""]
    for model, result in exported.items():
        if model in eager:
            lines.append(f"- {model}: exported full compute is {eager[model].full_seconds / result.full_seconds:.2f}x "
                         f"faster than PyTorch eager; the exported schedule "
                         f"{eager[model].schedule_seconds / result.schedule_seconds:.2f}x faster than the eager L2C "
                         f"sampler.")
    for r in results:
        if r.precision == "int8" and r.full_speedup_vs_fp32 is not None:
            lines.append(f"- {r.model}: int8 full compute is {r.full_speedup_vs_fp32:.2f}x faster than fp32 full "
                         f"compute; int8 L2C {r.schedule_speedup_vs_fp32:.2f}x, {r.schedule_of_target:.3f} of (int8 "
                         f"speedup x ideal {r.ideal_speedup:.3f}x); all int8 subsets resident in "
                         f"{r.memory_all_engines_bytes / r.memory_full_engine_bytes:.2f}x the int8 full subset's "
                         f"memory.")
    for r in exported.values():
        if r.cpp_memory_all_engines_bytes:
            lines.append(f"- {r.model}, C++ runtime (cpp/, `l2c-memory-probe`): all {r.num_subsets} subsets loaded "
                         f"{r.cpp_memory_all_engines_bytes / 2 ** 20:.1f} MiB, the full subset alone "
                         f"{r.cpp_memory_full_engine_bytes / 2 ** 20:.1f} MiB: "
                         f"{r.cpp_memory_all_engines_bytes / r.cpp_memory_full_engine_bytes:.3f}x (target <= 1.25x; "
                         f"Python {r.memory_all_engines_bytes / r.memory_full_engine_bytes:.3f}x).")
    from ..core.util import atomic_write_text

    atomic_write_text(args.docs / "bench.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.docs / 'bench.json'}, {args.docs / 'bench.md'}, {args.docs / 'bench.png'}")
    serving_benchmark(args.work, args.docs)


def serving_benchmark(work: Path, docs: Path, clients: int = 8) -> dict:
    """The embedded default's build served by the bundled tritonserver (from ``.venv-triton``): images per second
    with one client and with ``clients`` concurrent clients, interleaved in one run."""
    from ..builder.build import BuildRequest, build
    from ..core.util import write_json
    from ..models.zoo import embedded_default
    from ..runtime.pipeline import L2CPipeline
    from ..serving import throughput
    from ..serving.triton import TritonServer, free_port, write_repository
    from .bench import machine_description

    default = embedded_default()
    out = work / "dit-digits"
    build(BuildRequest(spec=default, schedule=default.schedule(), sampler=default.sampler(),
                       out_dir=out))
    write_repository(out, work / "triton")
    print(f"serving {out} on Triton: 1 client against {clients} concurrent clients ...", flush=True)
    with TritonServer(work / "triton", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                      log=work / "tritonserver.log") as server:
        load = os.getloadavg()[0]
        result = throughput.compare(server, "l2c", clients=clients, pipeline=L2CPipeline.from_engine_dir(out))
    result["machine"] = machine_description()
    result["load_average_1min"] = [load, os.getloadavg()[0]]  # before and after: other work on the machine
    docs.mkdir(parents=True, exist_ok=True)
    write_json(docs / "bench-serving.json", result)
    throughput.plot(result, docs / "bench-serving.png")
    one, many = result["one_client"], result["concurrent"]
    print(f"in-process: {result['in_process']['images_per_second']:.1f} images/s; "
          f"1 client: {one['images_per_second']:.1f} images/s (p50 {one['latency_ms_median']:.1f} ms); "
          f"{clients} clients: {many['images_per_second']:.1f} images/s (p50 {many['latency_ms_median']:.1f} ms, "
          f"{many['images_per_sampling_batch']:.2f} images per sampling batch): {result['speedup']:.2f}x")
    print(f"wrote {docs / 'bench-serving.json'}, {docs / 'bench-serving.png'}")
    return result


if __name__ == "__main__":
    main()
