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
    """One distinct subset of computed sub-layers and its graph boundary; ``expert``: the index of the expert whose
    graph it is, ``prefix`` that expert's (of its name and its cache slots; none for the first or only one)."""

    index: int
    compute: tuple[bool, ...]  # (num_sublayers,)
    reads: tuple[int, ...]  # sub-layers read from the cache (exactly those not computed)
    writes: tuple[int, ...]  # computed sub-layers whose fresh value a later step reuses
    steps: tuple[int, ...]  # sampling steps that run this subset
    expert: int = 0
    prefix: str = ""

    @property
    def name(self) -> str:
        """A stable, readable name: ``full`` or ``subset{index}_{computed}of{total}``, after the expert's prefix."""
        if all(self.compute):
            return f"{self.prefix}full"
        return f"{self.prefix}subset{self.index:02d}_{sum(self.compute)}of{len(self.compute)}"

    @property
    def num_computed(self) -> int:
        return sum(self.compute)


@dataclass(frozen=True)
class BuildPlan:
    subsets: tuple[SubsetPlan, ...]
    step_to_subset: tuple[int, ...]  # (num_steps,)
    slots: tuple[str, ...]  # (num_sublayers,): the cache slot (sub-layer) name of each column
    step_expert: tuple[int, ...] | None = None  # (num_steps,): the expert each step runs; None: one transformer
    prefixes: tuple[str, ...] = ("",)  # each expert's prefix of its cache slots

    def slot_name(self, subset: SubsetPlan, k: int) -> str:
        """The cache slot of column ``k`` in ``subset``'s expert: its prefix, then the sub-layer's name."""
        return self.prefixes[subset.expert] + self.slots[k]

    @classmethod
    def from_schedule(cls, schedule: Schedule, step_expert=None, prefixes: tuple[str, ...] = ("",)) -> "BuildPlan":
        """The distinct subsets of ``schedule`` and their boundaries. ``step_expert``: the expert each step runs
        (Wan2.2's two), each with its own subsets (its rows, in order of first appearance; the experts in the order
        they first run) and its own cache: a value computed at a step is handed on to that expert's next step."""
        compute = schedule.compute
        num_steps, width = compute.shape
        experts = [0] * num_steps if step_expert is None else [int(e) for e in step_expert]
        subsets: list[SubsetPlan] = []
        step_to_subset = [0] * num_steps
        for expert in dict.fromkeys(experts):
            calls = [s for s in range(num_steps) if experts[s] == expert]
            index: dict[tuple[bool, ...], int] = {}
            for s in calls:
                row = tuple(bool(v) for v in compute[s])
                step_to_subset[s] = index.setdefault(row, len(subsets) + len(index))
            writes: dict[int, set[int]] = {i: set() for i in index.values()}
            for s, after in zip(calls, calls[1:]):
                writes[step_to_subset[s]].update(k for k in range(width) if compute[s, k] and not compute[after, k])
            subsets += [SubsetPlan(index=i, compute=row, reads=tuple(k for k in range(width) if not row[k]),
                                   writes=tuple(sorted(writes[i])),
                                   steps=tuple(s for s in calls if step_to_subset[s] == i), expert=expert,
                                   prefix=prefixes[expert])
                        for row, i in index.items()]
        return cls(subsets=tuple(subsets), step_to_subset=tuple(step_to_subset), slots=tuple(schedule.sublayer_names),
                   step_expert=None if step_expert is None else tuple(experts), prefixes=tuple(prefixes))
