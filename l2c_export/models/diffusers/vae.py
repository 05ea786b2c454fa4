"""The VAE kinds a declaration names (:class:`~.declaration.VaeKind` ``kind``), each what the folder checks,
the memory estimate, the component exporter and ``verify`` ask of a VAE: its scale factor, its config checks, the
width of its decoder's full-resolution activations, and its decoder as a module.

- ``scale_shift``: an ``AutoencoderKL``; the pipelines decode ``latents / scaling_factor + shift_factor`` (the
  record's fields; the runtime applies them before the decoder graph).
- ``mean_std``: an ``AutoencoderKLQwenImage`` (Qwen-Image; Wan 2.1's layout), one frame decoded; the pipeline
  decodes ``latents * latents_std + latents_mean`` per channel, applied inside the decoder graph (the record's
  ``scaling_factor`` is 1).
- ``dc_ae``: an ``AutoencoderDC`` (DC-AE, Sana's 32x); the pipeline decodes ``latents / scaling_factor`` (1 where
  the config has none), its scale factor from the encoder's levels.

No PyTorch at import: the folder checks read configs only.
"""

from __future__ import annotations

import math
from pathlib import Path

from ...core.util import short_repr
from .files import DiffusersFolderError
from .sizes import (DC_VAE_LAYERS, DC_VAE_SIZES, QWEN_VAE_MULTIPLIERS, QWEN_VAE_SIZES, VAE_CHANNELS, VAE_LEVELS,
                    VAE_SIZES, check_integer_list, check_sizes, is_integer)


def _load(class_name: str, source: Path):
    from ...core.extras import import_extra

    return getattr(import_extra("diffusers", "exporting the VAE decoder"), class_name).from_pretrained(
        str(source), use_safetensors=True, local_files_only=True).float().eval()


def _plain_decoder(vae):
    """(module, record fields) of a VAE the pipeline decodes as ``vae.decode(latents / scaling_factor +
    shift_factor)``: the module maps the scaled latents (N, C, h, w) -> ``sample`` (N, 3, H, W); the runtime applies
    the record's ``scaling_factor`` (and ``shift_factor``, where the config has one) before it."""
    import torch

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, latents):
            return self.vae.decode(latents, return_dict=False)[0]

    shift = getattr(vae.config, "shift_factor", None)
    return Decoder().eval(), {"scaling_factor": float(vae.config.scaling_factor),
                              **({} if shift is None else {"shift_factor": float(shift)})}


def _check_latents_and_scaling(raw: dict, where: str, channels: int, default_scaling: float) -> None:
    """Refuses latent channels other than the transformer's (``channels``) and a ``scaling_factor`` (``default_scaling``
    where the config has none) that is not a positive finite number."""
    if raw.get("latent_channels") != channels:
        raise DiffusersFolderError(f"{where}: field 'latent_channels' is {short_repr(raw.get('latent_channels'))}; "
                                   f"the transformer samples {channels} latent channels")
    scale = raw.get("scaling_factor", default_scaling)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not 1e-6 <= scale <= 1e6:
        raise DiffusersFolderError(f"{where}: field 'scaling_factor' is {short_repr(scale)}; expected a positive "
                                   f"number")


class ScaleShiftVae:
    """An ``AutoencoderKL``: scale factor ``2 ** (len(block_out_channels) - 1)``."""

    def scale_factor(self, raw: dict, where: str) -> int:
        check_integer_list(raw, "block_out_channels", VAE_CHANNELS, where, DiffusersFolderError, VAE_LEVELS)
        return 2 ** (len(raw["block_out_channels"]) - 1)

    def decoder_width(self, raw: dict) -> tuple[int, str]:
        """(channels of the decoder's full-resolution activations, the config field that sets them)."""
        return (raw.get("block_out_channels") or (64,))[0], "block_out_channels"

    def check(self, raw: dict, where: str, channels: int) -> None:
        """Refuses, naming the field, sizes out of bounds, latent channels other than the transformer's
        (``channels``), factors that are not finite."""
        check_sizes(raw, VAE_SIZES, where, DiffusersFolderError)
        check_integer_list(raw, "block_out_channels", VAE_CHANNELS, where, DiffusersFolderError, VAE_LEVELS)
        groups = raw.get("norm_num_groups") or 32
        if any(c % groups for c in raw["block_out_channels"]):
            raise DiffusersFolderError(f"{where}: field 'block_out_channels' is {short_repr(raw['block_out_channels'])}"
                                       f"; each must be a multiple of norm_num_groups {groups}")
        for key in ("down_block_types", "up_block_types"):
            blocks = raw.get(key)
            if blocks is not None and not (isinstance(blocks, list) and len(blocks) == len(raw["block_out_channels"])):
                raise DiffusersFolderError(f"{where}: field {key!r} is {short_repr(blocks)}; expected one block type "
                                           f"per entry of block_out_channels")
        _check_latents_and_scaling(raw, where, channels, 0.18215)
        shift = raw.get("shift_factor")
        if shift is not None and (not isinstance(shift, (int, float)) or isinstance(shift, bool)
                                  or not -1e6 <= shift <= 1e6):
            raise DiffusersFolderError(f"{where}: field 'shift_factor' is {short_repr(shift)}; expected a finite "
                                       f"number or null")

    def decoder(self, class_name: str, source: Path, exporting: bool = False):
        """(module, record fields): ``latents`` (N, C, h, w), scaled (and shifted) -> ``sample`` (N, 3, H, W) in
        about [-1, 1], and ``scaling_factor``/``shift_factor``: the runtime decodes ``latents / scaling_factor +
        shift_factor``."""
        return _plain_decoder(_load(class_name, source))


