"""Which sampler runs a ``scheduler_config.json``: its ``_class_name`` picks one of diffusers' schedulers as
hand-written here (:mod:`.diffusers`, :mod:`.unipc`)."""

from __future__ import annotations

from ..core.util import short_repr
from .diffusers import (DiffusersDDIM, DiffusersDPMMultistep, DiffusersFlowMatchEuler, PipelineTimesteps,
                        SchedulerConfigError)
from .unipc import DiffusersUniPC


# scheduler_config.json's ``_class_name`` -> the sampler that runs it
SCHEDULER_CLASSES = {cls.class_name: cls for cls in (DiffusersDDIM, DiffusersDPMMultistep, DiffusersFlowMatchEuler,
                                                      DiffusersUniPC)}


def sampler_from_scheduler_config(config: dict, num_inference_steps: int, source: str,
                                  pipeline: PipelineTimesteps | None = None):
    """The sampler of a ``scheduler_config.json`` dict (its ``_class_name`` picks the scheduler) running
    ``num_inference_steps`` (``--steps``); ``pipeline``: how a flow-matching pipeline sets the timesteps (the other
    schedulers take none). Raises :class:`SchedulerConfigError` in one line naming ``source``, the field and what is
    supported."""
    if not isinstance(config, dict):
        raise SchedulerConfigError(f"{source}: expected a JSON object; got {type(config).__name__}")
    name = config.get("_class_name")
    if name not in SCHEDULER_CLASSES:
        raise SchedulerConfigError(f"{source}: field '_class_name' is {short_repr(name)}; supported: "
                                   f"{', '.join(SCHEDULER_CLASSES)}")
    if name == DiffusersFlowMatchEuler.class_name:
        return DiffusersFlowMatchEuler.from_scheduler_config(config, num_inference_steps, source, pipeline)
    return SCHEDULER_CLASSES[name].from_scheduler_config(config, num_inference_steps, source)
