"""Schedules: which sub-layers each model call computes, and the interchange JSON.

A schedule is a (num_steps, num_sublayers) boolean matrix, one row per model call in sampling order (``num_steps``
counts calls: DPM-Solver-2S makes two a step), one column per sub-layer. JSON::

    {"num_steps": N, "depth": D, "compute": [[1, 0, ...], ...],       # N rows of 2 * D values, 0 or 1
     "timesteps": [999, ...], "source": "...", "threshold": 0.1,      # optional
     "mode": "official", "sampler": "ddim"}                           # optional

The authors' families' columns are ``attn_j``/``mlp_j`` (2j, 2j + 1) and ``depth`` says how many; a model whose
sub-layers are named (a diffusers transformer: ``transformer_blocks.3.attn1``, ``.attn2``, ``.ff``) names its columns
in a ``sublayers`` list instead of ``depth``: ``{"num_steps": 12, "sublayers": [...], "compute": [...]}``.

A reused sub-layer reads its most recent computed value in the same request, so the first call must compute every
sub-layer; that is checked here, when a schedule is made, not when it runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from .macs import MacCount
from .plan import default_sublayer_names
from .util import read_json, write_json
from .vocabulary import SAMPLER_KINDS, official_cache_calls

# How a router decodes into a schedule. ``official``: as the authors' samplers, only the calls where they consult their
# router are decided (:func:`l2c_export.core.vocabulary.official_cache_calls`), every other call computes everything;
# ``general``: every call but the first is decided.
ScheduleMode = Literal["official", "general"]
SCHEDULE_MODES = ("official", "general")


class ScheduleError(ValueError):
    """An invalid schedule; the message names the file (or source) and the field."""


def check_mode(mode: str, where: str | None = None) -> ScheduleMode:
    """``mode`` if it is one of :data:`SCHEDULE_MODES`; else a ValueError (a :class:`ScheduleError` naming field
    'mode' of ``where`` where given)."""
    if not isinstance(mode, str) or mode not in SCHEDULE_MODES:
        shown = repr(mode) if len(repr(mode)) <= 40 else f"{repr(mode)[:40]}..."
        if where is None:
            raise ValueError(f"unknown schedule mode {shown}; expected one of {', '.join(SCHEDULE_MODES)}")
        raise ScheduleError(f"{where}: field 'mode' is {shown}; expected one of {', '.join(SCHEDULE_MODES)} (how "
                            f"the router was decoded), or no 'mode'")
    return mode


def format_model_time(t: float) -> str:
    """The time the model sees at a call, for people: ``999``, or one decimal where it is not whole (DPM-Solver's
    ``951.8``, not ``951.8417600387976``)."""
    return f"{float(t):.0f}" if float(t).is_integer() else f"{float(t):.1f}"


@dataclass
class Schedule:
    compute: np.ndarray  # (num_steps, num_sublayers) bool
    timesteps: list[int] | None = None
    source: str | None = None
    threshold: float | None = None
    mode: str | None = None
    sampler: str | None = None  # the sampler whose model calls the rows are (official mode's cache calls depend on it)
    extra: dict = field(default_factory=dict)
    sublayers: tuple[str, ...] | None = None  # column names; None: the authors' attn_j/mlp_j (2 * depth columns)

    def __post_init__(self):
        self.compute = np.asarray(self.compute, dtype=bool)
        if self.sublayers is not None:
            self.sublayers = tuple(self.sublayers)
            if self.sublayers == default_sublayer_names(len(self.sublayers)):
                self.sublayers = None  # the authors' layout, written as depth
        self.validate(self.source or "schedule")

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.compute.shape[0]

    @property
    def depth(self) -> int:
        """Blocks of an authors'-layout schedule (2 columns each)."""
        return self.compute.shape[1] // 2

    @property
    def width(self) -> int:
        """Columns: sub-layers of the model."""
        return self.compute.shape[1]

    @property
    def sublayer_names(self) -> tuple[str, ...]:
        """The name of every column: the ``sublayers`` list, else ``attn_j``/``mlp_j``."""
        return self.sublayers if self.sublayers is not None else default_sublayer_names(self.width)

    @classmethod
    def full(cls, num_steps: int, depth: int | None = None, sublayers=None, **kwargs) -> "Schedule":
        """Every sub-layer at every call: of a ``depth``-block authors' model, or over the named ``sublayers``."""
        width = len(sublayers) if sublayers is not None else 2 * depth
        return cls(np.ones((num_steps, width), dtype=bool), source=kwargs.pop("source", "full"), sublayers=sublayers,
                   **kwargs)

    def validate(self, where: str) -> None:
        if self.compute.ndim != 2 or self.compute.shape[0] < 1:
            raise ScheduleError(f"{where}: field 'compute' must be a non-empty list of rows; got shape "
                                f"{self.compute.shape}")
        if self.sublayers is None and (self.compute.shape[1] < 2 or self.compute.shape[1] % 2):
            raise ScheduleError(f"{where}: field 'compute' rows must have 2 * depth entries; got {self.compute.shape[1]}")
        if self.sublayers is not None:
            if len(self.sublayers) != self.compute.shape[1]:
                raise ScheduleError(f"{where}: field 'compute' rows have {self.compute.shape[1]} entries; field "
                                    f"'sublayers' names {len(self.sublayers)}")
            repeated = next((name for k, name in enumerate(self.sublayers) if name in self.sublayers[:k]), None)
            if repeated is not None:
                raise ScheduleError(f"{where}: field 'sublayers' names {repeated!r} twice")
        if not self.compute[0].all():
            missing = np.flatnonzero(~self.compute[0]).tolist()
            raise ScheduleError(f"{where}: field 'compute' row 0 (the first step) must compute every sub-layer, since "
                                f"a reused sub-layer reads a value computed earlier in the request; sub-layers "
                                f"{missing} are not computed")
        if self.mode is not None:
            check_mode(self.mode, where)
        if self.timesteps is not None and len(self.timesteps) != self.num_steps:
            raise ScheduleError(f"{where}: field 'timesteps' has {len(self.timesteps)} entries; expected num_steps = "
                                f"{self.num_steps}")

    def check_fits(self, num_steps: int, sublayers, where: str | None = None) -> None:
        """Raises ScheduleError unless this schedule is for ``num_steps`` calls of a model whose sub-layers are
        ``sublayers`` (their names in forward order; an int: an authors'-layout model of that many blocks). A name
        that is not one of the model's sub-layers is refused by name."""
        where = where or self.source or "schedule"
        if self.num_steps != num_steps:
            raise ScheduleError(f"{where}: field 'num_steps' is {self.num_steps}; the sampler takes {num_steps} steps")
        model = default_sublayer_names(2 * sublayers) if isinstance(sublayers, int) else tuple(sublayers)
        if self.sublayer_names == model:
            return
        named = model != default_sublayer_names(len(model))
        if self.sublayers is None and not named:
            raise ScheduleError(f"{where}: field 'depth' is {self.depth}; the model has {len(model) // 2} blocks")
        if self.sublayers is None:
            raise ScheduleError(f"{where}: field 'depth' describes attn_j/mlp_j columns; the model's sub-layers are "
                                f"named ({model[0]}, ...): give field 'sublayers' with its {len(model)} names")
        unknown = next((name for name in self.sublayers if name not in model), None)
        if unknown is not None:
            raise ScheduleError(f"{where}: field 'sublayers' names {unknown!r}, which is not a sub-layer of the model "
                                f"(its {len(model)}: {', '.join(model[:4])}{', ...' if len(model) > 4 else ''})")
        raise ScheduleError(f"{where}: field 'sublayers' must list the model's {len(model)} sub-layers in forward "
                            f"order ({', '.join(model[:4])}{', ...' if len(model) > 4 else ''}); got "
                            f"{len(self.sublayers)}")

    def check_expert_starts(self, step_expert, expert_names, where: str | None = None) -> None:
        """Raises ScheduleError unless the first call of each expert (``step_expert``: the expert of each call;
        ``expert_names``: their names) computes every sub-layer: each expert has its own cache, empty until then."""
        where = where or self.source or "schedule"
        first: dict[int, int] = {}
        for call, expert in enumerate(step_expert):
            first.setdefault(int(expert), call)
        for expert, call in sorted(first.items(), key=lambda item: item[1]):
            skipped = [self.sublayer_names[k] for k in np.flatnonzero(~self.compute[call])]
            if skipped:
                raise ScheduleError(f"{where}: field 'compute' row {call} (the first step of {expert_names[expert]}) "
                                    f"reuses {', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}; the first "
                                    f"step of each expert must compute every sub-layer (each expert has its own cache, "
                                    f"empty until then)")

    # ----------------------------------------------------------------------------------------------------------------
    def distinct_subsets(self) -> list[tuple[bool, ...]]:
        """The distinct rows, in order of first appearance (the full subset is first)."""
        seen: dict[tuple[bool, ...], None] = {}
        for row in self.compute:
            seen.setdefault(tuple(bool(v) for v in row), None)
        return list(seen)

    def subset_of_step(self) -> list[int]:
        """For each step, the index of its row in :meth:`distinct_subsets`."""
        index = {subset: i for i, subset in enumerate(self.distinct_subsets())}
        return [index[tuple(bool(v) for v in row)] for row in self.compute]

    def cache_steps(self) -> list[int]:
        """The model calls where the schedule decides per sub-layer: in official mode the calls where the authors'
        sampler consults its router (:func:`l2c_export.core.vocabulary.official_cache_calls` of the schedule's sampler,
        DDIM when it names none), else every call that reuses anything."""
        if self.mode == "official":
            return official_cache_calls(self.sampler or "ddim", self.num_steps)
        return [s for s in range(self.num_steps) if not self.compute[s].all()]

    def computed_per_step(self) -> list[int]:
        return self.compute.sum(axis=1).astype(int).tolist()

    def mac_fraction(self, macs: MacCount) -> float:
        """MACs of sampling with this schedule over MACs of computing everything, always-run parts included."""
        return sum(macs.of_subset(row) for row in self.compute) / (self.num_steps * macs.full)

    def ideal_speedup(self, macs: MacCount) -> float:
        return 1.0 / self.mac_fraction(macs)

    # ----------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = {"num_steps": self.num_steps, **({"depth": self.depth} if self.sublayers is None else
                                                 {"sublayers": list(self.sublayers)}),
                "compute": self.compute.astype(int).tolist()}
        for name in ("timesteps", "source", "threshold", "mode", "sampler"):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return {**data, **self.extra}

    def save(self, path: str | Path) -> None:
        write_json(Path(path), self.to_dict())

    @classmethod
    def from_dict(cls, data: dict, where: str = "schedule") -> "Schedule":
        if not isinstance(data, dict):
            raise ScheduleError(f"{where}: expected a JSON object with fields num_steps, depth (or sublayers), "
                                f"compute")
        for name in ("num_steps", "compute"):
            if name not in data:
                raise ScheduleError(f"{where}: missing field {name!r}")
        if ("depth" in data) == ("sublayers" in data):
            raise ScheduleError(f"{where}: expected exactly one of the fields 'depth' (attn_j/mlp_j columns) and "
                                f"'sublayers' (the columns' names)")
        num_steps, rows, sublayers = data["num_steps"], data["compute"], data.get("sublayers")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ScheduleError(f"{where}: field 'num_steps' must be a positive integer; got {num_steps!r}")
        if sublayers is not None:
            if not isinstance(sublayers, list) or not sublayers or not all(
                    isinstance(name, str) and name for name in sublayers):
                raise ScheduleError(f"{where}: field 'sublayers' must be a non-empty list of sub-layer names")
            width, what = len(sublayers), "len(sublayers)"
        else:
            depth = data["depth"]
            if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
                raise ScheduleError(f"{where}: field 'depth' must be a positive integer; got {depth!r}")
            width, what = 2 * depth, "2 * depth"
        if not isinstance(rows, list) or len(rows) != num_steps:
            got = len(rows) if isinstance(rows, list) else type(rows).__name__
            raise ScheduleError(f"{where}: field 'compute' must have num_steps = {num_steps} rows; got {got}")
        for s, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != width:
                got = len(row) if isinstance(row, list) else type(row).__name__
                raise ScheduleError(f"{where}: field 'compute' row {s} must have {what} = {width} entries; "
                                    f"got {got}")
            bad = [v for v in row if v not in (0, 1) or isinstance(v, float)]
            if bad:
                raise ScheduleError(f"{where}: field 'compute' row {s} must hold only 0 or 1; got {bad[0]!r}")
        timesteps, threshold = data.get("timesteps"), data.get("threshold")
        if timesteps is not None and (not isinstance(timesteps, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v
                for v in timesteps)):
            raise ScheduleError(f"{where}: field 'timesteps' must be a list of non-negative numbers (the timestep "
                                f"the model sees at each call)")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0.0 <= threshold <= 1.0):
            raise ScheduleError(f"{where}: field 'threshold' is {threshold!r}; expected a number in [0, 1]")
        if data.get("mode") is not None:
            check_mode(data["mode"], where)
        sampler = data.get("sampler")
        if sampler is not None and sampler not in SAMPLER_KINDS:
            raise ScheduleError(f"{where}: field 'sampler' is {sampler!r}; expected one of {', '.join(SAMPLER_KINDS)}")
        known = {"num_steps", "depth", "sublayers", "compute", "timesteps", "source", "threshold", "mode", "sampler"}
        return cls(np.asarray(rows, dtype=bool).reshape(num_steps, width), timesteps=data.get("timesteps"),
                   source=data.get("source", where), threshold=data.get("threshold"), mode=data.get("mode"),
                   sampler=data.get("sampler"), sublayers=sublayers,
                   extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def load(cls, path: str | Path) -> "Schedule":
        return cls.from_dict(read_json(Path(path), ScheduleError), where=str(path))

