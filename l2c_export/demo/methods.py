"""The evaluation's methods (:mod:`l2c_export.demo.evaluate`): what every method samples from (:class:`EvalSetup`),
one way of sampling and its cost (:class:`Candidate`), and the registry of the methods compared with the learned
schedule (:data:`METHODS`: a method is one entry).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..core.macs import MacCount
from ..core.schedule import Schedule, ScheduleMode
from ..routers import RouterLogits, baselines


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
    peer_search: dict = field(default_factory=dict)  # the cache-dit row's search: {"size": "small" | "full"}

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
    # runtime -> a call that draws the first batch again and returns its seconds (interleaved timing, eval --budgets)
    timers: dict[str, Callable[[], float]] = field(default_factory=dict)


@dataclass
class TextToImagePrompts:
    """A text-to-image or text-to-video model (the embedded ``t2i-digits``, ``t2i-digits-sd3``, ``t2v-digits``, a
    diffusers folder with its text encoder, tokenizer and VAE) judged on its decoded images or clips: sample i is
    ``captions[i]`` (naming digit ``digits[i]``, moving in direction ``directions[i]`` for the video model; None where
    a user's prompts name no digit) from noise row i. Each schedule is built (fp32, ONNX Runtime, with the folder's
    text encoder and VAE decoder graphs) into ``scratch`` and run as ``L2CPipeline(...)(prompt=..., decode=True)``,
    ``batch_size`` prompts a call; the seconds are those calls'."""

    folder: Path  # the diffusers folder (what the peers' pipeline loads)
    captions: list[str]
    digits: np.ndarray | None
    held_out: np.ndarray
    scratch: Path
    batch_size: int = 50
    directions: np.ndarray | None = None  # the video model's: (n,) direction names (l2c_export.demo.t2v.DIRECTIONS)

    @classmethod
    def of(cls, folder: Path, captions, scratch: Path, batch_size: int) -> "TextToImagePrompts":
        """From ``captions``: (caption, digit, held_out) per sample (:func:`l2c_export.demo.t2i.evaluation_prompts`;
        digit None for a user's prompt) or (caption, digit, held_out, direction) (the video model's)."""
        digits = [c[1] for c in captions]
        directions = [c[3] for c in captions] if captions and len(captions[0]) > 3 else None
        return cls(folder=folder, captions=[c[0] for c in captions],
                   digits=None if None in digits else np.array(digits, dtype=np.int64),
                   held_out=np.array([c[2] for c in captions], dtype=bool), scratch=scratch, batch_size=batch_size,
                   directions=None if directions is None else np.array(directions, dtype=object))

    @property
    def labels(self) -> np.ndarray | None:
        """What the judge's accuracy is against: the digits (n,), or for the video model (n, 2) rows (digit,
        direction) (an object array); None where the prompts name no digit."""
        if self.digits is None or self.directions is None:
            return self.digits
        return np.stack([self.digits.astype(object), self.directions], axis=1)

    def judge(self, shape: tuple):
        """The judge of decoded samples of ``shape`` (one sample's): the video model's clips frame by frame with the
        clip judge (:class:`l2c_export.demo.metrics.DigitClips`), 8x8 one-channel digits with the digits classifier,
        anything else in a fixed random projection of the decoded pixels (PSNR over [-1, 1])."""
        from .metrics import DigitClips, DigitsFeatures, FrameProjection, RandomProjection

        if len(shape) == 4:
            return DigitClips(shape) if self.directions is not None and self.digits is not None else \
                FrameProjection(shape, data_range=2.0)
        if self.digits is not None and tuple(shape) == (1, 8, 8):
            return DigitsFeatures()
        return RandomProjection(shape, data_range=2.0)

    def sample_build(self, setup: "EvalSetup", schedule: Schedule | None, num_steps: int,
                     runtimes: Sequence[str] = ("onnxruntime",)) -> Drawn:
        """The images of ``schedule`` (None: full compute) from its build on ONNX Runtime, with a timer per runtime
        of ``runtimes`` (``"onnxruntime"``, ``"torch"``: the same build on the PyTorch backend) that draws the first
        batch again."""
        import time

        from ..builder.build import BuildRequest, build
        from ..runtime.pipeline import L2CPipeline

        spec = setup.spec
        sampler = spec.sampler(None, num_steps)
        if schedule is None:
            schedule = Schedule.full(num_steps, sublayers=list(spec.sublayer_names),
                                     timesteps=sampler.model_times.tolist(), sampler=sampler.kind)
        earlier = sorted(self.scratch.glob("build-*"))
        folder = self.scratch / f"build-{len(earlier)}"
        if earlier:  # the build reuses what it shares with the last one (weights, text encoder and VAE graphs)
            _link_tree(earlier[-1], folder)
        build(BuildRequest(spec=spec, schedule=schedule, sampler=sampler, out_dir=folder), progress=False)
        pipe = L2CPipeline.from_engine_dir(folder)
        pipe(prompt=self.captions[:1], noise=setup.noise[:1], decode=True)  # untimed: sessions' first-run set-up
        compute = {subset["index"]: subset["compute"] for subset in pipe.manifest["subsets"]}
        images, seconds, spent = [], 0.0, 0
        for start in range(0, len(self.captions), self.batch_size):
            stop = min(start + self.batch_size, len(self.captions))
            begin = time.perf_counter()
            result = pipe(prompt=self.captions[start:stop], noise=setup.noise[start:stop], decode=True)
            seconds += time.perf_counter() - begin
            images.append(np.clip(result.decoded, -1.0, 1.0))  # as the pipelines' postprocess clamps
            spent += (stop - start) * sum(setup.macs.of_subset(compute[index]) for index in result.step_subsets)
        # the engines' own record of what ran (the subset of every model call), against full compute's calls
        ran = spent / (len(self.captions) * setup.num_steps * setup.macs.full)
        return Drawn(np.concatenate(images), seconds, {"engines_mac_fraction": round(ran, 6)},
                     timers={runtime: self._timer(folder, pipe if runtime == "onnxruntime" else None, runtime,
                                                  setup.noise) for runtime in runtimes})

    def _timer(self, folder: Path, pipe, runtime: str, noise: np.ndarray) -> Callable[[], float]:
        import time

        from ..runtime.pipeline import L2CPipeline

        batch = slice(0, min(self.batch_size, len(self.captions)))
        if pipe is None:
            pipe = L2CPipeline.from_engine_dir(folder, backend=runtime)
            pipe(prompt=self.captions[batch], noise=noise[batch], decode=True)  # untimed set-up, at the timed shape

        def timer() -> float:
            begin = time.perf_counter()
            pipe(prompt=self.captions[batch], noise=noise[batch], decode=True)
            return time.perf_counter() - begin
        return timer


