"""The Learning-to-Cache objective (see :mod:`l2c_export.learn.learner`): the router's logits, which calls are
learned, the loss at a window of model calls, and the windows that cover an iteration's targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..core.schedule import ScheduleMode
from ..models import family_of_config
from ..samplers import DenoisingSampler
from .data import Condition, sampler_output

LOGIT_LIMIT = 5.0


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
        call = calls.send(sampler_output(teacher, cfg_scale, family, config))
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
