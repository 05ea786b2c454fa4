"""The build's memory estimate: :mod:`l2c_export.core.memory`'s terms counted for a diffusers folder's model (its
transformer, text encoder and VAE built on torch's ``meta`` device, which allocates nothing), before anything is
allocated. The terms, the comparison with the machine's memory and the request's estimate are in core."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..core.memory import ACTIVATION_COPIES, DECODER_COPIES, FLOAT32, TRACE_BATCH, Part, check_fits


def count_parameters(make) -> int:
    """Parameters and buffers of the module ``make()`` builds, built on the ``meta`` device (nothing allocated)."""
    import torch

    with torch.device("meta"):
        module = make()
    return sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())


def transformer_parts(family, config, where: str, size_blame: str) -> list[Part]:
    """The transformer's weights and traced activations (``where``: its config.json; ``size_blame``: what sets the
    latents' size, its sample_size or --image-size)."""
    params = count_parameters(lambda: family.diffusers_class().from_config(dict(config.transformer)))
    width = family.inner_dim(config)
    tokens = family.num_tokens(config) + (getattr(family, "dummy_prompt_tokens", 0) or 0)
    blocks = config.get("num_layers")
    return [Part(f"transformer weights ({params:,} parameters)", params * FLOAT32,
                 f"{where}: fields 'num_layers' ({blocks}) and 'num_attention_heads' x 'attention_head_dim' "
                 f"({width})"),
            Part(f"traced activations ({tokens:,} tokens x {width} wide)",
                 TRACE_BATCH * tokens * width * FLOAT32 * ACTIVATION_COPIES, size_blame)]


def text_encoder_parts(config: dict, where: str, kind) -> list[Part]:
    """A text encoder's fp32 weights (its vocabulary's embedding named where it is most of them); ``kind``: its
    :class:`~l2c_export.models.diffusers.text_encoders.EncoderKind` (the config's width and depth fields)."""
    import transformers

    module = getattr(transformers, config["architectures"][0])
    model_config = module.config_class.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
    params = count_parameters(lambda: module(model_config))
    embedding = config["vocab_size"] * config[kind.width]
    blame = (f"{where}: field 'vocab_size' ({config['vocab_size']})" if 2 * embedding >= params
             else f"{where}: field {kind.layers!r} ({config[kind.layers]})")
    return [Part(f"text encoder weights ({params:,} parameters)", params * FLOAT32, blame)]


def vae_parts(family, config: dict, class_name: str, where: str, latents: tuple[int, ...],
              size_blame: str) -> list[Part]:
    """The VAE's fp32 weights and its decoder's traced run on a batch of 2 latents (C, h, w), or a video model's
    (C, F', h, w) decoded to (F' - 1) scale_factor_temporal + 1 frames (its scale factor and full-resolution width:
    the family's VAE kind)."""
    import diffusers

    kind = family.declaration.vae.code
    params = count_parameters(lambda: getattr(diffusers, class_name).from_config(config))
    width, field = kind.decoder_width(config)
    scale = kind.scale_factor(config, where)
    *_, h, w = latents
    frames = 1 if len(latents) == 3 else (latents[1] - 1) * config.get("scale_factor_temporal", 4) + 1
    decoded = TRACE_BATCH * width * frames * (h * scale) * (w * scale) * FLOAT32 * DECODER_COPIES
    return [Part(f"VAE weights ({params:,} parameters)", params * FLOAT32,
                 f"{where}: field {field!r} ({config.get(field)})"),
            Part(f"VAE decoder activations ({h * scale}x{w * scale} px)", decoded, size_blame)]


def build_parts(spec) -> list[Part]:
    """The estimate of a build of ``spec`` (a diffusers folder's model; none for the other models, whose sizes are
    presets): the transformer's parts (and the later experts' weights, Wan2.2's transformer_2) plus the larger of its
    components'."""
    from ..models.diffusers import DiffusersConfig

    config = spec.config
    if not isinstance(config, DiffusersConfig):
        return []
    family, found = spec.family, spec.components
    transformer_dir = Path(spec.weights)
    where = str(transformer_dir / "config.json")
    size_blame = (f"--image-size ({config.latent_size} latents on a side)" if config.latent_size is not None
                  else f"--num-frames and --image-size ({' x '.join(map(str, config.latent_shape))} latents)"
                  if config.latent_shape is not None
                  else f"{where}: field 'sample_size' ({config.get('sample_size')})"
                  if "sample_size" in config.transformer else f"--image-size (default {family.num_tokens(config)} "
                                                               f"image tokens)")
    parts = transformer_parts(family, config, where, size_blame)
    for expert in spec.experts.models[1:] if spec.experts is not None else ():  # traced weights held together
        weights = transformer_parts(family, expert.config, str(Path(expert.weights) / "config.json"), size_blame)[0]
        parts.append(dataclasses.replace(weights, what=f"{expert.name} {weights.what}"))
    components = []
    for encoder in () if found is None else found.text_encoders:  # exported one at a time
        from ..models.diffusers.text_encoders import ENCODER_KINDS

        components.append(text_encoder_parts(encoder.config, str(encoder.encoder / "config.json"),
                                             ENCODER_KINDS[encoder.spec.kind]))
    if found is not None and found.vae_config is not None:
        components.append(vae_parts(family, found.vae_config, found.vae_class, str(found.vae / "config.json"),
                                    family.vae_latents(config), size_blame))
    if components:
        parts += max(components, key=lambda group: sum(part.bytes for part in group))
    return parts


def check_build_fits(spec, available: int | None = None) -> int:
    """:func:`check_fits` of :func:`build_parts`: refuses a build that cannot fit, before anything is allocated."""
    parts = build_parts(spec)
    return check_fits(parts, "the build", available) if parts else 0
