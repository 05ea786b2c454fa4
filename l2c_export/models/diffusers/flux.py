"""``FluxTransformer2DModel`` (FLUX.1) as ``FluxPipeline`` samples it: double-stream blocks like SD3's, then
single-stream blocks whose attention and MLP run side by side over the text and image tokens together.

Sub-layers, in forward order:

- ``transformer_blocks.{i}.attn`` (joint attention; cached value both streams' outputs, (N, T + L, D), image
  first), ``.ff`` (image stream, (N, T, D)) and ``.ff_context`` (text stream, (N, L, D)), as in SD3;
- ``single_transformer_blocks.{j}.attn`` and ``.proj_mlp``: the two branches, which meet in one ``proj_out`` over
  their concatenation. That map is linear, so each branch is cached *with its share of it*: the attention branch's
  value is ``attn(x) @ proj_out.weight[:, :D].T`` and the MLP branch's ``act_mlp(proj_mlp(x)) @
  proj_out.weight[:, D:].T``, both (N, L + T, D); the block adds the two shares and ``proj_out``'s bias every call,
  then its gate and residual. A reused branch costs nothing of its own (not even its share of ``proj_out``, nor the
  MLP's activation). The block's forward is replaced by that sum (:func:`_single_block_forward`); diffusers' with
  the branches hooked to their last outputs computes the same (to float rounding: one matmul split in two).

Everything else (adaLN modulation, gates, residual adds, the rotary embedding) runs every call.

Conditioning: ``prompt_embeds`` (N, L, joint_attention_dim) and ``pooled_prompt_embeds`` (N, pooled_projection_dim),
never guided by a negative batch: FLUX.1-dev is guidance-distilled, ``--cfg-scale`` is the pipeline's
``guidance_scale`` fed to its guidance embedding (input ``guidance``, (N,)), and FLUX.1-schnell has none. The text and
image position ids are derived inside the graph as the pipeline derives them: zeros (L, 3) for the text, (row, column)
of each 2x2 latent patch for the image. Latents are packed as the pipeline packs them, (N, T, 4 C), T = (H / 2) *
(W / 2) for latents H x W = pixels over the VAE's scale factor (``build --image-size``; default the pipeline's
1024 px). The timestep fed is the scheduler's (0..1000); the graph divides it by 1000, as the pipeline does.
"""

from __future__ import annotations

import contextlib
import functools

from .. import TensorSpec
from ...core.interface import GUIDANCE_EMBEDDING, PACKED_2X2, SCALAR
from ...core.latents import unpacked_2x2_shape
from ...core.util import short_repr
from .cache import OutputPacking
from .declaration import JOINT, PROMPT, Blocks, Conditioning, Declaration, EncodePrompt, FlowTimesteps, Guidance
from .family import DiffusersConfig, refuse_num_frames
from .files import DiffusersFolderError
from .mmdit import TEXT_CONDITIONING, MMDiTFamily, without_negatives
from .sizes import FLUX_ROPE_AXES, FLUX_SIZES, LATENT_SIDE, TRANSFORMER_SIZES, check_integer_list
from .text_encoders import TOKENIZER_MAX_LENGTH, TextEncoder, TextEncoderStack

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's max_sequence_length: T5's tokens, the whole prompt_embeds
DEFAULT_LATENT_SIZE = 128  # FluxPipeline's default_sample_size: 1024 px at the VAE's scale factor 8

DECLARATION = Declaration(
    transformer_class="FluxTransformer2DModel",
    pipeline_classes=("FluxPipeline",),
    blocks=(Blocks(sublayers=("attn", "ff", "ff_context"), cached={"attn": JOINT, "ff_context": PROMPT}),
            # the branches' proj_out shares span the text and image tokens
            Blocks(sublayers=("attn", "proj_mlp"), path="single_transformer_blocks", count="num_single_layers",
                   cached={"attn": JOINT, "proj_mlp": JOINT})),
    # no negatives: FluxPipeline runs no second half; FLUX.1-dev's guidance embedding takes the scale (schnell has none)
    conditioning=(*without_negatives(TEXT_CONDITIONING),
                  Conditioning(argument="guidance_scale", input="guidance", kind=SCALAR, when="guidance_embeds")),
    guidance=Guidance(default_scale=3.5, rule=GUIDANCE_EMBEDDING),  # the pipeline's guidance_scale
    scheduler_classes=("FlowMatchEulerDiscreteScheduler",),
    flow_timesteps=FlowTimesteps(linspace_sigmas=True, default_max_shift=1.15),
    latent_layout=PACKED_2X2,  # FluxPipeline._pack_latents; unpacked before the VAE
    # FluxPipeline.encode_prompt: CLIP-L's pooled output (77 tokens in) and T5's last hidden state
    text_encoders=TextEncoderStack(
        encoders=(TextEncoder("text_encoder", "tokenizer", "clip", ("pooled",), length=TOKENIZER_MAX_LENGTH),
                  TextEncoder("text_encoder_2", "tokenizer_2", "t5", ("last_hidden_state",))),
        arrays=(("prompt_embeds", (("text_encoder_2/last_hidden_state",),)),
                ("pooled_prompt_embeds", (("text_encoder/pooled",),)))),
    default_steps=28,  # the pipeline's num_inference_steps
    max_sequence_length={"FluxPipeline": MAX_SEQUENCE_LENGTH},
    macs_prompt_tokens=MAX_SEQUENCE_LENGTH,  # FLUX.1-dev's: MACs are counted there
    required={"patch_size": 1},  # the pipeline packs 2x2 latent patches itself
    # (prompt_embeds, pooled_prompt_embeds, text_ids): the text ids are made by the runtime, not fed
    encode_prompt=EncodePrompt(("prompt_embeds", "pooled_prompt_embeds", None), guided=False),
)


