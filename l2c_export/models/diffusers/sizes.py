"""The integer fields of a diffusers folder's configs, each with the range it is read in and why: a size is a number
in a JSON file, and a number is not memory (``sample_size`` 65536 asks for terabytes, ``num_layers`` 1e9 builds for
hours), so every one is checked here before anything is allocated. The released models are the guide: a bound is a
few times the largest size any of them uses, never below it.

Declared once per component as data (:data:`TRANSFORMER_SIZES` shared by the transformer families, which add their
own; :data:`TEXT_ENCODER_SIZES`; :data:`VAE_SIZES`); :func:`check_sizes` applies a table. The scheduler's integers
are bounded where its options are declared (:mod:`l2c_export.samplers.diffusers`), and a tokenizer's ids by the text
encoder's ``vocab_size`` (:func:`l2c_export.models.diffusers.check_tokenizer`). What a config costs as a whole is
:mod:`l2c_export.builder.memory`'s estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from ...core.util import short_repr


@dataclass(frozen=True)
class Size:
    """An integer field read in ``low..high``; ``reason``: the released models' values the bound is made from.
    ``optional``: the field may be absent or null (the class's default then applies)."""

    low: int
    high: int
    reason: str
    optional: bool = False


def is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_sizes(config: Mapping, sizes: Mapping[str, Size], where: str, error: type[Exception]) -> None:
    """Refuses, naming ``where`` and the field, the first field of ``sizes`` that is not an integer in its range."""
    for key, size in sizes.items():
        value = config.get(key)
        if value is None and size.optional:
            continue
        if not is_integer(value) or not size.low <= value <= size.high:
            raise error(f"{where}: field {key!r} is {short_repr(value)}; expected an integer in "
                        f"{size.low}..{size.high} ({size.reason})")


def check_integer_list(config: Mapping, key: str, size: Size, where: str, error: type[Exception],
                       lengths: tuple[int, int]) -> None:
    """A field that is a list of ``lengths[0]..lengths[1]`` integers, each in ``size``'s range (absent or null where
    ``size.optional``)."""
    value = config.get(key)
    if value is None and size.optional:
        return
    low, high = lengths
    if not (isinstance(value, (list, tuple)) and low <= len(value) <= high
            and all(is_integer(v) and size.low <= v <= size.high for v in value)):
        raise error(f"{where}: field {key!r} is {short_repr(value)}; expected a list of {low} to {high} integers in "
                    f"{size.low}..{size.high} ({size.reason})")


# Transformers (DiT, PixArt-α/Σ, SD3/3.5, FLUX.1): the fields every family reads.
_WIDTH = 1 << 14  # embedding widths: T5-XXL's 4096 is the widest any of them takes
TRANSFORMER_SIZES = {
    "num_layers": Size(1, 128, "blocks: DiT-XL and PixArt 28, SD3.5-large 38, FLUX.1 19 + 38"),
    "num_attention_heads": Size(1, 256, "DiT and PixArt 16, FLUX.1 24, SD3.5-large 38"),
    "attention_head_dim": Size(1, 1024, "64 to 128 in every released model"),
    "in_channels": Size(1, 1024, "latent channels: 4 (DiT, PixArt), 16 (SD3), 64 (FLUX.1's 2x2 packing)"),
    "out_channels": Size(1, 2048, "the latent channels, doubled with a learned sigma", optional=True),
    "sample_size": Size(1, 1024, "latents on a side: 32 (DiT 256 px) to 512 (PixArt-Σ 4K)"),
    "patch_size": Size(1, 16, "2 in every released model, 1 in FLUX.1 (which packs 2x2 itself)"),
    "norm_num_groups": Size(1, 1024, "32 in every released model", optional=True),
    "num_embeds_ada_norm": Size(1, 1 << 20, "DiT's 1000 ImageNet classes", optional=True),
}
PIXART_SIZES = {
    "cross_attention_dim": Size(1, _WIDTH, "PixArt's 1152, the prompt's width after the caption projection"),
    "caption_channels": Size(1, _WIDTH, "T5-XXL's 4096", optional=True),
}
SD3_SIZES = {
    "joint_attention_dim": Size(1, _WIDTH, "the prompt embeddings' width: T5-XXL's 4096"),
    "caption_projection_dim": Size(1, _WIDTH, "the text stream's width: SD3-medium's 1536, SD3.5-large's 2432"),
    "pooled_projection_dim": Size(1, _WIDTH, "CLIP-L and CLIP-G pooled: 2048"),
    "pos_embed_max_size": Size(1, 1024, "positions on a side: SD3's 96, SD3.5's 192"),
}
FLUX_SIZES = {
    "num_single_layers": Size(1, 128, "single-stream blocks: FLUX.1's 38"),
    "joint_attention_dim": SD3_SIZES["joint_attention_dim"],
    "pooled_projection_dim": Size(1, _WIDTH, "CLIP-L pooled: 768"),
}
SANA_SIZES = {
    "cross_attention_dim": Size(1, _WIDTH, "Sana 1.6B's 2240, the prompt's width after the caption projection"),
    "caption_channels": Size(1, _WIDTH, "Gemma-2 2B's 2304"),
    "num_cross_attention_heads": Size(1, 256, "Sana 1.6B's 20"),
    "cross_attention_head_dim": Size(1, 1024, "Sana's 112"),
}
QWEN_IMAGE_SIZES = {
    "joint_attention_dim": Size(1, _WIDTH, "the prompt embeddings' width: Qwen2.5-VL-7B's 3584"),
}
WAN_SIZES = {
    "num_layers": Size(1, 128, "blocks: Wan2.1-1.3B's 30, -14B's 40"),
    "num_attention_heads": TRANSFORMER_SIZES["num_attention_heads"],
    "attention_head_dim": TRANSFORMER_SIZES["attention_head_dim"],
    "in_channels": Size(1, 1024, "latent channels: Wan2.1's 16, Wan2.2-TI2V's 48"),
    "out_channels": TRANSFORMER_SIZES["out_channels"],
    "text_dim": Size(1, _WIDTH, "the prompt embeddings' width: UMT5-XXL's 4096"),
    "freq_dim": Size(2, 4096, "the sinusoidal timestep embedding's width: Wan's 256"),
    "ffn_dim": Size(1, 1 << 16, "the feed-forward's hidden width: Wan2.1-1.3B's 8960, -14B's 13824"),
    "rope_max_seq_len": Size(1, 1 << 16, "rotary positions per axis: Wan's 1024", optional=True),
}
WAN_PATCH = Size(1, 16, "patch_size (frames, height, width): Wan's (1, 2, 2)")
# A clip's frames (Wan: 4k + 1, the pipeline's num_frames; Wan2.1 samples 81)
WAN_FRAMES = Size(1, 1025, "frames per clip: Wan2.1's 81")
QWEN_ROPE_AXES = Size(2, 1024, "Qwen-Image's rotary axes (16, 56, 56): even, summing to attention_head_dim",
                      optional=True)
FLUX_ROPE_AXES = Size(0, 1024, "FLUX.1's rotary axes (16, 56, 56), summing to attention_head_dim", optional=True)
# The latents on a side of a transformer without sample_size (FLUX.1: --image-size over the VAE's scale factor).
LATENT_SIDE = TRANSFORMER_SIZES["sample_size"]

# text_encoder/config.json (T5EncoderModel)
TEXT_ENCODER_SIZES = {
    "vocab_size": Size(1, 1 << 20, "T5's 32128; the largest vocabularies in use hold about 256k tokens"),
    "d_model": Size(1, _WIDTH, "T5-XXL's 4096"),
    "d_kv": Size(1, 1024, "T5's 64"),
    "d_ff": Size(1, 1 << 16, "T5-XXL's 10240"),
    "num_layers": Size(1, 128, "T5-XXL's 24"),
    "num_decoder_layers": Size(0, 128, "T5-XXL's 24 (not exported: the encoder only)", optional=True),
    "num_heads": Size(1, 256, "T5-XXL's 64"),
    "relative_attention_num_buckets": Size(1, 1024, "T5's 32"),
    "relative_attention_max_distance": Size(1, 1 << 16, "T5's 128"),
    "pad_token_id": Size(0, (1 << 20) - 1, "a token id: T5's 0", optional=True),
    "eos_token_id": Size(0, (1 << 20) - 1, "a token id: T5's 1", optional=True),
    "decoder_start_token_id": Size(0, (1 << 20) - 1, "a token id: T5's 0", optional=True),
}

# text_encoder/config.json of the decoder LLMs (their hidden states are the prompt embeddings)
_LLM_SIZES = {
    "vocab_size": Size(1, 1 << 20, "Gemma-2's 256000, Qwen2.5-VL's 152064"),
    "hidden_size": Size(1, _WIDTH, "Gemma-2 2B's 2304, Qwen2.5-VL-7B's 3584"),
    "intermediate_size": Size(1, 1 << 16, "Gemma-2 2B's 9216, Qwen2.5-VL-7B's 18944"),
    "num_hidden_layers": Size(1, 256, "Gemma-2 2B's 26, Qwen2.5-VL-7B's 28"),
    "num_attention_heads": Size(1, 256, "Gemma-2 2B's 8, Qwen2.5-VL-7B's 28"),
    "num_key_value_heads": Size(1, 256, "Gemma-2 2B's 4, Qwen2.5-VL-7B's 4"),
    "max_position_embeddings": Size(1, 1 << 20, "Gemma-2's 8192, Qwen2.5-VL's 128000"),
}  # their token ids (an eos_token_id may be a list) are checked against vocab_size by the folder reader
GEMMA2_SIZES = {**_LLM_SIZES, "head_dim": Size(1, 1024, "Gemma-2's 256"),
                "sliding_window": Size(1, 1 << 20, "Gemma-2's 4096 tokens", optional=True)}
# Qwen2.5-VL's text fields, in its text_config (transformers 5) or at the top (transformers 4)
QWEN2_5_VL_TEXT_SIZES = dict(_LLM_SIZES)

# vae/config.json (AutoencoderKL)
VAE_SIZES = {
    "in_channels": Size(1, 16, "RGB: 3", optional=True),
    "out_channels": Size(1, 16, "RGB: 3", optional=True),
    "latent_channels": Size(1, 1024, "4 (SD, DiT, PixArt) or 16 (SD3, FLUX.1)"),
    "layers_per_block": Size(1, 16, "2 in every released VAE", optional=True),
    "norm_num_groups": Size(1, 1024, "32 in every released VAE", optional=True),
    "sample_size": Size(1, 1 << 14, "the tile size of tiled decoding in pixels (512 or 1024); the decoder graph "
                                    "never reads it", optional=True),
}
VAE_CHANNELS = Size(1, 4096, "block_out_channels: 128 to 512 in every released VAE")
# vae/config.json (AutoencoderKLQwenImage: a causal 3D VAE, Wan 2.1's layout)
QWEN_VAE_SIZES = {
    "base_dim": Size(1, 4096, "the first level's width: Qwen-Image's 96"),
    "z_dim": Size(1, 1024, "latent channels: Qwen-Image's 16"),
    "num_res_blocks": Size(1, 16, "Qwen-Image's 2"),
    "input_channels": Size(1, 16, "RGB: 3", optional=True),
}
QWEN_VAE_MULTIPLIERS = Size(1, 64, "dim_mult: each level's width over base_dim, Qwen-Image's (1, 2, 4, 4)")
VAE_LEVELS = (1, 8)  # block_out_channels' length: 4 levels (scale factor 8) in every released VAE

# vae/config.json (AutoencoderDC: DC-AE, Sana's 32x autoencoder)
DC_VAE_SIZES = {
    "in_channels": Size(1, 16, "RGB: 3", optional=True),
    "latent_channels": Size(1, 1024, "Sana's 32"),
    "attention_head_dim": Size(1, 1024, "DC-AE's 32"),
}
DC_VAE_LAYERS = Size(0, 16, "layers per level: 2 or 3 in DC-AE f32c32")
# A CLIP text encoder (SD3's CLIP-L and CLIP-G, FLUX.1's CLIP-L), CLIPTextConfig's fields
CLIP_TEXT_SIZES = {
    "vocab_size": Size(1, 1 << 20, "CLIP's 49408"),
    "hidden_size": Size(1, _WIDTH, "CLIP-G's 1280"),
    "intermediate_size": Size(1, 1 << 16, "CLIP-G's 5120"),
    "num_hidden_layers": Size(1, 128, "CLIP-G's 32"),
    "num_attention_heads": Size(1, 256, "CLIP-G's 20"),
    "max_position_embeddings": Size(1, 4096, "CLIP's 77"),
    "projection_dim": Size(1, _WIDTH, "CLIP-G's 1280"),
    "pad_token_id": Size(0, (1 << 20) - 1, "a token id: CLIP's 1", optional=True),
    "bos_token_id": Size(0, (1 << 20) - 1, "a token id: CLIP's 0 (49406 in its tokenizer)", optional=True),
    "eos_token_id": Size(0, (1 << 20) - 1, "a token id: CLIP's 2 (49407 in its tokenizer)", optional=True),
}
