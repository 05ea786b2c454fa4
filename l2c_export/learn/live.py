"""A learned schedule on a live diffusers pipeline, in PyTorch, and learning one from it.

::

    import l2c_export
    l2c_export.enable(pipe, "schedule.json")          # or a Schedule, or a router (threshold= / target_mac_fraction=)
    image = pipe("a red cat", num_inference_steps=20).images[0]
    l2c_export.disable(pipe)                          # every hook and cached tensor gone: diffusers as it was

:func:`enable` registers diffusers' own hooks (``diffusers.hooks.HookRegistry``, as its FirstBlockCache does) on the
pipeline's transformer: one on the transformer that counts its calls per pipeline run, and one on each sub-layer the
family names (``transformer_blocks.3.attn1``, ...) that, at the (call, sub-layer) pairs the schedule skips, returns the
sub-layer's most recent computed output of the same run instead of computing it (the paper's semantics; the
reference is ``tests/diffusers_pipelines.py``'s ``schedule_hooks``). A run starts when the pipeline sets its
scheduler's timesteps (each ``pipe(...)`` call does); calls at the same timestep are passes of one step (a pipeline
that calls the transformer for the conditional and the unconditional half apart), each pass with a cache of its own.

:func:`learn` learns a router from a live pipeline: its transformer (a copy, wrapped as the toolchain's
:class:`~l2c_export.models.diffusers.CachedTransformer`), its scheduler as the sampler and its text encoder on the
prompts, through the same learner as ``l2c-export learn`` (:func:`l2c_export.learn.learner.learn_router`).
"""

from __future__ import annotations

import copy
import weakref
from pathlib import Path
from typing import Sequence

from ..core.schedule import Schedule
from ..routers import RouterLogits

HOOK_NAME = "l2c_export_schedule"  # the hooks' name in every HookRegistry they join
WHERE = "l2c_export.enable"


def live_model(pipe, image_size: int | None = None):
    """The family and config of ``pipe.transformer`` (a class the toolchain supports, its options checked as a
    folder's are): -> (family, DiffusersConfig). ``image_size``: pixels, for a transformer without a sample_size
    (FLUX.1; default the pipeline's)."""
    from ..models import get_family
    from ..models.diffusers import TRANSFORMER_FAMILIES, DiffusersConfig

    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(f"{WHERE}: the pipeline has no transformer (pipe.transformer); expected a diffusers "
                         f"pipeline of one of {', '.join(TRANSFORMER_FAMILIES)}")
    class_name = type(transformer).__name__
    if class_name not in TRANSFORMER_FAMILIES:
        raise ValueError(f"{WHERE}: pipe.transformer is a {class_name}; supported transformer classes: "
                         f"{', '.join(TRANSFORMER_FAMILIES)}")
    family = get_family(TRANSFORMER_FAMILIES[class_name])
    config = DiffusersConfig(class_name, {key: value for key, value in dict(transformer.config).items()
                                          if not key.startswith("_")})
    family.check_config(config, "pipe.transformer.config")
    if image_size is None and getattr(pipe, "default_sample_size", None) and "sample_size" not in config.transformer:
        image_size = pipe.default_sample_size * getattr(pipe, "vae_scale_factor", 8)
    scale = getattr(pipe, "vae_scale_factor", 8)
    return family, family.sized_config(config, image_size if "sample_size" not in config.transformer else None, scale)


def resolve_schedule(schedule, family, config, threshold: float | None = None,
                     target_mac_fraction: float | None = None, mode: str = "official") -> Schedule:
    """``schedule``: a :class:`Schedule`, a :class:`RouterLogits`, or a file (a schedule ``.json``; a router
    ``.safetensors`` or the authors' ``.pt``), a router decoded at ``threshold`` or ``target_mac_fraction``; checked
    against the model's sub-layer names."""
    from ..routers import load_router

    where = WHERE
    if isinstance(schedule, (str, Path)):
        where = f"{WHERE}: {schedule}"
        path = Path(schedule)
        schedule = Schedule.load(path) if path.suffix == ".json" else load_router(path)
    if isinstance(schedule, RouterLogits):
        if (threshold is None) == (target_mac_fraction is None):
            raise ValueError(f"{where}: a router is decoded at a threshold: give threshold= or target_mac_fraction= "
                             f"(one of them)")
        if target_mac_fraction is not None:
            from ..routers.baselines import schedule_for_mac_fraction

            schedule = schedule_for_mac_fraction(schedule, target_mac_fraction, family.count_macs(config), mode)
        else:
            schedule = schedule.to_schedule(threshold, mode=mode)
    elif not isinstance(schedule, Schedule):
        raise ValueError(f"{WHERE}: schedule is a {type(schedule).__name__}; expected a schedule.json or router path, "
                         f"a Schedule or a router (load_router)")
    elif threshold is not None or target_mac_fraction is not None:
        raise ValueError(f"{where}: threshold= and target_mac_fraction= decode a router; a schedule is decoded already")
    schedule.check_fits(schedule.num_steps, family.sublayer_names(config), where)
    return schedule


