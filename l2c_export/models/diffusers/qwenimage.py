"""``QwenImageTransformer2DModel`` (Qwen-Image) as ``QwenImagePipeline`` samples it: an MMDiT whose every block runs
joint attention over an image and a text stream, then an MLP per stream.

Sub-layers, per block in forward order: ``attn`` (the joint attention; it returns (image (N, T, D), text (N, L, D)),
cached as one (N, T + L, D), image first, split back where reused: SD3's :class:`.sd3.JointAttentionPacking`),
``img_mlp`` (N, T, D) and ``txt_mlp`` (N, L, D). Both streams' adaLN modulation, gates and residual adds run every
call.

Latents are packed as the pipeline packs them, (N, T, 4 C), T = (H / 2) (W / 2) for latents H x W = pixels over the
VAE's scale factor (``build --image-size``; default the pipeline's 1024 px): FLUX.1's sizing, which this family shares
(:class:`.flux.FluxDiffusersFamily`). The model predicts the flow-matching velocity (N, T, 4 C) (``proj_out``: the
2x2 patch of ``out_channels``).

Conditioning: ``prompt_embeds`` (N, L, joint_attention_dim) and ``prompt_embeds_mask`` (N, L), 1 keep / 0 padding
(graph inputs ``encoder_hidden_states``, ``encoder_hidden_states_mask``). The pipeline calls the transformer twice per
step, the prompt then the negative prompt, each at its own length; the runtime runs both as one 2N batch, the shorter
padded with zero embeddings under mask 0 (:func:`l2c_export.samplers.conditioning.pad_prompt_pair`). That equals the
two calls to float rounding: text token i sits at rotary position ``max_vid_index + i`` whatever the length, a
masked token is never attended to, and everything else is per token. ``--cfg-scale`` is the pipeline's
``true_cfg_scale``: ``u + s (c - u)`` rescaled per token to the norm of ``c`` (manifest ``guidance/norm_rescale``).

The rotary embedding: the pipeline's positions (``img_shapes`` = [(1, h, w)] at the build's size, ``pos_embed``'s
tables), applied in real arithmetic (:class:`RealRotaryJointAttention`; diffusers multiplies complex numbers, which
ONNX has no type for); the image's cos/sin are constants of the graph, the text's gathered from a constant table by
position, so the prompt axis stays dynamic. The timestep fed is the scheduler's (0..1000); the graph divides it by
1000, as the pipeline does.

The VAE kind is ``AutoencoderKLQwenImage`` (:meth:`QwenImageDiffusersFamily.vae_decoder`): one frame decoded, the
per-channel ``latents_mean``/``latents_std`` applied inside the decoder graph. The Qwen2.5-VL text encoder is not
carried: a build takes prompt embeddings.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

from .. import TensorSpec
from . import JOINT_TOKENS, PROMPT_TOKENS, DiffusersConfig, DiffusersFamily, DiffusersFolderError, OutputPacking
from ...core.util import short_repr
from .flux import FluxDiffusersFamily
from .sd3 import JointAttentionPacking
from .sizes import (QWEN_IMAGE_SIZES, QWEN_ROPE_AXES, QWEN_VAE_MULTIPLIERS, QWEN_VAE_SIZES, TRANSFORMER_SIZES,
                    check_integer_list, check_sizes)

MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline's max_sequence_length default: the longest prompt_embeds it keeps
TEXT_POSITIONS = 1024  # the pipeline's bound on max_sequence_length: the text rotary table's rows


def _rotate(x, cos, sin):
    """diffusers' ``apply_rotary_emb_qwen(x, freqs, use_real=False)`` in real arithmetic: x (N, S, H, D), its
    interleaved pairs the complex numbers; cos, sin (S, D / 2) the real and imaginary parts of ``freqs``."""
    import torch

    pairs = x.float().unflatten(-1, (-1, 2))  # unflatten, not reshape: the tracer keeps N and S dynamic
    real, imag = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None], sin[:, None]  # (S, 1, D / 2), against the heads
    return torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(3).type_as(x)


class RealRotaryJointAttention:
    """``QwenDoubleStreamAttnProcessor2_0`` with :func:`_rotate` for its complex rotary product and the streams
    split at the image's token count from the end (the text's length varies per request): hidden_states (N, T, D),
    encoder_hidden_states (N, L, D), encoder_hidden_states_mask (N, L) bool, image_rotary_emb ((cos, sin) of the
    image (T, D / 2), of the text (L, D / 2)) -> (image (N, T, D), text (N, L, D))."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        import torch
        import torch.nn.functional as F

        image_tokens = hidden_states.shape[1]  # fixed by the build's image size
        if encoder_hidden_states_mask is not None:
            image_mask = torch.ones_like(hidden_states[..., 0], dtype=torch.bool)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)[:, None, None, :]
        head_dim = attn.inner_dim // attn.heads
        streams = []
        for stream, (q, k, v), (norm_q, norm_k) in (
                (hidden_states, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k)),
                (encoder_hidden_states, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                 (attn.norm_added_q, attn.norm_added_k))):
            query, key, value = (proj(stream).unflatten(-1, (-1, head_dim)) for proj in (q, k, v))
            query = norm_q(query) if norm_q is not None else query
            key = norm_k(key) if norm_k is not None else key
            streams.append([query, key, value])
        if image_rotary_emb is not None:
            for (query_key, (cos, sin)) in zip(streams, image_rotary_emb):
                query_key[0], query_key[1] = _rotate(query_key[0], cos, sin), _rotate(query_key[1], cos, sin)
        image, text = streams
        # text first, as diffusers joins them; (N, S, H, D) -> SDPA's (N, H, S, D) and back, as its native backend
        query, key, value = (torch.cat([t, i], dim=1).transpose(1, 2) for t, i in zip(text, image))
        joint = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                               is_causal=False)
        joint = joint.transpose(1, 2).flatten(2, 3).to(query.dtype)
        text_out, image_out = joint[:, :-image_tokens], joint[:, -image_tokens:]
        image_out = attn.to_out[0](image_out.contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)  # dropout
        return image_out, attn.to_add_out(text_out.contiguous())