class ProjOutShare(OutputPacking):
    """A single-stream branch cached with its share of ``proj_out``: ``act(output) @ weight[:, start:stop].T``
    (N, L + T, D), no bias (added every call). Nothing to unpack: the block sums the shares."""

    def __init__(self, proj_out, start: int, stop: int, activation=None):
        self.proj_out, self.start, self.stop, self.activation = proj_out, start, stop, activation

    def pack(self, output, args, kwargs):
        import torch.nn.functional as F

        branch = output if self.activation is None else self.activation(output)
        return F.linear(branch, self.proj_out.weight[:, self.start:self.stop])

    def unpack(self, value, args, kwargs):
        return value

    def macs(self, value) -> int:
        """The share's matrix product: every output value sums ``stop - start`` products."""
        return value.numel() * (self.stop - self.start)


def _single_block_forward(block, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None,
                          joint_attention_kwargs=None):
    """``FluxSingleTransformerBlock.forward`` with ``proj_out(cat(attn, act(mlp)))`` as the sum of the branches'
    cached shares plus the bias: hidden_states (N, T, D), encoder_hidden_states (N, L, D) -> (text, image) as
    diffusers returns them."""
    import torch

    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = block.norm(hidden_states, emb=temb)
    attn_share = block.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                            **(joint_attention_kwargs or {}))
    mlp_share = block.proj_mlp(norm_hidden_states)
    hidden_states = residual + gate.unsqueeze(1) * (attn_share + mlp_share + block.proj_out.bias)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]


def _traceable_rotary(original, x, freqs_cis, use_real: bool = True, use_real_unbind_dim: int = -1,
                      sequence_dim: int = 2):
    """diffusers' ``apply_rotary_emb`` as FLUX.1 calls it (real, pairs interleaved), with ``x.unflatten(-1, (-1, 2))``
    for its ``x.reshape(*x.shape[:-1], -1, 2)``: the same view, but the TorchScript tracer records that reshape's
    sizes as constants, which would fix the prompt length and batch of the exported graph."""
    import torch

    if not (use_real and use_real_unbind_dim == -1):
        return original(x, freqs_cis, use_real=use_real, use_real_unbind_dim=use_real_unbind_dim,
                        sequence_dim=sequence_dim)
    cos, sin = freqs_cis  # (S, D)
    index = (None, None, slice(None), slice(None)) if sequence_dim == 2 else (None, slice(None), None, slice(None))
    cos, sin = cos[index].to(x.device), sin[index].to(x.device)
    x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


