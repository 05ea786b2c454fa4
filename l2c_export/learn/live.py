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

:func:`learn` learns a router from a live pipeline: its transformer (its weights copied into the toolchain's cached
wrapper of the same class, :meth:`~l2c_export.models.diffusers.DiffusersFamily.create`), its scheduler as the sampler
and its text encoder on the prompts, through the same learner as ``l2c-export learn``
(:func:`l2c_export.learn.learner.learn_router`).
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.schedule import Schedule
from ..routers import RouterLogits

HOOK_NAME = "l2c_export_schedule"  # the hooks' name in every HookRegistry they join
WHERE = "l2c_export.enable"


def live_model(pipe, image_size: int | None = None, where: str = WHERE):
    """The family and config of ``pipe.transformer`` (a class the toolchain supports, its options checked as a
    folder's are): -> (family, DiffusersConfig). ``image_size``: pixels, for a transformer without a sample_size
    (FLUX.1; default the pipeline's)."""
    from ..models.diffusers import DiffusersConfig, transformer_families

    families = transformer_families()
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(f"{where}: the pipeline has no transformer (pipe.transformer); expected a diffusers "
                         f"pipeline of one of {', '.join(families)}")
    class_name = type(transformer).__name__
    if class_name not in families:
        raise ValueError(f"{where}: pipe.transformer is a {class_name}; supported transformer classes: "
                         f"{', '.join(families)}")
    family = families[class_name]
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

    def end_call(self) -> None:
        """After a call of the last step nothing reads its pass's cache again: its tensors are let go."""
        if self.step == self.schedule.num_steps - 1:
            self.caches[self.pass_index] = {}

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

        def post_forward(self, module, output):
            self.state.end_call()
            return output

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
    if transformer is not None:
        _remove_hooks(transformer)


def _declared_family(pipe, where: str):
    """The declared family whose pipeline classes include ``pipe``'s class (a folder's text pipeline may carry no
    transformer to tell it by)."""
    from ..models.diffusers import transformer_families

    name = type(pipe).__name__
    family = next((f for f in transformer_families().values() if name in f.declaration.pipeline_classes), None)
    if family is None or family.declaration.encode_prompt is None:
        prompted = sorted(c for f in transformer_families().values() if f.declaration.encode_prompt is not None
                          for c in f.declaration.pipeline_classes)
        raise ValueError(f"{where}: a {name} is not encoded here; pipelines with prompts: {', '.join(prompted)}")
    return family


def encode_prompts(pipe, prompts: Sequence[str], guiding: bool, negative_prompt: str = "",
                   where: str = "prompts", max_sequence_length: int | None = None) -> dict:
    """``prompts`` encoded by the pipeline's own ``encode_prompt`` at its call's settings, as its family declares the
    call (:class:`~l2c_export.models.diffusers.declaration.EncodePrompt`: the outputs' names, the negative prompt
    encoded in the same call or in a second, fixed and call-default keywords), the negative prompt's too where
    ``guiding``: -> numpy arrays by the pipeline's argument names (``prompt_embeds`` (P, L, D),
    ``prompt_attention_mask`` (P, L), ...). ``max_sequence_length``: the call's, where not its default (a build's
    ``--max-sequence-length``)."""
    import inspect

    import torch

    from ..core.interface import TOKEN_EMBEDDINGS, TOKEN_MASK

    declared = _declared_family(pipe, where).declaration
    how = declared.encode_prompt
    missing = [part for part in ("tokenizer", "text_encoder") if getattr(pipe, part, None) is None]
    if missing:
        raise ValueError(f"{where}: the pipeline has no {' and no '.join(missing)} to encode prompts with; load it "
                         f"with its text encoder, or give the prompt embeddings by the pipeline's argument names")
    if isinstance(prompts, str) or not prompts or not all(isinstance(text, str) for text in prompts):
        raise ValueError(f"{where}: expected a non-empty list of prompts (str)")
    parameters = inspect.signature(pipe.encode_prompt).parameters
    call_defaults = {name: p.default for name, p in inspect.signature(pipe.__call__).parameters.items()
                     if p.default is not inspect.Parameter.empty}
    keywords = {"device": getattr(pipe, "_execution_device", None) or "cpu", **how.keywords,
                **{name: call_defaults[name] for name in how.from_call if name in call_defaults and name in parameters}}
    # the other prompts a stack may take (SD3's prompt_2, prompt_3): none, as the pipeline call's default
    keywords.update({name: None for name, p in parameters.items() if name.startswith("prompt_") and name[7:].isdigit()
                     and p.default is inspect.Parameter.empty})
    if max_sequence_length is not None:
        keywords["max_sequence_length"] = max_sequence_length
    if how.guided:
        keywords.update(do_classifier_free_guidance=guiding, negative_prompt=negative_prompt)

    kinds = {name: c.kind for c in declared.conditioning for name in (c.argument, c.negative) if name}

    def encoded(texts, names):
        with torch.no_grad():
            outputs = pipe.encode_prompt(list(texts), **keywords)
        arrays = {name: value.float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
                  for name, value in zip(names, outputs) if name is not None and value is not None}
        # a mask the pipeline leaves out where every token counts (Qwen-Image's all-ones mask is None): ones
        tokens = next((arrays[name] for name in names if kinds.get(name) == TOKEN_EMBEDDINGS and name in arrays), None)
        for name in names:
            if kinds.get(name) == TOKEN_MASK and name not in arrays and tokens is not None:
                arrays[name] = np.ones(tokens.shape[:2], dtype=np.int64)
        return arrays

    arrays = encoded(prompts, how.outputs)
    partners = {c.argument: c.negative for c in declared.conditioning if c.negative}
    if guiding and not how.guided and any(name in partners for name in arrays):
        arrays.update(encoded([negative_prompt] * len(prompts), [partners.get(name) for name in how.outputs]))
    for name in set(partners.values()) & set(arrays):  # one negative row for every prompt (PixArt's encode_prompt)
        if len(arrays[name]) == 1 < len(prompts):
            arrays[name] = arrays[name].repeat(len(prompts), axis=0)
    return arrays


