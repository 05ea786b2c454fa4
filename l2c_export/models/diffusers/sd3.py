"""``SD3Transformer2DModel`` (Stable Diffusion 3 and 3.5) as ``StableDiffusion3Pipeline`` samples it: an MMDiT whose
blocks run joint attention over an image and a text stream, then a feed-forward per stream.

Sub-layers, per block in forward order: ``attn`` (the joint attention; its cached value is both streams' outputs,
(N, T + L, D) with the image's T tokens first, split back where reused), ``attn2`` (SD3.5's second, image-only
attention, in the blocks of ``dual_attention_layers``), ``ff`` (the image stream's feed-forward) and ``ff_context``
(the text stream's, (N, L, D); absent from the last block, which is ``context_pre_only``: its attention's text
output is never read, so that block caches only the image part, (N, T, D)). The adaLN modulation, gates and residual
adds of both streams run every call.

Conditioning: ``prompt_embeds`` (N, L, joint_attention_dim) and ``pooled_prompt_embeds`` (N, pooled_projection_dim),
guided against their ``negative_`` counterparts on every latent channel; the model predicts the flow-matching
velocity; the folder's ``FlowMatchEulerDiscreteScheduler`` samples it with the pipeline's timesteps (``mu`` from the
image sequence length when ``use_dynamic_shifting``).
"""

from __future__ import annotations

from .. import TensorSpec
from . import (JOINT_TOKENS, PROMPT_TOKENS, DiffusersConfig, DiffusersFamily, DiffusersFolderError,
               OutputPacking)
from ...core.util import short_repr
from .sizes import SD3_SIZES, TRANSFORMER_SIZES
from .text_encoders import TOKENIZER_MAX_LENGTH, TextEncoderSpec, TextEncoderStack

MACS_PROMPT_TOKENS = 333  # the pipeline's 77 CLIP + 256 T5 tokens (max_sequence_length): MACs are counted there
QK_NORMS = (None, "rms_norm", "layer_norm")
# StableDiffusion3Pipeline.encode_prompt: CLIP-L's and CLIP-G's penultimate hidden states (77 tokens) side by side,
# zero-padded to T5's width, then T5's max_sequence_length tokens; pooled: the two CLIPs' projected pooled outputs
SD3_STACK = TextEncoderStack(
    encoders=(TextEncoderSpec("text_encoder", "tokenizer", "clip", ("pooled", "penultimate_hidden_state"),
                              length=TOKENIZER_MAX_LENGTH),
              TextEncoderSpec("text_encoder_2", "tokenizer_2", "clip", ("pooled", "penultimate_hidden_state"),
                              length=TOKENIZER_MAX_LENGTH),
              TextEncoderSpec("text_encoder_3", "tokenizer_3", "t5", ("last_hidden_state",))),
    arrays=(("prompt_embeds", (("text_encoder/penultimate_hidden_state", "text_encoder_2/penultimate_hidden_state"),
                               ("text_encoder_3/last_hidden_state",))),
            ("pooled_prompt_embeds", (("text_encoder/pooled", "text_encoder_2/pooled"),))))


class JointAttentionPacking(OutputPacking):
    """Joint attention returns (image output (N, T, D), text output (N, L, D)): cached as one (N, T + L, D), split
    at the image stream's token count T (the ``hidden_states`` it was called with). ``image_only``: the text output is
    never read (a ``context_pre_only`` block); only (N, T, D) is cached and None stands for the text part."""

    def __init__(self, image_only: bool = False):
        self.image_only = image_only

    def pack(self, output, args, kwargs):
        import torch

        image, text = output
        return image if self.image_only else torch.cat([image, text], dim=1)

    def unpack(self, value, args, kwargs):
        if self.image_only:
            return value, None
        tokens = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[1]
        return value[:, :tokens], value[:, tokens:]


