"""The family base of diffusers transformers: a :class:`DiffusersFamily` is made from a family file's
:class:`~l2c_export.models.diffusers.declaration.Declaration` and derives from it what every stage asks of a family
(its sub-layers, graph interface, traced inputs, guidance and sizes); a family file adds code only where its
transformer needs more than its declaration says (a config check, FLUX.1's packed sample).

The model is diffusers' own transformer, wrapped by :mod:`.cache`; MACs are counted by :mod:`.macs`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from .. import LATENT_SCALE, ModelFamily, TensorSpec, config_from_dict
from ...core.interface import KIND_DTYPES, NCFHW, SCALAR, TOKEN_EMBEDDINGS, TOKEN_MASK
from ...core.macs import MacCount
from ...core.util import short_repr
from .declaration import IMAGE, JOINT, JOINT_TOKENS, PROMPT, PROMPT_TOKENS, Declaration
from .text_encoders import DEFAULT_TOKENIZER_MAX_LENGTH
from .files import DiffusersFolderError, weight_files
from .sizes import TRANSFORMER_SIZES, Size, check_sizes

if TYPE_CHECKING:
    from .cache import OutputPacking


@dataclass(frozen=True)
class DiffusersConfig:
    """A diffusers transformer: its class and its ``config.json`` (without diffusers' private ``_`` keys), and where
    that config has no ``sample_size`` (FLUX.1) the latent side the build runs at (``--image-size`` over the VAE's
    scale factor); a video model's latents (F', H', W') the build runs at (``latent_shape``: Wan's, from
    ``--num-frames`` and ``--image-size``); where a build's MACs are counted at its own prompt length (Wan:
    ``Declaration.macs_at_build_length``), that length (``prompt_tokens``: ``--max-sequence-length``)."""

    transformer_class: str
    transformer: Mapping = field(default_factory=dict)
    latent_size: int | None = None
    latent_shape: tuple[int, ...] | None = None
    prompt_tokens: int | None = None

    def __post_init__(self):
        if self.latent_shape is not None:  # a list where read back from JSON
            object.__setattr__(self, "latent_shape", tuple(self.latent_shape))

    def __getitem__(self, key: str):
        return self.transformer[key]

    def get(self, key: str, default=None):
        return self.transformer.get(key, default)

    def to_dict(self) -> dict:
        data = {"transformer_class": self.transformer_class, "transformer": dict(self.transformer)}
        if self.latent_size is not None:
            data["latent_size"] = self.latent_size
        if self.latent_shape is not None:
            data["latent_shape"] = list(self.latent_shape)
        if self.prompt_tokens is not None:
            data["prompt_tokens"] = self.prompt_tokens
        return data

    def __hash__(self):
        return hash((self.transformer_class, json.dumps(dict(self.transformer), sort_keys=True), self.latent_size,
                     self.latent_shape, self.prompt_tokens))


def refuse_num_frames(family, config: DiffusersConfig, num_frames: int | None) -> None:
    """``--num-frames`` is a video model's; an image model refuses it (ValueError naming the flag)."""
    if num_frames is not None and family.latent_layout != NCFHW:
        raise ValueError(f"--num-frames {num_frames}: a {config.transformer_class} samples images, not clips; leave "
                         f"--num-frames out")


