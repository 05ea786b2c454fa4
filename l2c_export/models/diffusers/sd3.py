"""``SD3Transformer2DModel`` (Stable Diffusion 3 and 3.5) as ``StableDiffusion3Pipeline`` samples it: an MMDiT whose
blocks run joint attention over an image and a text stream, then a feed-forward per stream.

Sub-layers, per block in forward order: ``attn`` (the joint attention; its cached value is both streams' outputs,
(N, T + L, D) with the image's T tokens first, split back where reused), ``attn2`` (SD3.5's second, image-only
attention, in the blocks of ``dual_attention_layers``), ``ff`` (the image stream's feed-forward) and ``ff_context``
(the text stream's, (N, L, D); absent from the last block, which is ``context_pre_only``: its attention's text
output is never read, so that block caches only the image part, (N, T, D)). The adaLN modulation, gates and residual
adds of both streams run every call.

Conditioning (:data:`.mmdit.TEXT_CONDITIONING`): ``prompt_embeds`` (N, L, joint_attention_dim) and
``pooled_prompt_embeds`` (N, pooled_projection_dim), guided against their ``negative_`` counterparts on every latent
channel; the model predicts the flow-matching velocity; the folder's ``FlowMatchEulerDiscreteScheduler`` samples it
with the pipeline's timesteps (``mu`` from the image sequence length when ``use_dynamic_shifting``).
"""

from __future__ import annotations

from ...core.util import short_repr
from .declaration import IMAGE, JOINT, PROMPT, Blocks, Declaration, EncodePrompt, FlowTimesteps, Guidance
from .family import DiffusersConfig
from .files import DiffusersFolderError
from .mmdit import TEXT_CONDITIONING, MMDiTFamily
from .sizes import SD3_SIZES, TRANSFORMER_SIZES
from .text_encoders import TOKENIZER_MAX_LENGTH, TextEncoder, TextEncoderStack

QK_NORMS = (None, "rms_norm", "layer_norm")
MACS_PROMPT_TOKENS = 333  # the pipeline's 77 CLIP + 256 T5 tokens (max_sequence_length): prompt_embeds' longest

DECLARATION = Declaration(
    transformer_class="SD3Transformer2DModel",
    pipeline_classes=("StableDiffusion3Pipeline",),
    blocks=(Blocks(sublayers=("attn", "attn2", "ff", "ff_context"), only_in={"attn2": "dual_attention_layers"},
                   not_in_last=("ff_context",), cached={"attn": JOINT, "ff_context": PROMPT},
                   cached_in_last={"attn": IMAGE}),),
    conditioning=TEXT_CONDITIONING,
    guidance=Guidance(default_scale=7.0),  # the pipeline's guidance_scale
    scheduler_classes=("FlowMatchEulerDiscreteScheduler",),
    flow_timesteps=FlowTimesteps(linspace_sigmas=False, default_max_shift=1.16),
    # StableDiffusion3Pipeline.encode_prompt: CLIP-L's and CLIP-G's penultimate hidden states (77 tokens) side by
    # side, zero-padded to T5's width, then T5's max_sequence_length tokens; pooled: the two CLIPs' projected pooled
    # outputs side by side
    text_encoders=TextEncoderStack(
        encoders=(TextEncoder("text_encoder", "tokenizer", "clip", ("pooled", "penultimate_hidden_state"),
                              length=TOKENIZER_MAX_LENGTH),
                  TextEncoder("text_encoder_2", "tokenizer_2", "clip", ("pooled", "penultimate_hidden_state"),
                              length=TOKENIZER_MAX_LENGTH),
                  TextEncoder("text_encoder_3", "tokenizer_3", "t5", ("last_hidden_state",))),
        arrays=(("prompt_embeds", (("text_encoder/penultimate_hidden_state",
                                    "text_encoder_2/penultimate_hidden_state"),
                                   ("text_encoder_3/last_hidden_state",))),
                ("pooled_prompt_embeds", (("text_encoder/pooled", "text_encoder_2/pooled"),)))),
    default_steps=28,  # the pipeline's num_inference_steps
    max_sequence_length={"StableDiffusion3Pipeline": 256},  # T5's tokens
    macs_prompt_tokens=MACS_PROMPT_TOKENS,
    encode_prompt=EncodePrompt(("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                "negative_pooled_prompt_embeds")),
)


class SD3DiffusersFamily(MMDiTFamily):
    """The declaration, and the config checks it cannot say as data."""

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


FAMILY = SD3DiffusersFamily("diffusers-sd3", DECLARATION, sizes={**TRANSFORMER_SIZES, **SD3_SIZES})