WAN_VAE_TEMPORAL = 4  # WanPipeline's vae_scale_factor_temporal: the frames per latent frame l2c-export samples


def _check_wan_factors(raw: dict, where: str, flags: list) -> None:
    """An ``AutoencoderKLWan``'s ``scale_factor_spatial`` and ``scale_factor_temporal`` (what WanPipeline reads) are
    its levels' (2 ** levels, 2 ** temporal flags), the temporal one 4 (Wan 2.1's); no Wan2.2 patching or residual
    levels."""
    for key, value, want in (("scale_factor_spatial", raw.get("scale_factor_spatial", 8), 2 ** len(flags)),
                             ("scale_factor_temporal", raw.get("scale_factor_temporal", 4), 2 ** sum(flags))):
        if value != want or (key == "scale_factor_temporal" and value != WAN_VAE_TEMPORAL):
            raise DiffusersFolderError(f"{where}: field {key!r} is {short_repr(value)}; its levels make {want}, and "
                                       f"the temporal factor is sampled at {WAN_VAE_TEMPORAL} (Wan 2.1's) only")
    for key, value in (("patch_size", None), ("is_residual", False), ("decoder_base_dim", None)):
        if raw.get(key, value) != value:
            raise DiffusersFolderError(f"{where}: field {key!r} is {short_repr(raw.get(key))}; AutoencoderKLWan is "
                                       f"supported with {key} = {value!r} only (Wan 2.1's)")


class MeanStdVae:
    """An ``AutoencoderKLQwenImage`` or ``AutoencoderKLWan`` (Wan 2.1's causal 3D VAE, whose layout Qwen-Image's
    shares): scale factor ``2 ** len(temperal_downsample)`` (QwenImagePipeline's; WanPipeline's
    ``scale_factor_spatial``, which an ``AutoencoderKLWan``'s config must agree with)."""

    def scale_factor(self, raw: dict, where: str) -> int:
        levels = raw.get("temperal_downsample")
        if not (isinstance(levels, list) and 1 <= len(levels) <= 8 and all(isinstance(v, bool) for v in levels)):
            raise DiffusersFolderError(f"{where}: field 'temperal_downsample' is {short_repr(levels)}; expected a "
                                       f"list of 1 to 8 booleans (AutoencoderKLQwenImage)")
        return 2 ** len(levels)

    def decoder_width(self, raw: dict) -> tuple[int, str]:
        return raw["base_dim"] * raw["dim_mult"][0], "base_dim"

    def check(self, raw: dict, where: str, channels: int) -> None:
        """Sizes in bounds, one temporal flag per level after the first, ``z_dim`` the transformer's latent channels,
        ``latents_mean`` and ``latents_std`` one finite number per channel (std positive)."""
        check_sizes(raw, QWEN_VAE_SIZES, where, DiffusersFolderError)
        check_integer_list(raw, "dim_mult", QWEN_VAE_MULTIPLIERS, where, DiffusersFolderError, (1, 8))
        self.scale_factor(raw, where)
        flags, levels = raw["temperal_downsample"], len(raw["dim_mult"])
        if len(flags) != levels - 1:
            raise DiffusersFolderError(f"{where}: field 'temperal_downsample' is {short_repr(flags)}; expected one "
                                       f"flag per level after the first ({levels - 1}, dim_mult has {levels})")
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
        if raw.get("_class_name") == "AutoencoderKLWan":
            _check_wan_factors(raw, where, flags)
        if raw.get("attn_scales"):
            raise DiffusersFolderError(f"{where}: field 'attn_scales' is {short_repr(raw['attn_scales'])}; "
                                       f"AutoencoderKLQwenImage's decoder ignores it: expected [] as Qwen-Image's")

    def decoder(self, class_name: str, source: Path, exporting: bool = False):
        """``QwenImagePipeline``'s decode of one frame: ``latents`` (N, C, h, w) -> ``latents * latents_std +
        latents_mean`` per channel (its ``latents / (1 / std) + mean``), as (N, C, 1, h, w) -> ``vae.decode(...)[:,
        :, 0]`` (N, 3, H, W) in [-1, 1]; ``WanPipeline``'s of every frame of a clip: (N, C, F', h, w) -> (N, 3, F, H,
        W), F = 4 (F' - 1) + 1 (the causal decoder unrolled over the build's F' frames); the record's
        ``scaling_factor`` is 1. ``exporting``: the 2x
        ``nearest-exact`` upsamplings run as ``nearest`` (the same at a scale of 2: output pixel i reads input pixel
        floor(i / 2); the TorchScript exporter has no nearest-exact)."""
        import torch

        vae = _load(class_name, source)
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
                if latents.dim() == 5:  # a clip (Wan): every frame
                    return self.vae.decode(latents / inverse_std + mean, return_dict=False)[0]
                frames = latents.unsqueeze(2) / inverse_std + mean
                return self.vae.decode(frames, return_dict=False)[0][:, :, 0]

        return Decoder().eval(), {"scaling_factor": 1.0}