def folder_text_pipeline(folder: Path, where: str):
    """The pipeline of a diffusers folder with its tokenizer and text encoder only (no transformer, no VAE), as
    diffusers loads it: what :func:`encode_prompts` encodes with. Refuses a folder without a text encoder."""
    from diffusers import DiffusionPipeline

    from ..core.util import read_folder_json
    from ..models.diffusers import MODEL_INDEX, DiffusersFolderError

    index = read_folder_json(Path(folder) / MODEL_INDEX, "model_index", DiffusersFolderError)
    absent = {name: None for name, entry in index.items() if isinstance(entry, list) and entry[0] is None}
    if "text_encoder" not in index or "text_encoder" in absent:
        raise ValueError(f"{where}: {folder} has no text encoder ({MODEL_INDEX} field 'text_encoder'); give the "
                         f"prompt embeddings with --conditioning-data prompts.npz")
    skipped = {name: None for name in ("transformer", "vae") if name in index}
    pipe = DiffusionPipeline.from_pretrained(str(folder), **absent, **skipped)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_condition(family, config, arrays: dict, guiding: bool, guidance_scale: float, max_tokens: int | None,
                     where: str, names=None):
    """The learner's :class:`~l2c_export.learn.data.Condition` of prompt arrays by the pipeline's argument names,
    checked as the runtime checks them; ``names``: how messages call the request's parts (default the Python
    arguments; the CLI passes its flags)."""
    from .data import Condition
    from ..core.interface import conditioning_records
    from ..samplers.conditioning import ARGUMENT_NAMES, refuse_negatives

    records = conditioning_records([tensor.record() for tensor in family.graph_inputs(config)])
    if not family.classifier_free:
        refuse_negatives(arrays, where, names or ARGUMENT_NAMES)
    return Condition.of_prompts(arrays, records, family.guidance_record(config), guiding, where, guidance_scale,
                                max_tokens)