class _RunState:
    """What the hooks of one enabled pipeline share: the schedule, where the current run is (step, pass) and each
    pass's cache (sub-layer column -> its last computed output)."""

    def __init__(self, schedule: Schedule, pipe):
        self.schedule = schedule
        self.compute = schedule.compute.tolist()  # (num_steps, num_sublayers) bools
        self.pipe = weakref.ref(pipe)
        self.run_timesteps = None  # the scheduler's timesteps tensor of the current run
        self.step, self.pass_index, self.last_time = -1, 0, None
        self.caches: list[dict] = []

    def clear(self) -> None:
        self.run_timesteps, self.step, self.pass_index, self.last_time = None, -1, 0, None
        self.caches = []

    def begin_call(self, timestep) -> None:
        """Places a transformer call: a new run where the pipeline set new timesteps (checked against the
        schedule's step count), a new step where the timestep changed, else the next pass of the same step."""
        pipe = self.pipe()
        scheduler = getattr(pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is not None and timesteps is not self.run_timesteps:
            self.clear()
            self.run_timesteps = timesteps
            if len(timesteps) != self.schedule.num_steps:
                raise ValueError(f"{WHERE}: the schedule ({self.schedule.source or 'unnamed'}) has "
                                 f"{self.schedule.num_steps} steps (field 'num_steps'); the pipeline runs "
                                 f"{len(timesteps)} (num_inference_steps={len(timesteps)}): call pipe(..., "
                                 f"num_inference_steps={self.schedule.num_steps}) or use a schedule of "
                                 f"{len(timesteps)} steps")
        time = None if timestep is None else float(timestep.reshape(-1)[0]) if hasattr(timestep, "reshape") \
            else float(timestep)
        if time is not None and time == self.last_time:
            self.pass_index += 1
        else:
            self.step, self.pass_index, self.last_time = self.step + 1, 0, time
        if self.step >= self.schedule.num_steps:
            raise ValueError(f"{WHERE}: transformer call at step {self.step} of a schedule of "
                             f"{self.schedule.num_steps} steps; call the pipeline (pipe(...)), which sets its "
                             f"scheduler's timesteps, rather than the transformer directly")
        while len(self.caches) <= self.pass_index:
            self.caches.append({})

    def computes(self, column: int) -> bool:
        return self.compute[self.step][column]

    @property
    def cache(self) -> dict:
        return self.caches[self.pass_index]


def _hook_classes():
    """The two diffusers ``ModelHook`` classes, made on first use (diffusers is imported only then)."""
    from diffusers.hooks import ModelHook

    class StepCounter(ModelHook):
        """On the transformer: places each call in its run (step, pass) before it runs."""

        def __init__(self, state: _RunState):
            super().__init__()
            self.state = state

        def pre_forward(self, module, *args, **kwargs):
            self.state.begin_call(kwargs.get("timestep", args[1] if len(args) > 1 else None))
            return args, kwargs

    class ScheduledSublayer(ModelHook):
        """On a named sub-layer: its own forward where the schedule computes it (the output kept for later steps of
        the same pass), its last computed output where the schedule reuses it."""

        def __init__(self, state: _RunState, column: int):
            super().__init__()
            self.state, self.column = state, column

        def new_forward(self, module, *args, **kwargs):
            state = self.state
            if state.computes(self.column):
                output = self.fn_ref.original_forward(*args, **kwargs)
                state.cache[self.column] = output
                return output
            return state.cache[self.column]

    return StepCounter, ScheduledSublayer


def enable(pipe, schedule, *, threshold: float | None = None, target_mac_fraction: float | None = None,
           mode: str = "official") -> Schedule:
    """Applies ``schedule`` to the live diffusers pipeline ``pipe``: at every (step, sub-layer) the schedule skips,
    the sub-layer returns its most recent computed output of the same pipeline run. ``schedule``: a schedule.json
    path, a :class:`Schedule`, or a router (a file or :class:`RouterLogits`) decoded at ``threshold`` or at the
    threshold that meets ``target_mac_fraction``, in ``mode``. Its sub-layer names are checked now, its step count
    against ``num_inference_steps`` at each ``pipe(...)`` call. Enabling again replaces the schedule. Returns the
    schedule applied."""
    from diffusers.hooks import HookRegistry

    family, config = live_model(pipe)
    plan = resolve_schedule(schedule, family, config, threshold, target_mac_fraction, mode)
    disable(pipe)
    state = _RunState(plan, pipe)
    step_counter, scheduled_sublayer = _hook_classes()
    transformer = pipe.transformer
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(step_counter(state), HOOK_NAME)
    for column, name in enumerate(plan.sublayer_names):
        if not plan.compute[:, column].all():  # a sub-layer computed at every step needs no hook
            HookRegistry.check_if_exists_or_initialize(transformer.get_submodule(name)).register_hook(
                scheduled_sublayer(state, column), HOOK_NAME)
    return plan


def disable(pipe) -> None:
    """Removes what :func:`enable` added to ``pipe``: every hook (the transformer then runs its own forwards) and with
    them every cached tensor. Does nothing on a pipeline that is not enabled."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK_NAME) is not None:
            registry.get_hook(HOOK_NAME).state.clear()
            registry.remove_hook(HOOK_NAME, recurse=False)
