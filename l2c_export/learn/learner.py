"""Learning router logits: the Learning-to-Cache objective (Ma et al., NeurIPS 2024), as the authors train it.

The objective runs through the sampler's own model calls (:meth:`calls`, the loop of
:func:`l2c_export.samplers.denoise`), so it holds for every sampler and family: per model call ``c`` (DDIM/DDPM: one
per step; DPM-Solver-2S: two per step) a router holds one logit per sub-layer, ``w = sigmoid(logit)``. For a learned
call ``m``:

1. Take ``x`` at the input of an earlier solver step (data noised to its noise level, or a state of a trajectory
   that the full model sampled from noise) and run the full model there: that fills the cache with every
   sub-layer's fresh output, and the sampler moves ``x`` on with the (guided) teacher output.
2. At call ``m`` the teacher is the full model; the student is the family's ``forward_soft`` (DiT's, U-ViT's), in
   which every sub-layer outputs ``w * fresh + (1 - w) * cached``.
3. loss = MSE(teacher output, student output) + lambda * sum(w of call m). AdamW (no weight decay) updates only the
   logits, which are clamped to [-5, 5] after every update; the model is frozen and keeps no gradient.

The authors draw one call m per iteration and process (on 8 GPUs, 8 an iteration). Here an iteration averages the
loss over every learned call by default (``steps_per_iteration``: 1 gives theirs): the same objective with less
variance, so that AdamW, which moves a logit about ``lr`` per update, converges in a few hundred iterations on a CPU.

Schedule modes decide which calls are learned and what the cache holds:

- ``official`` (the authors'): only the calls where their sampler consults the router are learned
  (:func:`l2c_export.samplers.official_cache_calls`); every other call computes everything. DDIM/DDPM: the steps
  whose router index ``N - 1 - s`` is even, so the cache at ``m`` is the full model's values at ``m - 1`` (their
  ``ts = 2 t + 1`` step, then ``t``). DPM-Solver-2S: the outer call ``2k`` of solver steps k = 1 .. K-1, whose cache
  is what the previous step's midpoint call ``2k - 1`` computed; the unroll starts at step k - 1.
- ``general``: every call after the first may reuse, and a reused sub-layer holds its most recent *computed* value,
  which under soft routing is the previous call's output at that sub-layer, ``w * fresh + (1 - w) * cached``. So the
  student is unrolled from a step where the cache is exact (step 0 by default, or ``window`` calls back), with the
  teacher's trajectory as its inputs (teacher forcing, as the authors do for one step), and the loss at ``m`` reaches
  the routers of the calls before it through the cache.

With classifier-free guidance the batch is the sampler's: the conditional half and the null-class half share the
router (the authors drop 10% of the labels instead; their sampler too runs both halves through one schedule). A text
model (a diffusers PixArt) learns on a set of prompts (:class:`Condition`: prompt embeddings and masks, and the
negative ones as the unconditional half).

Distributed: under ``torchrun`` (gloo on CPU, NCCL on GPUs) every process draws the same global batch from the same
per-iteration generator and takes its shard; DDP averages the router's gradient, so N processes follow the path of
one process on the same data, up to float summation order.

Checkpoints and the router itself are safetensors files (no pickles). Router file: one float32 tensor ``logits``
(num_calls, num_sublayers) in sampling order and string metadata (see :func:`router_metadata`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.plan import default_sublayer_names
from ..core.schedule import ScheduleMode, check_mode
from ..core.util import parse_json
from ..models import family_of_config
from ..routers import RouterLogits, save_router
from ..samplers import DenoisingSampler
from ..samplers.guidance import apply_guidance

LOGIT_LIMIT = 5.0
STATE_FORMAT = "l2c-export-learn-state-v1"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class LearnSettings:
    """What a learning run does; saved in its checkpoints and router metadata."""

    mode: ScheduleMode = "official"
    iterations: int = 300
    batch_size: int = 16  # images per learned step and iteration, over all processes (guidance doubles them)
    lr: float = 0.05
    l1: float = 2e-4  # lambda of lambda * sum(w)
    cfg_scale: float = 1.0  # > 1: train on the guidance batch (conditional and null-class halves)
    window: int | None = None  # general mode: unroll this many steps back (None: from the first step)
    steps_per_iteration: int = 0  # learned steps drawn per iteration; 0: all of them
    init_std: float = 0.0  # learned logits start at init_std * N(0, 1) (the authors': 1)
    seed: int = 0

    def __post_init__(self):
        check_mode(self.mode)
        if self.iterations < 0 or self.batch_size < 1:
            raise ValueError(f"iterations ({self.iterations}) must be >= 0 and batch size ({self.batch_size}) >= 1")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be at least 1 step; got {self.window}")
        if self.steps_per_iteration < 0:
            raise ValueError(f"steps per iteration must be >= 0 (0: all); got {self.steps_per_iteration}")


def learned_calls(sampler: DenoisingSampler, mode: ScheduleMode) -> list[int]:
    """The model calls whose routers are learned. Official mode: the calls where the authors' sampler consults its
    router (DDIM/DDPM: the steps with an even router index ``N - 1 - s``; DPM-Solver-2S: the first call of solver
    steps 1 .. K-1), the others compute everything; general mode: every call after the first."""
    if mode == "official":
        return list(sampler.official_cache_calls())
    return list(range(1, sampler.num_calls))


class Router(nn.Module):
    """The learned parameters: logits (num_calls, num_sublayers) in sampling order. ``forward()`` -> sigmoid(logits).

    Rows never learned (the first call; in official mode the calls that compute everything) start at +5, i.e.
    compute, so that a router learned in official mode decodes sensibly in general mode too. Learned rows start at
    ``init_std * N(0, 1)``: the authors' N(0, 1) with ``init_std`` 1; the default 0 (w = 0.5) keeps a short run's
    ranking of the sub-layers free of the random start, which after a few hundred AdamW steps is still a large part
    of each logit.
    """

    def __init__(self, num_calls: int, num_sublayers: int, rows: Sequence[int], generator: torch.Generator,
                 init_std: float = 0.0):
        super().__init__()
        logits = torch.full((num_calls, num_sublayers), LOGIT_LIMIT)
        rows = list(rows)
        start = torch.randn(len(rows), num_sublayers, generator=generator) * init_std
        logits[rows] = start.clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
        self.logits = nn.Parameter(logits)

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


# ---------------------------------------------------------------------------------------------------------------------
# Data: where the input of a step comes from, and what it is conditioned on.

@dataclass
class Condition:
    """Per-sample conditioning, the model's inputs after (x, t), for a batch of B: ``cond`` and, as the guidance
    batch's unconditional half, ``uncond``. Label models: the labels (B,) and the null class; text models: prompt
    embeddings (B, L, D) and masks (B, L), and the negative prompt's."""

    cond: tuple[torch.Tensor, ...]
    uncond: tuple[torch.Tensor, ...]

    @classmethod
    def of_labels(cls, labels: torch.Tensor, null_class: int) -> "Condition":
        labels = torch.as_tensor(labels, dtype=torch.int64)
        return cls((labels,), (torch.full_like(labels, null_class),))

    @classmethod
    def of_prompts(cls, arrays: dict, inputs: dict, order: list[str], guiding: bool, where: str,
                   guidance_scale: float | None = None, max_tokens: int | None = None) -> "Condition":
        """A set of prompts from arrays by the pipelines' argument names, checked as the runtime checks them (the
        negative ones needed when ``guiding``): ``inputs`` role -> record with the per-request ``shape`` of each of
        the model's inputs, ``order`` their roles in the model's argument order. A model with a ``guidance`` input
        (a guidance-distilled FLUX.1) is fed ``guidance_scale`` there, (P,) for P prompts; prompts are at most
        ``max_tokens`` long (the pipeline's max_sequence_length: the longest a build of the model takes)."""
        from ..samplers.conditioning import GUIDANCE_ROLE, check_text_conditioning

        checked = check_text_conditioning(arrays, inputs, guiding, where, max_tokens=max_tokens)
        if GUIDANCE_ROLE in inputs:
            scale = np.full(len(checked["prompt_embeds"][0]), guidance_scale, dtype=np.float32)
            checked[GUIDANCE_ROLE] = (scale, scale)
        roles = [role for role in order if role in checked]
        cond = tuple(torch.from_numpy(checked[role][0]) for role in roles)
        return cls(cond, tuple(torch.from_numpy(checked[role][1]) for role in roles) if guiding else cond)

    def __len__(self) -> int:
        return len(self.cond[0])

    def __getitem__(self, index) -> "Condition":
        return Condition(tuple(t[index] for t in self.cond), tuple(t[index] for t in self.uncond))

    def model_batch(self, guiding: bool) -> tuple[torch.Tensor, ...]:
        """The model batch's conditioning inputs: conditional half first, then the unconditional one when guiding."""
        return tuple(torch.cat([c, u]) for c, u in zip(self.cond, self.uncond)) if guiding else self.cond


