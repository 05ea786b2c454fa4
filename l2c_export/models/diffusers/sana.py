"""``SanaTransformer2DModel`` as ``SanaPipeline`` samples it: Gemma-2 prompt embeddings (N, L, caption_channels) with
their attention mask (N, L), negative embeddings for guidance (a 2N batch), guidance on every latent channel, the
scheduler's integer timestep times the config's ``timestep_scale``, DC-AE latents (32x). Sub-layers: each block's
``attn1`` (ReLU linear self-attention), ``attn2`` (cross-attention) and ``ff`` (GLUMBConv, a convolution on the
latent grid); the block's adaLN-single modulation, gates and residual adds run every call.

``ff`` returns (N, D, h, w); its cache slot holds it as tokens (N, h * w, D), the layout of the other two
(:class:`GridPacking`). The linear attention's MACs are its own (two products of (d + 1) x d per token and head),
not softmax attention's T^2 (:meth:`SanaDiffusersFamily.count_macs`)."""

from __future__ import annotations

import math

from .. import TensorSpec
from ...core.macs import MacCount
from ...core.util import short_repr
from . import (PROMPT_TOKENS, DiffusersConfig, DiffusersFamily, DiffusersFolderError, OutputPacking,
               count_macs_by_hooks)
from .sizes import SANA_SIZES, TRANSFORMER_SIZES

MAX_SEQUENCE_LENGTH = 300  # SanaPipeline's max_sequence_length: the bound of the prompt axis L, and where MACs count
QK_NORMS = (None, "rms_norm_across_heads")  # Sana 1.0 and Sana 1.5


class GridPacking(OutputPacking):
    """GLUMBConv's output (N, D, h, w) as the tokens (N, h * w, D) its block flattens it to, and back. Unpacked by
    unflattening the tokens first, so that the two transposes never meet in the graph (the exporter would cancel
    them, and the consumers would read around the cached value)."""

    def pack(self, output, args, kwargs):
        return output.flatten(2).transpose(1, 2)

    def unpack(self, value, args, kwargs):
        grid = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[2:]
        return value.unflatten(1, tuple(grid)).permute(0, 3, 1, 2)


