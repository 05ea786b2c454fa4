"""Schedules at a MAC budget: a learned router's threshold for a target MAC fraction, and the learning-free baselines.

Every function returns a :class:`Schedule` (the same JSON as any other) whose ``extra`` says how it was made:

- :func:`schedule_for_mac_fraction`: the lowest router threshold whose schedule's MAC fraction is at most the target
  (the budget is met, and nothing more is removed than needed).
- :func:`reuse_every_n` (FORA): every sub-layer is computed at every n-th step and reused in between. n may be
  fractional (steps ``floor(i * n)``), so the budget can be approached in steps of one full step.
- :func:`random_drop`: sub-layers of steps 1.. removed at random until the budget is reached.
- :func:`fewer_steps`: the full model with fewer sampling steps; MAC fraction k / N of the N-step sampler.

Baselines take the achievable MAC fraction *closest* to the target (a FORA schedule cannot hit every value); each
schedule records the fraction it reached in ``extra["mac_fraction"]``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ..core.macs import MacCount
from ..core.schedule import Schedule, ScheduleMode
from ..samplers import DenoisingSampler, create_sampler, official_cache_calls
from . import RouterLogits


def least_mac_fraction(num_calls: int, macs: MacCount, mode: ScheduleMode, sampler_kind: str = "ddim") -> float:
    """The smallest MAC fraction a router of ``sampler_kind``'s calls can reach in ``mode`` (every call it decides
    reusing everything)."""
    decided = official_cache_calls(sampler_kind, num_calls) if mode == "official" else range(1, num_calls)
    rows = np.ones((num_calls, macs.width), dtype=bool)
    rows[list(decided)] = False
    return sum(macs.of_subset(row) for row in rows) / (num_calls * macs.full)


def schedule_for_mac_fraction(router: RouterLogits, target: float, macs: MacCount, mode: ScheduleMode = "official",
                              timesteps: list[int] | None = None) -> Schedule:
    """Decodes ``router`` at the threshold that meets a MAC budget: the schedule with the largest MAC fraction that is
    <= ``target``. The threshold is the midpoint between two neighbouring router probabilities, so decoding it again
    (``l2c-export schedule --threshold``) gives the same schedule."""
    if router.logits.shape[1] != macs.width:
        raise ValueError(f"{router.source}: the router has {router.logits.shape[1]} sub-layers; the model has "
                         f"{macs.width}")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target MAC fraction {target} is outside (0, 1]")
    least = least_mac_fraction(router.num_steps, macs, mode, router.sampler)
    if target < least - 1e-12:
        raise ValueError(f"target MAC fraction {target} is below the least that mode {mode!r} reaches with "
                         f"{router.num_steps} steps ({least:.4f})")
    levels = np.unique(router.probabilities())  # ascending
    candidates = np.concatenate([[0.0], (levels[:-1] + levels[1:]) / 2, [1.0]])
    # The MAC fraction falls as the threshold rises: bisect for the lowest threshold that meets the budget.
    low, high = 0, len(candidates) - 1
    while low < high:
        middle = (low + high) // 2
        if router.to_schedule(float(candidates[middle]), mode, timesteps).mac_fraction(macs) <= target + 1e-12:
            high = middle
        else:
            low = middle + 1
    result = router.to_schedule(float(candidates[low]), mode, timesteps)
    result.extra.update({"target_mac_fraction": target, "mac_fraction": result.mac_fraction(macs)})
    return result


def reuse_every_n(num_steps: int, macs: MacCount, target: float, timesteps: list[int] | None = None,
                  sublayers: tuple[str, ...] | None = None) -> Schedule:
    """FORA: all sub-layers computed at k evenly spaced steps (``floor(i * N / k)``, interval n = N / k), reused in
    between; k chosen so that the MAC fraction is closest to ``target``. ``sublayers``: the columns' names (a model
    with named sub-layers; None: the authors' attn_j/mlp_j)."""
    best = None
    for k in range(1, num_steps + 1):
        rows = np.zeros((num_steps, macs.width), dtype=bool)
        rows[np.floor(np.arange(k) * num_steps / k).astype(int)] = True
        candidate = Schedule(rows, timesteps=timesteps, sublayers=sublayers)
        fraction = candidate.mac_fraction(macs)
        if best is None or abs(fraction - target) < abs(best[0] - target) - 1e-12:
            best = (fraction, k, candidate)
    fraction, k, result = best
    result.source = f"fora: every {num_steps / k:.3g}-th step computes everything ({k} of {num_steps})"
    result.mode = "general"
    result.extra.update({"baseline": "fora", "interval": num_steps / k, "target_mac_fraction": target,
                         "mac_fraction": fraction})
    return result


def random_drop(num_steps: int, macs: MacCount, target: float, seed: int = 0,
                timesteps: list[int] | None = None, sublayers: tuple[str, ...] | None = None) -> Schedule:
    """Removes sub-layers of steps 1..N-1, in a random order from ``numpy.random.default_rng(seed)``, until the MAC
    fraction is the closest to ``target`` that the order reaches. ``sublayers``: as :func:`reuse_every_n`."""
    width = macs.width
    rows = np.ones((num_steps, width), dtype=bool)
    order = np.random.default_rng(seed).permutation((num_steps - 1) * width)
    total = num_steps * macs.full
    spent = float(total)
    best = (abs(spent / total - target), 0)
    for dropped, cell in enumerate(order, start=1):
        spent -= macs.sublayer(int(cell % width))
        if abs(spent / total - target) < best[0]:
            best = (abs(spent / total - target), dropped)
        if spent / total < target:
            break
    for cell in order[: best[1]]:
        rows[1 + cell // width, cell % width] = False
    result = Schedule(rows, timesteps=timesteps, mode="general", sublayers=sublayers,
                      source=f"random drop of {best[1]} sub-layers (seed {seed})")
    result.extra.update({"baseline": "random", "seed": seed, "dropped": int(best[1]), "target_mac_fraction": target,
                         "mac_fraction": result.mac_fraction(macs)})
    return result


def fewer_steps(num_steps: int, depth: int, target: float, kind: str = "ddim", clip_denoised: bool = False,
                sublayers: tuple[str, ...] | None = None,
                make_sampler: Callable[[int], DenoisingSampler] | None = None) -> Schedule:
    """The full model at k = round(target * N) model calls (at least one solver step; a whole number of solver
    steps, so even for DPM-Solver-2S): a full schedule of k rows, with the times of a k-call sampler. Its MAC
    fraction, against N full calls, is k / N. ``make_sampler(calls)``: the model's sampler at that many calls
    (default: ``create_sampler(kind, calls)``; a diffusers folder's is its scheduler's); ``sublayers`` as
    :func:`reuse_every_n` (then ``depth`` is not used)."""
    make_sampler = make_sampler or (lambda calls: create_sampler(kind, calls, clip_denoised=clip_denoised))
    per_step = make_sampler(num_steps).calls_per_step
    k = int(min(num_steps, per_step * max(1, round(target * num_steps / per_step))))
    timesteps = make_sampler(k).model_times.tolist()
    result = Schedule.full(k, None if sublayers else depth, sublayers=sublayers, timesteps=timesteps,
                           source=f"fewer steps: {k} instead of {num_steps}", sampler=kind)
    result.extra.update({"baseline": "fewer-steps", "reference_steps": num_steps, "target_mac_fraction": target,
                         "mac_fraction": k / num_steps})
    return result
