"""The build plan: a schedule's distinct subsets and, for each, what crosses its graph boundary.

Liveness (DESIGN.md): a subset's graph takes as inputs only the cached values it reuses, and returns only the fresh
branch outputs that some later step reuses. A value computed at step s is read later exactly when step s + 1 reuses
that sub-layer (a reuse reads the most recent computed value, and any recomputation in between would replace it). A
subset used at several steps returns the union of what those steps must hand on.

Cache slots are named after the sub-layer: the schedule's column names (:attr:`Schedule.sublayer_names`), which for
the authors' families are ``attn_{j}`` (index 2j) and ``mlp_{j}`` (index 2j + 1) and for a diffusers model the module
paths (``transformer_blocks.3.attn1``). A subset graph's inputs are the model's inputs and ``cache_{slot}`` for each
slot it reads; its outputs are the model's output and ``fresh_{slot}`` for each slot it writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .schedule import Schedule


def slot_name(index: int) -> str:
    """The authors' families' sub-layer index -> cache slot name: 2j -> ``attn_j``, 2j + 1 -> ``mlp_j``."""
    return f"{'attn' if index % 2 == 0 else 'mlp'}_{index // 2}"


def default_sublayer_names(width: int) -> tuple[str, ...]:
    """The column names of a schedule of ``width`` (= 2 * depth) sub-layers in the authors' layout."""
    return tuple(slot_name(k) for k in range(width))


def cache_input_name(slot: str) -> str:
    """The graph input that carries cache slot ``slot`` into a subset that reuses it."""
    return f"cache_{slot}"


def fresh_output_name(slot: str) -> str:
    """The graph output that carries a computed sub-layer's fresh value out to cache slot ``slot``."""
    return f"fresh_{slot}"


@dataclass(frozen=True)
class SubsetPlan:
    """One distinct subset of computed sub-layers and its graph boundary."""

    index: int
    compute: tuple[bool, ...]  # (num_sublayers,)
    reads: tuple[int, ...]  # sub-layers read from the cache (exactly those not computed)
    writes: tuple[int, ...]  # computed sub-layers whose fresh value a later step reuses
    steps: tuple[int, ...]  # sampling steps that run this subset

    @property
    def name(self) -> str:
        """A stable, readable name: ``full`` or ``subset{index}_{computed}of{total}``."""
        if all(self.compute):
            return "full"
        return f"subset{self.index:02d}_{sum(self.compute)}of{len(self.compute)}"

    @property
    def num_computed(self) -> int:
        return sum(self.compute)


@dataclass(frozen=True)
class BuildPlan:
    subsets: tuple[SubsetPlan, ...]
    step_to_subset: tuple[int, ...]  # (num_steps,)
    slots: tuple[str, ...]  # (num_sublayers,): the cache slot (sub-layer) name of each column

    @classmethod
    def from_schedule(cls, schedule: Schedule) -> "BuildPlan":
        compute = schedule.compute
        num_steps, width = compute.shape
        distinct = schedule.distinct_subsets()
        step_to_subset = schedule.subset_of_step()
        writes: list[set[int]] = [set() for _ in distinct]
        for s in range(num_steps - 1):
            live = [k for k in range(width) if compute[s, k] and not compute[s + 1, k]]
            writes[step_to_subset[s]].update(live)
        subsets = tuple(
            SubsetPlan(index=i, compute=subset, reads=tuple(k for k in range(width) if not subset[k]),
                       writes=tuple(sorted(writes[i])),
                       steps=tuple(s for s in range(num_steps) if step_to_subset[s] == i))
            for i, subset in enumerate(distinct)
        )
        return cls(subsets=subsets, step_to_subset=tuple(step_to_subset), slots=tuple(schedule.sublayer_names))