class SanaDiffusersFamily(DiffusersFamily):
    name = "diffusers-sana"
    transformer_class = "SanaTransformer2DModel"
    pipeline_classes = ("SanaPipeline",)
    scheduler_classes = ("DPMSolverMultistepScheduler",)  # Sana's folders: flow sigmas, flow_prediction
    block_sublayers = ("attn1", "attn2", "ff")
    # guidance_embeds: Sana-Sprint's distilled guidance (SanaSprintPipeline, SCM scheduler), not this pipeline's
    required = {"guidance_embeds": False}
    component_parts = ("vae",)  # Gemma-2 is not carried: a build takes prompt embeddings
    default_steps = 20  # the pipeline's num_inference_steps
    default_cfg_scale = 4.5  # the pipeline's guidance_scale
    dummy_prompt_tokens = 5  # the traced length (any: the axis is dynamic)
    sizes = {**TRANSFORMER_SIZES, **SANA_SIZES}

    def check_config(self, config: DiffusersConfig, where: str) -> None:
        super().check_config(config, where)
        if config.get("qk_norm") not in QK_NORMS:
            raise DiffusersFolderError(f"{where}: field 'qk_norm' is {short_repr(config.get('qk_norm'))}; supported: "
                                       f"null or 'rms_norm_across_heads'")
        if config["cross_attention_dim"] != self.inner_dim(config):
            raise DiffusersFolderError(f"{where}: field 'cross_attention_dim' is {config['cross_attention_dim']}; "
                                       f"the caption projection makes the prompt {self.inner_dim(config)} wide "
                                       f"(num_attention_heads x attention_head_dim)")
        for key, high in (("mlp_ratio", 16.0), ("timestep_scale", 1e4)):
            value = config.get(key, 1.0)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and 0 < value <= high):
                raise DiffusersFolderError(f"{where}: field {key!r} is {short_repr(value)}; expected a number in "
                                           f"(0, {high:g}]")
        if int(config.get("mlp_ratio", 2.5) * self.inner_dim(config)) < 1:
            raise DiffusersFolderError(f"{where}: field 'mlp_ratio' is {config['mlp_ratio']}; GLUMBConv's hidden "
                                       f"width int(mlp_ratio x {self.inner_dim(config)}) is 0")

    def max_prompt_tokens(self, pipeline_class: str) -> int:
        return MAX_SEQUENCE_LENGTH

    def text_channels(self, config: DiffusersConfig) -> int:
        """D of the prompt embeddings: caption_channels (Gemma-2 2B's 2304), projected inside."""
        return config.get("caption_channels", 2304)

    def output_packing(self, transformer, config: DiffusersConfig, path: str) -> OutputPacking | None:
        return GridPacking() if path.endswith(".ff") else None

    def graph_inputs(self, config: DiffusersConfig) -> list[TensorSpec]:
        return [self.sample_spec(config), TensorSpec("timestep", "float32", (), "time"),
                TensorSpec("encoder_hidden_states", "float32", (PROMPT_TOKENS, self.text_channels(config)),
                           "prompt_embeds"),
                TensorSpec("encoder_attention_mask", "float32", (PROMPT_TOKENS,), "prompt_attention_mask")]

    def macs_inputs(self, config: DiffusersConfig) -> tuple:
        return self.dummy_inputs(config, 1, tokens=MAX_SEQUENCE_LENGTH)

    def count_macs(self, config: DiffusersConfig) -> MacCount:
        """The hooks' count with each ``attn1``'s products made linear attention's: ``value`` padded with a row of
        ones (d + 1, T) times ``key`` (T, d), then that (d + 1, d) times ``query`` (d, T), per head, in place of the
        T x T of softmax attention the hooks charge."""
        counted = count_macs_by_hooks(self, config)
        tokens, heads, head_dim = self.num_tokens(config), config["num_attention_heads"], config["attention_head_dim"]
        quadratic = 2 * tokens * tokens * heads * head_dim
        linear = 2 * tokens * (head_dim + 1) * head_dim * heads
        per_sublayer = tuple(macs - quadratic + linear if name.endswith(".attn1") else macs
                             for name, macs in zip(self.sublayer_names(config), counted.per_sublayer))
        return MacCount(always=counted.always, per_sublayer=per_sublayer)

    def dummy_inputs(self, config: DiffusersConfig, batch: int, tokens: int | None = None) -> tuple:
        """Latents, timesteps 500, zero prompt embeddings of ``tokens`` (default: a short traced length) and a mask
        with the last token padded."""
        import torch

        side, tokens = config["sample_size"], tokens or self.dummy_prompt_tokens
        mask = torch.ones(batch, tokens)
        mask[:, -1] = 0  # a padded token, so the trace keeps the mask's path
        return (torch.zeros(batch, self.in_channels(config), side, side), torch.full((batch,), 500.0),
                torch.zeros(batch, tokens, self.text_channels(config)), mask)

    def run_transformer(self, transformer, config: DiffusersConfig, hidden_states, timestep, encoder_hidden_states,
                        encoder_attention_mask):
        """hidden_states (N, C, H, W), timestep (N,) the scheduler's, encoder_hidden_states (N, L, D_text),
        encoder_attention_mask (N, L) 1 keep / 0 discard -> (N, C_out, H, W). The pipeline multiplies the timestep by
        ``timestep_scale`` in float32 before the call; so does the graph."""
        scale = config.get("timestep_scale", 1.0)
        if scale != 1.0:
            timestep = timestep * scale
        return transformer(hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                           encoder_attention_mask=encoder_attention_mask, return_dict=False)[0]


FAMILY = SanaDiffusersFamily()
