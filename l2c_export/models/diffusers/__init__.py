"""Diffusers pipeline folders as models: a transformer class is a small declaration, diffusers' own modules do the rest.

A folder is what a pipeline's ``save_pretrained`` writes: ``model_index.json``, ``transformer/`` (``config.json`` and
``diffusion_pytorch_model.safetensors`` or a sharded ``.safetensors.index.json``), ``scheduler/``
(``scheduler_config.json``), and ``vae/``, ``text_encoder*/``, ``tokenizer*/`` where present. :func:`read_folder`
checks it and refuses, in one line naming the file and field, what is not supported; the components a build carries
beside the transformer (:class:`FolderComponents`: a VAE decoder, the family's text encoders and their tokenizers,
:mod:`.text_encoders`) are found and checked here, and exported by :mod:`l2c_export.builder.components`.

A :class:`DiffusersFamily` declares, like cache-dit's block adapters and Optimum's export configs, only what differs
between transformer classes: the class and pipeline it reads, the options it supports, its block list and the module
paths of each block's sub-layers in forward order (DiT ``attn1``, ``ff``; PixArt ``attn1``, ``attn2``, ``ff``), its
graph interface (the transformer's forward arguments, each with a role) and how those feed the transformer. The
model is diffusers' own transformer, wrapped by :class:`CachedTransformer`: each named sub-module either runs and
hands its output to the request's cache, or returns the cached value; everything else in the block (norms,
modulation, gates, residual adds) runs every call exactly as diffusers wrote it.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .. import LATENT_SCALE, ModelFamily, TensorSpec, config_from_dict, get_family
from ...core.macs import MacCount
from ...core.util import read_folder_json, short_repr
from .sizes import (TRANSFORMER_SIZES, VAE_CHANNELS, VAE_LEVELS, VAE_SIZES, Size, check_integer_list, check_sizes,
                    is_integer)
from .text_encoders import DEFAULT_TOKENIZER_MAX_LENGTH, TextEncoderStack, read_text_encoders

MODEL_INDEX = "model_index.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


class DiffusersFolderError(ValueError):
    """A diffusers folder that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class DiffusersConfig:
    """A diffusers transformer: its class and its ``config.json`` (without diffusers' private ``_`` keys), and where
    that config has no ``sample_size`` (FLUX.1) the latent side the build runs at (``--image-size`` over the VAE's
    scale factor)."""

    transformer_class: str
    transformer: Mapping = field(default_factory=dict)
    latent_size: int | None = None

    def __getitem__(self, key: str):
        return self.transformer[key]

    def get(self, key: str, default=None):
        return self.transformer.get(key, default)

    def to_dict(self) -> dict:
        data = {"transformer_class": self.transformer_class, "transformer": dict(self.transformer)}
        if self.latent_size is not None:
            data["latent_size"] = self.latent_size
        return data

    def __hash__(self):
        return hash((self.transformer_class, json.dumps(dict(self.transformer), sort_keys=True), self.latent_size))


# ---------------------------------------------------------------------------------------------------------------------
class _CacheState:
    """What the wrapped sub-modules of one cached transformer read during a call: which sub-layers compute (None:
    all), the request's cache (sub-layer index -> output, or None: keep nothing), and for the soft-routed forward the
    weights (num_sublayers,) and where fresh outputs go. Per thread, so that requests in several threads (the torch
    backend serving them) never see each other's; a deep copy (the exporter's stand-in) gets a state of its own."""

    _FIELDS = ("compute", "cache", "weights", "fresh")

    def __init__(self):
        object.__setattr__(self, "_local", threading.local())

    def __getattr__(self, name: str):
        if name not in self._FIELDS:
            raise AttributeError(name)
        return getattr(self._local, name, None)

    def __setattr__(self, name: str, value) -> None:
        if name not in self._FIELDS:
            raise AttributeError(name)
        setattr(self._local, name, value)

    def __deepcopy__(self, memo) -> "_CacheState":
        return _CacheState()


# The sizes of a text model's graph interface that vary per request (TensorSpec names them): the prompt's tokens, and
# joint attention's image + prompt tokens (SD3, FLUX.1).
PROMPT_TOKENS = "prompt_tokens"
JOINT_TOKENS = "joint_tokens"