DC_AE_BLOCKS = ("ResBlock", "EfficientViTBlock")


class DcAeVae:
    """An ``AutoencoderDC`` (DC-AE, Sana's 32x): scale factor ``2 ** (len(encoder_block_out_channels) - 1)``
    (SanaPipeline's)."""

    def scale_factor(self, raw: dict, where: str) -> int:
        check_integer_list(raw, "encoder_block_out_channels", VAE_CHANNELS, where, DiffusersFolderError, VAE_LEVELS)
        return 2 ** (len(raw["encoder_block_out_channels"]) - 1)

    def decoder_width(self, raw: dict) -> tuple[int, str]:
        return (raw.get("decoder_block_out_channels") or (128,))[0], "decoder_block_out_channels"

    def check(self, raw: dict, where: str, channels: int) -> None:
        """Sizes in bounds, the encoder's and decoder's levels, and per level of the decoder its layer count, block
        type and attention scales; an EfficientViT level's channels a multiple of attention_head_dim; latent
        channels the transformer's; a positive ``scaling_factor``."""
        check_sizes(raw, DC_VAE_SIZES, where, DiffusersFolderError)
        for key in ("encoder_block_out_channels", "decoder_block_out_channels"):
            check_integer_list(raw, key, VAE_CHANNELS, where, DiffusersFolderError, VAE_LEVELS)
        for part in ("encoder", "decoder"):  # from_pretrained builds the encoder too: its depth is memory as well
            levels = len(raw[f"{part}_block_out_channels"])
            check_integer_list(raw, f"{part}_layers_per_block", DC_VAE_LAYERS, where, DiffusersFolderError,
                               (levels, levels))
        types = raw.get("decoder_block_types", "ResBlock")
        types = [types] * levels if isinstance(types, str) else types
        if not (isinstance(types, list) and len(types) == levels and all(t in DC_AE_BLOCKS for t in types)):
            raise DiffusersFolderError(f"{where}: field 'decoder_block_types' is "
                                       f"{short_repr(raw.get('decoder_block_types'))}; expected one of "
                                       f"{', '.join(DC_AE_BLOCKS)}, or a list of them, one per level")
        for key in ("decoder_norm_types", "decoder_act_fns"):
            value = raw.get(key)
            if not (value is None or isinstance(value, str) or (isinstance(value, list) and len(value) == levels
                                                                 and all(isinstance(v, str) for v in value))):
                raise DiffusersFolderError(f"{where}: field {key!r} is {short_repr(value)}; expected a name or a "
                                           f"list of {levels}, one per level")
        scales = raw.get("decoder_qkv_multiscales", [[], [], [], [5], [5], [5]])
        if not (isinstance(scales, list) and len(scales) == levels and all(
                isinstance(level, list) and all(is_integer(k) and 1 <= k <= 31 and k % 2 for k in level)
                for level in scales)):
            raise DiffusersFolderError(f"{where}: field 'decoder_qkv_multiscales' is {short_repr(scales)}; expected "
                                       f"a list of {levels} lists of odd kernel sizes in 1..31, one per level")
        head = raw["attention_head_dim"]
        for block, width in zip(types, raw["decoder_block_out_channels"]):
            if block == "EfficientViTBlock" and width % head:
                raise DiffusersFolderError(f"{where}: field 'decoder_block_out_channels' has {width} at an "
                                           f"EfficientViTBlock level; expected a multiple of attention_head_dim {head}")
        if raw.get("upsample_block_type", "pixel_shuffle") not in ("pixel_shuffle", "interpolate"):
            raise DiffusersFolderError(f"{where}: field 'upsample_block_type' is "
                                       f"{short_repr(raw.get('upsample_block_type'))}; expected 'pixel_shuffle' or "
                                       f"'interpolate'")
        _check_latents_and_scaling(raw, where, channels, 1.0)

    def decoder(self, class_name: str, source: Path, exporting: bool = False):
        """(module, record fields): ``latents`` (N, C, h, w), scaled -> ``sample`` (N, 3, H, W); the runtime decodes
        ``latents / scaling_factor`` (SanaPipeline's)."""
        return _plain_decoder(_load(class_name, source))


VAE_KINDS = {"scale_shift": ScaleShiftVae(), "mean_std": MeanStdVae(), "dc_ae": DcAeVae()}
