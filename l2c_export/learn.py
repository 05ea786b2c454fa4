"""Learning router logits: the Learning-to-Cache objective (Ma et al., NeurIPS 2024), as the authors' DiT code does it.

Per sampling step ``s`` a router holds ``2 * depth`` logits, ``w = sigmoid(logit)``. For a training step ``m``:

1. Take ``x`` at the input of an earlier step (data noised to that step's timestep, or a state of a trajectory that
   the full model sampled from noise) and run the full model there: that fills the cache with every sub-layer's fresh
   (ungated) branch output, and one sampler step moves ``x`` on.
2. At step ``m`` the teacher is the full model; the student is :meth:`DiT.forward_soft`, in which every sub-layer
   outputs ``w * fresh + (1 - w) * cached``.
3. loss = MSE(teacher output, student output) + lambda * sum(w of step m). AdamW (no weight decay) updates only the
   logits, which are clamped to [-5, 5] after every update; the model is frozen and keeps no gradient.

The authors draw one step m per iteration and process (on 8 GPUs, 8 steps an iteration). Here an iteration averages
the loss over every learned step by default (``steps_per_iteration``: 1 gives theirs): the same objective with less
variance, so that AdamW, which moves a logit about ``lr`` per update, converges in a few hundred iterations on a CPU.

Schedule modes decide which steps are learned and what the cache holds:

- ``official`` (the authors'): the steps whose router index ``N - 1 - s`` is odd compute everything, so the cache at a
  learned step ``m`` is exactly the full model's fresh values at ``m - 1`` (their ``ts = 2 t + 1`` step, then ``t``).
- ``general``: every step after the first may reuse, and a reused sub-layer holds its most recent *computed* value,
  which under soft routing is the previous step's output at that sub-layer, ``w * fresh + (1 - w) * cached``. So the
  student is unrolled from a step where the cache is exact (step 0 by default, or ``window`` steps back), with the
  teacher's trajectory as its inputs (teacher forcing, as the authors do for one step), and the loss at ``m`` reaches
  the routers of the steps before it through the cache.

With classifier-free guidance the batch is the sampler's: the conditional half and the null-class half share the
router (the authors drop 10% of the labels instead; their sampler too runs both halves through one schedule).

Distributed: under ``torchrun`` (gloo on CPU, NCCL on GPUs) every process draws the same global batch from the same
per-iteration generator and takes its shard; DDP averages the router's gradient, so N processes follow the path of
one process on the same data, up to float summation order.

Checkpoints and the router itself are safetensors files (no pickles). Router file: one float32 tensor ``logits``
(num_steps, 2 * depth) in sampling order and string metadata (see :func:`router_metadata`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .diffusion import Sampler, apply_guidance, default_guided_channels
from .models import DiT
from .routers import RouterLogits, save_router

ScheduleMode = Literal["official", "general"]
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
        if self.mode not in ("official", "general"):
            raise ValueError(f"unknown schedule mode {self.mode!r}; expected 'official' or 'general'")
        if self.iterations < 0 or self.batch_size < 1:
            raise ValueError(f"iterations ({self.iterations}) must be >= 0 and batch size ({self.batch_size}) >= 1")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be at least 1 step; got {self.window}")
        if self.steps_per_iteration < 0:
            raise ValueError(f"steps per iteration must be >= 0 (0: all); got {self.steps_per_iteration}")


def learned_steps(num_steps: int, mode: ScheduleMode) -> list[int]:
    """The sampling steps whose routers are learned: in official mode those with an even router index ``N - 1 - s``
    (the others compute everything), in general mode every step after the first."""
    if mode == "official":
        return [s for s in range(1, num_steps) if (num_steps - 1 - s) % 2 == 0]
    return list(range(1, num_steps))


class Router(nn.Module):
    """The learned parameters: logits (num_steps, 2 * depth) in sampling order. ``forward()`` -> sigmoid(logits).

    Rows never learned (the first step; in official mode the full steps) start at +5, i.e. compute, so that a router
    learned in official mode decodes sensibly in general mode too. Learned rows start at ``init_std * N(0, 1)``: the
    authors' N(0, 1) with ``init_std`` 1; the default 0 (w = 0.5) keeps a short run's ranking of the sub-layers free of
    the random start, which after a few hundred AdamW steps is still a large part of each logit.
    """

    def __init__(self, num_steps: int, depth: int, mode: ScheduleMode, generator: torch.Generator,
                 init_std: float = 0.0):
        super().__init__()
        logits = torch.full((num_steps, 2 * depth), LOGIT_LIMIT)
        rows = learned_steps(num_steps, mode)
        start = torch.randn(len(rows), 2 * depth, generator=generator) * init_std
        logits[rows] = start.clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
        self.logits = nn.Parameter(logits)

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


# ---------------------------------------------------------------------------------------------------------------------
# Data: where the input of a step comes from.

class StepSource(Protocol):
    def draw(self, generator: torch.Generator, batch_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x (batch, C, H, W) at the input of sampling step ``step`` and labels (batch,) int64."""