class OutputPacking:
    """How a sub-module's output becomes the one tensor its cache slot holds, and back: ``pack(output, args,
    kwargs)`` -> (N, T', D') and ``unpack(value, args, kwargs)`` -> what the block consumes in place of the module's
    output (``args``/``kwargs``: the module's call arguments). A family declares one where a module returns a tuple
    (joint attention's two streams) or where the cached value is more than the module's output (a branch's share of
    a linear map after it); without one the cached value is the output itself."""

    def pack(self, output, args, kwargs):
        raise NotImplementedError

    def unpack(self, value, args, kwargs):
        raise NotImplementedError

    def macs(self, value) -> int:
        """MACs that packing adds to the module's own (a share of a linear map: FLUX.1's single-stream blocks)."""
        return 0


def _cached_forward(module, *args, **kwargs):
    """The forward of a named sub-module: its own (the class's) forward, its output (packed, where the family
    declares an :class:`OutputPacking`) kept as the sub-layer's fresh value; where this call reuses it, the cached
    value instead; soft-routed, ``w * fresh + (1 - w) * cached``."""
    from ..layers import cached_output

    state, index, packing = module._l2c_state, module._l2c_index, module._l2c_packing
    if state.compute is not None and not state.compute[index]:
        cached = cached_output(state.cache, index)
        return cached if packing is None else packing.unpack(cached, args, kwargs)
    out = type(module).forward(module, *args, **kwargs)
    value = out if packing is None else packing.pack(out, args, kwargs)
    if state.weights is not None:
        if state.fresh is not None:
            state.fresh[index] = value
        weight = state.weights[index]
        value = weight * value + (1 - weight) * cached_output(state.cache, index)
    elif state.cache is not None:
        state.cache[index] = value
    return value if packing is None else packing.unpack(value, args, kwargs)


@functools.cache
def _cached_transformer_class():
    """The wrapper's class, made on first use so that importing this module needs no torch."""
    import torch

    class _CachedTransformer(torch.nn.Module):
        """A diffusers transformer whose named sub-modules compute or reuse per call.

        ``forward_cached(*inputs, compute, cache)`` takes the family's graph inputs (the transformer's forward
        arguments, :meth:`DiffusersFamily.graph_inputs`), runs sub-layer ``i`` where ``compute[i]`` (its output
        written to ``cache[i]``) and otherwise returns ``cache[i]`` in its place; returns the transformer's output
        (N, C_out, H, W). Sub-modules keep their parameter names, under ``transformer.``.
        """

        def __init__(self, family: "DiffusersFamily", config: DiffusersConfig, transformer: torch.nn.Module):
            super().__init__()
            self.config = config
            self.family_name = family.name
            self.transformer = transformer
            self._state = _CacheState()
            for index, path in enumerate(family.sublayer_names(config)):
                module = transformer.get_submodule(path)
                module._l2c_index = index
                module._l2c_state = self._state
                module._l2c_packing = family.output_packing(transformer, config, path)
                # An instance attribute, so deep copies (the exporter's stand-in) call their own copy.
                module.forward = functools.partial(_cached_forward, module)
            family.adapt_blocks(transformer, config)

        @property
        def family(self) -> "DiffusersFamily":
            return get_family(self.family_name)

        def forward(self, *inputs):
            return self.forward_cached(*inputs, None, None)

        def forward_cached(self, *arguments):
            """``forward_cached(*inputs, compute, cache)``: compute (num_sublayers bools, None: all), cache (index ->
            (N, T, D), None: keep nothing), as every family's."""
            *inputs, compute, cache = arguments
            names = self.family.sublayer_names(self.config)
            if compute is not None and len(compute) != len(names):
                raise ValueError(f"compute has {len(compute)} entries; the model has {len(names)} sub-layers")
            self._state.compute, self._state.cache = compute, cache
            try:
                return self.family.run_transformer(self.transformer, self.config, *inputs)
            finally:
                self._state.compute = self._state.cache = None

        def forward_soft(self, *arguments):
            """``forward_soft(*inputs, weights, cache, fresh)``, L2C's student as every family's: every sub-layer is
            computed and contributes ``weights[i] * fresh_i + (1 - weights[i]) * cache[i]`` in place of its output;
            ``fresh`` (or None) receives each fresh output; ``cache`` is not modified. weights: (num_sublayers,)."""
            *inputs, weights, cache, fresh = arguments
            names = self.family.sublayer_names(self.config)
            if tuple(weights.shape) != (len(names),):
                raise ValueError(f"weights has shape {tuple(weights.shape)}; expected ({len(names)},)")
            self._state.weights, self._state.cache, self._state.fresh = weights, cache, fresh
            try:
                return self.family.run_transformer(self.transformer, self.config, *inputs)
            finally:
                self._state.weights = self._state.cache = self._state.fresh = None

    return _CachedTransformer


