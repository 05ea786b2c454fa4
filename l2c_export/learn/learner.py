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
(num_calls, num_sublayers) in sampling order and string metadata (see :func:`l2c_export.learn.files.router_metadata`).

This module is the training loop; the parts live by job in :mod:`l2c_export.learn.settings` (what a run does),
:mod:`l2c_export.learn.data` (where a step's input comes from), :mod:`l2c_export.learn.objective` (the router and the
loss), :mod:`l2c_export.learn.distributed` (the process group), :mod:`l2c_export.learn.state` (resuming) and
:mod:`l2c_export.learn.files` (the router file).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.plan import default_sublayer_names
from ..models import family_of_config
from ..routers import ALWAYS_COMPUTE, RouterLogits
from ..samplers import DenoisingSampler
from .data import StepSource
from .distributed import init_distributed
from .objective import LOGIT_LIMIT, LossTerms, Router, l2c_loss, learned_calls, windows
from .settings import LearnSettings
from .state import load_state, save_state


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
                 progress: bool = True, source_name: str = "", log_every: int = 25,
                 computed_calls: tuple[int, ...] = ()) -> LearnResult:
    """Learns router logits for ``model`` at ``sampler``'s steps; returns them (sampling order).

    ``computed_calls``: calls that compute everything, not learned, their logits :data:`ALWAYS_COMPUTE` so that every
    decoding keeps them whole (a pipeline of experts: each expert's first call, its cache empty until then).

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
    steps = [call for call in learned_calls(sampler, settings.mode) if call not in computed_calls]
    if not steps:
        raise ValueError(f"{sampler.kind} with {num_calls} model calls has no call to learn in {settings.mode} mode "
                         f"(the first solver step always computes everything); take more steps")
    router = Router(num_calls, width, steps, torch.Generator().manual_seed(settings.seed), settings.init_std)
    optimizer = torch.optim.AdamW(router.parameters(), lr=settings.lr, weight_decay=0.0)
    first = 0
    if resume:
        if state_path is None or not Path(state_path).is_file():
            raise FileNotFoundError(f"{state_path}: no learning state to resume from")
        first = load_state(Path(state_path), router, optimizer, settings, num_calls, width)
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
            save_state(Path(state_path), router, optimizer, settings, done)
    bar.close()
    logits = router.logits.detach().numpy().copy()
    logits[list(computed_calls)] = ALWAYS_COMPUTE
    meta = {"sampler": sampler.kind, "source_data": source_name, "settings": settings}
    names = family_of_config(model.config).sublayer_names(model.config)
    if names != default_sublayer_names(len(names)):
        meta["sublayers"] = list(names)
    return LearnResult(RouterLogits(logits, source="learned", meta=meta), settings.iterations,
                       time.perf_counter() - start_time, history)