class NoisedData:
    """Clean data x0 (images in [-1, 1], or latents as the model sees them) noised to a step's timestep."""

    def __init__(self, x0: np.ndarray, labels: np.ndarray, sampler: Sampler, description: str):
        if len(x0) == 0:
            raise ValueError(f"{description}: no samples")
        self.x0 = torch.from_numpy(np.ascontiguousarray(x0, dtype=np.float32))
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.sampler = sampler
        self.description = description

    def draw(self, generator, batch_size, step):
        index = torch.randint(len(self.x0), (batch_size,), generator=generator)
        noise = torch.randn(self.x0[index].shape, generator=generator)
        alpha_bar = float(self.sampler.alphas_cumprod[step])
        return math.sqrt(alpha_bar) * self.x0[index] + math.sqrt(1.0 - alpha_bar) * noise, self.labels[index]


class Trajectories:
    """States the full model passes through when it samples from noise: the teacher needs no data.

    states: (P, num_steps, C, H, W), ``states[p, s]`` is the input of step ``s``; labels: (P,).
    """

    def __init__(self, states: torch.Tensor, labels: torch.Tensor):
        self.states = states
        self.labels = labels
        self.description = f"{len(states)} trajectories sampled from the model"

    def draw(self, generator, batch_size, step):
        index = torch.randint(len(self.states), (batch_size,), generator=generator)
        return self.states[index, step], self.labels[index]


@torch.no_grad()
def sample_trajectories(model: DiT, sampler: Sampler, count: int, cfg_scale: float, seed: int,
                        batch_size: int = 256, progress: bool = True) -> Trajectories:
    """Samples ``count`` trajectories with the full model (random labels, guidance as the sampler runs it) through
    the one denoising loop, and keeps every model call's input."""
    from .samplers import ModelCall, denoise

    config = model.config
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(config.num_classes, (count,), generator=generator)
    noise = torch.randn((count, config.in_channels, config.input_size, config.input_size), generator=generator)
    states = torch.empty((count, sampler.num_calls) + tuple(noise.shape[1:]))
    guided = default_guided_channels(config.in_channels)
    bar = tqdm(total=count * sampler.num_calls, desc="sampling trajectories", disable=not progress, leave=False)
    for begin in range(0, count, batch_size):
        x, y = noise[begin: begin + batch_size], labels[begin: begin + batch_size]

        def run_model(call: ModelCall) -> torch.Tensor:
            states[begin: begin + len(call.x), call.index] = call.x
            xb, yb = _guidance_batch(call.x, y, config.num_classes, cfg_scale)
            t = torch.full((len(xb),), call.t, dtype=torch.float32)
            out = _guided(model(xb, t, yb), cfg_scale, guided)
            bar.update(len(call.x))
            return out[: len(call.x)]

        denoise(sampler, x, run_model, lambda s: torch.randn(x.shape, generator=generator))
    bar.close()
    return Trajectories(states, labels)


def _guidance_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg_scale: float):
    if cfg_scale > 1.0:
        return torch.cat([x, x]), torch.cat([y, torch.full_like(y, num_classes)])
    return x, y


def _guided(model_out: torch.Tensor, cfg_scale: float, guided_channels: int) -> torch.Tensor:
    return apply_guidance(model_out, cfg_scale, guided_channels) if cfg_scale > 1.0 else model_out


def _t(sampler: Sampler, step: int, batch: int) -> torch.Tensor:
    return torch.full((batch,), int(sampler.timesteps[step]), dtype=torch.int64)


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


