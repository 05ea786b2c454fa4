"""The whole budget curve on a text-to-image folder (``eval --model t2i-digits --budgets 0.35,0.5,0.7,0.85``, or a
user's own folder: ``eval --diffusers DIR --prompts prompts.txt --router router.safetensors --budgets ...``): at
each MAC fraction, the learned schedule (the router decoded at the threshold that meets it, or a given schedule at
its own MAC fraction; ``l2c``, in the router's mode, official by default) and, where the model ships one
(:data:`~l2c_export.models.zoo.GENERAL_ROUTER_FILE`), a router learned in general mode decoded the same way
(``l2c-general``: any call may reuse, so it reaches the budgets below official mode's least) against the plain
baselines (FORA, fewer steps, random drop: :data:`l2c_export.demo.methods.METHODS`) and every cache a diffusers
user can switch on (:data:`l2c_export.demo.diffusers_caches.PEERS`), each searched to land within
:data:`~l2c_export.demo.diffusers_caches.TOLERANCE` of the budget; in quality and in wall time.

The text-to-video ``t2v-digits`` (``eval --model t2v-digits --budgets ...``) runs the same curve on its decoded clips,
judged frame by frame (:meth:`l2c_export.demo.methods.TextToImagePrompts.judge`), the peers on ``WanPipeline``.

Every method draws the same captions from the same noise. Ours are built and run on ONNX Runtime
(``L2CPipeline(prompt=..., decode=True)``); full compute and the learned schedule also on the PyTorch backend of the
same builds (``sample --backend torch``), so the runtimes can be told apart; the peers on diffusers' own pipeline in
PyTorch. Per row (JSON ``results``):

- ``mac_fraction``: counted (schedules: their MACs, checked against ``engines_mac_fraction``, the subsets the
  engines report they ran; peers: the sub-layers that ran, by hooks, checked against ``own_mac_fraction`` where the
  cache keeps a count of its own: cache-dit), ``reached`` (within
  the tolerance of ``budget``) and, where not, ``note`` with the nearest reached; ``error`` where the method could
  not run at all (and nothing else);
- ``fd_to_full``, ``psnr`` (against the ONNX Runtime full-compute images, decoded, in [-1, 1]), ``fd`` (to the
  1797 digits), ``accuracy`` (the digits classifier reads the prompted digit), as in
  :mod:`l2c_export.demo.evaluate`; on a user's prompts (no digits named, or images not 8x8 one-channel) the
  features are a fixed random projection of the decoded images and ``fd`` and ``accuracy`` are null;
- ``seconds_per_image`` in the method's own ``runtime`` (the median of ``repeats`` interleaved timings of one call on
  the first ``batch_size`` prompts, every timer once per round), ``speedup`` against full compute in that runtime,
  ``ideal_speedup`` (1 / MAC fraction) and ``speedup_of_ideal``; the learned schedule and full compute also
  ``seconds_per_image_torch``, ``speedup_torch``, ``speedup_of_ideal_torch``;
- ``search``: a peer's settings tried on the calibration prompts (MAC fraction, PSNR), and ``settings`` chosen.

``l2c_speedup_of_ideal`` (and ``l2c_general_speedup_of_ideal``): the learned schedule's achieved / ideal speedup in
ONNX Runtime per budget, against the claim (>= :data:`SPEEDUP_OF_IDEAL_CLAIM`), also the table's last notes.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..core.schedule import Schedule
from ..routers import RouterLogits, baselines
from . import diffusers_caches
from .diffusers_caches import PEERS, TOLERANCE
from .evaluate import average_random_seeds
from .methods import METHODS, Candidate, EvalSetup, TextToImagePrompts
from .metrics import frechet_distance, psnr

OURS = ("l2c", "l2c-general", "fora", "random", "fewer-steps")  # built and run on ONNX Runtime
REFERENCES = {"onnxruntime": "full", "torch": "full", "diffusers": "full (diffusers)"}
SPEEDUP_OF_IDEAL_CLAIM = 0.9  # the learned schedule's achieved / MAC-counted speedup in ONNX Runtime engines


def evaluate_curve(spec, router: RouterLogits | None, budgets: Sequence[float], captions, seed: int = 0,
                   batch_size: int = 50, search_size: str = "full", repeats: int = 3, random_seeds=(0, 1),
                   mode: str = "official", progress: bool = True, peers: Sequence[str] | None = None,
                   schedule: Schedule | None = None, general_router: RouterLogits | None = None) -> dict:
    """The curve (see the module doc) of ``spec`` (a text-to-image folder's spec) at ``budgets``: the learned
    schedule decoded from ``router`` at each budget, or (no router) the given ``schedule`` itself at every budget it
    reaches; on ``captions`` ((caption, digit, held_out) per sample, one noise row each from ``seed``; digit None:
    a user's prompt, no classifier applies); ``peers``: the names of :data:`PEERS` to run (default all);
    ``general_router``: a router learned in general mode (same steps), the ``l2c-general`` row at each budget. Returns
    the JSON document, with ``grid`` (the lowest budget's images of a few prompts per method) popped off by the
    caller before writing."""
    import torch

    from ..samplers.guidance import make_noise

    if (router is None) == (schedule is None):
        raise ValueError("the curve's learned schedule: give a router or a schedule")
    sampler = spec.sampler(None, (router or schedule).num_steps)
    macs = spec.family.count_macs(spec.config)
    sample_shape = next(t.shape for t in spec.family.graph_inputs(spec.config) if t.role == "sample")
    num_samples = len(captions)
    scratch = tempfile.TemporaryDirectory(prefix="l2c-curve-")
    prompts = TextToImagePrompts.of(Path(spec.weights).parent, captions, Path(scratch.name), batch_size)
    setup = EvalSetup(spec=spec, model=None, num_steps=sampler.num_calls, macs=macs, labels=None,
                      conditioning=None, noise=make_noise(seed, (num_samples, *sample_shape)),
                      cfg_scale=spec.cfg_scale, mode=mode, router=router, random_seeds=tuple(random_seeds),
                      prompts=prompts)
    timed = slice(0, min(batch_size, num_samples))
    rows, images, timers = [], {}, []  # images: row index -> (n, C, H, W); timers: (row index, runtime, call)

    def add(row: dict, drawn_images=None, row_timers=()) -> None:
        rows.append(row)
        if drawn_images is not None:
            images[len(rows) - 1] = drawn_images
        timers.extend((len(rows) - 1, runtime, call) for runtime, call in row_timers)

    pipelines = None
    try:
        with torch.no_grad():
            ours = [Candidate("full", 1.0, sampler.num_calls, None, None, "reference")]
            for budget in budgets:
                ours += _our_candidates(budget, setup, schedule, general_router)
            for candidate in tqdm(ours, desc="building and sampling the schedules", disable=not progress):
                runtimes = ("onnxruntime", "torch") if candidate.method in ("full", "l2c") else ("onnxruntime",)
                drawn = prompts.sample_build(setup, candidate.schedule, candidate.num_steps, runtimes=runtimes)
                add({"method": candidate.method, "budget": candidate.budget, "point": candidate.point,
                     "mac_fraction": round(candidate.mac_fraction, 6), "runtime": "onnxruntime",
                     **candidate.info, **drawn.info}, drawn.samples, drawn.timers.items())
            pipelines = diffusers_caches.folder_pipelines(spec, setup.num_steps, setup.cfg_scale,
                                                          image_size=tuple(images[0].shape[-2:]))
            _add_peers(add, setup, pipelines, budgets, search_size, [PEERS[name] for name in (peers or PEERS)],
                       timed, progress)
            seconds = _interleaved_medians(timers, repeats, progress)
    finally:
        scratch.cleanup()

    full = images[0]
    judge = prompts.judge(full.shape[1:])
    full_features = judge(full)
    labels = prompts.labels
    for index, row in enumerate(rows):
        if index in images:
            samples = images[index]
            features = judge(samples)
            held_out = prompts.held_out.any() and labels is not None
            row.update({"fd_to_full": frechet_distance(features, full_features),
                        "psnr": None if index == 0 else judge.psnr(samples, full),
                        "fd": None if judge.real is None else frechet_distance(features, judge.real),
                        "accuracy": judge.accuracy(samples, labels),
                        "accuracy_held_out_forms": (judge.accuracy(samples[prompts.held_out],
                                                                   labels[prompts.held_out])
                                                    if held_out else None)})
        for runtime in ("onnxruntime", "torch", "diffusers"):
            if (index, runtime) in seconds:
                suffix = "_torch" if runtime == "torch" else ""
                row[f"seconds_per_image{suffix}"] = seconds[index, runtime] / (timed.stop - timed.start)
    results = average_random_seeds(rows)
    _speedups(results)
    grid_rows = _grid(prompts, rows, images, min(budgets) if budgets else None)
    import onnxruntime

    return {"model": spec.name, "budgets": list(budgets), "tolerance": TOLERANCE, "num_samples": num_samples,
            "seed": seed, "random_seeds": list(random_seeds), "search": search_size, "repeats": repeats,
            "cfg_scale": spec.cfg_scale, "sampler": {"kind": sampler.kind, "num_calls": sampler.num_calls},
            **({"learned_router": router.source} if router is not None else {"learned_schedule": schedule.source}),
            **({"general_router": general_router.source} if general_router is not None else {}),
            "mode": mode, "l2c_speedup_of_ideal": _learned_speedup_of_ideal(results),
            **({"l2c_general_speedup_of_ideal": _learned_speedup_of_ideal(results, "l2c-general")}
               if general_router is not None else {}),
            "timing": {"what": f"median of {repeats} interleaved timings of one call of {timed.stop} prompts (text "
                               f"encoder, sampling and VAE decoding), per image",
                       "onnxruntime": f"ONNX Runtime {onnxruntime.__version__} (CPUExecutionProvider)",
                       "torch": f"the same builds on the PyTorch backend, PyTorch {torch.__version__}",
                       "diffusers": f"diffusers' {pipelines.pipeline_class} in PyTorch {torch.__version__}",
                       "threads": torch.get_num_threads()},
            "features": judge.description, "results": results, "grid": grid_rows}


def _our_candidates(budget: float, setup: EvalSetup, schedule: Schedule | None = None,
                    general_router: RouterLogits | None = None) -> list[Candidate]:
    """The learned schedule (``l2c``: the router decoded in ``setup.mode`` at the threshold that meets ``budget``, or
    the given ``schedule`` itself; ``l2c-general``: ``general_router`` decoded so in general mode) and FORA, random
    drop and fewer steps at ``budget``."""
    if schedule is not None:
        out = [_learned_candidate("l2c", schedule, None, budget, setup)]
    else:
        out = [_decoded_candidate("l2c", setup.router, setup.mode, budget, setup)]
    if general_router is not None:
        out.append(_decoded_candidate("l2c-general", general_router, "general", budget, setup))
    for name in ("fora", "random", "fewer-steps"):
        out += METHODS[name](budget, setup, "sweep")
    for candidate in out:
        candidate.info["reached"] = abs(candidate.mac_fraction - budget) <= TOLERANCE
        if not candidate.info["reached"]:
            candidate.info.setdefault("note", f"cannot reach {budget}: nearest {candidate.mac_fraction:.3f}")
    return out


def _decoded_candidate(method: str, router: RouterLogits, mode: str, budget: float, setup: EvalSetup) -> Candidate:
    """``router`` decoded in ``mode`` at the threshold that meets ``budget``; below the least the mode reaches, the
    least, with the reason."""
    try:
        learned, note = baselines.schedule_for_mac_fraction(router, budget, setup.macs, mode, setup.timesteps), None
    except ValueError as error:
        learned = router.to_schedule(1.0, mode, setup.timesteps)
        note = f"cannot reach {budget}: nearest {learned.mac_fraction(setup.macs):.3f} ({error})"
    return _learned_candidate(method, learned, note, budget, setup)


def _learned_candidate(method: str, learned: Schedule, note: str | None, budget: float,
                       setup: EvalSetup) -> Candidate:
    info = {"threshold": learned.threshold, "mode": learned.mode, **({"note": note} if note else {})}
    return Candidate(method, learned.mac_fraction(setup.macs), setup.num_steps, learned, budget, "sweep", info)


def _add_peers(add, setup: EvalSetup, pipelines: "diffusers_caches.FolderPipelines", budgets: Sequence[float],
               search_size: str, peers, timed: slice, progress: bool) -> None:
    """Full compute on diffusers' pipeline (``pipelines``), then each peer: its knobs searched on the calibration
    prompts (the first call's), and at each budget the chosen setting drawn on every prompt."""
    prompts, spec = setup.prompts, setup.spec
    captions, noise = prompts.captions, setup.noise
    count = dict(macs=setup.macs, sublayers=spec.sublayer_names, batch_size=prompts.batch_size)
    full = diffusers_caches.draw(pipelines.open(None, {}, {}), captions, noise, **count)
    add({"method": "full (diffusers)", "budget": None, "point": "reference",
         "mac_fraction": round(full.mac_fraction, 6), "runtime": "diffusers"}, full.images,
        [("diffusers", _peer_timer(full.peer, captions, noise, timed))])
    reference = full.images[timed]
    for peer in tqdm(peers, desc="searching and sampling the peers", disable=not progress):
        state: dict = {}
        try:
            if peer.calibrate is not None:
                state = {"num_steps": setup.num_steps}
                peer.calibrate(pipelines.open(None, {}, {}), captions[timed], noise[timed], state)

            def measure(knobs: dict) -> tuple[float, float]:
                run = diffusers_caches.draw(pipelines.open(peer, knobs, state), captions[timed], noise[timed],
                                            **count)
                return run.mac_fraction, psnr(run.images, reference, 2.0)

            tried = diffusers_caches.search(peer, budgets, measure, search_size,
                                            refine=1 if search_size == "small" else 3)
        except Exception as error:  # noqa: BLE001 - a hook that cannot run on this transformer: its rows say why
            for budget in budgets:
                add({"method": peer.name, "budget": budget, "point": "sweep", "mac_fraction": None,
                     "runtime": "diffusers", "entry": peer.entry, "reached": False,
                     "error": f"{type(error).__name__}: {error}"})
            continue
        drawn: dict[str, diffusers_caches.PeerRun] = {}
        for budget in budgets:
            chosen, reached = diffusers_caches.choose(tried, budget)
            key = json.dumps(chosen["settings"], sort_keys=True)
            if key not in drawn:
                drawn[key] = diffusers_caches.draw(pipelines.open(peer, chosen["settings"], state), captions, noise,
                                                   **count)
            run = drawn[key]
            row = {"method": peer.name, "budget": budget, "point": "sweep", "mac_fraction": round(run.mac_fraction, 6),
                   "runtime": "diffusers", "entry": peer.entry, "settings": chosen["settings"],
                   "reached": abs(run.mac_fraction - budget) <= TOLERANCE, **run.info}
            if not row["reached"]:
                row["note"] = (f"cannot reach {budget}: nearest {chosen['mac_fraction']:.3f} on the calibration "
                               f"prompts ({run.mac_fraction:.3f} on all) of {len(tried)} settings tried"
                               if not reached else f"{run.mac_fraction:.3f} on all prompts against "
                                                   f"{chosen['mac_fraction']:.3f} on the calibration prompts")
            if run.own is not None:
                row["own_counter"] = run.own
                own = diffusers_caches.own_mac_fraction(run.own, setup.macs, spec.sublayer_names, setup.num_steps)
                row["own_mac_fraction"] = None if own is None else round(own, 6)
            row["search"] = {"calibration_prompts": timed.stop, "tried": tried,
                             **({"mag_ratios": state["mag_ratios"]} if "mag_ratios" in state else {})}
            add(row, run.images, [("diffusers", _peer_timer(run.peer, captions, noise, timed))])


def _peer_timer(peer, captions, noise, timed: slice):
    return lambda: diffusers_caches.time_call(peer, captions[timed], noise[timed])


def _interleaved_medians(timers, repeats: int, progress: bool) -> dict:
    """{(row index, runtime): median seconds}, each timer called once per round, ``repeats`` rounds."""
    samples: dict = {}
    for _ in tqdm(range(repeats), desc="timing (interleaved rounds)", disable=not progress):
        for index, runtime, call in timers:
            samples.setdefault((index, runtime), []).append(call())
    return {key: statistics.median(values) for key, values in samples.items()}


def _speedups(results: list[dict]) -> None:
    """Each row's speedup against full compute in its own runtime, and its ratio to the MAC-counted ideal."""
    reference = {}
    for runtime, method in REFERENCES.items():
        row = next((r for r in results if r["method"] == method), None)
        suffix = "_torch" if runtime == "torch" else ""
        if row is not None and row.get(f"seconds_per_image{suffix}"):
            reference[runtime] = row[f"seconds_per_image{suffix}"]
    for row in results:
        for runtime, suffix in ((row["runtime"], ""), ("torch", "_torch")):
            seconds = row.get(f"seconds_per_image{suffix}")
            if seconds and runtime in reference and row.get("mac_fraction"):
                row[f"speedup{suffix}"] = reference[runtime] / seconds
                row["ideal_speedup"] = 1.0 / row["mac_fraction"]
                row[f"speedup_of_ideal{suffix}"] = row[f"speedup{suffix}"] / row["ideal_speedup"]


def _grid(prompts: TextToImagePrompts, rows: list[dict], images: dict, budget) -> dict:
    """A few prompts' images (one per digit where the captions name digits, else the first ten distinct prompts) of
    every method at ``budget`` (and full compute): {"captions", "held_out", "budget", "methods": [(label,
    (k, C, H, W))]}."""
    from .eval_plots import one_prompt_per_digit

    if prompts.digits is not None:
        chosen = one_prompt_per_digit(prompts)
    else:
        first = {caption: index for index, caption in reversed(list(enumerate(prompts.captions)))}
        chosen = sorted(first.values())[:10]
    methods = []
    for index, row in enumerate(rows):
        if index in images and (row["budget"] is None or row["budget"] == budget):
            if row["method"] == "random" and row.get("seed", 0) != 0:
                continue
            label = row["method"] if row["budget"] is None else f"{row['method']} ({row['mac_fraction']:.2f})"
            methods.append((label, images[index][chosen]))
    return {"captions": [prompts.captions[i] for i in chosen],
            "held_out": [bool(prompts.held_out[i]) for i in chosen], "budget": budget, "methods": methods}


def _learned_speedup_of_ideal(results: list[dict], method: str = "l2c") -> dict:
    """The learned schedule's (``method``'s rows) achieved speedup over its MAC-counted ideal in ONNX Runtime engines,
    per budget (the claim: >= :data:`SPEEDUP_OF_IDEAL_CLAIM`): {"claim", "by_budget": {budget: ratio or None},
    "met"}."""
    by_budget = {str(row["budget"]): row.get("speedup_of_ideal") for row in results if row["method"] == method}
    measured = [value for value in by_budget.values() if value is not None]
    return {"claim": SPEEDUP_OF_IDEAL_CLAIM, "by_budget": by_budget,
            "met": bool(measured) and all(value >= SPEEDUP_OF_IDEAL_CLAIM for value in measured)}


def format_curve_table(report: dict) -> str:
    """A Markdown table, a row per method and budget: ``-`` where a metric does not apply or the method did not
    run; a budget not reached within the tolerance marked ``*``."""
    def number(value, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = ["| budget | method | MAC fraction | FD to full | PSNR (dB) | FD to data | accuracy | s / image (runtime) "
             "| speedup | achieved / ideal | PyTorch `sample` s / image (achieved / ideal) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in sorted(report["results"], key=lambda r: (-1 if r["budget"] is None else r["budget"])):
        fraction = number(row.get("mac_fraction"))
        if row.get("reached") is False:
            fraction += "*"
        torch_cell = "-" if row.get("seconds_per_image_torch") is None else (
            f"{row['seconds_per_image_torch']:.4f} ({number(row.get('speedup_of_ideal_torch'), 2)})")
        seconds = row.get("seconds_per_image")
        timed = "-" if seconds is None else f"{seconds:.4f} ({row['runtime']})"
        lines.append(f"| {number(row['budget'], 2) if row['budget'] is not None else 'full'} | {row['method']} | "
                     f"{fraction} | {number(row.get('fd_to_full'))} | {number(row.get('psnr'), 2)} | "
                     f"{number(row.get('fd'), 2)} | {number(row.get('accuracy'))} | "
                     f"{timed} | "
                     f"{number(row.get('speedup'), 2)} | {number(row.get('speedup_of_ideal'), 2)} | {torch_cell} |")
    notes = [f"- {row['method']} at {row['budget']}: {row.get('error') or row.get('note')}"
             for row in report["results"] if row.get("error") or row.get("note")]
    for method in ("l2c", "l2c-general"):
        claim = report.get(f"{method.replace('-', '_')}_speedup_of_ideal")
        if claim:
            ratios = ", ".join(f"{number(value, 2)} at {budget}" for budget, value in claim["by_budget"].items())
            notes.append(f"- {method} in ONNX Runtime engines, achieved / ideal speedup: {ratios} (claim >= "
                         f"{claim['claim']}: {'met' if claim['met'] else 'not met'})")
    return "\n".join(lines + ([""] + notes if notes else []))
