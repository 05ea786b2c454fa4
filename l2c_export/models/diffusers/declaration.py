"""What a diffusers transformer class is, as data: a :class:`Declaration` per family file (``dit.py``, ``pixart.py``,
``sd3.py``, ``flux.py``, ``sana.py``, ``qwenimage.py``, ``wan.py``), read by
:class:`~l2c_export.models.diffusers.family.DiffusersFamily` and recorded in the manifest, so that no stage after the
model lists a family's names, kinds or layout (docs/adding-a-family.md walks through one).

A declaration names, by the names diffusers and its pipelines use:

- the transformer class it reads and the pipeline classes whose sampling the runtime reproduces;
- its blocks (:class:`Blocks`: a module list, its length's config field, and each block's sub-layer module paths:
  the modules whose outputs are cached);
- its conditioning (:class:`Conditioning`): each input of the transformer's forward fed from a pipeline call
  argument, with a kind (:data:`l2c_export.core.interface.CONDITIONING_KINDS`) and, for guidance, the ``negative_``
  partner the unconditional half is fed from;
- its guidance rule (:class:`Guidance`), latent layout, scheduler classes (and how a flow-matching pipeline sets
  their timesteps, :class:`FlowTimesteps`);
- its text-encoder stack (:class:`~.text_encoders.TextEncoderStack`: tokenizer and encoder pairs by folder part,
  each of a kind, and the token groups of their outputs each pipeline argument is made of) and its VAE
  (:class:`VaeKind`).

No PyTorch here: a declaration is read by the folder checks and the builder before any model is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ...core.interface import (CLASSIFIER_FREE, CONDITIONING, CONDITIONING_KINDS, DEFAULT_SCALE_ARGUMENT,
                               GUIDANCE_RULES, KIND_DTYPES, KIND_RANKS, LABEL, LATENT_LAYOUTS, NCHW, SCALAR,
                               TOKEN_EMBEDDINGS, TOKEN_MASK)
from .text_encoders import TextEncoder, TextEncoderStack  # noqa: F401  (re-exported: part of the format)

# The sizes of a text model's graph interface that vary per request (a TensorSpec names them): the prompt's tokens,
# and joint attention's image + prompt tokens (an MMDiT's cached joint outputs).
PROMPT_TOKENS = "prompt_tokens"
JOINT_TOKENS = "joint_tokens"

# What a sub-layer's cached value spans (Blocks.cached): the image tokens, the prompt tokens, or both (joint).
IMAGE, PROMPT, JOINT = "image", "prompt", "joint"


@dataclass(frozen=True)
class Blocks:
    """A list of blocks: ``path`` the transformer's module list, ``count`` the config field holding its length, and
    ``sublayers`` each block's sub-layer module paths in forward order (the schedule's columns are
    ``{path}.{i}.{sublayer}``). ``only_in``: a sub-layer present only in the blocks a config field lists (SD3.5's
    ``attn2`` in ``dual_attention_layers``); ``not_in_last``: sub-layers the last block lacks (SD3's
    ``context_pre_only`` block has no ``ff_context``). ``cached``: what each sub-layer's cached value spans
    (:data:`IMAGE` unless said), ``cached_in_last`` where the last block differs (SD3's last joint attention keeps
    only its image output)."""

    sublayers: tuple[str, ...]
    path: str = "transformer_blocks"
    count: str = "num_layers"
    only_in: Mapping[str, str] = field(default_factory=dict)
    not_in_last: tuple[str, ...] = ()
    cached: Mapping[str, str] = field(default_factory=dict)
    cached_in_last: Mapping[str, str] = field(default_factory=dict)

    def span(self, config, i: int, name: str) -> str:
        """What sub-layer ``name`` of block ``i`` caches: :data:`IMAGE`, :data:`PROMPT` or :data:`JOINT` tokens."""
        if i == config[self.count] - 1 and name in self.cached_in_last:
            return self.cached_in_last[name]
        return self.cached.get(name, IMAGE)

    def block_sublayers(self, config, i: int) -> tuple[str, ...]:
        """Block ``i``'s sub-layer module paths (relative to the block), in forward order."""
        last = i == config[self.count] - 1
        return tuple(name for name in self.sublayers
                     if (name not in self.only_in or i in (config.get(self.only_in[name]) or ()))
                     and not (last and name in self.not_in_last))