class DiffusersFamily(ModelFamily):
    """A diffusers transformer class, made from its :class:`Declaration` (``name``: the registry's, which the
    family's file gives it: ``diffusers-<module>``; ``sizes``: the config's integer fields, each bounded)."""

    model_names = ()
    default_sampler = "diffusers"  # the folder's scheduler (scheduler/scheduler_config.json)
    latent_scale = LATENT_SCALE
    dummy_prompt_tokens = 5  # the traced prompt length (any: the axis is dynamic)
    config_class = DiffusersConfig

    def __init__(self, name: str, declaration: Declaration, sizes: Mapping[str, Size] = TRANSFORMER_SIZES):
        self.name = name
        self.declaration = declaration
        self.sizes = sizes

    # -- declared facts, by the names the stages read ----------------------------------------------------------------
    @property
    def transformer_class(self) -> str:  # the ``_class_name`` of transformer/config.json
        return self.declaration.transformer_class

    @property
    def pipeline_classes(self) -> tuple[str, ...]:  # the pipelines whose sampling the runtime reproduces
        return self.declaration.pipeline_classes

    @property
    def scheduler_classes(self) -> tuple[str, ...]:  # the schedulers its pipelines take
        return self.declaration.scheduler_classes

    @property
    def required(self) -> Mapping[str, object]:  # config option -> the only value supported
        return self.declaration.required

    @property
    def default_steps(self) -> int:
        return self.declaration.default_steps

    @property
    def default_cfg_scale(self) -> float:
        return self.declaration.guidance.default_scale

    @property
    def guidance_rule(self) -> str:
        return self.declaration.guidance.rule

    @property
    def scale_argument(self) -> str:
        return self.declaration.guidance.scale_argument

    @property
    def latent_layout(self) -> str:
        return self.declaration.latent_layout

    @property
    def macs_prompt_tokens(self) -> int | None:
        return self.declaration.macs_prompt_tokens

    def owns(self, config) -> bool:
        return isinstance(config, DiffusersConfig) and config.transformer_class == self.transformer_class

    def config_from_dict(self, data: Mapping) -> DiffusersConfig:
        config = config_from_dict(DiffusersConfig, data)
        self.check_config(config, "config")
        return config

    def check_config(self, config: DiffusersConfig, where: str) -> None:
        """Refuses, naming it, a class or option this family does not run: unknown keys (not arguments of the class),
        options other than :attr:`required`, and integer fields outside their bounds (:attr:`sizes`)."""
        if config.transformer_class != self.transformer_class:
            raise DiffusersFolderError(f"{where}: field '_class_name' is {short_repr(config.transformer_class)}; the "
                                       f"{self.name} family reads {self.transformer_class}")
        for key, value in self.required.items():
            if config.get(key, value) != value:
                raise DiffusersFolderError(f"{where}: field {key!r} is {short_repr(config.get(key))}; "
                                           f"{self.transformer_class} is supported with {key} = {value!r} only")
        check_sizes(config, self.sizes, where, DiffusersFolderError)
        if "sample_size" in self.sizes and config["sample_size"] % config["patch_size"]:
            raise DiffusersFolderError(f"{where}: field 'sample_size' {config['sample_size']} is not a multiple of "
                                       f"'patch_size' {config['patch_size']}")
        if self.out_channels(config) not in (self.in_channels(config), 2 * self.in_channels(config)):
            raise DiffusersFolderError(f"{where}: field 'out_channels' is {short_repr(config.get('out_channels'))}; "
                                       f"expected in_channels or 2 * in_channels (learned sigma)")
        # last: the keys are checked against diffusers' own class, whose import takes seconds
        accepted = set(inspect.signature(self.diffusers_class().__init__).parameters) - {"self"}
        unknown = sorted(set(config.transformer) - accepted)
        if unknown:
            raise DiffusersFolderError(f"{where}: field {short_repr(unknown[0])} is not an option of "
                                       f"{self.transformer_class} (diffusers 0.42); not supported")

    def sized_config(self, config: DiffusersConfig, image_size: int | tuple[int, int] | None, vae_scale_factor: int,
                     num_frames: int | None = None) -> DiffusersConfig:
        """The config at ``--image-size`` pixels (and ``--num-frames`` for a video model); these families take their
        size from ``sample_size``."""
        refuse_num_frames(self, config, num_frames)
        if image_size is not None:
            raise ValueError(f"--image-size: a {self.transformer_class} runs at its config's sample_size "
                             f"({config.get('sample_size')} latents); leave --image-size out")
        return config

    def diffusers_class(self):
        from ...core.extras import import_extra

        return getattr(import_extra("diffusers"), self.transformer_class)

    # -- sizes -------------------------------------------------------------------------------------------------------
    def in_channels(self, config: DiffusersConfig) -> int:
        return config["in_channels"]

    def out_channels(self, config: DiffusersConfig) -> int:
        return config.get("out_channels") or config["in_channels"]

    def num_tokens(self, config: DiffusersConfig) -> int:
        return (config["sample_size"] // config["patch_size"]) ** 2

    def inner_dim(self, config: DiffusersConfig) -> int:
        return config["num_attention_heads"] * config["attention_head_dim"]

    # -- models ------------------------------------------------------------------------------------------------------
    def create(self, config: DiffusersConfig):
        """diffusers' transformer of ``config`` (its own initialisation), wrapped for cached calls."""
        transformer = self.diffusers_class().from_config(dict(config.transformer))
        from .cache import cached_transformer_class

        return cached_transformer_class()(self, config, transformer.eval())

    def load(self, path: str | Path, config: DiffusersConfig):
        """The transformer of a folder's ``transformer/`` (``path``) with its safetensors weights, eval mode, fp32."""
        from ..checkpoint import load_safetensors_into

        model = self.create(config).float()
        load_safetensors_into(weight_files(Path(path)), model.transformer, str(path))
        return model.eval()

    def weights_sha256(self, path: str | Path) -> str:
        """One digest of the transformer's config and every weight file (a sharded model has several)."""
        from ...core.manifest import sha256_of

        path = Path(path)
        digest = hashlib.sha256()
        for file in [path / "config.json", *weight_files(path)]:
            digest.update(f"{file.name}:{sha256_of(file)}\n".encode())
        return digest.hexdigest()

    # -- sub-layers --------------------------------------------------------------------------------------------------
    def num_layers(self, config: DiffusersConfig) -> int:
        return sum(config[blocks.count] for blocks in self.declaration.blocks)

    def sublayer_names(self, config: DiffusersConfig) -> tuple[str, ...]:
        return tuple(f"{blocks.path}.{i}.{name}" for blocks in self.declaration.blocks
                     for i in range(config[blocks.count]) for name in blocks.block_sublayers(config, i))

    def cached_shape(self, config: DiffusersConfig) -> tuple[int, ...]:
        return (self.num_tokens(config), self.inner_dim(config))

    def cached_shapes(self, config: DiffusersConfig) -> tuple[tuple[int | str, ...], ...]:
        """Per sub-layer, (tokens, inner_dim): the image's tokens, the prompt's or both (joint), as its blocks
        declare (:attr:`Blocks.cached`)."""
        tokens = {IMAGE: self.num_tokens(config), PROMPT: PROMPT_TOKENS, JOINT: JOINT_TOKENS}
        dim = self.inner_dim(config)
        return tuple((tokens[blocks.span(config, i, name)], dim) for blocks in self.declaration.blocks
                     for i in range(config[blocks.count]) for name in blocks.block_sublayers(config, i))

    def dim_ranges(self, config: DiffusersConfig, max_prompt_tokens: int | None) -> dict[str, tuple[int, int, int]]:
        """A text model's prompt length: 1 to the pipeline's max_sequence_length, the optimum at the longest (the
        pipelines pad to it); joint attention's image + prompt tokens follow it."""
        if max_prompt_tokens is None:
            return {}
        image = self.num_tokens(config)
        return {PROMPT_TOKENS: (1, max_prompt_tokens, max_prompt_tokens),
                JOINT_TOKENS: (image + 1, image + max_prompt_tokens, image + max_prompt_tokens)}

    def output_packing(self, transformer, config: DiffusersConfig, path: str) -> "OutputPacking | None":
        """The packing of sub-layer ``path``'s output into its cache slot (None: the output itself)."""
        return None

    def adapt_blocks(self, transformer, config: DiffusersConfig) -> None:
        """Where a family's cached values are not what diffusers' block consumes (FLUX.1's single-stream branches,
        cached with their share of ``proj_out``), it replaces those blocks' forwards here; by default nothing."""

    def pipeline_timesteps(self, config: DiffusersConfig):
        """How the pipeline sets a flow-matching scheduler's timesteps
        (:class:`l2c_export.samplers.PipelineTimesteps`, from the declared :class:`FlowTimesteps`); None for the
        other families."""
        declared = self.declaration.flow_timesteps
        if declared is None:
            return None
        from ...samplers import PipelineTimesteps

        return PipelineTimesteps(self.num_tokens(config), linspace_sigmas=declared.linspace_sigmas,
                                 default_max_shift=declared.default_max_shift)

    # -- graph interface ---------------------------------------------------------------------------------------------
    def sample_spec(self, config: DiffusersConfig) -> TensorSpec:
        side = config["sample_size"]
        return TensorSpec("hidden_states", "float32", (self.in_channels(config), side, side), "sample")

    def vae_latents(self, config: DiffusersConfig) -> tuple[int, int, int]:
        """The VAE's latents (C, h, w) for a sample of ``config``: the sample itself where :attr:`latent_layout` is
        "spatial"; FLUX.1's ("packed_2x2") unpacks (T, 4 C) to (C, h, w)."""
        return tuple(self.sample_spec(config).shape)

    def graph_output(self, config: DiffusersConfig) -> TensorSpec:
        side = config["sample_size"]
        return TensorSpec("noise_pred", "float32", (self.out_channels(config), side, side), "output")

    # -- cost and sampling conventions -------------------------------------------------------------------------------
    def count_macs(self, config: DiffusersConfig) -> MacCount:
        from .macs import count_macs_by_hooks

        return count_macs_by_hooks(self, config)

    def guided_channels(self, config: DiffusersConfig, guide_all: bool = False) -> int:
        """The pipelines guide every latent channel (and drop the learned-sigma half after)."""
        return self.in_channels(config)

    def sampler_channels(self, config: DiffusersConfig) -> int | None:
        """The leading channels of the guided output the scheduler steps on: the pipelines drop a learned-sigma half."""
        return self.in_channels(config) if self.out_channels(config) == 2 * self.in_channels(config) else None

    def null_class(self, config: DiffusersConfig) -> int | None:
        return self.declaration.guidance.null_class

    def macs_inputs(self, config: DiffusersConfig) -> tuple:
        """One sample's graph inputs whose forward :meth:`count_macs` counts: the traced dummies, a prompt of
        :meth:`macs_prompt_length` tokens."""
        return self.dummy_inputs(config, 1, tokens=self.macs_prompt_length(config))

    def macs_prompt_length(self, config: DiffusersConfig) -> int | None:
        """The prompt length ``config``'s MACs are counted at: the build's (``config.prompt_tokens``) where the
        pipeline pads every prompt to it and the transformer reads every row (Wan), else the declared
        ``macs_prompt_tokens``."""
        return config.prompt_tokens or self.declaration.macs_prompt_tokens

    def max_prompt_tokens(self, pipeline_class: str, max_sequence_length: int | None = None,
                          tokenizer_max_length: int | None = None) -> int | None:
        """The longest prompt embeddings (tokens, L) the pipeline makes at ``max_sequence_length`` (default: its own,
        the declaration's): that length (PixArt, FLUX.1), or with the declared stack's CLIP ``tokenizer_max_length``
        (77) more (SD3); None for a model without text conditioning."""
        length = max_sequence_length or self.declaration.max_sequence_length.get(pipeline_class)
        stack = self.declaration.text_encoders
        if length is None or stack is None:
            return length
        return stack.prompt_tokens(length, tokenizer_max_length or DEFAULT_TOKENIZER_MAX_LENGTH)

    def text_channels(self, config: DiffusersConfig) -> int | None:
        """D of the prompt embeddings the transformer takes; None for a model without text conditioning."""
        embeddings = self.declaration.of_kind(TOKEN_EMBEDDINGS)
        return None if embeddings is None else embeddings.width_of(config)

    # -- graph interface, from the declared conditioning --------------------------------------------------------------
    def graph_inputs(self, config: DiffusersConfig) -> list[TensorSpec]:
        """The sample, the timestep, then each declared conditioning input the config has, in the forward's order."""
        return [self.sample_spec(config), TensorSpec("timestep", "float32", (), "time"),
                *(c.spec(config) for c in self.declaration.present_conditioning(config))]

    def dummy_inputs(self, config: DiffusersConfig, batch: int, tokens: int | None = None) -> tuple:
        """Torch tensors for tracing, one per :meth:`graph_inputs` entry: zero latents, timesteps 500, zero
        embeddings of ``tokens`` tokens (default :attr:`dummy_prompt_tokens`: any, the axis is dynamic), masks with
        the last token padded (so the trace keeps the mask's path), a scale input at the pipeline's default, label 0."""
        import torch

        tokens = tokens or self.dummy_prompt_tokens
        guidance = self.declaration.guidance
        tensors = [torch.zeros(batch, *self.sample_spec(config).shape), torch.full((batch,), 500.0)]
        for conditioning in self.declaration.present_conditioning(config):
            shape = tuple(tokens if isinstance(size, str) else size for size in conditioning.shape(config))
            if conditioning.kind == TOKEN_MASK:
                mask = torch.ones(batch, *shape)
                mask[:, -1] = 0
                tensors.append(mask)
            elif conditioning.kind == SCALAR and conditioning.argument == guidance.scale_argument:
                tensors.append(torch.full((batch,), float(guidance.default_scale)))
            else:
                dtype = torch.int64 if KIND_DTYPES[conditioning.kind] == "int64" else torch.float32
                tensors.append(torch.zeros(batch, *shape, dtype=dtype))
        return tuple(tensors)

    def run_transformer(self, transformer, config: DiffusersConfig, hidden_states, timestep, *conditioning):
        """The transformer's forward on the graph inputs (in :meth:`graph_inputs` order), each conditioning input
        passed by its declared forward argument, with the declaration's fixed ``call_arguments`` -> (N, C_out, H, W)."""
        names = [c.input for c in self.declaration.present_conditioning(config)]
        return transformer(hidden_states=hidden_states, timestep=timestep, **dict(zip(names, conditioning)),
                           **self.declaration.call_arguments, return_dict=False)[0]