class StepSource(Protocol):
    def draw(self, generator: torch.Generator, batch_size: int, call: int) -> tuple[torch.Tensor, object]:
        """x (batch, C, H, W) at the input of model call ``call`` and its conditioning: labels (batch,) int64 or a
        :class:`Condition`."""


class NoisedData:
    """Clean data x0 (images in [-1, 1], or latents as the model sees them) noised to a step's timestep."""

    def __init__(self, x0: np.ndarray, labels: np.ndarray, sampler: DenoisingSampler, description: str):
        if len(x0) == 0:
            raise ValueError(f"{description}: no samples")
        self.x0 = torch.from_numpy(np.ascontiguousarray(x0, dtype=np.float32))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.sampler = sampler
        self.description = description

    def draw(self, generator, batch_size, call):
        index = torch.randint(len(self.x0), (batch_size,), generator=generator)
        noise = torch.randn(self.x0[index].shape, generator=generator)
        alpha, sigma = self.sampler.noise_level(call)
        return alpha * self.x0[index] + sigma * noise, self.labels[index]


class Trajectories:
    """States the full model passes through when it samples from noise: the teacher needs no data.

    states: (P, num_calls, C, H, W), ``states[p, c]`` is the input of model call ``c``; labels: (P,), or the
    trajectories' :class:`Condition`.
    """

    def __init__(self, states: torch.Tensor, labels):
        self.states = states
        self.labels = labels
        self.description = f"{len(states)} trajectories sampled from the model"

    def draw(self, generator, batch_size, call):
        index = torch.randint(len(self.states), (batch_size,), generator=generator)
        return self.states[index, call], self.labels[index]