class SD3DiffusersFamily(DiffusersFamily):
    name = "diffusers-sd3"
    transformer_class = "SD3Transformer2DModel"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    scheduler_classes = ("FlowMatchEulerDiscreteScheduler",)
    text_encoders = SD3_STACK
    max_sequence_lengths = {"StableDiffusion3Pipeline": 256}  # T5's tokens
    default_steps = 28  # the pipeline's num_inference_steps
    default_cfg_scale = 7.0  # the pipeline's guidance_scale
    dummy_prompt_tokens = 5  # the traced length (any: the axis is dynamic)
    sizes = {**TRANSFORMER_SIZES, **SD3_SIZES}

    def check_config(self, config: DiffusersConfig, where: str) -> None:
        super().check_config(config, where)
        if config["caption_projection_dim"] != self.inner_dim(config):
            raise DiffusersFolderError(f"{where}: field 'caption_projection_dim' is {config['caption_projection_dim']}"
                                       f"; the text stream must be {self.inner_dim(config)} wide (num_attention_heads "
                                       f"x attention_head_dim)")
        if config["sample_size"] // config["patch_size"] > config["pos_embed_max_size"]:
            raise DiffusersFolderError(f"{where}: field 'sample_size' {config['sample_size']} is more patches than "
                                       f"pos_embed_max_size {config['pos_embed_max_size']}")
        if config.get("qk_norm") not in QK_NORMS:
            raise DiffusersFolderError(f"{where}: field 'qk_norm' is {short_repr(config.get('qk_norm'))}; supported: "
                                       f"{', '.join(repr(q) for q in QK_NORMS)}")
        dual = config.get("dual_attention_layers") or ()
        if not isinstance(dual, (list, tuple)) or len(dual) > config["num_layers"] or any(
                not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < config["num_layers"] for i in dual):
            raise DiffusersFolderError(f"{where}: field 'dual_attention_layers' is {short_repr(dual)}; expected at "
                                       f"most num_layers block indices in 0..{config['num_layers'] - 1}")

    # -- sub-layers --------------------------------------------------------------------------------------------------
    def _block_sublayers(self, config: DiffusersConfig, i: int) -> tuple[str, ...]:
        last = i == config["num_layers"] - 1
        return ("attn", *(("attn2",) if i in (config.get("dual_attention_layers") or ()) else ()), "ff",
                *(() if last else ("ff_context",)))

    def sublayer_names(self, config: DiffusersConfig) -> tuple[str, ...]:
        return tuple(f"{self.blocks}.{i}.{name}" for i in range(config["num_layers"])
                     for name in self._block_sublayers(config, i))

    def cached_shapes(self, config: DiffusersConfig) -> tuple[tuple[int | str, ...], ...]:
        tokens, dim, last = self.num_tokens(config), self.inner_dim(config), f".{config['num_layers'] - 1}."
        shapes = []
        for name in self.sublayer_names(config):
            if name.endswith(".attn") and last not in name:
                shapes.append((JOINT_TOKENS, dim))
            elif name.endswith(".ff_context"):
                shapes.append((PROMPT_TOKENS, dim))
            else:
                shapes.append((tokens, dim))
        return tuple(shapes)

    def output_packing(self, transformer, config: DiffusersConfig, path: str) -> OutputPacking | None:
        if path.endswith(".attn"):
            return JointAttentionPacking(image_only=path == f"{self.blocks}.{config['num_layers'] - 1}.attn")
        return None

    # -- graph interface ---------------------------------------------------------------------------------------------
    def graph_inputs(self, config: DiffusersConfig) -> list[TensorSpec]:
        return [self.sample_spec(config), TensorSpec("timestep", "float32", (), "time"),
                TensorSpec("encoder_hidden_states", "float32", (PROMPT_TOKENS, config["joint_attention_dim"]),
                           "prompt_embeds"),
                TensorSpec("pooled_projections", "float32", (config["pooled_projection_dim"],),
                           "pooled_prompt_embeds")]

    def dummy_inputs(self, config: DiffusersConfig, batch: int, tokens: int | None = None) -> tuple:
        import torch

        side, tokens = config["sample_size"], tokens or self.dummy_prompt_tokens
        return (torch.zeros(batch, self.in_channels(config), side, side), torch.full((batch,), 500.0),
                torch.zeros(batch, tokens, config["joint_attention_dim"]),
                torch.zeros(batch, config["pooled_projection_dim"]))

    def macs_inputs(self, config: DiffusersConfig) -> tuple:
        return self.dummy_inputs(config, 1, tokens=MACS_PROMPT_TOKENS)

    def run_transformer(self, transformer, config: DiffusersConfig, hidden_states, timestep, encoder_hidden_states,
                        pooled_projections):
        """hidden_states (N, C, H, W), timestep (N,) the scheduler's (0..1000), encoder_hidden_states (N, L,
        joint_attention_dim), pooled_projections (N, P) -> the velocity (N, C_out, H, W)."""
        return transformer(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                           pooled_projections=pooled_projections, return_dict=False)[0]

    # -- sampling ----------------------------------------------------------------------------------------------------
    def pipeline_timesteps(self, config: DiffusersConfig):
        from ...samplers import PipelineTimesteps

        return PipelineTimesteps(self.num_tokens(config), linspace_sigmas=False, default_max_shift=1.16)


FAMILY = SD3DiffusersFamily()
