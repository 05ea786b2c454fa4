"""``SanaTransformer2DModel`` as ``SanaPipeline`` samples it: Gemma-2 prompt embeddings (N, L, caption_channels) with
their attention mask (N, L), negative embeddings for guidance (a 2N batch), guidance on every latent channel, the
scheduler's integer timestep times the config's ``timestep_scale``, DC-AE latents (32x). Sub-layers: each block's
``attn1`` (ReLU linear self-attention), ``attn2`` (cross-attention) and ``ff`` (GLUMBConv, a convolution on the
latent grid); the block's adaLN-single modulation, gates and residual adds run every call.

``ff`` returns (N, D, h, w); its cache slot holds it as tokens (N, h * w, D), the layout of the other two
(:class:`GridPacking`). The linear attention's MACs are its own (two products of (d + 1) x d per token and head),
not softmax attention's T^2 (:meth:`SanaDiffusersFamily.count_macs`).

Prompts: the Gemma-2 encoder (``Gemma2Model``) is a graph of its last hidden state, run as ``encode_prompt`` runs it
(the stack's declaration below); a folder without it builds taking prompt embeddings."""

from __future__ import annotations

import math

from ...core.interface import TOKEN_EMBEDDINGS, TOKEN_MASK
from ...core.macs import MacCount
from ...core.util import short_repr
from .cache import OutputPacking
from .declaration import Blocks, Conditioning, Declaration, EncodePrompt, Guidance, VaeKind
from .family import DiffusersConfig, DiffusersFamily
from .files import DiffusersFolderError
from .macs import count_macs_by_hooks
from .sizes import SANA_SIZES, TRANSFORMER_SIZES
from .text_encoders import TextEncoder, TextEncoderStack

MAX_SEQUENCE_LENGTH = 300  # SanaPipeline's max_sequence_length: the bound of the prompt axis L, and where MACs count
# SanaPipeline.__call__'s default complex_human_instruction (NVlabs' Sana_1600M_app.yaml), one line per item
COMPLEX_HUMAN_INSTRUCTION = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image "
    "generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)
QK_NORMS = (None, "rms_norm_across_heads")  # Sana 1.0 and Sana 1.5

DECLARATION = Declaration(
    transformer_class="SanaTransformer2DModel",
    pipeline_classes=("SanaPipeline",),
    blocks=(Blocks(sublayers=("attn1", "attn2", "ff")),),
    conditioning=(
        # Gemma-2's hidden states, projected inside from caption_channels
        Conditioning(argument="prompt_embeds", input="encoder_hidden_states", kind=TOKEN_EMBEDDINGS,
                     width="caption_channels", negative="negative_prompt_embeds"),
        Conditioning(argument="prompt_attention_mask", input="encoder_attention_mask", kind=TOKEN_MASK,
                     negative="negative_prompt_attention_mask"),
    ),
    guidance=Guidance(default_scale=4.5),  # the pipeline's guidance_scale
    scheduler_classes=("DPMSolverMultistepScheduler",),  # Sana's folders: flow sigmas, flow_prediction
    # the pipeline's encode_prompt (clean_caption=False: lower-cased and stripped): Gemma-2's last hidden states of
    # the complex_human_instruction lines joined by newlines + the prompt, tokenized (right-padded) to the
    # instruction's tokens + max_sequence_length - 2, keeping the first token and the last max_sequence_length - 1;
    # the negative prompt without the instruction, max_sequence_length tokens
    text_encoders=TextEncoderStack(
        encoders=(TextEncoder("text_encoder", "tokenizer", "gemma2", ("last_hidden_state",), masked=True,
                              template="\n".join(COMPLEX_HUMAN_INSTRUCTION) + "{}", template_negative=False,
                              template_extra=-2, selection="first_and_last", selection_count=1,
                              padding_side="right"),),
        arrays=(("prompt_embeds", (("text_encoder/last_hidden_state",),)),
                ("prompt_attention_mask", (("text_encoder/attention_mask",),))),
        preprocessing="lower_strip"),
    vae=VaeKind(classes=("AutoencoderDC",), kind="dc_ae"),  # DC-AE, 32x
    default_steps=20,  # the pipeline's num_inference_steps
    max_sequence_length={"SanaPipeline": MAX_SEQUENCE_LENGTH},
    macs_prompt_tokens=MAX_SEQUENCE_LENGTH,
    # guidance_embeds: Sana-Sprint's distilled guidance (SanaSprintPipeline, SCM scheduler), not this pipeline's
    required={"guidance_embeds": False},
    # the pipeline call's complex_human_instruction (encode_prompt's own default is None)
    encode_prompt=EncodePrompt(("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                                "negative_prompt_attention_mask"),
                               from_call=("max_sequence_length", "complex_human_instruction", "clean_caption")),
)


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
    """The declaration, plus what it cannot say as data: config checks between fields, the cached ``ff`` as tokens,
    linear attention's MACs, and the timestep's ``timestep_scale``."""

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

    def output_packing(self, transformer, config: DiffusersConfig, path: str) -> OutputPacking | None:
        return GridPacking() if path.endswith(".ff") else None

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

    def run_transformer(self, transformer, config: DiffusersConfig, hidden_states, timestep, *conditioning):
        """As the declaration says, the timestep (N,) first multiplied by ``timestep_scale`` in float32, as the
        pipeline does before the call (so does the graph) -> (N, C_out, H, W)."""
        scale = config.get("timestep_scale", 1.0)
        if scale != 1.0:
            timestep = timestep * scale
        return super().run_transformer(transformer, config, hidden_states, timestep, *conditioning)


FAMILY = SanaDiffusersFamily("diffusers-sana", DECLARATION, sizes={**TRANSFORMER_SIZES, **SANA_SIZES})
