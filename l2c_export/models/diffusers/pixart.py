"""``PixArtTransformer2DModel`` (PixArt-α and -Σ) as ``PixArtAlphaPipeline``/``PixArtSigmaPipeline`` sample it:
T5 prompt embeddings (N, L, caption_channels) with their attention mask (N, L), negative embeddings for guidance,
guidance on every latent channel, the learned-sigma half dropped before the scheduler step. Sub-layers: each block's
``attn1`` (self-attention), ``attn2`` (cross-attention) and ``ff`` (the block's adaLN-single modulation, gates and
residual adds run every call)."""

from __future__ import annotations

from ...core.interface import TOKEN_EMBEDDINGS, TOKEN_MASK
from .declaration import Blocks, Conditioning, Declaration, EncodePrompt, Guidance
from .family import DiffusersConfig, DiffusersFamily
from .files import DiffusersFolderError
from .sizes import PIXART_SIZES, TRANSFORMER_SIZES
from .text_encoders import TextEncoder, TextEncoderStack

MACS_PROMPT_TOKENS = 120  # PixArt-α's max_sequence_length: the prompt length MACs are counted at

DECLARATION = Declaration(
    transformer_class="PixArtTransformer2DModel",
    pipeline_classes=("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
    blocks=(Blocks(sublayers=("attn1", "attn2", "ff")),),
    conditioning=(
        # T5's embeddings, projected inside from caption_channels (or taken as they are, cross_attention_dim wide)
        Conditioning(argument="prompt_embeds", input="encoder_hidden_states", kind=TOKEN_EMBEDDINGS,
                     width=("caption_channels", "cross_attention_dim"), negative="negative_prompt_embeds"),
        Conditioning(argument="prompt_attention_mask", input="encoder_attention_mask", kind=TOKEN_MASK,
                     negative="negative_prompt_attention_mask"),
    ),
    guidance=Guidance(default_scale=4.5),  # the pipelines' guidance_scale
    # encode_prompt (clean_caption=False): the prompt lower-cased and stripped, T5 fed its tokenizer's mask; the
    # embeddings and the mask are the conditioning
    text_encoders=TextEncoderStack(
        encoders=(TextEncoder("text_encoder", "tokenizer", "t5", ("last_hidden_state",), masked=True),),
        arrays=(("prompt_embeds", (("text_encoder/last_hidden_state",),)),
                ("prompt_attention_mask", (("text_encoder/attention_mask",),))),
        preprocessing="lower_strip"),
    default_steps=20,  # the pipelines' num_inference_steps
    # the pipelines' max_sequence_length defaults: the longest prompt each encodes, the bound of the prompt axis L
    max_sequence_length={"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300},
    macs_prompt_tokens=MACS_PROMPT_TOKENS,
    required={"norm_type": "ada_norm_single", "attention_type": "default"},
    call_arguments={"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}},
    # encode_prompt(clean_caption=False): the builds' preprocessing (caption cleaning needs bs4 and ftfy)
    encode_prompt=EncodePrompt(("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                                "negative_prompt_attention_mask"), keywords={"clean_caption": False}),
)


class PixArtDiffusersFamily(DiffusersFamily):
    """The declaration, and two config checks it cannot say as data."""

    def check_config(self, config: DiffusersConfig, where: str) -> None:
        super().check_config(config, where)
        additional = config.get("use_additional_conditions")
        if additional or (additional is None and config["sample_size"] == 128):
            raise DiffusersFolderError(f"{where}: field 'use_additional_conditions' is on (PixArt-α 1024's resolution "
                                       f"and aspect-ratio conditions); not supported yet")
        if config.get("caption_channels") is not None and config["cross_attention_dim"] != self.inner_dim(config):
            raise DiffusersFolderError(f"{where}: field 'cross_attention_dim' is {config['cross_attention_dim']}; "
                                       f"the caption projection makes the prompt {self.inner_dim(config)} wide "
                                       f"(num_attention_heads x attention_head_dim)")


FAMILY = PixArtDiffusersFamily("diffusers-pixart", DECLARATION, sizes={**TRANSFORMER_SIZES, **PIXART_SIZES})