class FluxDiffusersFamily(MMDiTFamily):
    """The declaration, with what FLUX.1's packed sample, single-stream blocks and position ids need in code."""

    def check_config(self, config: DiffusersConfig, where: str) -> None:
        super().check_config(config, where)
        if config["in_channels"] % 4:
            raise DiffusersFolderError(f"{where}: field 'in_channels' is {config['in_channels']}; expected 4 x the "
                                       f"VAE's latent channels (the pipeline packs 2x2 patches)")
        check_integer_list(config, "axes_dims_rope", FLUX_ROPE_AXES, where, DiffusersFolderError, (1, 8))
        if sum(config.get("axes_dims_rope") or (16, 56, 56)) != config["attention_head_dim"]:
            axes = short_repr(config.get("axes_dims_rope"))
            raise DiffusersFolderError(f"{where}: field 'axes_dims_rope' is {axes}; its sum must be "
                                       f"attention_head_dim {config['attention_head_dim']}")

    def latent_size(self, config: DiffusersConfig) -> int:
        return config.latent_size or DEFAULT_LATENT_SIZE

    def sized_config(self, config: DiffusersConfig, image_size: int | tuple[int, int] | None, vae_scale_factor: int,
                     num_frames: int | None = None) -> DiffusersConfig:
        """``--image-size PIXELS``: the latents are ``2 * (pixels // (vae_scale_factor * 2))`` on a side, as
        ``FluxPipeline.prepare_latents`` computes; default its 128 * vae_scale_factor pixels."""
        refuse_num_frames(self, config, num_frames)
        if isinstance(image_size, tuple):
            raise ValueError(f"--image-size {image_size[0]}x{image_size[1]}: a {config.transformer_class} samples "
                             f"squares; give one size in pixels")
        pixels = DEFAULT_LATENT_SIZE * vae_scale_factor if image_size is None else image_size
        if not isinstance(pixels, int) or pixels < 2 * vae_scale_factor or pixels % (2 * vae_scale_factor):
            raise ValueError(f"--image-size {short_repr(pixels)}: expected a positive multiple of "
                             f"{2 * vae_scale_factor} (the VAE's scale factor {vae_scale_factor} times the pipeline's "
                             f"2x2 packing)")
        if pixels // vae_scale_factor > LATENT_SIDE.high:
            raise ValueError(f"--image-size {pixels}: expected at most {LATENT_SIDE.high * vae_scale_factor} pixels "
                             f"({LATENT_SIDE.high} latents on a side at the VAE's scale factor {vae_scale_factor}; "
                             f"FLUX.1 and Qwen-Image sample up to about 2 megapixels)")
        return DiffusersConfig(config.transformer_class, config.transformer, latent_size=pixels // vae_scale_factor)

    # -- sizes -------------------------------------------------------------------------------------------------------
    def num_tokens(self, config: DiffusersConfig) -> int:
        return (self.latent_size(config) // 2) ** 2

    def vae_latents(self, config: DiffusersConfig) -> tuple[int, int, int]:
        """The packed sample (T, 4 C) unpacked, (C, h, w) (``FluxPipeline._unpack_latents``)."""
        side = self.latent_size(config)
        return unpacked_2x2_shape(self.sample_spec(config).shape, side, side)

    def out_channels(self, config: DiffusersConfig) -> int:
        return config.get("out_channels") or config["in_channels"]

    # -- sub-layers --------------------------------------------------------------------------------------------------
    def output_packing(self, transformer, config: DiffusersConfig, path: str) -> OutputPacking | None:
        if path.startswith("single_transformer_blocks."):
            block = transformer.get_submodule(path.rsplit(".", 1)[0])
            dim = self.inner_dim(config)
            if path.endswith(".attn"):
                return ProjOutShare(block.proj_out, 0, dim)
            return ProjOutShare(block.proj_out, dim, block.proj_out.in_features, block.act_mlp)
        return super().output_packing(transformer, config, path)

    def adapt_blocks(self, transformer, config: DiffusersConfig) -> None:
        for block in transformer.single_transformer_blocks:
            block.forward = functools.partial(_single_block_forward, block)

    @contextlib.contextmanager
    def export_context(self):
        """The trace runs the attention processors with :func:`_traceable_rotary`."""
        from ...core.extras import import_extra

        transformer_flux = import_extra("diffusers.models.transformers.transformer_flux")

        original = transformer_flux.apply_rotary_emb
        transformer_flux.apply_rotary_emb = functools.partial(_traceable_rotary, original)
        try:
            yield
        finally:
            transformer_flux.apply_rotary_emb = original

    # -- graph interface ---------------------------------------------------------------------------------------------
    def sample_spec(self, config: DiffusersConfig) -> TensorSpec:
        return TensorSpec("hidden_states", "float32", (self.num_tokens(config), config["in_channels"]), "sample")

    def graph_output(self, config: DiffusersConfig) -> TensorSpec:
        return TensorSpec("noise_pred", "float32", (self.num_tokens(config), self.out_channels(config)), "output")

    def image_ids(self, config: DiffusersConfig):
        """(T, 3) float32: ``FluxPipeline._prepare_latent_image_ids``: (0, row, column) of each packed patch."""
        import torch

        side = self.latent_size(config) // 2
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = ids[..., 1] + torch.arange(side)[:, None]
        ids[..., 2] = ids[..., 2] + torch.arange(side)[None, :]
        return ids.reshape(side * side, 3)

    def run_transformer(self, transformer, config: DiffusersConfig, hidden_states, timestep, encoder_hidden_states,
                        pooled_projections, guidance=None):
        """hidden_states (N, T, C) packed, timestep (N,) the scheduler's (0..1000), encoder_hidden_states (N, L,
        joint_attention_dim), pooled_projections (N, P), guidance (N,) or None -> the velocity (N, T, C_out)."""
        import torch

        # zeros (L, 3) shaped after the prompt, so that the traced graph keeps L dynamic (a size read as an int is
        # traced as a constant)
        text_ids = torch.zeros_like(encoder_hidden_states[0, :, :3], dtype=hidden_states.dtype)
        return transformer(hidden_states=hidden_states, timestep=timestep / 1000, guidance=guidance,
                           pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                           txt_ids=text_ids, img_ids=self.image_ids(config).to(hidden_states.dtype),
                           return_dict=False)[0]

    # -- sampling ----------------------------------------------------------------------------------------------------
    def guided_channels(self, config: DiffusersConfig, guide_all: bool = False) -> int:
        """No classifier-free batch runs; the whole packed sample (its axis 1, the tokens) is the model's output."""
        return self.num_tokens(config)

    def sampler_channels(self, config: DiffusersConfig) -> int | None:
        return None


FAMILY = FluxDiffusersFamily("diffusers-flux", DECLARATION,
                             sizes={**{k: v for k, v in TRANSFORMER_SIZES.items() if k != "sample_size"}, **FLUX_SIZES})