# ---------------------------------------------------------------------------------------------------------------------
class DiffusersFamily(ModelFamily):
    """A diffusers transformer class. Subclasses declare the class attributes and the three methods at the end."""

    transformer_class: str  # the ``_class_name`` of transformer/config.json
    pipeline_classes: tuple[str, ...]  # the pipelines whose sampling the runtime reproduces
    blocks: str = "transformer_blocks"  # the block list
    block_sublayers: tuple[str, ...]  # each block's sub-layer module paths, in forward order
    required: Mapping[str, object] = {}  # config option -> the only value supported
    sizes: Mapping[str, Size] = TRANSFORMER_SIZES  # the config's integer fields, each bounded (.sizes)
    scheduler_classes: tuple[str, ...] = ("DDIMScheduler", "DPMSolverMultistepScheduler")  # what its pipelines take
    classifier_free: bool = True  # guidance runs a 2N batch (False: the pipeline never does; FLUX.1)
    component_parts: tuple[str, ...] = ("vae",)  # the folder parts a build carries as graphs, beside text_encoders
    text_encoders: TextEncoderStack | None = None  # the pipeline's text encoders and how their outputs combine
    max_sequence_lengths: Mapping[str, int] = {}  # pipeline -> its max_sequence_length default (text models)
    latent_layout: str = "spatial"  # how the sampled latents lie before the VAE decodes them (see vae_latents)
    default_steps: int = 20
    model_names = ()
    default_sampler = "diffusers"  # the folder's scheduler (scheduler/scheduler_config.json)
    latent_scale = LATENT_SCALE

    config_class = DiffusersConfig

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

    def sized_config(self, config: DiffusersConfig, image_size: int | None, vae_scale_factor: int) -> DiffusersConfig:
        """The config at ``--image-size`` pixels; these families take their size from ``sample_size``."""
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
        return _cached_transformer_class()(self, config, transformer.eval())

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
        return config["num_layers"]

    def sublayer_names(self, config: DiffusersConfig) -> tuple[str, ...]:
        return tuple(f"{self.blocks}.{i}.{name}" for i in range(self.num_layers(config))
                     for name in self.block_sublayers)

    def cached_shape(self, config: DiffusersConfig) -> tuple[int, ...]:
        return (self.num_tokens(config), self.inner_dim(config))

    def dim_ranges(self, config: DiffusersConfig, max_prompt_tokens: int | None) -> dict[str, tuple[int, int, int]]:
        """A text model's prompt length: 1 to the pipeline's max_sequence_length, the optimum at the longest (the
        pipelines pad to it); joint attention's image + prompt tokens follow it."""
        if max_prompt_tokens is None:
            return {}
        image = self.num_tokens(config)
        return {PROMPT_TOKENS: (1, max_prompt_tokens, max_prompt_tokens),
                JOINT_TOKENS: (image + 1, image + max_prompt_tokens, image + max_prompt_tokens)}

    def output_packing(self, transformer, config: DiffusersConfig, path: str) -> OutputPacking | None:
        """The packing of sub-layer ``path``'s output into its cache slot (None: the output itself)."""
        return None

    def adapt_blocks(self, transformer, config: DiffusersConfig) -> None:
        """Where a family's cached values are not what diffusers' block consumes (FLUX.1's single-stream branches,
        cached with their share of ``proj_out``), it replaces those blocks' forwards here; by default nothing."""

    def pipeline_timesteps(self, config: DiffusersConfig):
        """How the pipeline sets a flow-matching scheduler's timesteps
        (:class:`l2c_export.samplers.PipelineTimesteps`); None for the other families."""
        return None

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
        return count_macs_by_hooks(self, config)

    def guided_channels(self, config: DiffusersConfig, guide_all: bool = False) -> int:
        """The pipelines guide every latent channel (and drop the learned-sigma half after)."""
        return self.in_channels(config)

    def sampler_channels(self, config: DiffusersConfig) -> int | None:
        """The leading channels of the guided output the scheduler steps on: the pipelines drop a learned-sigma half."""
        return self.in_channels(config) if self.out_channels(config) == 2 * self.in_channels(config) else None

    def null_class(self, config: DiffusersConfig) -> int | None:
        return None

    def macs_inputs(self, config: DiffusersConfig) -> tuple:
        """One sample's graph inputs whose forward :meth:`count_macs` counts (the traced dummies by default)."""
        return self.dummy_inputs(config, 1)

    def max_prompt_tokens(self, pipeline_class: str, max_sequence_length: int | None = None,
                          tokenizer_max_length: int | None = None) -> int | None:
        """The longest prompt embeddings (tokens, L) the pipeline makes at ``max_sequence_length`` (default: its
        own, :attr:`max_sequence_lengths`): that length (PixArt, FLUX.1), or CLIP's ``tokenizer_max_length`` (77)
        more (SD3); None for a model without text conditioning."""
        if self.text_encoders is None:
            return None
        return self.text_encoders.prompt_tokens(max_sequence_length or self.max_sequence_lengths[pipeline_class],
                                                tokenizer_max_length or DEFAULT_TOKENIZER_MAX_LENGTH)

    def text_channels(self, config: DiffusersConfig) -> int | None:
        """D of the prompt embeddings the transformer takes; None for a model without text conditioning."""
        return None

    # -- what each class declares ------------------------------------------------------------------------------------
    def graph_inputs(self, config: DiffusersConfig) -> list[TensorSpec]:
        raise NotImplementedError

    def run_transformer(self, transformer, config: DiffusersConfig, *inputs):
        """The transformer's forward on the graph inputs (in :meth:`graph_inputs` order) -> (N, C_out, H, W)."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------------------
def count_macs_by_hooks(family: DiffusersFamily, config: DiffusersConfig) -> MacCount:
    """MACs of one sample's forward, counted on the meta device (no memory, any size): every Linear and Conv2d by its
    shapes, every attention's two products (2 * Tq * Tk * inner), each charged to the sub-layer whose module holds it,
    the rest to ``always``."""
    import torch

    names = family.sublayer_names(config)
    per_sublayer = [0] * len(names)
    always = 0

    def charge(path: str, macs: int) -> None:
        nonlocal always
        for index, name in enumerate(names):
            if path == name or path.startswith(name + "."):
                per_sublayer[index] += macs
                return
        always += macs

    def hook(path):
        def count(module, args, kwargs, out):
            if isinstance(module, torch.nn.Linear):  # by its input: a wrapped sub-layer may return a packed value
                rows = (args[0] if args else kwargs["input"]).numel() // module.in_features
                charge(path, rows * module.in_features * module.out_features)
            elif isinstance(module, torch.nn.Conv2d):
                kh, kw = module.kernel_size
                charge(path, out.numel() * module.in_channels // module.groups * kh * kw)
            else:  # an attention: queries from the first argument, keys from encoder_hidden_states when given
                query = args[0] if args else kwargs["hidden_states"]
                keys = kwargs.get("encoder_hidden_states")
                if keys is not None and getattr(module, "added_kv_proj_dim", None) is not None:
                    tokens = query.shape[1] + keys.shape[1]  # joint attention (SD3, FLUX.1): both streams attend
                    charge(path, 2 * tokens * tokens * module.inner_dim)
                else:
                    keys = query if keys is None else keys
                    charge(path, 2 * query.shape[1] * keys.shape[1] * module.inner_dim)
        return count

    def packed(path, packing):
        def count(module, args, kwargs, out):  # what a packing computes besides the module (a share of a linear map)
            charge(path, packing.macs(out))
        return count

    from ...core.extras import import_extra

    AttentionModuleMixin = import_extra("diffusers.models.attention").AttentionModuleMixin
    Attention = import_extra("diffusers.models.attention_processor").Attention

    with torch.device("meta"):
        model = family.create(config)
        inputs = family.macs_inputs(config)
        for path, module in model.transformer.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, Attention, AttentionModuleMixin)):
                module.register_forward_hook(hook(path), with_kwargs=True)
        for path in names:
            packing = model.transformer.get_submodule(path)._l2c_packing
            if packing is not None and hasattr(packing, "macs"):
                model.transformer.get_submodule(path).register_forward_hook(packed(path, packing), with_kwargs=True)
        with torch.no_grad():
            model(*inputs)
    return MacCount(always=always, per_sublayer=tuple(per_sublayer))


# ---------------------------------------------------------------------------------------------------------------------
# Transformer class -> the family that reads it.
TRANSFORMER_FAMILIES = {"DiTTransformer2DModel": "diffusers-dit", "PixArtTransformer2DModel": "diffusers-pixart",
                        "SD3Transformer2DModel": "diffusers-sd3", "FluxTransformer2DModel": "diffusers-flux"}


@dataclass(frozen=True)
class FolderComponents:
    """The parts of a pipeline folder a build carries beside the transformer, each checked (None, empty: not in the
    folder): ``vae/`` (an ``AutoencoderKL``: its decoder) and its config as read (what the memory estimate reads);
    the family's text encoders with their tokenizers (:class:`.text_encoders.FoundTextEncoder`, in the order of its
    :class:`.text_encoders.TextEncoderStack`), and the pipelines' ``tokenizer_max_length`` where the stack reads it
    (CLIP's 77)."""

    vae: Path | None = None
    vae_config: dict | None = field(default=None, compare=False)
    text_encoders: tuple = ()
    tokenizer_max_length: int | None = None


@dataclass(frozen=True)
class DiffusersFolder:
    """A checked diffusers pipeline folder."""

    path: Path
    pipeline_class: str
    family: DiffusersFamily
    config: DiffusersConfig
    scheduler_config: dict | None  # scheduler/scheduler_config.json (None where the folder has no scheduler/)
    components: FolderComponents = FolderComponents()

    @property
    def transformer_dir(self) -> Path:
        return self.path / "transformer"

    @property
    def scheduler_config_path(self) -> Path:
        return self.path / "scheduler" / "scheduler_config.json"

    @property
    def vae_scale_factor(self) -> int:
        """The pipelines' ``2 ** (len(vae.config.block_out_channels) - 1)``, 8 without a ``vae/``."""
        path = self.path / "vae" / "config.json"
        if not path.is_file():
            return 8
        raw = _read_json(path, "")
        check_integer_list(raw, "block_out_channels", VAE_CHANNELS, str(path), DiffusersFolderError, VAE_LEVELS)
        return 2 ** (len(raw["block_out_channels"]) - 1)


def _read_json(path: Path, what: str, kind: str = "config") -> dict:
    """A JSON object from a folder's file (size-capped by ``kind``: :data:`l2c_export.core.util.FOLDER_JSON_CAPS`);
    ``what``: what the file is, said when it is missing."""
    if not path.is_file():
        raise DiffusersFolderError(f"{path}: missing; {what}")
    data = read_folder_json(path, kind, DiffusersFolderError)
    if not isinstance(data, dict):
        raise DiffusersFolderError(f"{path}: expected a JSON object")
    return data


def _is_name(value: object, dotted: bool = False) -> bool:
    """A Python identifier (``dotted``: or a dotted module path), as diffusers imports a component's library and
    class by name: never a path."""
    return isinstance(value, str) and value.isascii() and all(
        part.isidentifier() for part in (value.split(".") if dotted else [value]))


def check_model_index(index: dict, where: Path) -> None:
    """Every component entry of ``model_index.json`` is ``[library, class]``: a module name and a class name (each
    may be null: a component saved as absent), never a path."""
    for key, entry in index.items():
        if not isinstance(entry, list):
            continue  # a pipeline option (requires_safety_checker, ...), not a component
        if not (len(entry) == 2 and (entry[0] is None or _is_name(entry[0], dotted=True))
                and (entry[1] is None or _is_name(entry[1]))):
            raise DiffusersFolderError(f"{where}: field {short_repr(key)} is {short_repr(entry)}; expected [library, "
                                       f"class], a module and a class name (Python identifiers), or nulls")


def read_folder(folder: str | Path) -> DiffusersFolder:
    """Reads and checks a diffusers pipeline folder: its model index, its transformer's class, config and weight
    files, and its scheduler config. Raises :class:`DiffusersFolderError` naming the file and field.

    The folder's files may be symbolic links (a Hugging Face cache snapshot links each to ``../../blobs/<hash>``):
    they are read through them, as files; what a build takes from them is their content."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DiffusersFolderError(f"--diffusers {folder}: no such folder; expected a diffusers pipeline folder "
                                   f"(what a pipeline's save_pretrained writes)")
    index = _read_json(folder / MODEL_INDEX, "expected a diffusers pipeline folder (what a pipeline's "
                                             "save_pretrained writes: model_index.json, transformer/, scheduler/)",
                       kind="model_index")
    where = folder / MODEL_INDEX
    check_model_index(index, where)
    entry = index.get("transformer")
    if not (isinstance(entry, list) and entry[1]):
        raise DiffusersFolderError(f"{where}: field 'transformer' is {short_repr(entry)}; expected a pipeline with a "
                                   f"transformer ([library, class])")
    if not (folder / "transformer").is_dir():
        raise DiffusersFolderError(f"{folder}: no transformer/ folder (model_index.json names {short_repr(entry[1])})")
    config_path = folder / "transformer" / "config.json"
    raw = _read_json(config_path, "expected the transformer's config.json")
    class_name = raw.get("_class_name")
    if class_name not in TRANSFORMER_FAMILIES:
        raise DiffusersFolderError(f"{config_path}: field '_class_name' is {short_repr(class_name)}; supported "
                                   f"transformer classes: {', '.join(TRANSFORMER_FAMILIES)}")
    family = get_family(TRANSFORMER_FAMILIES[class_name])
    config = DiffusersConfig(class_name, {k: v for k, v in raw.items() if not k.startswith("_")})
    family.check_config(config, str(config_path))
    weight_files(folder / "transformer")
    pipeline_class = index.get("_class_name")
    if pipeline_class not in family.pipeline_classes:
        raise DiffusersFolderError(f"{where}: field '_class_name' is {short_repr(pipeline_class)}; a {class_name} is "
                                   f"sampled as {' or '.join(family.pipeline_classes)} does")
    scheduler = None
    if (folder / "scheduler").is_dir():
        from ...samplers.diffusers import read_scheduler_config

        path = folder / "scheduler" / "scheduler_config.json"
        if not path.is_file():
            raise DiffusersFolderError(f"{path}: missing; expected the scheduler's config")
        scheduler = read_scheduler_config(path)
        if scheduler.get("_class_name") not in family.scheduler_classes:
            raise DiffusersFolderError(f"{path}: field '_class_name' is {short_repr(scheduler.get('_class_name'))}; "
                                       f"{pipeline_class} is run here with {' or '.join(family.scheduler_classes)}")
    components = read_components(folder, index, family, config)
    return DiffusersFolder(folder, pipeline_class, family, config, scheduler, components)


VAE_CLASSES = ("AutoencoderKL",)
TOKENIZER_FILE = "tokenizer.json"


def read_components(folder: Path, index: dict, family: DiffusersFamily, config: DiffusersConfig) -> FolderComponents:
    """The folder's VAE, text encoder and tokenizer where ``model_index.json`` names them, checked: their classes,
    integer fields (:mod:`.sizes`), safetensors weights, the VAE's latent channels against the transformer and its
    scaling and shift factors, the text encoder's width against the prompt embeddings the transformer takes, and the
    tokenizer against the text encoder (:func:`check_tokenizer`)."""
    def named(part: str) -> bool:
        entry = index.get(part)
        return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None

    vae = vae_config = None
    if named("vae") and "vae" in family.component_parts:
        vae = folder / "vae"
        raw = _read_json(vae / "config.json", "expected the VAE's config.json (model_index.json names a vae)")
        where = vae / "config.json"
        if raw.get("_class_name") not in VAE_CLASSES:
            raise DiffusersFolderError(f"{where}: field '_class_name' is {short_repr(raw.get('_class_name'))}; "
                                       f"supported VAE classes: {', '.join(VAE_CLASSES)}")
        check_sizes(raw, VAE_SIZES, str(where), DiffusersFolderError)
        check_integer_list(raw, "block_out_channels", VAE_CHANNELS, str(where), DiffusersFolderError, VAE_LEVELS)
        groups = raw.get("norm_num_groups") or 32
        if any(channels % groups for channels in raw["block_out_channels"]):
            raise DiffusersFolderError(f"{where}: field 'block_out_channels' is {short_repr(raw['block_out_channels'])}"
                                       f"; each must be a multiple of norm_num_groups {groups}")
        for key in ("down_block_types", "up_block_types"):
            blocks = raw.get(key)
            if blocks is not None and not (isinstance(blocks, list) and len(blocks) == len(raw["block_out_channels"])):
                raise DiffusersFolderError(f"{where}: field {key!r} is {short_repr(blocks)}; expected one block type "
                                           f"per entry of block_out_channels")
        channels = family.vae_latents(config)[0]
        if raw.get("latent_channels") != channels:
            raise DiffusersFolderError(f"{where}: field 'latent_channels' is {short_repr(raw.get('latent_channels'))}; "
                                       f"the transformer samples {channels} latent channels")
        scale = raw.get("scaling_factor", 0.18215)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 1e-6 <= scale <= 1e6:
            raise DiffusersFolderError(f"{where}: field 'scaling_factor' is {short_repr(scale)}; expected a positive "
                                       f"number")
        shift = raw.get("shift_factor")
        if shift is not None and (not isinstance(shift, (int, float)) or isinstance(shift, bool)
                                  or not -1e6 <= shift <= 1e6):
            raise DiffusersFolderError(f"{where}: field 'shift_factor' is {short_repr(shift)}; expected a finite "
                                       f"number or null")
        _safetensors_weights(vae, "diffusion_pytorch_model")
        vae_config = {k: v for k, v in raw.items() if not k.startswith("_")}
    if family.text_encoders is None:
        if named("text_encoder"):
            raise DiffusersFolderError(f"{folder / MODEL_INDEX}: names a text encoder, but a "
                                       f"{config.transformer_class} takes no prompt embeddings")
        return FolderComponents(vae, vae_config)
    widths = {tensor.role: tensor.shape[-1] for tensor in family.graph_inputs(config) if tensor.shape}
    encoders, length = read_text_encoders(folder, index, family.text_encoders, widths, _read_json,
                                          DiffusersFolderError)
    return FolderComponents(vae, vae_config, encoders, length)


def _special_token(value: object) -> str | None:
    """A special token as tokenizer_config.json and special_tokens_map.json write it: the text, or an object with
    its ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def check_tokenizer(tokenizer: Path, vocab_size: int, encoder: str = "text_encoder") -> None:
    """Reads ``tokenizer/`` as the build and the runtime will, before anything is exported: every file within its
    size cap, ``tokenizer.json`` JSON the ``tokenizers`` library loads, every token id it can produce (its
    vocabulary, added tokens, post-processor's special tokens, padding id) below the text encoder's ``vocab_size``
    (``encoder``: its folder part), and the pad and end-of-sequence tokens the configs name present in the
    vocabulary. A CLIP tokenizer saved as ``vocab.json`` and ``merges.txt`` alone (no ``tokenizer.json``) is made
    into one at build time as transformers makes it (:func:`l2c_export.builder.components.check_components` checks
    its ids then). Raises :class:`DiffusersFolderError` naming the file."""
    from ...core.util import check_file_size

    path = tokenizer / TOKENIZER_FILE
    bpe_files = [tokenizer / "vocab.json", tokenizer / "merges.txt"]
    if not path.is_file() and not all(file.is_file() for file in bpe_files):
        raise DiffusersFolderError(f"{path}: missing; expected the tokenizer as a tokenizers library file (a fast "
                                   f"tokenizer's save_pretrained writes it), or a BPE's vocab.json and merges.txt")
    for file in sorted(tokenizer.iterdir()):  # what transformers will read besides: each within its cap
        if file.is_file() and file.name != TOKENIZER_FILE:
            check_file_size(file, "tokenizer_config" if file.suffix == ".json" and file.name != "vocab.json"
                            else "tokenizer", DiffusersFolderError)
    if not path.is_file():
        return
    data = _read_json(path, "", kind="tokenizer")
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_str(json.dumps(data))
    except Exception as error:  # the tokenizers library raises its own Exception on a bad file
        raise DiffusersFolderError(f"{path}: not a tokenizers library file ({short_repr(str(error), 160)[1:-1]})") \
            from None
    vocabulary = backend.get_vocab(with_added_tokens=True)
    ids = [("its vocabulary", max(vocabulary.values(), default=0))]
    processor = data.get("post_processor")
    pending = [processor] if isinstance(processor, (dict, list)) else []
    while pending:  # the special tokens' ids of a (nested) post-processor
        value = pending.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if key == "ids" and isinstance(item, list):
                ids += [("field 'post_processor' special token", i) for i in item if is_integer(i)]
            elif isinstance(item, (dict, list)):
                pending.append(item)
    padding = data.get("padding")
    if isinstance(padding, dict) and is_integer(padding.get("pad_id")):
        ids.append(("field 'padding/pad_id'", padding["pad_id"]))
    for what, token_id in ids:
        if not 0 <= token_id < vocab_size:
            raise DiffusersFolderError(f"{path}: {what} has token id {token_id}; the text encoder's vocab_size is "
                                       f"{vocab_size} ({encoder}/config.json), so ids must be below it")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config_path = tokenizer / name
        if not config_path.is_file():
            continue
        tokens = _read_json(config_path, "", kind="tokenizer_config")
        for key in ("pad_token", "eos_token"):
            token = _special_token(tokens.get(key))
            if tokens.get(key) is not None and token is None:
                raise DiffusersFolderError(f"{config_path}: field {key!r} is {short_repr(tokens.get(key))}; expected "
                                           f"a token (text)")
            if token is not None and token not in vocabulary:
                raise DiffusersFolderError(f"{config_path}: field {key!r} is {short_repr(token)}, which is not in "
                                           f"{path}'s vocabulary")


def _safetensors_weights(part: Path, stem: str) -> None:
    """Refuses a component whose weights are not safetensors (a checkpoint is never unpickled here)."""
    if not ((part / f"{stem}.safetensors").is_file() or (part / f"{stem}.safetensors.index.json").is_file()):
        pickled = sorted(p.name for p in part.glob("*.bin"))
        raise DiffusersFolderError(f"{part}: no {stem}.safetensors"
                                   + (f" ({', '.join(pickled)} is pickled, which is never loaded here; re-save with "
                                      f"safe_serialization=True)" if pickled else ""))


def weight_files(transformer_dir: Path) -> list[Path]:
    """The transformer's safetensors files: the single file, or the shards its index names (each inside the
    folder). Pickled ``.bin`` weights are refused: a checkpoint is never unpickled here."""
    single, sharded = transformer_dir / WEIGHTS_FILE, transformer_dir / WEIGHTS_INDEX
    if single.is_file():
        return [single]
    if sharded.is_file():
        weight_map = _read_json(sharded, "", kind="weights_index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise DiffusersFolderError(f"{sharded}: field 'weight_map' must map parameter names to shard files")
        files = []
        for name in dict.fromkeys(weight_map.values()):
            if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".") \
                    or not name.endswith(".safetensors"):
                raise DiffusersFolderError(f"{sharded}: field 'weight_map' names {short_repr(name)}; expected a "
                                           f".safetensors file inside {transformer_dir}")
            if not (transformer_dir / name).is_file():
                raise DiffusersFolderError(f"{sharded}: field 'weight_map' names {short_repr(name)}, which is missing")
            files.append(transformer_dir / name)
        return files
    pickled = sorted(p.name for p in transformer_dir.glob("*.bin"))
    raise DiffusersFolderError(f"{transformer_dir}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX}"
                               + (f" ({', '.join(pickled)} is pickled, which is never loaded here; re-save with "
                                  f"safe_serialization=True)" if pickled else ""))
