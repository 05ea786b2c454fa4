"""``WanTransformer3DModel`` (Wan2.1) as ``WanPipeline`` samples it, text to video: latents (N, C, F', H', W'),
F' = (num_frames - 1) / 4 + 1 frames and H' x W' = the frames' pixels over the VAE's spatial factor 8 (``build
--num-frames F --image-size PIXELS|HxW``; default the pipeline's 81 frames of 480 x 832), patched (1, 2, 2) into
T = F' (H' / 2) (W' / 2) tokens. Sub-layers, per block in forward order: ``attn1`` (self-attention with the 3-D
rotary embedding), ``attn2`` (cross-attention to the prompt) and ``ffn``, each (N, T, D); the block's adaLN
modulation (its ``scale_shift_table`` plus the timestep projection), gates and residual adds run every call.

Conditioning: ``prompt_embeds`` (N, L, text_dim), UMT5's hidden states with the rows past each prompt zeroed by the
pipeline (no mask reaches the transformer), guided against ``negative_prompt_embeds`` of the same shape (the
pipeline pads both to max_sequence_length, 512): ``uncond + s (cond - uncond)`` on every channel, on only when
``guidance_scale`` > 1. The pipeline calls the transformer for the prompt, then for the negative prompt; the runtime
runs both as one 2N batch, which equals the two calls (everything in the transformer is per sample). The timestep
fed is the scheduler's (``t.expand(N)``); the transformer's own forward runs as declared.

Scheduler: Wan's folders ship ``UniPCMultistepScheduler`` (flow prediction, ``use_flow_sigmas``, ``flow_shift``:
:mod:`l2c_export.samplers.unipc`); the pipeline runs as well with ``FlowMatchEulerDiscreteScheduler`` (``shift`` as
Wan's flow shift, no dynamic shifting: the pipeline passes no ``mu``). The UMT5 encoder and its tokenizer are
carried as components where the folder has them (``build --max-sequence-length L``; prompts cleaned as the pipeline's
``prompt_clean``, :func:`~l2c_export.core.text_stack.wan_prompt_clean`; each prompt's rows past its tokens zeroed);
the VAE (``AutoencoderKLWan``) is carried as a decoder graph of every frame of the clip
(the ``mean_std`` VAE kind, :mod:`.vae`), its scale factors checked to be the ones sampled here (4 in time).
"""

from __future__ import annotations

from ...core.interface import NCFHW, TOKEN_EMBEDDINGS
from ...core.util import short_repr
from .. import TensorSpec
from .declaration import Blocks, Conditioning, Declaration, EncodePrompt, Experts, Guidance, VaeKind
from .family import DiffusersConfig, DiffusersFamily
from .files import DiffusersFolderError
from .sizes import LATENT_SIDE, WAN_FRAMES, WAN_PATCH, WAN_SIZES, check_integer_list
from .text_encoders import TextEncoder, TextEncoderStack
from .vae import WAN_VAE_TEMPORAL

MAX_SEQUENCE_LENGTH = 512  # WanPipeline's max_sequence_length: UMT5's tokens, the whole prompt_embeds
VAE_SCALE_FACTOR_TEMPORAL = WAN_VAE_TEMPORAL  # WanPipeline's vae_scale_factor_temporal (4 without a VAE)
DEFAULT_NUM_FRAMES = 81  # WanPipeline's num_frames
DEFAULT_HEIGHT, DEFAULT_WIDTH = 480, 832  # WanPipeline's height and width