class QwenImageDiffusersFamily(FluxDiffusersFamily):
    name = "diffusers-qwenimage"
    transformer_class = "QwenImageTransformer2DModel"
    pipeline_classes = ("QwenImagePipeline",)
    scheduler_classes = ("FlowMatchEulerDiscreteScheduler",)
    # The VAE decoder (AutoencoderKLQwenImage, one frame) is carried; the Qwen2.5-VL text encoder is not, so a build
    # takes prompt embeddings.
    component_parts = ("vae",)
    vae_class = "AutoencoderKLQwenImage"
    classifier_free = True  # true CFG: the negative prompt runs as the unconditional half ...
    norm_rescale = True  # ... and the combination is rescaled per token to the conditional norm
    # the pipeline packs 2x2 latent patches; the base Qwen-Image (no Edit's zero_cond_t, no Layered's extras)
    required = {"patch_size": 2, "guidance_embeds": False, "zero_cond_t": False, "use_additional_t_cond": False,
                "use_layer3d_rope": False}
    default_steps = 50  # the pipeline's num_inference_steps
    default_cfg_scale = 4.0  # the pipeline's true_cfg_scale
    dummy_prompt_tokens = 5
    sizes = {**{k: v for k, v in TRANSFORMER_SIZES.items() if k != "sample_size"}, **QWEN_IMAGE_SIZES}

    def check_config(self, config: DiffusersConfig, where: str) -> None:
        DiffusersFamily.check_config(self, config, where)
        check_integer_list(config, "axes_dims_rope", QWEN_ROPE_AXES, where, DiffusersFolderError, (3, 3))
        axes = config.get("axes_dims_rope") or (16, 56, 56)
        if any(axis % 2 for axis in axes) or sum(axes) != config["attention_head_dim"]:
            raise DiffusersFolderError(f"{where}: field 'axes_dims_rope' is {short_repr(config.get('axes_dims_rope'))}"
                                       f"; expected three even sizes summing to attention_head_dim "
                                       f"{config['attention_head_dim']}")
        if config["in_channels"] % 4:
            raise DiffusersFolderError(f"{where}: field 'in_channels' is {config['in_channels']}; expected 4 x the "
                                       f"VAE's latent channels (the pipeline packs 2x2 patches)")

    def out_channels(self, config: DiffusersConfig) -> int:
        """``proj_out``'s width: a 2x2 patch of ``out_channels`` (16 for Qwen-Image: 64, the packed sample's)."""
        return config["patch_size"] ** 2 * (config.get("out_channels") or config["in_channels"])

    def num_layers(self, config: DiffusersConfig) -> int:
        return config["num_layers"]

    # -- the VAE: AutoencoderKLQwenImage ----------------------------------------------------------------------------
    def vae_scale_factor(self, vae_config: dict, where: str) -> int:
        """``QwenImagePipeline``'s ``2 ** len(vae.temperal_downsample)`` (an ``AutoencoderKLQwenImage``)."""
        levels = vae_config.get("temperal_downsample")
        if not (isinstance(levels, list) and 1 <= len(levels) <= 8 and all(isinstance(v, bool) for v in levels)):
            raise DiffusersFolderError(f"{where}: field 'temperal_downsample' is {short_repr(levels)}; expected a "
                                       f"list of 1 to 8 booleans (AutoencoderKLQwenImage)")
        return 2 ** len(levels)

    def vae_decoder_width(self, vae_config: dict) -> tuple[int, str]:
        return vae_config["base_dim"] * vae_config["dim_mult"][0], "base_dim"

    def check_vae_config(self, raw: dict, where: str, config: DiffusersConfig) -> None:
        """An ``AutoencoderKLQwenImage``: sizes in bounds, one temporal flag per level after the first, ``z_dim`` the
        transformer's latent channels, ``latents_mean`` and ``latents_std`` one finite number per channel (std
        positive: the pipeline divides by its inverse)."""
        check_sizes(raw, QWEN_VAE_SIZES, where, DiffusersFolderError)
        check_integer_list(raw, "dim_mult", QWEN_VAE_MULTIPLIERS, where, DiffusersFolderError, (1, 8))
        self.vae_scale_factor(raw, where)  # temperal_downsample: a list of flags
        flags, levels = raw["temperal_downsample"], len(raw["dim_mult"])
        if len(flags) != levels - 1:
            raise DiffusersFolderError(f"{where}: field 'temperal_downsample' is {short_repr(flags)}; expected one "
                                       f"flag per level after the first ({levels - 1}, dim_mult has {levels})")
        channels = self.vae_latents(config)[0]
        if raw["z_dim"] != channels:
            raise DiffusersFolderError(f"{where}: field 'z_dim' is {raw['z_dim']}; the transformer samples {channels} "
                                       f"latent channels")
        for key, low in (("latents_mean", -math.inf), ("latents_std", 0.0)):
            values = raw.get(key)
            if not (isinstance(values, list) and len(values) == channels and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > low
                    for v in values)):
                raise DiffusersFolderError(f"{where}: field {key!r} is {short_repr(values)}; expected {channels} "
                                           f"finite numbers{' > 0' if low == 0 else ''} (one per latent channel)")
        if raw.get("attn_scales"):
            raise DiffusersFolderError(f"{where}: field 'attn_scales' is {short_repr(raw['attn_scales'])}; "
                                       f"AutoencoderKLQwenImage's decoder ignores it: expected [] as Qwen-Image's")

    def vae_decoder(self, source: Path, exporting: bool = False):
        """``QwenImagePipeline``'s decode of one frame: ``latents`` (N, C, h, w) unpacked -> ``latents *
        latents_std + latents_mean`` per channel (its ``latents / (1 / std) + mean``), as (N, C, 1, h, w) ->
        ``vae.decode(...)[:, :, 0]`` (N, 3, H, W) in [-1, 1]. The per-channel factors are in the module (the record's
        ``scaling_factor`` is 1). ``exporting``: the 2x ``nearest-exact`` upsamplings run as ``nearest`` (the same
        at a scale of 2: output pixel i reads input pixel floor(i / 2); the TorchScript exporter has no
        nearest-exact)."""
        import torch

        from ...core.extras import import_extra

        vae = import_extra("diffusers", "exporting the VAE decoder").AutoencoderKLQwenImage.from_pretrained(
            str(source), use_safetensors=True, local_files_only=True).float().eval()
        if exporting:
            for module in vae.modules():
                if isinstance(module, torch.nn.Upsample) and module.mode == "nearest-exact":
                    if tuple(module.scale_factor) != (2.0, 2.0):
                        raise ValueError(f"{source}: an upsampling by {module.scale_factor}; the exported decoder "
                                         f"runs nearest-exact only at a scale of 2")
                    module.mode = "nearest"
        channels = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, channels, 1, 1, 1)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, channels, 1, 1, 1)

        class Decoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.vae = vae

            def forward(self, latents):
                frames = latents.unsqueeze(2) / inverse_std + mean
                return self.vae.decode(frames, return_dict=False)[0][:, :, 0]

        return Decoder().eval(), {"scaling_factor": 1.0}

    # -- sub-layers --------------------------------------------------------------------------------------------------
    def sublayer_names(self, config: DiffusersConfig) -> tuple[str, ...]:
        return tuple(f"{self.blocks}.{i}.{name}" for i in range(config["num_layers"])
                     for name in ("attn", "img_mlp", "txt_mlp"))

    def cached_shapes(self, config: DiffusersConfig) -> tuple[tuple[int | str, ...], ...]:
        dim, tokens = self.inner_dim(config), self.num_tokens(config)
        by_kind = {"attn": (JOINT_TOKENS, dim), "img_mlp": (tokens, dim), "txt_mlp": (PROMPT_TOKENS, dim)}
        return tuple(by_kind[name.rsplit(".", 1)[1]] for name in self.sublayer_names(config))

    def output_packing(self, transformer, config: DiffusersConfig, path: str) -> OutputPacking | None:
        return JointAttentionPacking() if path.endswith(".attn") else None

    def adapt_blocks(self, transformer, config: DiffusersConfig) -> None:
        """Each joint attention runs :class:`RealRotaryJointAttention`; the rotary tables are made once, here, so
        that the exporter's trace sees constants (diffusers makes them with complex arithmetic)."""
        for block in transformer.transformer_blocks:
            block.attn.set_processor(RealRotaryJointAttention())
        transformer._l2c_rotary_tables = self.rotary_tables(transformer, config)

    @contextlib.contextmanager
    def export_context(self):
        yield

    # -- graph interface ---------------------------------------------------------------------------------------------
    def graph_inputs(self, config: DiffusersConfig) -> list[TensorSpec]:
        return [self.sample_spec(config), TensorSpec("timestep", "float32", (), "time"),
                TensorSpec("encoder_hidden_states", "float32", (PROMPT_TOKENS, config["joint_attention_dim"]),
                           "prompt_embeds"),
                TensorSpec("encoder_hidden_states_mask", "float32", (PROMPT_TOKENS,), "prompt_embeds_mask")]

    def dummy_inputs(self, config: DiffusersConfig, batch: int, tokens: int | None = None) -> tuple:
        import torch

        tokens = tokens or self.dummy_prompt_tokens
        return (torch.zeros(batch, self.num_tokens(config), config["in_channels"]), torch.full((batch,), 500.0),
                torch.zeros(batch, tokens, config["joint_attention_dim"]), torch.ones(batch, tokens))

    def macs_inputs(self, config: DiffusersConfig) -> tuple:
        return self.dummy_inputs(config, 1, tokens=MAX_SEQUENCE_LENGTH)

    def max_prompt_tokens(self, pipeline_class: str) -> int:
        return MAX_SEQUENCE_LENGTH

    def text_channels(self, config: DiffusersConfig) -> int:
        return config["joint_attention_dim"]

    def rotary_tables(self, transformer, config: DiffusersConfig):
        """((cos, sin) of the image tokens (T, D / 2), (cos, sin) of text positions 0..TEXT_POSITIONS - 1): what
        ``pos_embed`` returns for the pipeline's ``img_shapes`` [(1, h, w)] (h = w = the packed side), as real
        tables."""
        import torch

        side = self.latent_size(config) // 2
        pos_embed = transformer.pos_embed
        with torch.no_grad():
            image, text = pos_embed([(1, side, side)], max_txt_seq_len=TEXT_POSITIONS,
                                    device=pos_embed.pos_freqs.device)
            return tuple((table.real.contiguous(), table.imag.contiguous()) for table in (image, text))

    def run_transformer(self, transformer, config: DiffusersConfig, hidden_states, timestep, encoder_hidden_states,
                        encoder_hidden_states_mask):
        """``QwenImageTransformer2DModel.forward`` as the pipeline calls it: hidden_states (N, T, C) packed,
        timestep (N,) the scheduler's (0..1000), encoder_hidden_states (N, L, joint_attention_dim),
        encoder_hidden_states_mask (N, L) 1 keep / 0 padding -> the velocity (N, T, C_out). The blocks are
        diffusers'; the rotary tables (:meth:`rotary_tables`) are gathered here."""
        import torch

        device = hidden_states.device
        (image_cos, image_sin), (text_cos, text_sin) = transformer._l2c_rotary_tables
        # text positions 0..L-1 from the prompt's own axis (a size read as an int would be traced as a constant)
        positions = (torch.cumsum(torch.ones_like(encoder_hidden_states_mask[0]), 0) - 1).long()
        rotary = ((image_cos.to(device), image_sin.to(device)),
                  (text_cos.to(device).index_select(0, positions), text_sin.to(device).index_select(0, positions)))
        hidden = transformer.img_in(hidden_states)
        temb = transformer.time_text_embed((timestep / 1000).to(hidden.dtype), hidden)
        text = transformer.txt_in(transformer.txt_norm(encoder_hidden_states))
        mask = encoder_hidden_states_mask.to(torch.bool)
        for block in transformer.transformer_blocks:
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, encoder_hidden_states_mask=mask,
                                 temb=temb, image_rotary_emb=rotary)
        return transformer.proj_out(transformer.norm_out(hidden, temb))


FAMILY = QwenImageDiffusersFamily()
