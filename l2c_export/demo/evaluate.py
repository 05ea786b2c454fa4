"""What a schedule buys at equal cost: the learned schedule against the learning-free ones, on an embedded digits
model (the DiT with DDIM, or the U-ViT with DPM-Solver-2S) or a diffusers folder (its transformer and scheduler).

From the same noise and conditioning (labels, or prompt embeddings), samples are drawn with full compute, with the
learned schedule and with each baseline (:mod:`l2c_export.routers.baselines`) at the learned schedule's MAC fraction
and at a sweep of budgets. A method (:mod:`l2c_export.demo.methods`), given a budget, makes candidates, each saying
what it costs (its MAC fraction of full compute) and how it samples (the PyTorch reference sampler with a schedule
and a step count, or a sampler of its own); :data:`l2c_export.demo.methods.METHODS` lists them, so a method is one
entry. Per method:

- ``fd``: Frechet distance between the samples and reference data in a feature space (the FID recipe):
  scikit-learn's 1797 digits in the 64 features of the shipped digits classifier (:mod:`l2c_export.demo.classifier`)
  where that classifier applies (8x8 one-channel pixel models); ``null`` where there are no reference data (diffusers
  folders).
- ``accuracy``: fraction of samples that the classifier assigns the class they were sampled for (digits label
  models; else ``null``).
- ``psnr``: PSNR (dB) of the samples against the full-compute samples from the same noise; ``null`` for full compute
  itself (identical, infinite). Pixel models: both clipped to [-1, 1], data range 2; latents: unclipped, data range
  the full-compute latents' (max - min). A video model's clips (Wan: (C, F', H', W') latents): each latent frame's
  PSNR against the same frame of full compute, averaged over every frame of every clip
  (:func:`l2c_export.demo.metrics.frame_psnr`).
- ``fd_to_full``: the Frechet distance to the full-compute samples: how far the method moves the model's own
  distribution (0 for full compute), in the classifier's features where it applies, else in a fixed random
  projection of the flattened latents (:class:`l2c_export.demo.metrics.RandomProjection`: 64 Gaussian directions
  from seed 0); a video model's over its clips' frames as images (each latent frame (C, H', W') projected alike,
  :class:`l2c_export.demo.metrics.FrameProjection`: n F' frames, not n clips; the embedded ``t2v-digits`` over its
  decoded clips' frames, :class:`l2c_export.demo.metrics.DigitClips`). ``fd`` can fall below full compute's
  when an approximation happens to move the samples towards the data; ``fd_to_full`` cannot.

``int8 full`` and ``int8 l2c`` are the int8 build (ONNX Runtime, dynamic activations; :mod:`l2c_export.export.quantize`)
with the learned schedule, sampled from the same noise; their PSNR and FD to full are against the fp32 full-compute
samples, so they count quantization and caching together.

JSON: ``{"results": [{"method", "mac_fraction", "fd", "accuracy", "psnr", "fd_to_full", "budget", "point", ...},
...], "features": ..., ...}`` where ``point`` is ``"reference"`` (full compute), ``"matched"`` (at the learned
schedule's MAC fraction) or ``"sweep"``.

This module is the evaluation loop and its report (JSON, Markdown table); the parts live by job in
:mod:`l2c_export.demo.metrics` (FD, PSNR, feature spaces), :mod:`l2c_export.demo.methods` (the setup, candidates and
the method registry), :mod:`l2c_export.demo.int8_builds` (the int8 rows) and :mod:`l2c_export.demo.eval_plots`
(pictures).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..core.interface import NCFHW
from ..core.schedule import Schedule, ScheduleMode
from ..core.util import atomic_write_text
from ..routers import RouterLogits
from .eval_plots import grid_samples
from .int8_builds import int8_samples
from .methods import Candidate, Drawn, EvalSetup, TextToImagePrompts, candidates_at
from .metrics import DigitsFeatures, FrameProjection, RandomProjection, frechet_distance

DEFAULT_BUDGETS = (0.6, 0.7, 0.8, 0.9)


def evaluate(spec, learned: Schedule, router: RouterLogits | None = None, mode: ScheduleMode = "official",
             budgets: Sequence[float] = DEFAULT_BUDGETS, num_samples: int = 1000, seed: int = 0,
             random_seeds: Sequence[int] = (0, 1), classifier_path: Path | None = None, progress: bool = True,
             int8: bool = True, labels: Sequence[int] | None = None,
             prompts: Mapping[str, np.ndarray] | None = None, prompts_source: str = "prompts",
             captions: Sequence[tuple[str, int, bool]] | None = None, batch_size: int = 50,
             grid: dict | None = None, peer_search: Mapping | None = None) -> dict:
    """Evaluates ``learned`` (a schedule of ``spec``, a :class:`l2c_export.models.zoo.ModelSpec`: an embedded digits
    model or a diffusers folder; its row count is the sampler's step count) and every method at its MAC fraction,
    and the router (if given) and every method at each of ``budgets``. Sample i is conditioned on ``labels[i %
    len(labels)]`` (label models; default: every class in turn) or on prompt ``i % P`` of ``prompts`` (text models:
    arrays by the pipelines' argument names, P rows; ``prompts_source`` names them in errors).

    ``captions`` (text-to-image ``t2i-digits``: (caption, digit, held_out) per sample,
    :func:`l2c_export.demo.t2i.evaluation_prompts`): every method samples images from the captions as its users run
    it, timed (``seconds_per_image``): the schedules from builds on ONNX Runtime (:class:`TextToImagePrompts`),
    cache-dit's DBCache on diffusers' pipeline in PyTorch, ``batch_size`` prompts a call; the decoded images are
    judged by the digits classifier (``fd`` to the digits, ``accuracy`` of the named digit). The text-to-video
    ``t2v-digits`` (captions (caption, digit, held_out, direction), :func:`l2c_export.demo.t2v.evaluation_prompts`):
    the same on its decoded clips (n, 3, F, H, W), judged frame by frame (:class:`l2c_export.demo.metrics.DigitClips`:
    PSNR and FD to full compute over the frames, ``accuracy`` the digit drawn and moving as asked, no ``fd``), the
    peer on diffusers' ``WanPipeline``. ``grid``, if given, is
    filled with a few prompts' images of full compute, the learned schedule and cache-dit
    (:func:`l2c_export.demo.eval_plots.plot_t2i_grid`);
    ``peer_search``: the cache-dit row's search, ``{"size": "small" | "full"}`` (the grid of
    :data:`l2c_export.demo.diffusers_caches.PEERS`'s ``cache-dit``; default full).
    Returns the JSON document (see the module doc)."""
    import tempfile

    import torch

    from ..samplers.guidance import make_noise

    config, family = spec.config, spec.family
    sampler = spec.sampler(None, learned.num_steps)
    learned.check_fits(sampler.num_calls, spec.sublayer_names)
    macs = family.count_macs(config)
    null_class = family.null_class(config)
    label_array = conditioning = None
    if null_class is not None:
        cycle = list(labels) if labels else list(range(null_class))
        label_array = np.asarray([cycle[i % len(cycle)] for i in range(num_samples)], dtype=np.int64)
    elif prompts is not None:
        guiding = family.classifier_free and spec.cfg_scale > 1.0  # FLUX.1: no negative batch
        conditioning = _cycle_prompts(spec, prompts, num_samples, guiding, prompts_source)
    sample_shape = next(t.shape for t in family.graph_inputs(config) if t.role == "sample")
    judge = (DigitsFeatures(classifier_path) if DigitsFeatures.applies(spec)
             else FrameProjection(sample_shape) if family.latent_layout == NCFHW else RandomProjection(sample_shape))
    text_to_image, scratch = None, None
    if captions is not None:
        if len(captions) != num_samples:
            raise ValueError(f"{len(captions)} captions for {num_samples} samples")
        scratch = tempfile.TemporaryDirectory(prefix="l2c-eval-")
        text_to_image = TextToImagePrompts.of(Path(spec.weights).parent, captions, Path(scratch.name), batch_size)
        label_array, int8 = text_to_image.labels, False
        judge = None  # the decoded samples' (below, once their shape is known)
    setup = EvalSetup(spec=spec, model=spec.load_model(), num_steps=sampler.num_calls, macs=macs,
                      labels=None if label_array is None or captions is not None else label_array.tolist(),
                      conditioning=conditioning, noise=make_noise(seed, (num_samples, *sample_shape)),
                      cfg_scale=spec.cfg_scale, mode=mode, router=router, random_seeds=tuple(random_seeds),
                      prompts=text_to_image, peer_search=dict(peer_search or {}))

    matched = learned.mac_fraction(macs)
    candidates = [Candidate("full", 1.0, sampler.num_calls, None, None, "reference")]
    candidates += candidates_at(matched, setup, "matched", learned=learned)
    for budget in budgets:
        candidates += candidates_at(budget, setup, "sweep")

    samples_by_key: dict[tuple, np.ndarray] = {}
    drawn_by_key: dict[tuple, Drawn] = {}
    try:
        with torch.no_grad():  # scoped: evaluate() is also called in-process (tests), where grads must stay on
            for candidate in tqdm(candidates, desc="evaluating schedules", disable=not progress):
                if candidate.key() not in samples_by_key:
                    drawn = candidate.samples(setup)
                    if isinstance(drawn, Drawn):
                        drawn_by_key[candidate.key()], drawn = drawn, drawn.samples
                    samples_by_key[candidate.key()] = drawn
    finally:
        if scratch is not None:
            scratch.cleanup()
    full_samples = samples_by_key[candidates[0].key()]
    if judge is None:  # decoded images (the digits classifier on 8x8 digits) or clips (frame by frame)
        judge = (DigitsFeatures(classifier_path) if full_samples.ndim == 4
                 else text_to_image.judge(full_samples.shape[1:]))
    full_features = judge(full_samples)

    def metrics(samples: np.ndarray, reference: bool = False) -> dict:
        sample_features = judge(samples)
        out = {"fd": None if judge.real is None else frechet_distance(sample_features, judge.real),
               "accuracy": judge.accuracy(samples, label_array),
               "psnr": None if reference else judge.psnr(samples, full_samples),
               "fd_to_full": frechet_distance(sample_features, full_features)}
        if text_to_image is not None and text_to_image.held_out.any():
            held_out = text_to_image.held_out
            out["accuracy_held_out_forms"] = judge.accuracy(samples[held_out], label_array[held_out])
        return out

    rows = []
    for candidate in candidates:
        drawn = drawn_by_key.get(candidate.key())
        timing = {} if drawn is None else {"seconds_per_image": drawn.seconds / num_samples, **drawn.info}
        rows.append({"method": candidate.method, "mac_fraction": round(candidate.mac_fraction, 6),
                     **metrics(samples_by_key[candidate.key()], reference=candidate.method == "full"),
                     **{k: v for k, v in timing.items() if k == "seconds_per_image"},
                     "budget": candidate.budget, "point": candidate.point, **candidate.info,
                     **{k: v for k, v in timing.items() if k != "seconds_per_image"}})
    if grid is not None and text_to_image is not None:
        grid.update(grid_samples(text_to_image, candidates, samples_by_key))
    if int8:
        request = {"labels": setup.labels} if setup.labels is not None else {"conditioning": conditioning}
        for method, samples in int8_samples(spec, learned, sampler, request, setup.noise).items():
            rows.append({"method": method, "mac_fraction": 1.0 if method == "int8 full" else round(matched, 6),
                         **metrics(samples), "budget": None,
                         "point": "reference" if method == "int8 full" else "matched", "precision": "int8"})
    extra = {}
    if text_to_image is not None:
        import onnxruntime

        from .t2i import pipeline_class

        forms = sorted(set(zip(text_to_image.captions, text_to_image.held_out.tolist())))
        source = ("l2c_export.demo.t2v.evaluation_prompts: every prompt form (training and held-out) with every "
                  "direction and digit, in a fixed shuffled order" if text_to_image.directions is not None else
                  "l2c_export.demo.t2i.evaluation_prompts: every caption form (training and held-out) with every "
                  "digit in turn")
        extra = {"prompts": {"source": source,
                             "num_samples": num_samples, "distinct": len(forms),
                             "held_out": int(text_to_image.held_out.sum()), "batch_size": batch_size},
                 "timing": {"what": "wall-clock seconds per image of the calls that draw it, text encoder and VAE "
                                    "decoder included, batch_size prompts a call, on this machine",
                            "schedules": f"a build on ONNX Runtime {onnxruntime.__version__} (CPUExecutionProvider)",
                            "cache-dit": f"diffusers' {pipeline_class(text_to_image.folder)} in PyTorch "
                                         f"{torch.__version__}, {torch.get_num_threads()} threads",
                            "cpus": _cpu_count()}}
    return {"results": average_random_seeds(rows), "learned_mac_fraction": matched, **extra,
            "learned_schedule": learned.source, "num_samples": num_samples, "seed": seed,
            "random_seeds": list(random_seeds), "model": spec.name,
            "sampler": {"kind": sampler.kind, "num_calls": sampler.num_calls},
            "cfg_scale": spec.cfg_scale, "features": judge.description,
            "fd_reference": None if judge.real is None else judge.description}


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _cycle_prompts(spec, prompts: Mapping[str, np.ndarray], n: int, guiding: bool, where: str) -> dict:
    """``n`` rows of prompt arrays (the model's text roles: PixArt's masks, SD3's pooled embeddings; their negatives
    when ``guiding``), prompt ``i % P`` in row i, checked as the runtime checks a request."""
    from ..core.interface import request_records
    from ..runtime.conditioning import check_text_conditioning

    records = request_records([t.record() for t in spec.family.graph_inputs(spec.config)],
                              spec.family.guidance_record(spec.config))
    checked = check_text_conditioning(prompts, records, guiding, where, max_tokens=spec.max_prompt_tokens)
    rows = np.arange(n) % len(next(iter(checked.values()))[0])
    out = {}
    for record in records:
        array, negative = checked[record["argument"]]
        out[record["argument"]] = array[rows]
        if negative is not None and record.get("negative"):
            out[record["negative"]] = negative[rows]
    return out


def average_random_seeds(rows: list[dict]) -> list[dict]:
    """One ``random`` row per (point, budget): the mean over seeds, with their spread."""
    out, groups = [], {}
    for row in rows:
        if row["method"] != "random":
            out.append(row)
            continue
        key = (row["point"], row["budget"])
        if key not in groups:
            groups[key] = []
            out.append(key)  # placeholder keeps the order
        groups[key].append(row)
    merged = []
    for item in out:
        if not isinstance(item, tuple):
            merged.append(item)
            continue
        group = groups[item]
        row = {**group[0], "seed": [r["seed"] for r in group], "dropped": [r["dropped"] for r in group]}
        for name in ("mac_fraction", "fd", "accuracy", "psnr", "fd_to_full", "accuracy_held_out_forms",
                     "seconds_per_image", "engines_mac_fraction"):
            if name not in row:
                continue
            values = [r[name] for r in group]
            row[name] = None if None in values else float(np.mean(values))
        spread = "fd" if row["fd"] is not None else "fd_to_full"
        row[f"{spread}_std"] = float(np.std([r[spread] for r in group]))
        merged.append(row)
    return merged


def write_json(report: dict, path: Path) -> None:
    atomic_write_text(Path(path), json.dumps(report, indent=1, allow_nan=False) + "\n")


def format_table(report: dict) -> str:
    """A Markdown table of the matched point (then the sweep); ``-`` where a metric does not apply."""
    def number(value, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    timed = any("seconds_per_image" in row for row in report["results"])
    lines = ["| method | point | MAC fraction | FD | accuracy | PSNR (dB) | FD to full |" + (" s / image |" if timed
                                                                                         else ""),
             "| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if timed else "")]
    for row in report["results"]:
        budget = row["point"] if row["budget"] is None or row["point"] == "matched" else f"sweep {row['budget']}"
        lines.append(f"| {row['method']} | {budget} | {row['mac_fraction']:.3f} | {number(row['fd'])} | "
                     f"{number(row['accuracy'])} | {number(row['psnr'], 2)} | {number(row['fd_to_full'])} |"
                     + (f" {number(row.get('seconds_per_image'), 4)} |" if timed else ""))
    return "\n".join(lines)