DECLARATION = Declaration(
    transformer_class="WanTransformer3DModel",
    pipeline_classes=("WanPipeline",),
    blocks=(Blocks(sublayers=("attn1", "attn2", "ffn"), path="blocks"),),
    conditioning=(
        Conditioning(argument="prompt_embeds", input="encoder_hidden_states", kind=TOKEN_EMBEDDINGS,
                     width="text_dim", negative="negative_prompt_embeds"),
    ),
    guidance=Guidance(default_scale=5.0),  # the pipeline's guidance_scale
    scheduler_classes=("UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"),
    latent_layout=NCFHW,
    # WanPipeline._get_t5_prompt_embeds: prompt_clean, UMT5's last hidden states, fed the mask, the rows past each
    # prompt zeroed; the negative prompt "" by default
    text_encoders=TextEncoderStack(
        encoders=(TextEncoder("text_encoder", "tokenizer", "umt5", ("last_hidden_state",), masked=True,
                              selection="zeroed_past_prompt"),),
        arrays=(("prompt_embeds", (("text_encoder/last_hidden_state",),)),), preprocessing="wan_prompt_clean"),
    # AutoencoderKLWan: Wan 2.1's causal 3D VAE, per-channel latents_mean/latents_std as Qwen-Image's; every frame
    vae=VaeKind(classes=("AutoencoderKLWan",), kind="mean_std"),
    default_steps=50,  # the pipeline's num_inference_steps
    max_sequence_length={"WanPipeline": MAX_SEQUENCE_LENGTH},
    macs_prompt_tokens=MAX_SEQUENCE_LENGTH,
    macs_at_build_length=True,  # every prompt padded to max_sequence_length, every row read by attn2
    # text to video: no image embedding (Wan2.1-I2V's), no added key/value projections; the released query/key norm
    required={"image_dim": None, "added_kv_proj_dim": None, "pos_embed_seq_len": None,
              "qk_norm": "rms_norm_across_heads"},
    encode_prompt=EncodePrompt(("prompt_embeds", "negative_prompt_embeds")),
    # Wan2.2-A14B: transformer while t >= boundary_ratio x num_train_timesteps (high noise), then transformer_2, each
    # guided with its own scale (guidance_scale_2 defaults to guidance_scale); they share the clip, the prompt and the
    # blocks' shapes
    experts=Experts(shape_fields=("patch_size", "in_channels", "out_channels", "num_attention_heads",
                                  "attention_head_dim", "num_layers", "text_dim")),
)


def _rotate(x, cos, sin):
    """diffusers' rotary product of ``WanAttnProcessor`` (x (N, T, H, D), its interleaved channel pairs turned by
    cos, sin (1, T, 1, D) repeated per pair), as one stack of the two halves: diffusers writes them into strided
    slices of an empty tensor, which the tracer records with the traced batch fixed."""
    import torch

    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