def _link_tree(source: Path, target: Path) -> None:
    """``target`` a copy of the build folder ``source`` made of hard links (a build replaces files, never writes into
    them), or of copies where the file system links none."""
    import os
    import shutil

    try:
        shutil.copytree(source, target, copy_function=os.link)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)


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
    """cache-dit's DBCache on diffusers' own pipeline (models sampled from captions only,
    :data:`l2c_export.demo.diffusers_caches.PEERS`), its settings searched for ``budget`` on a calibration set (the
    first ``batch_size`` prompts; ``setup.peer_search["size"]``: "small" or "full", the grid); its MAC fraction is
    the one counted from the sub-layers it ran on every prompt (set after it samples), beside cache-dit's own count."""
    if setup.prompts is None:
        return []
    from . import diffusers_caches as caches
    from .metrics import psnr

    prompts, spec = setup.prompts, setup.spec
    captions, noise = prompts.captions, setup.noise
    calibration = slice(0, min(prompts.batch_size, len(captions)))
    pipelines = caches.folder_pipelines(spec, setup.num_steps, setup.cfg_scale)
    count = dict(macs=setup.macs, sublayers=spec.sublayer_names, batch_size=prompts.batch_size)
    peer = caches.PEERS["cache-dit"]
    reference = caches.draw(pipelines.open(None, {}, {}), captions[calibration], noise[calibration], **count).images

    def measure(knobs: dict) -> tuple[float, float]:
        run = caches.draw(pipelines.open(peer, knobs, {}), captions[calibration], noise[calibration], **count)
        return run.mac_fraction, psnr(run.images, reference, 2.0)

    size = setup.peer_search.get("size", "full")
    tried = caches.search(peer, [budget], measure, size, refine=1 if size == "small" else 3)
    chosen, _ = caches.choose(tried, budget)
    candidate = Candidate("cache-dit", chosen["mac_fraction"], setup.num_steps, None, budget, point,
                          {"dbcache": chosen["settings"], "calibration": {"prompts": calibration.stop,
                                                                         "tried": tried}})

    def run(setup: EvalSetup) -> Drawn:
        pipeline = pipelines.open(peer, chosen["settings"], {})
        pipeline.call(captions[:1], noise[:1])  # untimed, uncounted: PyTorch's first-call set-up
        drawn = caches.draw(pipeline, captions, noise, **count)
        candidate.mac_fraction = drawn.mac_fraction
        own = caches.own_mac_fraction(drawn.own, setup.macs, spec.sublayer_names, setup.num_steps)
        return Drawn(drawn.images, drawn.seconds, {"own_counter": drawn.own,
                                                   "own_mac_fraction": None if own is None else round(own, 6)})

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
