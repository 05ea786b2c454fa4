"""What a schedule buys at equal cost: the learned schedule against the learning-free ones on an embedded digits model
(the DiT with DDIM, or the U-ViT with DPM-Solver-2S).

From the same noise and labels, samples are drawn with full compute, with the learned schedule and with each baseline
(:mod:`l2c_export.routers.baselines`) at the learned schedule's MAC fraction and at a sweep of budgets. Per method:

- ``fd``: Frechet distance between the samples and scikit-learn's 1797 digits in the feature space of the shipped
  digits classifier (:mod:`l2c_export.demo.classifier`; 64 features), the FID recipe with a domain-appropriate network.
- ``accuracy``: fraction of samples that the classifier assigns the class they were sampled for.
- ``psnr``: PSNR (dB, data range 2 for [-1, 1]) of the samples against the full-compute samples from the same noise;
  ``null`` for full compute itself (identical, infinite).
- ``fd_to_full``: the Frechet distance to the full-compute samples instead of the real digits: how far the method
  moves the model's own distribution (0 for full compute). ``fd`` can fall below full compute's when an
  approximation happens to move the samples towards the data; ``fd_to_full`` cannot.

``int8 full`` and ``int8 l2c`` are the int8 build (ONNX Runtime, dynamic activations; :mod:`l2c_export.export.quantize`)
with the learned schedule, sampled from the same noise; their PSNR and FD to full are against the fp32 full-compute
samples, so they count quantization and caching together.

JSON: ``{"results": [{"method", "mac_fraction", "fd", "accuracy", "psnr", "budget", "point", ...}, ...], ...}`` where
``point`` is ``"matched"`` (at the learned schedule's MAC fraction) or ``"sweep"``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from ..core.schedule import Schedule, ScheduleMode
from ..core.util import atomic_write_bytes, atomic_write_text
from ..routers import RouterLogits, baselines

DEFAULT_BUDGETS = (0.6, 0.7, 0.8, 0.9)
METHODS = ("full", "l2c", "fora", "random", "fewer-steps")


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to (n, d) and (m, d) features:
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Tr (S_a S_b)^(1/2) is taken as the sum of the square roots of the eigenvalues of the symmetric S_a^(1/2) S_b
    S_a^(1/2) (the same eigenvalues), which needs no general matrix square root.
    """
    mu_a, mu_b = features_a.mean(axis=0), features_b.mean(axis=0)
    sigma_a = np.atleast_2d(np.cov(features_a, rowvar=False))
    sigma_b = np.atleast_2d(np.cov(features_b, rowvar=False))
    values, vectors = np.linalg.eigh(sigma_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = root_a @ sigma_b @ root_a
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    distance = ((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_root
    return float(max(distance, 0.0))  # identical sets give a rounding error's worth below zero


def psnr(samples: np.ndarray, reference: np.ndarray, data_range: float = 2.0) -> float | None:
    """PSNR in dB of ``samples`` against ``reference`` (same shape), both clipped to [-1, 1]; None when identical."""
    mse = float(np.mean((np.clip(samples, -1, 1) - np.clip(reference, -1, 1)) ** 2, dtype=np.float64))
    return None if mse == 0.0 else float(10.0 * np.log10(data_range ** 2 / mse))


@dataclass
class Candidate:
    """One way of sampling: a schedule for a sampler of ``num_steps`` steps (None: full compute)."""

    method: str
    mac_fraction: float
    num_steps: int
    schedule: Schedule | None
    budget: float | None
    point: str
    info: dict = field(default_factory=dict)

    def key(self) -> tuple:
        compute = None if self.schedule is None or self.schedule.compute.all() else self.schedule.compute.tobytes()
        return self.num_steps, compute


def candidates_at(budget: float, router: RouterLogits | None, mode: ScheduleMode, num_steps: int, macs,
                  timesteps: list[int], point: str, random_seeds: Sequence[int], sampler_kind: str,
                  clip_denoised: bool, learned: Schedule | None = None) -> list[Candidate]:
    """The l2c schedule (``learned`` if given, else the router at ``budget``) and every baseline at ``budget``."""
    out = []
    if learned is None and router is not None:
        try:
            learned = baselines.schedule_for_mac_fraction(router, budget, macs, mode, timesteps)
        except ValueError:
            learned = None  # below what the mode can reach
    if learned is not None:
        out.append(Candidate("l2c", learned.mac_fraction(macs), num_steps, learned, budget, point,
                             {"threshold": learned.threshold, "mode": learned.mode}))
    fora = baselines.reuse_every_n(num_steps, macs, budget, timesteps)
    out.append(Candidate("fora", fora.mac_fraction(macs), num_steps, fora, budget, point,
                         {"interval": fora.extra["interval"]}))
    for seed in random_seeds:
        drop = baselines.random_drop(num_steps, macs, budget, seed=seed, timesteps=timesteps)
        out.append(Candidate("random", drop.mac_fraction(macs), num_steps, drop, budget, point,
                             {"seed": seed, "dropped": drop.extra["dropped"]}))
    fewer = baselines.fewer_steps(num_steps, macs.depth, budget, kind=sampler_kind, clip_denoised=clip_denoised)
    out.append(Candidate("fewer-steps", fewer.extra["mac_fraction"], fewer.num_steps, None, budget, point,
                         {"steps": fewer.num_steps}))
    return out


def evaluate(learned: Schedule, router: RouterLogits | None = None, mode: ScheduleMode = "official",
             budgets: Sequence[float] = DEFAULT_BUDGETS, num_samples: int = 1000, seed: int = 0,
             random_seeds: Sequence[int] = (0, 1), classifier_path: Path | None = None,
             progress: bool = True, int8: bool = True, model_name: str = "dit-digits") -> dict:
    """Evaluates ``learned`` (a schedule of the embedded model ``model_name``) and the baselines at its MAC fraction,
    and the router (if given) and the baselines at each of ``budgets``. Returns the JSON document (see the module
    doc)."""
    import torch

    from ..models import zoo
    from ..samplers.guidance import make_noise
    from ..samplers.reference import sample_reference
    from .classifier import CLASSIFIER_PATH, accuracy, features, load_classifier
    from .train import digits_dataset

    spec = zoo.embedded_default(model_name)
    config, family = spec.config, spec.family
    sampler = spec.sampler()
    learned.check_fits(sampler.num_calls, spec.sublayer_names)
    macs = family.count_macs(config)
    timesteps = sampler.model_times.tolist()
    classifier = load_classifier(classifier_path or CLASSIFIER_PATH)
    real_features = features(classifier, digits_dataset()[0])
    model = spec.load_model()
    labels = [i % family.null_class(config) for i in range(num_samples)]
    noise = make_noise(seed, (num_samples, *family.graph_inputs(config)[0].shape))

    matched = learned.mac_fraction(macs)
    candidates = [Candidate("full", 1.0, sampler.num_calls, None, None, "reference")]
    common = dict(mode=mode, num_steps=sampler.num_calls, macs=macs, timesteps=timesteps, random_seeds=random_seeds,
                  sampler_kind=sampler.kind, clip_denoised=spec.clip_denoised)
    candidates += candidates_at(matched, router, point="matched", learned=learned, **common)
    for budget in budgets:
        candidates += candidates_at(budget, router, point="sweep", **common)

    samples_by_key: dict[tuple, np.ndarray] = {}
    torch.set_grad_enabled(False)
    for candidate in tqdm(candidates, desc="evaluating schedules", disable=not progress):
        if candidate.key() not in samples_by_key:
            run_sampler = spec.sampler(num_steps=candidate.num_steps)
            samples_by_key[candidate.key()] = sample_reference(model, run_sampler, labels, noise, spec.cfg_scale,
                                                               schedule=candidate.schedule, progress=False)
    full_samples = samples_by_key[candidates[0].key()]
    full_features = features(classifier, full_samples)
    label_array = np.asarray(labels)

    def metrics(samples: np.ndarray, reference: bool = False) -> dict:
        sample_features = features(classifier, samples)
        return {"fd": frechet_distance(sample_features, real_features),
                "accuracy": accuracy(classifier, samples, label_array),
                "psnr": None if reference else psnr(samples, full_samples),
                "fd_to_full": frechet_distance(sample_features, full_features)}

    rows = []
    for candidate in candidates:
        rows.append({"method": candidate.method, "mac_fraction": round(candidate.mac_fraction, 6),
                     **metrics(samples_by_key[candidate.key()], reference=candidate.method == "full"),
                     "budget": candidate.budget, "point": candidate.point, **candidate.info})
    if int8:
        for method, samples in _int8_samples(spec, learned, sampler, labels, noise).items():
            rows.append({"method": method, "mac_fraction": 1.0 if method == "int8 full" else round(matched, 6),
                         **metrics(samples), "budget": None,
                         "point": "reference" if method == "int8 full" else "matched", "precision": "int8"})
    return {"results": _average_random_seeds(rows), "learned_mac_fraction": matched,
            "learned_schedule": learned.source, "num_samples": num_samples, "seed": seed,
            "random_seeds": list(random_seeds), "model": spec.name,
            "sampler": {"kind": sampler.kind, "num_calls": sampler.num_calls},
            "cfg_scale": spec.cfg_scale,
            "fd_reference": "scikit-learn digits (1797) in the shipped classifier's 64-d feature space"}


def _int8_samples(spec, learned: Schedule, sampler, labels: list[int], noise: np.ndarray) -> dict[str, np.ndarray]:
    """Samples of the int8 build (ONNX Runtime) of ``spec`` with ``learned``: full compute and the schedule."""
    import tempfile

    from ..builder.build import BuildRequest, build
    from ..runtime.pipeline import L2CPipeline

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "int8"
        build(BuildRequest(spec=spec, schedule=learned, sampler=sampler, out_dir=folder, precision="int8"),
              progress=False)
        pipe = L2CPipeline.from_engine_dir(folder)
        return {"int8 full": pipe(labels, noise=noise, full=True).samples,
                "int8 l2c": pipe(labels, noise=noise).samples}


def _average_random_seeds(rows: list[dict]) -> list[dict]:
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
        for name in ("mac_fraction", "fd", "accuracy", "psnr", "fd_to_full"):
            values = [r[name] for r in group]
            row[name] = float(np.mean(values))
        row["fd_std"] = float(np.std([r["fd"] for r in group]))
        merged.append(row)
    return merged


def write_json(report: dict, path: Path) -> None:
    atomic_write_text(Path(path), json.dumps(report, indent=1, allow_nan=False) + "\n")


def plot_fd(report: dict, path: Path) -> None:
    """Left: FD (to the real digits) against MAC fraction, one line per method, full compute dashed and the shipped
    schedule marked. Right: PSNR against the full-compute samples, the same lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"l2c": ("#2b6cb0", "o"), "fora": ("#dd6b20", "s"), "random": ("#718096", "^"),
              "fewer-steps": ("#38a169", "D")}
    rows = report["results"]
    full = next(r for r in rows if r["method"] == "full")
    learned = next((r for r in rows if r["method"] == "l2c" and r["point"] == "matched"), None)
    figure, (fd_axis, psnr_axis) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    for axis, metric in ((fd_axis, "fd"), (psnr_axis, "psnr")):
        for method, (color, marker) in styles.items():
            points = sorted({(r["mac_fraction"], r[metric]) for r in rows if r["method"] == method})
            if points:
                axis.plot(*zip(*points), color=color, marker=marker, label=method, linewidth=1.5, markersize=5)
        if learned:
            axis.axvline(learned["mac_fraction"], color="#2b6cb0", linestyle=":", linewidth=1,
                         label="shipped schedule")
        sampler = report["sampler"]
        axis.set_xlabel(f"MAC fraction (of full compute, {sampler['num_calls']} {sampler['kind']} model calls)")
        axis.grid(True, alpha=0.3)
    fd_axis.axhline(full["fd"], color="black", linestyle="--", linewidth=1, label=f"full compute ({full['fd']:.2f})")
    fd_axis.set_ylabel("Frechet distance to the digits (classifier features)")
    fd_axis.set_title("FD (lower is better)", fontsize=9)
    psnr_axis.set_ylabel("PSNR against full compute (dB)")
    psnr_axis.set_title("PSNR against the full-compute samples (higher is better)", fontsize=9)
    fd_axis.legend(fontsize=8)
    figure.suptitle(f"{report['model']}, {report['num_samples']} samples from the same noise, guidance "
                    f"{report['cfg_scale']:g}", fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(Path(path), buffer.getvalue())


def format_table(report: dict) -> str:
    """A Markdown table of the matched point (then the sweep)."""
    lines = ["| method | point | MAC fraction | FD | accuracy | PSNR (dB) | FD to full |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["results"]:
        value = "-" if row["psnr"] is None else f"{row['psnr']:.2f}"
        budget = row["point"] if row["budget"] is None or row["point"] == "matched" else f"sweep {row['budget']}"
        lines.append(f"| {row['method']} | {budget} | {row['mac_fraction']:.3f} | {row['fd']:.3f} | "
                     f"{row['accuracy']:.3f} | {value} | {row['fd_to_full']:.3f} |")
    return "\n".join(lines)
