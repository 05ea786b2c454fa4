"""What a schedule buys at equal cost: the learned schedule against the learning-free ones, on an embedded digits
model (the DiT with DDIM, or the U-ViT with DPM-Solver-2S) or a diffusers folder (its transformer and scheduler).

From the same noise and conditioning (labels, or prompt embeddings), samples are drawn with full compute, with the
learned schedule and with each baseline (:mod:`l2c_export.routers.baselines`) at the learned schedule's MAC fraction
and at a sweep of budgets. A method is a :class:`Method`: given a budget it makes :class:`Candidate`s, each saying
what it costs (its MAC fraction of full compute) and how it samples (the PyTorch reference sampler with a schedule
and a step count, or a sampler of its own); :data:`METHODS` lists them, so a method is one entry. Per method:

- ``fd``: Frechet distance between the samples and reference data in a feature space (the FID recipe):
  scikit-learn's 1797 digits in the 64 features of the shipped digits classifier (:mod:`l2c_export.demo.classifier`)
  where that classifier applies (8x8 one-channel pixel models); ``null`` where there are no reference data (diffusers
  folders).
- ``accuracy``: fraction of samples that the classifier assigns the class they were sampled for (digits label
  models; else ``null``).
- ``psnr``: PSNR (dB) of the samples against the full-compute samples from the same noise; ``null`` for full compute
  itself (identical, infinite). Pixel models: both clipped to [-1, 1], data range 2; latents: unclipped, data range
  the full-compute latents' (max - min).
- ``fd_to_full``: the Frechet distance to the full-compute samples: how far the method moves the model's own
  distribution (0 for full compute), in the classifier's features where it applies, else in a fixed random
  projection of the flattened latents (:class:`RandomProjection`: 64 Gaussian directions from seed 0). ``fd`` can
  fall below full compute's when an approximation happens to move the samples towards the data; ``fd_to_full``
  cannot.

``int8 full`` and ``int8 l2c`` are the int8 build (ONNX Runtime, dynamic activations; :mod:`l2c_export.export.quantize`)
with the learned schedule, sampled from the same noise; their PSNR and FD to full are against the fp32 full-compute
samples, so they count quantization and caching together.

JSON: ``{"results": [{"method", "mac_fraction", "fd", "accuracy", "psnr", "fd_to_full", "budget", "point", ...},
...], "features": ..., ...}`` where ``point`` is ``"reference"`` (full compute), ``"matched"`` (at the learned
schedule's MAC fraction) or ``"sweep"``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..core.macs import MacCount
from ..core.schedule import Schedule, ScheduleMode
from ..core.util import atomic_write_bytes, atomic_write_text
from ..routers import RouterLogits, baselines

DEFAULT_BUDGETS = (0.6, 0.7, 0.8, 0.9)
PROJECTION_DIM = 64  # features of the random projection (as many as the digits classifier's)


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


def psnr(samples: np.ndarray, reference: np.ndarray, data_range: float | None = 2.0) -> float | None:
    """PSNR in dB of ``samples`` against ``reference`` (same shape); None when identical. With ``data_range`` 2 (pixel
    models) both are clipped to [-1, 1]; with None (latents) nothing is clipped and the range is the reference's
    (max - min)."""
    if data_range is not None:
        samples, reference = np.clip(samples, -1, 1), np.clip(reference, -1, 1)
    else:
        data_range = float(reference.max() - reference.min())
    mse = float(np.mean((samples - reference) ** 2, dtype=np.float64))
    return None if mse == 0.0 else float(10.0 * np.log10(data_range ** 2 / mse))


# ---------------------------------------------------------------------------------------------------------------------
# Feature spaces.

class DigitsFeatures:
    """The shipped digits classifier: 64 penultimate features, the 1797 real digits as reference, class accuracy."""

    description = "scikit-learn digits (1797) in the shipped classifier's 64-d feature space"
    data_range = 2.0  # pixels in [-1, 1]

    def __init__(self, classifier_path: Path | None = None):
        from .classifier import CLASSIFIER_PATH, load_classifier
        from .train import digits_dataset

        self.classifier = load_classifier(classifier_path or CLASSIFIER_PATH)
        self.real = self(digits_dataset()[0])

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        from .classifier import features

        return features(self.classifier, samples)

    def accuracy(self, samples: np.ndarray, labels: np.ndarray | None) -> float | None:
        from .classifier import accuracy

        return None if labels is None else accuracy(self.classifier, samples, labels)

    @staticmethod
    def applies(spec) -> bool:
        """8x8 one-channel pixel models of 10 classes (the embedded digits models)."""
        sample = next(t for t in spec.family.graph_inputs(spec.config) if t.role == "sample")
        return spec.space == "pixel" and tuple(sample.shape) == (1, 8, 8)


class RandomProjection:
    """A fixed random projection of the flattened samples (C * H * W) onto ``dim`` Gaussian directions of norm about
    1, from ``numpy.random.default_rng(seed)``: a feature space for any model, with no reference data (so FD to full
    only) and no classes."""

    real = None
    data_range = None  # latents: PSNR over the reference's range

    def __init__(self, sample_shape: Sequence[int], dim: int = PROJECTION_DIM, seed: int = 0):
        size = int(np.prod(sample_shape))
        self.matrix = np.random.default_rng(seed).standard_normal((size, dim)) / np.sqrt(size)
        self.description = (f"a fixed random projection of the flattened {'x'.join(map(str, sample_shape))} latents "
                            f"onto {dim} Gaussian directions (numpy default_rng({seed})); no reference data")

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        return samples.reshape(len(samples), -1).astype(np.float64) @ self.matrix

    def accuracy(self, samples: np.ndarray, labels: np.ndarray | None) -> None:
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Methods.

@dataclass
class EvalSetup:
    """What every method samples from: the model, the N-call sampler the MAC fractions are counted against, the
    request (labels, or prompt arrays by the pipelines' names, one row per sample) and its noise (n, C, H, W)."""

    spec: object  # models.zoo.ModelSpec
    model: object  # the family's torch module
    num_steps: int  # model calls of full compute
    macs: MacCount
    labels: list[int] | None
    conditioning: dict[str, np.ndarray] | None
    noise: np.ndarray
    cfg_scale: float
    mode: ScheduleMode = "official"
    router: RouterLogits | None = None
    random_seeds: Sequence[int] = (0, 1)
    prompts: "TextToImagePrompts | None" = None  # a text-to-image model sampled from captions, on ONNX Runtime
    peer_search: dict = field(default_factory=dict)  # cache_dit_peer.match_mac_fraction's search options

    @property
    def sampler(self):
        return self.spec.sampler(None, self.num_steps)

    @property
    def timesteps(self) -> list:
        return self.sampler.model_times.tolist()

    def sample(self, schedule: Schedule | None, num_steps: int) -> "np.ndarray | Drawn":
        """The PyTorch reference sampler at ``num_steps`` model calls, with ``schedule`` (None: full compute); for a
        text-to-image model (``prompts``), a build of ``schedule`` on ONNX Runtime, captions in, decoded images out."""
        if self.prompts is not None:
            return self.prompts.sample_build(self, schedule, num_steps)
        from ..models.reference import sample_reference

        return sample_reference(self.model, self.spec.sampler(None, num_steps), self.labels, self.noise,
                                self.cfg_scale, schedule=schedule, progress=False, conditioning=self.conditioning)


@dataclass
class Drawn:
    """Samples (n, C, H, W) with the wall-clock seconds their drawing took as a user runs the method."""

    samples: np.ndarray
    seconds: float
    info: dict = field(default_factory=dict)


@dataclass
class TextToImagePrompts:
    """A text-to-image model (the embedded ``t2i-digits``, a diffusers folder with its T5, tokenizer and VAE) judged
    on its decoded images: sample i is ``captions[i]`` (naming digit ``digits[i]``) from noise row i. Each schedule
    is built (fp32, ONNX Runtime, with the folder's text encoder and VAE decoder graphs) into ``scratch`` and run as
    ``L2CPipeline(...)(prompt=..., decode=True)``, ``batch_size`` prompts a call; the seconds are those calls'."""

    folder: Path  # the diffusers folder (what cache-dit's pipeline loads)
    captions: list[str]
    digits: np.ndarray
    held_out: np.ndarray
    scratch: Path
    batch_size: int = 50

    def sample_build(self, setup: "EvalSetup", schedule: Schedule | None, num_steps: int) -> Drawn:
        import time

        from ..builder.build import BuildRequest, build
        from ..runtime.pipeline import L2CPipeline

        spec = setup.spec
        sampler = spec.sampler(None, num_steps)
        if schedule is None:
            schedule = Schedule.full(num_steps, sublayers=list(spec.sublayer_names),
                                     timesteps=sampler.model_times.tolist(), sampler=sampler.kind)
        folder = self.scratch / f"build-{len(list(self.scratch.glob('build-*')))}"
        build(BuildRequest(spec=spec, schedule=schedule, sampler=sampler, out_dir=folder), progress=False)
        pipe = L2CPipeline.from_engine_dir(folder)
        pipe(prompt=self.captions[:1], noise=setup.noise[:1], decode=True)  # untimed: sessions' first-run set-up
        images, seconds = [], 0.0
        for start in range(0, len(self.captions), self.batch_size):
            stop = min(start + self.batch_size, len(self.captions))
            begin = time.perf_counter()
            result = pipe(prompt=self.captions[start:stop], noise=setup.noise[start:stop], decode=True)
            seconds += time.perf_counter() - begin
            images.append(np.clip(result.decoded, -1.0, 1.0))  # as the pipelines' postprocess clamps
        return Drawn(np.concatenate(images), seconds)


@dataclass
class Candidate:
    """One way of sampling and what it costs: ``mac_fraction`` of full compute. By default the reference sampler with
    ``schedule`` (None: full compute) at ``num_steps`` model calls; a method with a sampler of its own gives ``run``."""

    method: str
    mac_fraction: float
    num_steps: int
    schedule: Schedule | None
    budget: float | None
    point: str
    info: dict = field(default_factory=dict)
    run: Callable[[EvalSetup], np.ndarray] | None = None

    def key(self) -> tuple:
        """Candidates with equal keys sample the same thing (drawn once)."""
        if self.run is not None:
            return self.method, json.dumps(self.info, sort_keys=True, default=str)
        compute = None if self.schedule is None or self.schedule.compute.all() else self.schedule.compute.tobytes()
        return self.num_steps, compute

    def samples(self, setup: EvalSetup) -> "np.ndarray | Drawn":
        """The samples (n, C, H, W); a :class:`Drawn` where the method was timed as its users run it."""
        return self.run(setup) if self.run is not None else setup.sample(self.schedule, self.num_steps)


# A method: (budget, setup, point) -> its candidates at that budget (none where it cannot reach it).
Method = Callable[[float, EvalSetup, str], list[Candidate]]


def _fora(budget: float, setup: EvalSetup, point: str) -> list[Candidate]:
    fora = baselines.reuse_every_n(setup.num_steps, setup.macs, budget, setup.timesteps,
                                   sublayers=setup.spec.sublayer_names)
    return [Candidate("fora", fora.mac_fraction(setup.macs), setup.num_steps, fora, budget, point,
                      {"interval": fora.extra["interval"]})]


def _random(budget: float, setup: EvalSetup, point: str) -> list[Candidate]:
    out = []
    for seed in setup.random_seeds:
        drop = baselines.random_drop(setup.num_steps, setup.macs, budget, seed=seed, timesteps=setup.timesteps,
                                     sublayers=setup.spec.sublayer_names)
        out.append(Candidate("random", drop.mac_fraction(setup.macs), setup.num_steps, drop, budget, point,
                             {"seed": seed, "dropped": drop.extra["dropped"]}))
    return out


def _fewer_steps(budget: float, setup: EvalSetup, point: str) -> list[Candidate]:
    spec = setup.spec
    fewer = baselines.fewer_steps(setup.num_steps, spec.num_layers, budget, kind=setup.sampler.kind,
                                  clip_denoised=spec.clip_denoised, sublayers=spec.sublayer_names,
                                  make_sampler=lambda calls: spec.sampler(None, calls))
    return [Candidate("fewer-steps", fewer.extra["mac_fraction"], fewer.num_steps, None, budget, point,
                      {"steps": fewer.num_steps})]


def _cache_dit(budget: float, setup: EvalSetup, point: str) -> list[Candidate]:
    """cache-dit's DBCache on diffusers' own pipeline (text-to-image models only), its settings matched to
    ``budget`` on a calibration set (the first ``batch_size`` prompts); its MAC fraction is the one counted from
    the blocks it ran on every prompt (set after it samples)."""
    if setup.prompts is None:
        return []
    from . import cache_dit_peer

    prompts, spec = setup.prompts, setup.spec
    calibration = slice(0, min(prompts.batch_size, len(prompts.captions)))
    settings, tried = cache_dit_peer.match_mac_fraction(
        prompts.folder, budget, prompts.captions[calibration], setup.noise[calibration], setup.num_steps,
        setup.cfg_scale, setup.macs, spec.sublayer_names, batch_size=prompts.batch_size, **setup.peer_search)
    candidate = Candidate("cache-dit", budget, setup.num_steps, None, budget, point,
                          {"dbcache": settings.as_dict(), "calibration": {"prompts": calibration.stop,
                                                                         "tried": tried}})

    def run(setup: EvalSetup) -> Drawn:
        drawn = cache_dit_peer.sample_dbcache(prompts.folder, settings, prompts.captions, setup.noise, setup.num_steps,
                                              setup.cfg_scale, setup.macs, spec.sublayer_names, prompts.batch_size)
        candidate.mac_fraction = drawn.mac_fraction
        return Drawn(drawn.images, drawn.seconds,
                     {"block_calls": drawn.block_calls, "transformer_calls": drawn.transformer_calls,
                      "cached_steps": drawn.cached_steps})

    candidate.run = run
    return [candidate]


# The other methods, compared with the learned schedule at every budget, in this order (cache-dit: text-to-image
# models only).
METHODS: dict[str, Method] = {"fora": _fora, "random": _random, "fewer-steps": _fewer_steps, "cache-dit": _cache_dit}


def candidates_at(budget: float, setup: EvalSetup, point: str, learned: Schedule | None = None) -> list[Candidate]:
    """The l2c schedule (``learned`` if given, else the router at ``budget``) and every method of :data:`METHODS`
    at ``budget``."""
    out = []
    if learned is None and setup.router is not None:
        try:
            learned = baselines.schedule_for_mac_fraction(setup.router, budget, setup.macs, setup.mode,
                                                          setup.timesteps)
        except ValueError:
            learned = None  # below what the mode can reach
    if learned is not None:
        out.append(Candidate("l2c", learned.mac_fraction(setup.macs), setup.num_steps, learned, budget, point,
                             {"threshold": learned.threshold, "mode": learned.mode}))
    for method in METHODS.values():
        out += method(budget, setup, point)
    return out


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
    judged by the digits classifier (``fd`` to the digits, ``accuracy`` of the named digit). ``grid``, if given, is
    filled with a few prompts' images of full compute, the learned schedule and cache-dit (:func:`plot_t2i_grid`);
    ``peer_search``: options of :func:`l2c_export.demo.cache_dit_peer.match_mac_fraction` (which settings it tries).
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
        guiding = getattr(family, "classifier_free", True) and spec.cfg_scale > 1.0  # FLUX.1: no negative batch
        conditioning = _cycle_prompts(spec, prompts, num_samples, guiding, prompts_source)
    sample_shape = next(t.shape for t in family.graph_inputs(config) if t.role == "sample")
    judge = DigitsFeatures(classifier_path) if DigitsFeatures.applies(spec) else RandomProjection(sample_shape)
    text_to_image, scratch = None, None
    if captions is not None:
        if len(captions) != num_samples:
            raise ValueError(f"{len(captions)} captions for {num_samples} samples")
        scratch = tempfile.TemporaryDirectory(prefix="l2c-eval-")
        text_to_image = TextToImagePrompts(folder=Path(spec.weights).parent, captions=[c for c, _, _ in captions],
                                           digits=np.array([d for _, d, _ in captions], dtype=np.int64),
                                           held_out=np.array([h for _, _, h in captions], dtype=bool),
                                           scratch=Path(scratch.name), batch_size=batch_size)
        label_array, int8 = text_to_image.digits, False
        judge = DigitsFeatures(classifier_path)  # on the decoded 8x8 images
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
    full_features = judge(full_samples)

    def metrics(samples: np.ndarray, reference: bool = False) -> dict:
        sample_features = judge(samples)
        out = {"fd": None if judge.real is None else frechet_distance(sample_features, judge.real),
               "accuracy": judge.accuracy(samples, label_array),
               "psnr": None if reference else psnr(samples, full_samples, judge.data_range),
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
        grid.update(_grid_samples(text_to_image, candidates, samples_by_key))
    if int8:
        request = {"labels": setup.labels} if setup.labels is not None else {"conditioning": conditioning}
        for method, samples in _int8_samples(spec, learned, sampler, request, setup.noise).items():
            rows.append({"method": method, "mac_fraction": 1.0 if method == "int8 full" else round(matched, 6),
                         **metrics(samples), "budget": None,
                         "point": "reference" if method == "int8 full" else "matched", "precision": "int8"})
    extra = {}
    if text_to_image is not None:
        import onnxruntime

        forms = sorted(set(zip(text_to_image.captions, text_to_image.held_out.tolist())))
        extra = {"prompts": {"source": "l2c_export.demo.t2i.evaluation_prompts: every caption form (training and "
                                       "held-out) with every digit in turn",
                             "num_samples": num_samples, "distinct": len(forms),
                             "held_out": int(text_to_image.held_out.sum()), "batch_size": batch_size},
                 "timing": {"what": "wall-clock seconds per image of the calls that draw it, text encoder and VAE "
                                    "decoder included, batch_size prompts a call, on this machine",
                            "schedules": f"a build on ONNX Runtime {onnxruntime.__version__} (CPUExecutionProvider)",
                            "cache-dit": f"diffusers' PixArtAlphaPipeline in PyTorch {torch.__version__}, "
                                         f"{torch.get_num_threads()} threads",
                            "cpus": _cpu_count()}}
    return {"results": _average_random_seeds(rows), "learned_mac_fraction": matched, **extra,
            "learned_schedule": learned.source, "num_samples": num_samples, "seed": seed,
            "random_seeds": list(random_seeds), "model": spec.name,
            "sampler": {"kind": sampler.kind, "num_calls": sampler.num_calls},
            "cfg_scale": spec.cfg_scale, "features": judge.description,
            "fd_reference": None if judge.real is None else judge.description}


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


GRID_METHODS = ("full", "l2c", "cache-dit")  # the grid's columns


def _grid_samples(prompts: TextToImagePrompts, candidates: list[Candidate], samples_by_key: dict) -> dict:
    """One prompt per digit (caption forms in turn, held-out ones included) and its images of :data:`GRID_METHODS`
    at the matched point: {"captions": [...], "held_out": [...], method: (k, C, H, W)}."""
    chosen = []
    for digit in range(10):
        rows = [i for i in np.flatnonzero(prompts.digits == digit)]
        if rows:
            forms = list(dict.fromkeys(prompts.captions[i] for i in rows))
            wanted = forms[digit % len(forms)]
            chosen.append(next(i for i in rows if prompts.captions[i] == wanted))
    out = {"captions": [prompts.captions[i] for i in chosen], "held_out": [bool(prompts.held_out[i]) for i in chosen]}
    for method in GRID_METHODS:
        candidate = next((c for c in candidates if c.method == method and c.point in ("reference", "matched")), None)
        if candidate is not None:
            out[method] = samples_by_key[candidate.key()][chosen]
    return out


def plot_t2i_grid(grid: dict, path: Path) -> None:
    """The grid of :func:`_grid_samples`: a row per prompt (its caption, "held-out form" marked), a column per
    method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in GRID_METHODS if m in grid]
    rows = len(grid["captions"])
    figure, axes = plt.subplots(rows, len(methods), figsize=(1.5 * len(methods) + 2.6, 1.25 * rows), squeeze=False)
    titles = {"full": "full compute", "l2c": "learned schedule", "cache-dit": "cache-dit DBCache"}
    for r, text in enumerate(grid["captions"]):
        for c, method in enumerate(methods):
            axis = axes[r][c]
            axis.imshow(np.clip(grid[method][r, 0], -1, 1), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(titles.get(method, method), fontsize=8)
        label = f'"{text}"' + ("\n(held-out form)" if grid["held_out"][r] else "")
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    atomic_write_bytes(Path(path), buffer.getvalue())


def _cycle_prompts(spec, prompts: Mapping[str, np.ndarray], n: int, guiding: bool, where: str) -> dict:
    """``n`` rows of prompt arrays (the model's text roles: PixArt's masks, SD3's pooled embeddings; their negatives
    when ``guiding``), prompt ``i % P`` in row i, checked as the runtime checks a request."""
    from ..runtime.conditioning import TEXT_ROLES, check_text_conditioning

    inputs = {t.role: t.record() for t in spec.family.graph_inputs(spec.config) if t.role in TEXT_ROLES}
    checked = check_text_conditioning(prompts, inputs, guiding, where, max_tokens=spec.max_prompt_tokens)
    rows = np.arange(n) % len(checked["prompt_embeds"][0])
    out = {}
    for role, (array, negative) in checked.items():
        out[role] = array[rows]
        if negative is not None:
            out[f"negative_{role}"] = negative[rows]
    return out


def _int8_samples(spec, learned: Schedule, sampler, request: dict, noise: np.ndarray) -> dict[str, np.ndarray]:
    """Samples of the int8 build (ONNX Runtime) of ``spec`` with ``learned``: full compute and the schedule, for
    ``request`` (the pipeline's ``labels`` or ``conditioning``)."""
    import tempfile

    from ..builder.build import BuildRequest, build
    from ..runtime.pipeline import L2CPipeline

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "int8"
        build(BuildRequest(spec=spec, schedule=learned, sampler=sampler, out_dir=folder, precision="int8"),
              progress=False)
        pipe = L2CPipeline.from_engine_dir(folder)
        return {"int8 full": pipe(**request, noise=noise, full=True).samples,
                "int8 l2c": pipe(**request, noise=noise).samples}


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
        for name in ("mac_fraction", "fd", "accuracy", "psnr", "fd_to_full", "accuracy_held_out_forms",
                     "seconds_per_image"):
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


def plot_fd(report: dict, path: Path) -> None:
    """Left: FD against MAC fraction (to the reference data where there are some, else to full compute), one line per
    method, full compute dashed and the learned schedule marked. Right: PSNR against the full-compute samples, the
    same lines. A method without a style of its own gets the next colour of matplotlib's cycle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"l2c": ("#2b6cb0", "o"), "fora": ("#dd6b20", "s"), "random": ("#718096", "^"),
              "fewer-steps": ("#38a169", "D"), "cache-dit": ("#c53030", "P")}
    rows = report["results"]
    full = next(r for r in rows if r["method"] == "full")
    learned = next((r for r in rows if r["method"] == "l2c" and r["point"] == "matched"), None)
    # FD to the data where there are some, except for a text-to-image model: its methods' FD to the digits differ by
    # less than the samples' own spread, so its plot shows how far each moves full compute's samples
    fd_metric = "fd" if full["fd"] is not None and "prompts" not in report else "fd_to_full"
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "full" and "precision" not in r))
    cycle = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"][4:] * 4)
    figure, (fd_axis, psnr_axis) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    for axis, metric in ((fd_axis, fd_metric), (psnr_axis, "psnr")):
        for method in methods:
            color, marker = styles.setdefault(method, (next(cycle), "v"))
            points = sorted({(r["mac_fraction"], r[metric]) for r in rows if r["method"] == method
                             and r[metric] is not None})
            if points:
                axis.plot(*zip(*points), color=color, marker=marker, label=method, linewidth=1.5, markersize=5)
        if learned:
            axis.axvline(learned["mac_fraction"], color="#2b6cb0", linestyle=":", linewidth=1,
                         label="learned schedule")
        sampler = report["sampler"]
        axis.set_xlabel(f"MAC fraction (of full compute, {sampler['num_calls']} {sampler['kind']} model calls)")
        axis.grid(True, alpha=0.3)
    if fd_metric == "fd":
        fd_axis.axhline(full["fd"], color="black", linestyle="--", linewidth=1,
                        label=f"full compute ({full['fd']:.2f})")
        fd_axis.set_ylabel("Frechet distance to the digits (classifier features)")
    else:
        features = "classifier features" if full["fd"] is not None else "random projection"
        fd_axis.set_ylabel(f"Frechet distance to full compute ({features})")
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
