"""Where models come from: the embedded defaults (digits models shipped in the package), official checkpoints and
diffusers pipeline folders.

A :class:`ModelSpec` says everything the later stages need about a model besides its weights: the architecture, whether
it samples pixels or VAE latents, and its default sampler and guidance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.schedule import Schedule
from ..samplers import DenoisingSampler, create_sampler
from . import ModelFamily, family_of_config, family_of_model, get_family

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
# Folders of DEMO_DIR, each with a model.json, or a diffusers pipeline folder (model_index.json) with the learned
# router.safetensors and schedule.json beside (diffusers' from_pretrained ignores them).
EMBEDDED_MODELS = ("dit-digits", "uvit-digits", "t2i-digits", "t2i-digits-sd3", "t2v-digits")
# The diffusers folders among them: PixArt-α (l2c_export/demo/t2i.py), SD3 (l2c_export/demo/t2i_sd3.py) and Wan
# (l2c_export/demo/t2v.py)
TEXT_TO_IMAGE_MODELS = ("t2i-digits", "t2i-digits-sd3")
TEXT_TO_VIDEO_MODELS = ("t2v-digits",)
# An embedded diffusers folder's file beside model_index.json: its prompts and, for a video model, the clip it is
# sampled at (num_frames, height, width), its prompts' max_sequence_length and its num_inference_steps, which a build
# of it takes.
CAPTIONS_FILE = "captions.json"
DEFAULT_NAME = "dit-digits"
ROUTER_FILE, SCHEDULE_FILE = "router.safetensors", "schedule.json"
# A second router beside ROUTER_FILE, learned in general mode (any call may reuse; ROUTER_FILE's official mode reuses
# only where the authors' sampler consults its router): the budget curve's ``l2c-general`` row, below official's least.
GENERAL_ROUTER_FILE = "router-general.safetensors"
MAX_PRESET_IMAGE_SIZE = 4096  # --image-size of an official checkpoint's preset, in pixels


@dataclass(frozen=True)
class Expert:
    """One of the transformers a pipeline switches between by timestep: its component ``name``, the ``prefix`` of its
    cache slots and weight tensors in a build (none for the first), its guidance-scale argument, its config (sized as
    the build's) and weights folder."""

    name: str
    prefix: str
    scale_argument: str
    config: object
    weights: Path


@dataclass(frozen=True)
class ExpertSet:
    """A pipeline's experts in the order they run (Wan2.2's transformer, then transformer_2) and its boundary ratio:
    a model call whose timestep is >= ``boundary_ratio`` x num_train_timesteps runs the first, a later one the
    next."""

    boundary_ratio: float
    models: tuple[Expert, ...]

    def boundary_timestep(self, sampler: DenoisingSampler) -> float:
        """``boundary_ratio`` x the scheduler's ``num_train_timesteps`` (a diffusers sampler's option)."""
        return self.boundary_ratio * sampler.to_dict()["options"]["num_train_timesteps"]

    def step_expert(self, sampler: DenoisingSampler) -> list[int]:
        """(num_calls,) the expert of each of ``sampler``'s model calls, as ``WanPipeline.__call__`` chooses: the
        first while the timestep is >= :meth:`boundary_timestep` (in float32: :func:`expert_of_time`), the second
        after."""
        from ..core.manifest import expert_of_time

        boundary = self.boundary_timestep(sampler)
        return [expert_of_time(t, boundary) for t in sampler.model_times]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: object  # the family's config (DiTConfig, UViTConfig, ...): it says the family
    weights: Path
    space: str  # "pixel": samples are images in [-1, 1]; "latent": SD-VAE latents (scale 0.18215)
    sampler_kind: str | None = None  # default: the family's (DiT: ddim; U-ViT: dpm_solver_2s)
    num_steps: int = 20  # model calls (NFE)
    cfg_scale: float | None = None  # default: the family's (DiT: 4.0; U-ViT: 1.4)
    clip_denoised: bool = False
    default_schedule: Path | None = None
    default_router: Path | None = None
    general_router: Path | None = None  # GENERAL_ROUTER_FILE of an embedded folder, where it ships one
    training: dict | None = None  # embedded models: how ``train-default`` trains them (steps, batch_size)
    scheduler_config: dict | None = None  # a diffusers folder's scheduler_config.json: the sampler comes from it
    scheduler_source: str | None = None  # where that config was read (named in its errors)
    components: object = None  # a diffusers folder's FolderComponents: the VAE, text encoder and tokenizer a build carries
    max_prompt_tokens: int | None = None  # text models: the longest prompt embeddings L (the bound of their tokens)
    max_sequence_length: int | None = None  # text models: the pipeline's max_sequence_length (T5's tokens)
    experts: ExpertSet | None = None  # a pipeline of transformers switching by timestep (Wan2.2); None: one

    def __post_init__(self):
        if self.sampler_kind is None:
            object.__setattr__(self, "sampler_kind", self.family.default_sampler)
        if self.cfg_scale is None:
            object.__setattr__(self, "cfg_scale", self.family.default_cfg_scale)

    @property
    def family(self) -> ModelFamily:
        return family_of_config(self.config)

    @property
    def num_layers(self) -> int:
        return self.family.num_layers(self.config)

    @property
    def sublayer_names(self) -> tuple[str, ...]:
        """The schedule's columns: every sub-layer's name in forward order."""
        return self.family.sublayer_names(self.config)

    def load_model(self):
        """The cached model; a pipeline of experts' switching between them by timestep, as the pipeline
        (:func:`~l2c_export.models.diffusers.cache.expert_switch`)."""
        if self.experts is None:
            return self.family.load(self.weights, self.config)
        from .diffusers.cache import expert_switch

        return expert_switch([self.family.load(m.weights, m.config) for m in self.experts.models],
                             self.experts.boundary_timestep(self.sampler()))

    def sampler(self, kind: str | None = None, num_steps: int | None = None) -> DenoisingSampler:
        """The sampler ``kind`` (default: the model's) with ``num_steps`` model calls (NFE; default: the model's). A
        diffusers folder's sampler is its scheduler, ``num_steps`` its ``num_inference_steps``."""
        if self.family.default_sampler == "diffusers":
            if kind is not None:
                raise ValueError(f"--sampler {kind}: a diffusers folder samples with its own scheduler "
                                 f"({self.scheduler_source}); leave --sampler out")
            if self.scheduler_config is None:
                raise ValueError(f"{self.scheduler_source}: missing; a diffusers folder needs its scheduler/ to sample")
            from ..samplers import sampler_from_scheduler_config

            return sampler_from_scheduler_config(self.scheduler_config, num_steps or self.num_steps,
                                                 self.scheduler_source, self.family.pipeline_timesteps(self.config))
        return create_sampler(kind or self.sampler_kind, num_steps or self.num_steps, clip_denoised=self.clip_denoised)

    def schedule(self) -> Schedule | None:
        return Schedule.load(self.default_schedule) if self.default_schedule else None


def embedded_default(name: str = DEFAULT_NAME) -> ModelSpec:
    """A model shipped in ``l2c_export/demo/NAME/`` (see its ``model.json``, or for ``t2i-digits``, ``t2i-digits-sd3``
    and ``t2v-digits`` the diffusers folder it is, with its router and schedule, sized by its :data:`CAPTIONS_FILE`):
    the digits DiT by default."""
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; expected one of {', '.join(EMBEDDED_MODELS)}")
    folder = DEMO_DIR / name
    if embedded_diffusers_folder(name) is not None:
        captions = json.loads((folder / CAPTIONS_FILE).read_text()) if (folder / CAPTIONS_FILE).is_file() else {}
        size = (captions["height"], captions["width"]) if "height" in captions else None
        spec = from_diffusers(folder, size, captions.get("max_sequence_length"), captions.get("num_frames"))
        return replace(spec, name=name, num_steps=captions.get("num_inference_steps", spec.num_steps),
                       default_schedule=folder / SCHEDULE_FILE if (folder / SCHEDULE_FILE).is_file() else None,
                       default_router=folder / ROUTER_FILE if (folder / ROUTER_FILE).is_file() else None,
                       general_router=(folder / GENERAL_ROUTER_FILE if (folder / GENERAL_ROUTER_FILE).is_file()
                                       else None))
    info = json.loads((folder / "model.json").read_text())
    family = get_family(info["family"])
    return ModelSpec(name=info["name"], config=family.config_from_dict(info["config"]),
                     weights=folder / info["weights"], space=info["space"], sampler_kind=info["sampler"]["kind"],
                     num_steps=info["sampler"]["num_steps"], cfg_scale=info["cfg_scale"],
                     clip_denoised=info["sampler"].get("clip_denoised", False),
                     default_schedule=folder / info["schedule"] if info.get("schedule") else None,
                     default_router=folder / info["router"] if info.get("router") else None,
                     training=info.get("training"))


def embedded_diffusers_folder(name: str | None) -> Path | None:
    """The folder of an embedded model that is a diffusers pipeline folder (``t2i-digits``, ``t2i-digits-sd3``,
    ``t2v-digits``); None for any other name."""
    folder = DEMO_DIR / name if name in EMBEDDED_MODELS else None
    return folder if folder is not None and (folder / "model_index.json").is_file() else None


def official(checkpoint: str | Path, model: str, image_size: int, num_classes: int = 1000) -> ModelSpec:
    """An official checkpoint of a preset (DiT-XL/2, U-ViT-H/2, ...): ``image_size`` in pixels, 4-channel latents at
    1/8; the family's default sampler and guidance scale."""
    if image_size % 8:
        raise ValueError(f"--image-size {image_size} is not a multiple of 8 (latents are 1/8 of the image)")
    if image_size > MAX_PRESET_IMAGE_SIZE:
        raise ValueError(f"--image-size {image_size}: expected at most {MAX_PRESET_IMAGE_SIZE} pixels (the presets are "
                         f"released at 256 and 512 px; the position table grows with the square of the size)")
    family = family_of_model(model)
    config = family.preset(model, image_size, num_classes)
    return ModelSpec(name=f"{model} {image_size}px", config=config, weights=Path(checkpoint), space="latent")


def from_diffusers(folder: str | Path, image_size: int | tuple[int, int] | None = None,
                   max_sequence_length: int | None = None, num_frames: int | None = None) -> ModelSpec:
    """A diffusers pipeline folder (:func:`l2c_export.models.diffusers.read_folder`): its transformer, its scheduler as
    the sampler, the pipeline's default steps and guidance scale; ``image_size`` (pixels) for a transformer without a
    ``sample_size`` (FLUX.1), or (height, width) and ``num_frames`` for a video model (Wan); ``max_sequence_length``
    the pipelines' argument of that name (T5's tokens; default the pipeline's) for a text model."""
    from ..core.extras import require_extra
    from .diffusers import read_folder
    from .diffusers.text_encoders import SEQUENCE_LENGTHS

    require_extra("diffusers", f"the diffusers folder {folder}")  # its transformer is diffusers' class
    found = read_folder(folder)
    config = found.family.sized_config(found.config, image_size, found.vae_scale_factor, num_frames)
    family = found.family
    if max_sequence_length is not None:
        low, high = SEQUENCE_LENGTHS
        if family.declaration.text_encoders is None:
            raise ValueError(f"--max-sequence-length: a {found.config.transformer_class} takes no prompts; leave "
                             f"--max-sequence-length out")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
                or not low <= max_sequence_length <= high:
            raise ValueError(f"--max-sequence-length {max_sequence_length!r}: expected an integer in {low}..{high} "
                             f"(T5's tokens; {found.pipeline_class} takes at most {high})")
    if family.declaration.text_encoders is not None:
        max_sequence_length = max_sequence_length or family.declaration.max_sequence_length[found.pipeline_class]
    max_prompt_tokens = family.max_prompt_tokens(found.pipeline_class, max_sequence_length,
                                                 found.components.tokenizer_max_length)

    def at_prompt_length(sized_config):
        """Where MACs count at the build's prompt length (Wan), the config with that length."""
        if family.declaration.macs_at_build_length and max_prompt_tokens is not None:
            return replace(sized_config, prompt_tokens=max_prompt_tokens)
        return sized_config

    config = at_prompt_length(config)
    experts = None
    if found.experts is not None:
        declared = family.declaration.experts
        later = [Expert(expert.name, declared.prefix(i), declared.scale_arguments[i], at_prompt_length(
                            family.sized_config(expert.config, image_size, found.vae_scale_factor, num_frames)),
                        expert.path)
                 for i, expert in enumerate(found.experts.later, start=1)]
        experts = ExpertSet(found.experts.boundary_ratio, (
            Expert(declared.components[0], declared.prefix(0), declared.scale_arguments[0], config,
                   found.transformer_dir), *later))
    return ModelSpec(name=f"{found.config.transformer_class} {Path(folder).resolve().name}", config=config,
                     weights=found.transformer_dir, space="latent", num_steps=family.default_steps,
                     scheduler_config=found.scheduler_config, scheduler_source=str(found.scheduler_config_path),
                     components=found.components,
                     max_prompt_tokens=max_prompt_tokens, max_sequence_length=max_sequence_length,
                     experts=experts)


def resolve(checkpoint: str | Path | None, model: str | None, image_size: int | tuple[int, int] | None,
            num_classes: int | None, diffusers: str | Path | None = None,
            max_sequence_length: int | None = None, num_frames: int | None = None) -> ModelSpec:
    """A diffusers folder (``diffusers``); without a checkpoint, an embedded model (``model``: dit-digits, the
    default, uvit-digits, t2i-digits, t2i-digits-sd3 or t2v-digits); else the official model the flags describe."""
    if diffusers is not None:
        if checkpoint is not None or model is not None:
            raise ValueError("--diffusers names the model; leave out --checkpoint and --model")
        return from_diffusers(diffusers, image_size, max_sequence_length, num_frames)
    if num_frames is not None:
        raise ValueError("--num-frames is the clip length of a --diffusers video folder (Wan); leave it out")
    if isinstance(image_size, tuple):
        raise ValueError(f"--image-size {image_size[0]}x{image_size[1]}: a height and a width are a --diffusers video "
                         f"folder's (Wan); give one size in pixels")
    if max_sequence_length is not None:
        raise ValueError("--max-sequence-length is the prompt length of a --diffusers folder's text model; leave it "
                         "out")
    if checkpoint is None:
        if model is not None and model not in EMBEDDED_MODELS:
            raise ValueError(f"--model {model} needs --checkpoint; without one, --model is an embedded model: "
                             f"{', '.join(EMBEDDED_MODELS)}")
        return embedded_default(model or DEFAULT_NAME)
    if model is None or image_size is None:
        raise ValueError("--checkpoint needs --model (for example DiT-XL/2 or U-ViT-H/2) and --image-size (pixels, "
                         "for example 256)")
    return official(checkpoint, model, image_size, num_classes or 1000)