@dataclass(frozen=True)
class Conditioning:
    """One conditioning input: the transformer's forward argument ``input`` (the graph input's name), fed from the
    pipeline's call argument ``argument``, of ``kind`` (:data:`l2c_export.core.interface.CONDITIONING_KINDS`).

    ``width``: the config field giving the last size of a token_embeddings or pooled input (a tuple: the first one
    set). ``negative``: the pipeline argument that guidance feeds the unconditional half from (``negative_`` and the
    argument), None where both halves take the same value (or the rule runs no second half). ``tokens``: the named
    axis of a token input. ``when``: a config field that must be true for the input to exist (FLUX.1's
    ``guidance_embeds``). ``pads_negative``: a token mask over tokens its model treats as absent where masked, so
    the ``negative`` partner may have another token count (the shorter half padded under mask 0: Qwen-Image's)."""

    argument: str
    input: str
    kind: str
    width: str | tuple[str, ...] | None = None
    negative: str | None = None
    tokens: str = PROMPT_TOKENS
    when: str | None = None
    pads_negative: bool = False

    def __post_init__(self):
        if self.kind not in CONDITIONING_KINDS:
            raise ValueError(f"{self.argument}: kind {self.kind!r}; expected one of {', '.join(CONDITIONING_KINDS)}")
        if self.pads_negative and not (self.kind == TOKEN_MASK and self.negative):
            raise ValueError(f"{self.argument}: only a token mask with a negative partner pads the shorter half")

    def present(self, config) -> bool:
        return self.when is None or bool(config.get(self.when))

    def width_of(self, config) -> int | None:
        """The last size of the input: the first of the ``width`` fields that the config sets."""
        fields = (self.width,) if isinstance(self.width, str) else (self.width or ())
        return next((config.get(name) for name in fields if config.get(name) is not None), None)

    def shape(self, config) -> tuple[int | str, ...]:
        """The per-sample shape, a token axis named by :attr:`tokens`."""
        if self.kind == TOKEN_EMBEDDINGS:
            return (self.tokens, self.width_of(config))
        if self.kind == TOKEN_MASK:
            return (self.tokens,)
        if KIND_RANKS[self.kind] == 1:
            return (self.width_of(config),)
        return ()

    def spec(self, config):
        """The graph input's :class:`~l2c_export.models.TensorSpec`."""
        from .. import TensorSpec

        return TensorSpec(self.input, KIND_DTYPES[self.kind], self.shape(config), CONDITIONING,
                          argument=self.argument, kind=self.kind, negative=self.negative,
                          pads_negative=self.pads_negative)


@dataclass(frozen=True)
class Guidance:
    """How the pipeline guides: ``rule`` (:data:`l2c_export.core.interface.GUIDANCE_RULES`), the name of its scale
    argument (a conditioning input of that argument is fed the scale: FLUX.1-dev's ``guidance_scale``), its default
    scale, and for a label model the null class of the unconditional half."""

    default_scale: float
    rule: str = CLASSIFIER_FREE
    scale_argument: str = DEFAULT_SCALE_ARGUMENT
    null_class: int | None = None

    def __post_init__(self):
        if self.rule not in GUIDANCE_RULES:
            raise ValueError(f"guidance rule {self.rule!r}; expected one of {', '.join(GUIDANCE_RULES)}")


@dataclass(frozen=True)
class VaeKind:
    """The VAE the pipeline decodes with: its classes and its ``kind``, a key of :data:`.vae.VAE_KINDS` (the code
    that checks its config, gives its scale factor and decoder): "scale_shift" (``AutoencoderKL``: ``latents /
    scaling_factor + shift_factor``, the config's fields), "mean_std" (per-channel ``latents_mean`` and
    ``latents_std``: Qwen-Image's and Wan's) or "dc_ae" (``AutoencoderDC``, Sana's: ``latents / scaling_factor``,
    the scale factor from the encoder's levels)."""

    classes: tuple[str, ...] = ("AutoencoderKL",)
    kind: str = "scale_shift"

    def __post_init__(self):
        from .vae import VAE_KINDS

        if self.kind not in VAE_KINDS:
            raise ValueError(f"VAE kind {self.kind!r}; expected one of {', '.join(VAE_KINDS)}")

    @property
    def code(self):
        """What the stages ask of this kind of VAE (:data:`.vae.VAE_KINDS`)."""
        from .vae import VAE_KINDS

        return VAE_KINDS[self.kind]


@dataclass(frozen=True)
class FlowTimesteps:
    """How a flow-matching pipeline sets its scheduler's timesteps (:class:`l2c_export.samplers.PipelineTimesteps`):
    whether it passes ``sigmas = linspace(1, 1 / N, N)`` (FluxPipeline) or none (StableDiffusion3Pipeline), and its
    fallback ``max_shift`` for dynamic shifting."""

    linspace_sigmas: bool = False
    default_max_shift: float = 1.15


@dataclass(frozen=True)
class EncodePrompt:
    """How the pipelines' own ``encode_prompt`` is called and what it returns: what a live pipeline's prompts are
    encoded with (``l2c_export.learn(pipe, prompts=...)``, ``learn --prompts``). ``outputs``: the pipeline argument
    each returned value is passed as, in order (None: not a transformer input, FLUX.1's text ids); ``guided``: it
    encodes the negative prompt itself (``do_classifier_free_guidance``, ``negative_prompt``), else it is called again
    on the negative prompts, its outputs then their conditioning's ``negative`` partners (Qwen-Image's);
    ``keywords``: fixed keyword arguments (PixArt's ``clean_caption=False``: the builds' preprocessing);
    ``from_call``: keyword arguments given the default of the pipeline call's argument of the same name (Sana's
    ``complex_human_instruction``; ``max_sequence_length`` where ``encode_prompt``'s default differs)."""

    outputs: tuple[str | None, ...]
    guided: bool = True
    keywords: Mapping[str, object] = field(default_factory=dict)
    from_call: tuple[str, ...] = ("max_sequence_length",)