class TraceableWanAttention:
    """``WanAttnProcessor`` for text to video (no image context: ``added_kv_proj_dim`` is null), its rotary product
    :func:`_rotate`: hidden_states (N, T, D), encoder_hidden_states (N, L, D) for the cross-attention (None: self),
    rotary_emb (cos, sin) -> (N, T, D)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        import torch.nn.functional as F

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        # (N, S, H, D) -> SDPA's (N, H, S, D) and back, as diffusers' native backend
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def frame_latents(num_frames: int) -> int:
    """The latent frames F' of a clip of ``num_frames`` (4k + 1): (num_frames - 1) / 4 + 1, the causal VAE's first
    frame alone, then each 4 in one."""
    return (num_frames - 1) // VAE_SCALE_FACTOR_TEMPORAL + 1


class WanDiffusersFamily(DiffusersFamily):
    """The declaration, with what a video transformer needs in code: its (F', H', W') latents from ``--num-frames``
    and ``--image-size``, its 3-D patch and the config checks between fields."""

    def check_config(self, config: DiffusersConfig, where: str) -> None:
        check_integer_list(config, "patch_size", WAN_PATCH, where, DiffusersFolderError, (3, 3))
        super().check_config(config, where)
        if config["attention_head_dim"] % 2:
            raise DiffusersFolderError(f"{where}: field 'attention_head_dim' is {config['attention_head_dim']}; "
                                       f"expected an even size (the rotary embedding turns pairs of channels)")

    def sized_config(self, config: DiffusersConfig, image_size: int | tuple[int, int] | None, vae_scale_factor: int,
                     num_frames: int | None = None) -> DiffusersConfig:
        """``--num-frames F --image-size PIXELS|HxW``: latents (F', H', W'), F' = (F - 1) / 4 + 1, H' and W' the
        pixels over ``vae_scale_factor``; F must be 4k + 1 and the pixels multiples of the scale factor times the
        patch (the pipeline would round them, silently); default the pipeline's 81 frames of 480 x 832."""
        frames = DEFAULT_NUM_FRAMES if num_frames is None else num_frames
        if isinstance(frames, bool) or not isinstance(frames, int) or not WAN_FRAMES.low <= frames <= WAN_FRAMES.high \
                or (frames - 1) % VAE_SCALE_FACTOR_TEMPORAL:
            raise ValueError(f"--num-frames {short_repr(frames)}: expected 4k + 1 frames in "
                             f"{WAN_FRAMES.low}..{WAN_FRAMES.high} (1, 5, 9, ..., 81: the VAE's first frame alone, "
                             f"then {VAE_SCALE_FACTOR_TEMPORAL} frames per latent frame)")
        if image_size is None:
            image_size = (DEFAULT_HEIGHT, DEFAULT_WIDTH)
        height, width = image_size if isinstance(image_size, tuple) else (image_size, image_size)
        patch_t, patch_h, patch_w = config["patch_size"]
        for name, pixels, patch in (("height", height, patch_h), ("width", width, patch_w)):
            step = vae_scale_factor * patch
            if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < step or pixels % step:
                raise ValueError(f"--image-size: the {name} {short_repr(pixels)} is not a positive multiple of {step} "
                                 f"(the VAE's scale factor {vae_scale_factor} times the patch {patch})")
            if pixels // vae_scale_factor > LATENT_SIDE.high:
                raise ValueError(f"--image-size: the {name} {pixels} is over {LATENT_SIDE.high * vae_scale_factor} "
                                 f"pixels ({LATENT_SIDE.high} latents at the VAE's scale factor {vae_scale_factor})")
        latents = (frame_latents(frames), height // vae_scale_factor, width // vae_scale_factor)
        if latents[0] % patch_t:
            raise ValueError(f"--num-frames {frames}: its {latents[0]} latent frames are not a multiple of the "
                             f"transformer's temporal patch {patch_t}")
        positions = config.get("rope_max_seq_len") or 1024
        grid = (latents[0] // patch_t, latents[1] // patch_h, latents[2] // patch_w)
        if max(grid) > positions:
            raise ValueError(f"--num-frames {frames} --image-size {height}x{width}: {max(grid)} patches on an axis; "
                             f"the transformer's rotary embedding has {positions} positions (rope_max_seq_len)")
        return DiffusersConfig(config.transformer_class, config.transformer, latent_shape=latents)

    def latent_shape(self, config: DiffusersConfig) -> tuple[int, int, int]:
        """(F', H', W'): the build's, or the pipeline's default clip."""
        if config.latent_shape is not None:
            return config.latent_shape
        return (frame_latents(DEFAULT_NUM_FRAMES), DEFAULT_HEIGHT // 8, DEFAULT_WIDTH // 8)

    def adapt_blocks(self, transformer, config: DiffusersConfig) -> None:
        """Every attention runs :class:`TraceableWanAttention` (diffusers' arithmetic, a traceable rotary product)."""
        for block in transformer.blocks:
            block.attn1.set_processor(TraceableWanAttention())
            block.attn2.set_processor(TraceableWanAttention())

    # -- sizes -------------------------------------------------------------------------------------------------------
    def num_tokens(self, config: DiffusersConfig) -> int:
        frames, height, width = self.latent_shape(config)
        patch_t, patch_h, patch_w = config["patch_size"]
        return (frames // patch_t) * (height // patch_h) * (width // patch_w)

    # -- graph interface ---------------------------------------------------------------------------------------------
    def sample_spec(self, config: DiffusersConfig) -> TensorSpec:
        return TensorSpec("hidden_states", "float32", (self.in_channels(config), *self.latent_shape(config)),
                          "sample")

    def graph_output(self, config: DiffusersConfig) -> TensorSpec:
        return TensorSpec("noise_pred", "float32", (self.out_channels(config), *self.latent_shape(config)), "output")

    def vae_latents(self, config: DiffusersConfig) -> tuple[int, ...]:
        """The sample itself, (C, F', H', W')."""
        return tuple(self.sample_spec(config).shape)


FAMILY = WanDiffusersFamily("diffusers-wan", DECLARATION, sizes=WAN_SIZES)