def load_latents(path: Path, labels_path: Path | None, config) -> tuple[np.ndarray, np.ndarray]:
    """(n, C, H, W) latents of a ``.npy`` file, already scaled as the model sees them (SD-VAE: x 0.18215), and
    labels (n,) from ``labels_path`` (``.npy``), else -1 (a random class is drawn for each)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    latents = np.load(path, allow_pickle=False)
    expected = (config.in_channels, config.input_size, config.input_size)
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
    loss: torch.Tensor  # scalar: mean over the target steps of MSE + l1 * sum(w)
    mse: torch.Tensor  # scalar: mean over the target steps of the MSE
    router_sum: torch.Tensor  # scalar: mean over the target steps of sum(w)


def l2c_loss(model: DiT, sampler: Sampler, weights: torch.Tensor, x: torch.Tensor, labels: torch.Tensor,
             start: int, targets: int | Sequence[int], l1: float, cfg_scale: float = 1.0,
             step_noise: Callable[[int, tuple], torch.Tensor] | None = None) -> LossTerms:
    """The L2C loss at the sampling steps ``targets`` (one step, or several along one unrolled window).

    weights: (num_steps, 2 * depth), sigmoid of the router logits; only rows ``start + 1 .. max(targets)`` are used.
    x: (B, C, H, W) at the input of step ``start`` (< every target), where the full model fills the cache;
    labels: (B,). After ``start`` the inputs follow the teacher (full model, guided as the sampler runs it) and the
    student's cache becomes each step's soft output ``w * fresh + (1 - w) * cached``. ``step_noise(s, shape)``
    gives DDPM's noise. The model must be frozen (no parameter requires grad).
    """
    targets = sorted({targets} if isinstance(targets, int) else set(targets))
    if not targets or not 0 <= start < targets[0] or targets[-1] >= sampler.num_steps:
        raise ValueError(f"need 0 <= start ({start}) < targets ({targets}) < num_steps ({sampler.num_steps})")
    config = model.config
    guided = default_guided_channels(config.in_channels)
    xb, yb = _guidance_batch(x, labels, config.num_classes, cfg_scale)
    cache: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        out = model.forward_cached(xb, _t(sampler, start, len(xb)), yb, [True] * config.num_sublayers, cache)
        xb = _advance(sampler, start, xb, _guided(out, cfg_scale, guided), step_noise, config.learn_sigma)
    mse, router_sum = 0.0, 0.0
    for s in range(start + 1, targets[-1] + 1):
        t = _t(sampler, s, len(xb))
        with torch.no_grad():
            teacher = model(xb, t, yb)
        fresh: dict[int, torch.Tensor] = {}
        student = model.forward_soft(xb, t, yb, weights[s], cache, fresh)
        if s in targets:
            mse = mse + ((teacher - student) ** 2).mean()
            router_sum = router_sum + weights[s].sum()
        if s < targets[-1]:
            cache = {k: weights[s, k] * fresh[k] + (1 - weights[s, k]) * cache[k] for k in cache}
            xb = _advance(sampler, s, xb, _guided(teacher, cfg_scale, guided), step_noise, config.learn_sigma)
    mse, router_sum = mse / len(targets), router_sum / len(targets)
    return LossTerms(loss=mse + l1 * router_sum, mse=mse, router_sum=router_sum)


def windows(targets: Sequence[int], mode: ScheduleMode, window: int | None) -> list[tuple[int, list[int]]]:
    """(start, targets) unrolls that cover ``targets``: in official mode one per target, from the full step before
    it; in general mode one from the first step covering all of them, or with ``window`` one per target from
    ``window`` steps back."""
    if mode == "official":
        return [(m - 1, [m]) for m in targets]
    if window is None:
        return [(0, list(targets))]
    return [(max(0, m - window), [m]) for m in targets]


def _advance(sampler, s, xb, guided_out, step_noise, learn_sigma):
    noise = None
    if sampler.kind == "ddpm" and s < sampler.num_steps - 1:
        noise = step_noise(s, tuple(xb.shape)) if step_noise else torch.zeros_like(xb)
    return sampler.step(s, xb, guided_out, noise, learn_sigma=learn_sigma)


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


def learn_router(model: DiT, sampler: Sampler, source: StepSource, settings: LearnSettings,
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
    if sampler.kind not in ("ddim", "ddpm") or not hasattr(model, "forward_soft"):
        raise ValueError(f"learning routers takes a DiT with DDIM or DDPM for now; got {type(model).__name__} with "
                         f"{sampler.kind} (decode the authors' routers, or learned ones, for any family)")
    num_steps, depth = sampler.num_steps, model.config.depth
    if num_steps < 2:
        raise ValueError("a router needs at least 2 sampling steps (the first always computes everything)")
    steps = learned_steps(num_steps, settings.mode)
    router = Router(num_steps, depth, settings.mode, torch.Generator().manual_seed(settings.seed), settings.init_std)
    optimizer = torch.optim.AdamW(router.parameters(), lr=settings.lr, weight_decay=0.0)
    first = 0
    if resume:
        if state_path is None or not Path(state_path).is_file():
            raise FileNotFoundError(f"{state_path}: no learning state to resume from")
        first = _load_state(Path(state_path), router, optimizer, settings, num_steps, depth)
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
        for start, window_targets in windows(targets, settings.mode, settings.window):
            x, labels = source.draw(generator, settings.batch_size, start)
            noise_seed = int(torch.randint(2 ** 31, (1,), generator=generator))

            def step_noise(s, shape, _seed=noise_seed, _part=part):
                full = torch.randn((settings.batch_size,) + shape[1:],
                                   generator=torch.Generator().manual_seed(_seed + s))[_part]
                return torch.cat([full, full]) if shape[0] == 2 * len(full) else full

            window_terms = l2c_loss(model, sampler, weights, x[part], labels[part], start, window_targets,
                                    settings.l1, settings.cfg_scale, step_noise)
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
                     "computed": terms.router_sum.item() / (2 * depth)}
            history.append(entry)
            bar.set_postfix(mse=f"{entry['mse']:.2e}", w=f"{entry['computed']:.2f}")
        if state_path is not None and dist_info.is_main and (done % save_every == 0 or done == settings.iterations):
            _save_state(Path(state_path), router, optimizer, settings, done)
    bar.close()
    logits = router.logits.detach().numpy().copy()
    meta = {"source_data": source_name, "settings": settings}
    return LearnResult(RouterLogits(logits, source="learned", meta=meta), settings.iterations,
                       time.perf_counter() - start_time, history)


def _save_state(path: Path, router: Router, optimizer: torch.optim.Optimizer, settings: LearnSettings,
                iteration: int) -> None:
    from safetensors.torch import save

    from .util import atomic_write_bytes

    state = optimizer.state.get(router.logits, {})
    tensors = {"logits": router.logits.detach().contiguous()}
    if state:
        tensors["exp_avg"] = state["exp_avg"].contiguous()
        tensors["exp_avg_sq"] = state["exp_avg_sq"].contiguous()
    metadata = {"format": STATE_FORMAT, "iteration": str(iteration),
                "adam_step": str(float(state["step"])) if state else "0", "settings": json.dumps(asdict(settings))}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def _load_state(path: Path, router: Router, optimizer: torch.optim.Optimizer, settings: LearnSettings,
                num_steps: int, depth: int) -> int:
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
    saved = json.loads(metadata.get("settings", "{}"))
    differing = {k: (saved.get(k), v) for k, v in asdict(settings).items() if k != "iterations" and saved.get(k) != v}
    if differing:
        raise ValueError(f"{path}: field 'settings' differs from this run in "
                         + ", ".join(f"{k} (saved {a!r}, now {b!r})" for k, (a, b) in differing.items()))
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: tensor {name!r} holds NaN or infinite values; expected a finite learning state")
    if tuple(tensors["logits"].shape) != (num_steps, 2 * depth):
        raise ValueError(f"{path}: tensor 'logits' has shape {tuple(tensors['logits'].shape)}; expected "
                         f"({num_steps}, {2 * depth})")
    with torch.no_grad():
        router.logits.copy_(tensors["logits"])
    if "exp_avg" in tensors:
        optimizer.state[router.logits] = {"step": torch.tensor(float(metadata["adam_step"])),
                                          "exp_avg": tensors["exp_avg"].clone(),
                                          "exp_avg_sq": tensors["exp_avg_sq"].clone()}
    return int(metadata["iteration"])


def router_metadata(spec_name: str, sampler: Sampler, settings: LearnSettings, data: str, seconds: float,
                    official_model: str | None = None, image_size: int | None = None,
                    num_classes: int | None = None) -> dict[str, str]:
    """String metadata of a learned router file. ``model``/``image_size``/``num_classes`` are set only for official
    checkpoints, so that ``schedule`` counts MACs of the right model (it reads those keys)."""
    meta = {"learned_by": "l2c-export learn", "spec": spec_name, "sampler": sampler.kind,
            "num_sampling_steps": str(sampler.num_steps), "timesteps": json.dumps(sampler.timesteps.tolist()),
            "data": data, "seconds": f"{seconds:.1f}", "settings": json.dumps(asdict(settings))}
    if official_model:
        meta["model"] = official_model
    if image_size:
        meta["image_size"] = str(image_size)
    if num_classes:
        meta["num_classes"] = str(num_classes)
    return meta


def write_router(router: RouterLogits, path: Path, metadata: dict[str, str]) -> None:
    """This project's router format (see :func:`l2c_export.routers.save_router`)."""
    save_router(router, path, metadata)