@dataclass(frozen=True)
class Experts:
    """Transformers that take turns by timestep (Wan2.2's): the pipeline's components, in the order they run (the
    first while the timestep is >= ``boundary`` x the scheduler's num_train_timesteps, the next after), the
    ``model_index.json`` field holding that ratio, and each one's guidance-scale argument (a later one defaults to
    the first's). ``shape_fields``: the config fields the experts must share (the graph interface, the sub-layers and
    their cached shapes); the others may differ."""

    components: tuple[str, ...] = ("transformer", "transformer_2")
    boundary: str = "boundary_ratio"
    scale_arguments: tuple[str, ...] = ("guidance_scale", "guidance_scale_2")
    shape_fields: tuple[str, ...] = ()

    def prefix(self, index: int) -> str:
        """Expert ``index``'s prefix of cache slots and weight tensors: none for the first, ``<component>.`` after."""
        return "" if index == 0 else f"{self.components[index]}."


@dataclass(frozen=True)
class Declaration:
    """A diffusers transformer class as its pipelines run it (the module docstring lists what each field says).

    ``max_sequence_length``: pipeline class -> its ``max_sequence_length`` call argument's default (``build
    --max-sequence-length`` overrides it), the bound of the token axis, or with a text-encoder stack the length
    its ``max_sequence_length`` encoders pad to (SD3's prompt is CLIP's 77 tokens more, :meth:`TextEncoderStack.prompt_tokens`);
    ``macs_prompt_tokens``: the prompt length MACs are counted at; ``macs_at_build_length``: the pipeline pads every
    prompt to its ``max_sequence_length`` and the transformer reads every padded row (no mask: Wan), so a build's
    MACs are counted at the build's length (``build --max-sequence-length``, :attr:`DiffusersConfig.prompt_tokens`)
    instead; ``required``: config option -> the only value
    supported; ``call_arguments``: fixed keyword arguments of the transformer's forward (PixArt's
    ``added_cond_kwargs``); ``default_steps``: the pipelines' num_inference_steps; ``encode_prompt``: how the
    pipelines' own prompt encoding is called (:class:`EncodePrompt`; None: the pipelines take no prompts);
    ``experts``: the transformers that may take turns by timestep (:class:`Experts`; None: one transformer)."""

    transformer_class: str
    pipeline_classes: tuple[str, ...]
    blocks: tuple[Blocks, ...]
    conditioning: tuple[Conditioning, ...]
    guidance: Guidance
    scheduler_classes: tuple[str, ...] = ("DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
    flow_timesteps: FlowTimesteps | None = None
    latent_layout: str = NCHW
    text_encoders: TextEncoderStack | None = None
    vae: VaeKind | None = VaeKind()
    default_steps: int = 20
    max_sequence_length: Mapping[str, int] = field(default_factory=dict)
    macs_prompt_tokens: int | None = None
    macs_at_build_length: bool = False
    required: Mapping[str, object] = field(default_factory=dict)
    call_arguments: Mapping[str, object] = field(default_factory=dict)
    encode_prompt: EncodePrompt | None = None
    experts: Experts | None = None

    def __post_init__(self):
        if self.latent_layout not in LATENT_LAYOUTS:
            raise ValueError(f"latent layout {self.latent_layout!r}; expected one of {', '.join(LATENT_LAYOUTS)}")
        arguments = [c.argument for c in self.conditioning] + [c.negative for c in self.conditioning if c.negative]
        if len(set(arguments)) != len(arguments):
            raise ValueError(f"{self.transformer_class}: a pipeline argument is declared twice in {arguments}")
        if any(c.kind == LABEL for c in self.conditioning) != (self.guidance.null_class is not None):
            raise ValueError(f"{self.transformer_class}: a label input and the guidance's null class come together")
        made = [name for name, _ in self.text_encoders.arrays] if self.text_encoders is not None else []
        if not set(made) <= {c.argument for c in self.conditioning}:
            raise ValueError(f"{self.transformer_class}: the text encoders make {made}; each must be a declared "
                             f"conditioning argument")
        encoded = [name for name in (self.encode_prompt.outputs if self.encode_prompt else ()) if name is not None]
        if not set(encoded) <= set(arguments):
            raise ValueError(f"{self.transformer_class}: encode_prompt returns {encoded}; each must be a declared "
                             f"conditioning argument or its negative partner")
        scale_fed = [c for c in self.conditioning if c.argument == self.guidance.scale_argument]
        if any(c.kind != SCALAR for c in scale_fed):
            raise ValueError(f"{self.transformer_class}: the input fed the scale ({self.guidance.scale_argument}) "
                             f"must be a scalar")

    def present_conditioning(self, config) -> tuple[Conditioning, ...]:
        """The conditioning inputs a transformer of ``config`` has, in its forward's order."""
        return tuple(c for c in self.conditioning if c.present(config))

    def of_kind(self, kind: str) -> Conditioning | None:
        """The first conditioning input of ``kind`` (the prompt's token embeddings, ...), None if there is none."""
        return next((c for c in self.conditioning if c.kind == kind), None)
