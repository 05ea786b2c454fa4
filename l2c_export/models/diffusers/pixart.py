"""``PixArtTransformer2DModel`` (PixArt-α and -Σ) as ``PixArtAlphaPipeline``/``PixArtSigmaPipeline`` sample it:
T5 prompt embeddings (N, L, caption_channels) with their attention mask (N, L), negative embeddings for guidance,
guidance on every latent channel, the learned-sigma half dropped before the scheduler step. Sub-layers: each block's
``attn1`` (self-attention), ``attn2`` (cross-attention) and ``ff`` (the block's adaLN-single modulation, gates and
residual adds run every call)."""

from __future__ import annotations

from .. import TensorSpec
from . import PROMPT_TOKENS, DiffusersConfig, DiffusersFamily, DiffusersFolderError
from .sizes import PIXART_SIZES, TRANSFORMER_SIZES
from .text_encoders import TextEncoderSpec, TextEncoderStack

MACS_PROMPT_TOKENS = 120  # PixArt-α's T5 max_sequence_length: the prompt length MACs are counted at
# encode_prompt (clean_caption=False): the prompt lower-cased and stripped, T5 fed its tokenizer's mask; the
# embeddings and the mask are the conditioning
T5_STACK = TextEncoderStack(
    encoders=(TextEncoderSpec("text_encoder", "tokenizer", "t5", ("last_hidden_state",), masked=True),),
    arrays=(("prompt_embeds", (("text_encoder/last_hidden_state",),)),
            ("prompt_attention_mask", (("text_encoder/attention_mask",),))),
    preprocessing="lower_strip")


class PixArtDiffusersFamily(DiffusersFamily):
    name = "diffusers-pixart"
    transformer_class = "PixArtTransformer2DModel"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    block_sublayers = ("attn1", "attn2", "ff")
    required = {"norm_type": "ada_norm_single", "attention_type": "default"}
    default_steps = 20  # the pipelines' num_inference_steps
    default_cfg_scale = 4.5  # the pipelines' guidance_scale
    dummy_prompt_tokens = 5  # the traced length (any: the axis is dynamic)
    sizes = {**TRANSFORMER_SIZES, **PIXART_SIZES}
    text_encoders = T5_STACK
    # the pipelines' max_sequence_length defaults: the longest prompt each encodes, the bound of the prompt axis L
    max_sequence_lengths = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}

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

    def text_channels(self, config: DiffusersConfig) -> int:
        """D of the prompt embeddings: caption_channels (projected inside), else cross_attention_dim."""
        return config.get("caption_channels") or config.get("cross_attention_dim")

    def graph_inputs(self, config: DiffusersConfig) -> list[TensorSpec]:
        return [self.sample_spec(config), TensorSpec("timestep", "float32", (), "time"),
                TensorSpec("encoder_hidden_states", "float32", (PROMPT_TOKENS, self.text_channels(config)),
                           "prompt_embeds"),
                TensorSpec("encoder_attention_mask", "float32", (PROMPT_TOKENS,), "prompt_attention_mask")]

    def macs_inputs(self, config: DiffusersConfig) -> tuple:
        return self.dummy_inputs(config, 1, tokens=MACS_PROMPT_TOKENS)

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
        """hidden_states (N, C, H, W), timestep (N,), encoder_hidden_states (N, L, D_text), encoder_attention_mask
        (N, L) 1 keep / 0 discard -> (N, C_out, H, W)."""
        return transformer(hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                           encoder_attention_mask=encoder_attention_mask,
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


FAMILY = PixArtDiffusersFamily()