@torch.no_grad()
def sample_trajectories(model: nn.Module, sampler: DenoisingSampler, count: int, cfg_scale: float, seed: int,
                        batch_size: int = 256, progress: bool = True,
                        prompts: Condition | None = None) -> Trajectories:
    """Samples ``count`` trajectories with the full model (random labels, or random prompts of ``prompts`` for a text
    model; guidance as the sampler runs it) through the one denoising loop, and keeps every model call's input."""
    from ..samplers import ModelCall, denoise

    config = model.config
    family = family_of_config(config)
    sample_shape = next(spec.shape for spec in family.graph_inputs(config) if spec.role == "sample")
    generator = torch.Generator().manual_seed(seed)
    if prompts is None:
        labels = torch.randint(family.null_class(config), (count,), generator=generator)
        condition = Condition.of_labels(labels, family.null_class(config))
    else:
        labels = condition = prompts[torch.randint(len(prompts), (count,), generator=generator)]
    noise = torch.randn((count, *sample_shape), generator=generator)
    states = torch.empty((count, sampler.num_calls) + tuple(noise.shape[1:]))
    bar = tqdm(total=count * sampler.num_calls, desc="sampling trajectories", disable=not progress, leave=False)
    for begin in range(0, count, batch_size):
        x, y = noise[begin: begin + batch_size], condition[begin: begin + batch_size]

        def run_model(call: ModelCall) -> torch.Tensor:
            states[begin: begin + len(call.x), call.index] = call.x
            xb = torch.cat([call.x, call.x]) if cfg_scale > 1.0 else call.x
            t = torch.full((len(xb),), call.t, dtype=torch.float32)
            out = _sampler_output(model(xb, t, *y.model_batch(cfg_scale > 1.0)), cfg_scale, family, config)
            bar.update(len(call.x))
            return out[: len(call.x)]

        denoise(sampler, x, run_model, lambda s: torch.randn(x.shape, generator=generator))
    bar.close()
    return Trajectories(states, labels)