def learn(pipe, prompts: Sequence[str] | None = None, *, num_inference_steps: int | None = None,
          guidance_scale: float | None = None, negative_prompt: str = "", mode: str = "official",
          trajectories: int = 256, iterations: int = 300, batch_size: int = 16, lr: float = 0.05, l1: float = 2e-4,
          window: int | None = None, steps_per_iteration: int = 0, init_std: float = 0.0, seed: int = 0,
          image_size: int | None = None, conditioning: dict | None = None, progress: bool = True) -> RouterLogits:
    """Learns a router for the live diffusers pipeline ``pipe`` (L2C's objective, as ``l2c-export learn`` does):
    ``trajectories`` sampled by its transformer (a copy: ``pipe`` is not changed) and scheduler at
    ``num_inference_steps`` (default: the family's pipeline default) and ``guidance_scale``, on the CPU in fp32
    whatever the pipeline's device and dtype, conditioned on
    ``prompts`` encoded by the pipeline's own text encoder (a text model; each trajectory takes one at random), or
    on ``conditioning``, their embeddings by the pipeline's argument names (``prompt_embeds`` (P, L, D),
    ``prompt_attention_mask``, ``pooled_prompt_embeds``, the ``negative_`` ones when guiding: a pipeline loaded
    without its text encoders), or on random class labels (DiT). Returns the router: logits (num_inference_steps, sub-layers) with the metadata
    ``learn --out`` writes, so that ``router.save("router.safetensors")`` writes that file and
    ``enable(pipe, router, target_mac_fraction=0.7)`` applies it."""
    from ..samplers import sampler_from_scheduler_config
    from .data import sample_trajectories
    from .files import router_metadata
    from .learner import learn_router
    from .settings import LearnSettings
    import json

    family, config = live_model(pipe, image_size, "l2c_export.learn")
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise ValueError("l2c_export.learn: the pipeline has no scheduler (pipe.scheduler)")
    num_steps = num_inference_steps or family.default_steps
    sampler = sampler_from_scheduler_config(json.loads(scheduler.to_json_string()), num_steps, "pipe.scheduler.config",
                                            family.pipeline_timesteps(config))
    guidance_scale = family.default_cfg_scale if guidance_scale is None else guidance_scale
    classifier_free = family.classifier_free
    settings = LearnSettings(mode=mode, iterations=iterations, batch_size=batch_size, lr=lr, l1=l1,
                             cfg_scale=guidance_scale if classifier_free else 1.0, window=window,
                             steps_per_iteration=steps_per_iteration, init_std=init_std, seed=seed)
    text_model = any(tensor.kind == "token_embeddings" for tensor in family.graph_inputs(config))
    given = "prompts" if conditioning is None else "conditioning"
    if prompts is not None and conditioning is not None:
        raise ValueError("l2c_export.learn: give prompts= or conditioning=, not both")
    if text_model and prompts is None and conditioning is None:
        raise ValueError("l2c_export.learn: a text model learns on prompts: give prompts=[...] (or their embeddings, "
                         "conditioning={'prompt_embeds': ..., ...})")
    if not text_model and (prompts is not None or conditioning is not None):
        raise ValueError(f"l2c_export.learn: this model is conditioned on class labels; {given}= does not apply")
    condition = None
    if text_model:
        guiding = classifier_free and guidance_scale > 1.0
        where = f"l2c_export.learn: {given}"
        arrays = ({name: np.asarray(value.detach().float().cpu() if hasattr(value, "detach") else value)
                   for name, value in conditioning.items()} if conditioning is not None
                  else encode_prompts(pipe, prompts, guiding, negative_prompt, where))
        max_tokens = None
        if hasattr(family, "max_prompt_tokens") and type(pipe).__name__ in family.pipeline_classes:
            max_tokens = family.max_prompt_tokens(type(pipe).__name__)
        condition = prompt_condition(family, config, arrays, guiding, guidance_scale, max_tokens, where)
    model = family.create(config)  # a CPU fp32 copy of the pipeline's transformer (the learner runs on the CPU)
    model.transformer.load_state_dict({name: value.detach().float().cpu()
                                       for name, value in pipe.transformer.state_dict().items()})
    model.eval()
    source = sample_trajectories(model, sampler, trajectories, settings.cfg_scale, seed, progress=progress,
                                 prompts=condition)
    description = f"{len(condition)} prompts" if text_model else "random class labels"
    result = learn_router(model, sampler, source, settings, progress=progress, source_name=description)
    router = result.router
    router.source = "l2c_export.learn"
    router.meta = {**router_metadata(f"{config.transformer_class} (live pipeline)", sampler, settings, description,
                                     result.seconds),
                   "learned_by": "l2c_export.learn", "sublayers": list(family.sublayer_names(config))}
    return router


def _remove_hooks(transformer) -> None:
    """Removes :func:`enable`'s hooks from a transformer's modules, and with them their state (the caches)."""
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(HOOK_NAME) is not None:
            registry.get_hook(HOOK_NAME).state.clear()
            registry.remove_hook(HOOK_NAME, recurse=False)