def _sampler_output(model_out: torch.Tensor, cfg_scale: float, family, config) -> torch.Tensor:
    """The model output as the sampler takes it: guided (as the family's pipeline guides), and only the channels the
    sampler steps on (a diffusers pipeline drops the learned-sigma half)."""
    if cfg_scale > 1.0:
        model_out = apply_guidance(model_out, cfg_scale, family.guided_channels(config))
    channels = family.sampler_channels(config)
    return model_out if channels is None else model_out[:, :channels]


def load_image_folder(folder: Path, size: int, channels: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images of ``folder`` -> (n, channels, size, size) float32 in [-1, 1], labels (n,) and class names.

    ImageFolder layout: one subfolder per class, classes numbered in sorted order. Images directly in ``folder``
    have no class; they get label -1 (a random class is drawn for them)."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(p, -1) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    for index, name in enumerate(classes):
        files += [(p, index) for p in sorted((folder / name).rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it or in its class subfolders")
    images = []
    for path, _ in files:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            side = min(image.size)  # centre crop, then resize (the authors' center_crop_arr, simplified)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        images.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
    return np.stack(images), np.array([label for _, label in files], dtype=np.int64), classes


def load_latents(path: Path, labels_path: Path | None, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(n, C, H, W) latents of a ``.npy`` file, already scaled as the model sees them (SD-VAE: x 0.18215), and
    labels (n,) from ``labels_path`` (``.npy``), else -1 (a random class is drawn for each). ``shape``: the model's
    per-sample input (C, H, W)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    latents = np.load(path, allow_pickle=False)
    expected = tuple(shape)
    if latents.ndim != 4 or tuple(latents.shape[1:]) != expected:
        raise ValueError(f"{path}: latents of shape {latents.shape}; expected (n, {', '.join(map(str, expected))})")
    if not np.issubdtype(latents.dtype, np.floating) or not np.isfinite(latents).all():
        raise ValueError(f"{path}: latents must be finite floating-point numbers (found {latents.dtype} with NaN, "
                         f"infinite or non-float values)")
    if labels_path is None:
        return latents.astype(np.float32), np.full(len(latents), -1, dtype=np.int64)
    labels = np.load(labels_path, allow_pickle=False)
    if labels.shape != (len(latents),):
        raise ValueError(f"{labels_path}: labels of shape {labels.shape}; expected ({len(latents)},), one per latent")
    return latents.astype(np.float32), labels.astype(np.int64)


def with_random_labels(labels: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Labels -1 (no class known) replaced by random classes; labels out of range refused."""
    labels = np.asarray(labels, dtype=np.int64).copy()
    bad = labels[(labels >= num_classes) | (labels < -1)]
    if len(bad):
        raise ValueError(f"labels {sorted(set(bad.tolist()))[:5]} are out of range for {num_classes} classes")
    missing = labels < 0
    labels[missing] = np.random.default_rng(seed).integers(num_classes, size=int(missing.sum()))
    return labels


# ---------------------------------------------------------------------------------------------------------------------
# The objective.

@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar: mean over the target calls of MSE + l1 * sum(w)
    mse: torch.Tensor  # scalar: mean over the target calls of the MSE
    router_sum: torch.Tensor  # scalar: mean over the target calls of sum(w)


def l2c_loss(model: nn.Module, sampler: DenoisingSampler, weights: torch.Tensor, x: torch.Tensor,
             labels: torch.Tensor, start: int, targets: int | Sequence[int], l1: float, cfg_scale: float = 1.0,
             step_noise: Callable[[int, tuple], torch.Tensor] | None = None,
             learned: Sequence[int] | None = None) -> LossTerms:
    """The L2C loss at the model calls ``targets`` (one, or several along one unrolled window), driven through the
    sampler's own model calls (:meth:`calls`, as :func:`l2c_export.samplers.denoise` runs them).

    weights: (num_calls, num_sublayers), sigmoid of the router logits. x: (B, C, H, W) at the input of solver step
    ``start``, whose first call ``start * calls_per_step`` precedes every target; labels: (B,) or a
    :class:`Condition` of B. The sampler moves on
    with the teacher's output (full model, guided as the sampler runs it). At the window's first call, and at calls
    not in ``learned`` (default: every later call; official mode passes the router's calls, so that e.g.
    DPM-Solver's midpoint calls compute everything), the full model fills the cache; at the other calls the student
    is ``model.forward_soft`` and the cache becomes its soft output ``w * fresh + (1 - w) * cached``.
    ``step_noise(s, shape)`` gives DDPM's noise after step ``s``. The model must be frozen.
    """
    targets = sorted({targets} if isinstance(targets, int) else set(targets))
    first = start * sampler.calls_per_step
    if not targets or not 0 <= first < targets[0] or targets[-1] >= sampler.num_calls:
        raise ValueError(f"need 0 <= first call of step {start} ({first}) < targets ({targets}) < num_calls "
                         f"({sampler.num_calls})")
    learned = set(range(first + 1, sampler.num_calls) if learned is None else learned)
    config = model.config
    family = family_of_config(config)
    compute_all = [True] * len(family.sublayer_names(config))
    condition = labels if isinstance(labels, Condition) else Condition.of_labels(labels, family.null_class(config))
    guiding = cfg_scale > 1.0
    xb, yb = (torch.cat([x, x]) if guiding else x), condition.model_batch(guiding)

    def ddpm_noise(s: int) -> torch.Tensor:
        return step_noise(s, tuple(xb.shape)) if step_noise else torch.zeros_like(xb)

    cache: dict[int, torch.Tensor] = {}
    mse, router_sum = 0.0, 0.0
    calls = sampler.calls(xb, ddpm_noise, first_step=start)
    call = next(calls)
    while True:
        t = torch.full((len(call.x),), call.t, dtype=torch.float32)
        if call.index == first or call.index not in learned:
            with torch.no_grad():
                teacher = model.forward_cached(call.x, t, *yb, compute_all, cache)
        else:
            with torch.no_grad():
                teacher = model(call.x, t, *yb)
            fresh: dict[int, torch.Tensor] = {}
            student = model.forward_soft(call.x, t, *yb, weights[call.index], cache, fresh)
            if call.index in targets:
                mse = mse + ((teacher - student) ** 2).mean()
                router_sum = router_sum + weights[call.index].sum()
            if call.index < targets[-1]:
                w = weights[call.index]
                cache = {k: w[k] * fresh[k] + (1 - w[k]) * cache[k] for k in cache}
        if call.index == targets[-1]:
            break
        call = calls.send(_sampler_output(teacher, cfg_scale, family, config))
    calls.close()
    mse, router_sum = mse / len(targets), router_sum / len(targets)
    return LossTerms(loss=mse + l1 * router_sum, mse=mse, router_sum=router_sum)


def windows(sampler: DenoisingSampler, targets: Sequence[int], mode: ScheduleMode,
            window: int | None) -> list[tuple[int, list[int]]]:
    """(start step, target calls) unrolls that cover ``targets``: in official mode one per target, from the solver
    step before it (whose calls compute everything); in general mode one from the first step covering all of them,
    or with ``window`` one per target from the step of the call ``window`` calls back."""
    per_step = sampler.calls_per_step
    if mode == "official":
        return [(m // per_step - 1, [m]) for m in targets]
    if window is None:
        return [(0, list(targets))]
    return [(max(0, m - window) // per_step, [m]) for m in targets]


# ---------------------------------------------------------------------------------------------------------------------
# The training loop.

@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    """Joins the process group that ``torchrun`` describes (env WORLD_SIZE > 1): gloo on CPU, NCCL on GPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


def iteration_generator(seed: int, iteration: int) -> torch.Generator:
    """Everything random in an iteration comes from here: resuming, or adding processes, changes nothing."""
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


@dataclass
class LearnResult:
    router: RouterLogits
    iterations: int
    seconds: float
    history: list[dict]  # per logged iteration: iteration, steps, loss, mse, computed (mean w of those steps)


def learn_router(model: nn.Module, sampler: DenoisingSampler, source: StepSource, settings: LearnSettings,
                 state_path: Path | None = None, resume: bool = False, save_every: int = 50,
                 progress: bool = True, source_name: str = "", log_every: int = 25) -> LearnResult:
    """Learns router logits for ``model`` at ``sampler``'s steps; returns them (sampling order).

    ``state_path``: a safetensors checkpoint (logits, AdamW moments, iteration) written every ``save_every``
    iterations and at the end; with ``resume`` the run continues from it and ends exactly where an uninterrupted
    run would.
    """
    dist_info = init_distributed()
    if settings.batch_size % dist_info.world_size:
        raise ValueError(f"batch size {settings.batch_size} is not a multiple of the {dist_info.world_size} processes")
    shard = settings.batch_size // dist_info.world_size
    model.eval().requires_grad_(False)
    if not hasattr(model, "forward_soft"):
        raise ValueError(f"{type(model).__name__} has no soft-routed forward (forward_soft); learning routers needs "
                         f"one (decode the authors' routers, or learned ones, instead)")
    num_calls, width = sampler.num_calls, len(family_of_config(model.config).sublayer_names(model.config))
    steps = learned_calls(sampler, settings.mode)
    if not steps:
        raise ValueError(f"{sampler.kind} with {num_calls} model calls has no call to learn in {settings.mode} mode "
                         f"(the first solver step always computes everything); take more steps")
    router = Router(num_calls, width, steps, torch.Generator().manual_seed(settings.seed), settings.init_std)
    optimizer = torch.optim.AdamW(router.parameters(), lr=settings.lr, weight_decay=0.0)
    first = 0
    if resume:
        if state_path is None or not Path(state_path).is_file():
            raise FileNotFoundError(f"{state_path}: no learning state to resume from")
        first = _load_state(Path(state_path), router, optimizer, settings, num_calls, width)
    trainer: nn.Module = router
    if dist_info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        trainer = DistributedDataParallel(router)
    history: list[dict] = []
    start_time = time.perf_counter()
    bar = tqdm(range(first, settings.iterations), desc=f"learning routers ({settings.mode})", initial=first,
               total=settings.iterations, disable=not (progress and dist_info.is_main))
    for iteration in bar:
        generator = iteration_generator(settings.seed, iteration)
        if settings.steps_per_iteration and settings.steps_per_iteration < len(steps):
            order = torch.randperm(len(steps), generator=generator)[: settings.steps_per_iteration]
            targets = sorted(steps[int(i)] for i in order)
        else:
            targets = steps
        part = slice(dist_info.rank * shard, (dist_info.rank + 1) * shard)
        weights = trainer()
        loss = mse = router_sum = 0.0
        for start, window_targets in windows(sampler, targets, settings.mode, settings.window):
            x, labels = source.draw(generator, settings.batch_size, start * sampler.calls_per_step)
            noise_seed = int(torch.randint(2 ** 31, (1,), generator=generator))

            def step_noise(s, shape, _seed=noise_seed, _part=part):
                full = torch.randn((settings.batch_size,) + shape[1:],
                                   generator=torch.Generator().manual_seed(_seed + s))[_part]
                return torch.cat([full, full]) if shape[0] == 2 * len(full) else full

            window_terms = l2c_loss(model, sampler, weights, x[part], labels[part], start, window_targets,
                                    settings.l1, settings.cfg_scale, step_noise, learned=steps)
            share = len(window_targets) / len(targets)
            loss = loss + share * window_terms.loss
            mse = mse + share * window_terms.mse
            router_sum = router_sum + share * window_terms.router_sum
        terms = LossTerms(loss, mse, router_sum)
        optimizer.zero_grad(set_to_none=True)
        terms.loss.backward()
        optimizer.step()
        with torch.no_grad():
            router.logits.clamp_(-LOGIT_LIMIT, LOGIT_LIMIT)
        done = iteration + 1
        if done % log_every == 0 or done == settings.iterations:
            entry = {"iteration": done, "steps": targets, "loss": terms.loss.item(), "mse": terms.mse.item(),
                     "computed": terms.router_sum.item() / width}
            history.append(entry)
            bar.set_postfix(mse=f"{entry['mse']:.2e}", w=f"{entry['computed']:.2f}")
        if state_path is not None and dist_info.is_main and (done % save_every == 0 or done == settings.iterations):
            _save_state(Path(state_path), router, optimizer, settings, done)
    bar.close()
    logits = router.logits.detach().numpy().copy()
    meta = {"sampler": sampler.kind, "source_data": source_name, "settings": settings}
    names = family_of_config(model.config).sublayer_names(model.config)
    if names != default_sublayer_names(len(names)):
        meta["sublayers"] = list(names)
    return LearnResult(RouterLogits(logits, source="learned", meta=meta), settings.iterations,
                       time.perf_counter() - start_time, history)


def _save_state(path: Path, router: Router, optimizer: torch.optim.Optimizer, settings: LearnSettings,
                iteration: int) -> None:
    from safetensors.torch import save

    from ..core.util import atomic_write_bytes

    state = optimizer.state.get(router.logits, {})
    tensors = {"logits": router.logits.detach().contiguous()}
    if state:
        tensors["exp_avg"] = state["exp_avg"].contiguous()
        tensors["exp_avg_sq"] = state["exp_avg_sq"].contiguous()
    metadata = {"format": STATE_FORMAT, "iteration": str(iteration),
                "adam_step": str(float(state["step"])) if state else "0", "settings": json.dumps(asdict(settings))}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def _load_state(path: Path, router: Router, optimizer: torch.optim.Optimizer, settings: LearnSettings,
                num_calls: int, width: int) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:
        raise ValueError(f"{path}: not a readable safetensors learning state ({error})") from error
    if metadata.get("format") != STATE_FORMAT or "logits" not in tensors:
        raise ValueError(f"{path}: field 'format' is {metadata.get('format')!r}; expected {STATE_FORMAT!r} with a "
                         f"tensor 'logits'")
    saved = parse_json(metadata.get("settings", "{}"), f"{path}: metadata field 'settings'", ValueError)
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: metadata field 'settings' is not a JSON object of learning settings")
    differing = {k: (saved.get(k), v) for k, v in asdict(settings).items() if k != "iterations" and saved.get(k) != v}
    if differing:
        raise ValueError(f"{path}: field 'settings' differs from this run in "
                         + ", ".join(f"{k} (saved {a!r}, now {b!r})" for k, (a, b) in differing.items()))
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: tensor {name!r} holds NaN or infinite values; expected a finite learning state")
    if tuple(tensors["logits"].shape) != (num_calls, width):
        raise ValueError(f"{path}: tensor 'logits' has shape {tuple(tensors['logits'].shape)}; expected "
                         f"({num_calls}, {width})")
    with torch.no_grad():
        router.logits.copy_(tensors["logits"])
    if "exp_avg" in tensors:
        optimizer.state[router.logits] = {"step": torch.tensor(float(metadata["adam_step"])),
                                          "exp_avg": tensors["exp_avg"].clone(),
                                          "exp_avg_sq": tensors["exp_avg_sq"].clone()}
    return int(metadata["iteration"])


def router_metadata(spec_name: str, sampler: DenoisingSampler, settings: LearnSettings, data: str, seconds: float,
                    official_model: str | None = None, image_size: int | None = None,
                    num_classes: int | None = None, sublayers: Sequence[str] | None = None) -> dict[str, str]:
    """String metadata of a learned router file. ``model``/``image_size``/``num_classes`` are set only for official
    checkpoints, so that ``schedule`` counts MACs of the right model (it reads those keys); ``sublayers`` (JSON) names
    the columns of a model whose sub-layers are named (a diffusers model)."""
    meta = {"learned_by": "l2c-export learn", "spec": spec_name, "sampler": sampler.kind,
            "num_sampling_steps": str(sampler.num_calls), "timesteps": json.dumps(sampler.timesteps.tolist()),
            "data": data, "seconds": f"{seconds:.1f}", "settings": json.dumps(asdict(settings))}
    if official_model:
        meta["model"] = official_model
    if image_size:
        meta["image_size"] = str(image_size)
    if num_classes:
        meta["num_classes"] = str(num_classes)
    if sublayers:
        meta["sublayers"] = json.dumps(list(sublayers))
    return meta


def write_router(router: RouterLogits, path: Path, metadata: dict[str, str]) -> None:
    """This project's router format (see :func:`l2c_export.routers.save_router`)."""
    save_router(router, path, metadata)
