"""What a build or a request will cost in memory, estimated before anything is allocated, and refused (one line
naming the field that costs most, the estimate and what the machine has) when it cannot fit.

The estimate errs low on purpose: it counts only what surely must be held at once, so it never refuses what would
have run, and refuses what could never have.

A build (:func:`build_parts`, a diffusers folder's model) holds at once:

- the transformer's fp32 weights: its parameters and buffers, counted on torch's ``meta`` device from the config
  (which allocates nothing), times 4 bytes;
- the activations of the traced forward (batch :data:`TRACE_BATCH`, the image tokens plus the traced prompt):
  :data:`ACTIVATION_COPIES` tensors of (batch, tokens, width) float32 (the residual stream, a norm, queries, keys,
  values, the attention's output and the 4x wide MLP hidden state of one block);
- then, while the transformer is still loaded, the larger of its components: the text encoder's fp32 weights, or the
  VAE's fp32 weights with the decoder's traced run (batch 2 images at full size, :data:`DECODER_COPIES` feature maps
  of its widest full-resolution level).

A request (:func:`run_parts`, from the manifest alone: no torch) holds, beyond the loaded engines: the cache (every
slot of the manifest, (batch, T, D) each, at the longest prompt), one transformer forward's activations as above
plus one attention's scores (batch, heads, T, T) float32 as ONNX Runtime's MatMul and Softmax materialise them, the
samples, and the decoded images where the build decodes. ``batch`` is the samples, doubled by classifier-free
guidance.

Both are compared with the memory the kernel says is available (``MemAvailable`` in ``/proc/meminfo``; where there
is no such file, nothing is refused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .util import format_bytes

FLOAT32 = 4
TRACE_BATCH = 2  # the batch the transformer is traced at (l2c_export.export.onnx.trace)
ACTIVATION_COPIES = 10  # (batch, tokens, width) tensors alive in one block's forward: see the module's docstring
DECODER_COPIES = 3  # full-resolution feature maps alive in the VAE decoder's last level (input, norm, conv output)
MEMINFO = Path("/proc/meminfo")


class MemoryEstimateError(ValueError):
    """A build or request that cannot fit in the machine's memory; the message names the field, the estimate and
    the memory available."""


@dataclass(frozen=True)
class Part:
    """One term of an estimate: what it is, its bytes, and the input that decides it (``blame``: a file and field,
    or a flag), named when this term is the largest."""

    what: str
    bytes: int
    blame: str


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (``MemAvailable``); None where it does not say."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(parts: list[Part], doing: str, available: int | None = None) -> int:
    """The estimate's total bytes; refuses (:class:`MemoryEstimateError`, naming the largest part's input) when it
    exceeds ``available`` (default: :func:`available_memory`)."""
    total = sum(part.bytes for part in parts)
    available = available_memory() if available is None else available
    if available is not None and total > available:
        largest = max(parts, key=lambda part: part.bytes)
        terms = ", ".join(f"{part.what} {format_bytes(part.bytes)}" for part in sorted(parts, key=lambda p: -p.bytes)
                          if part.bytes)
        raise MemoryEstimateError(f"{largest.blame}: {doing} needs at least {format_bytes(total)} ({terms}) against "
                                  f"{format_bytes(available)} available (MemAvailable, /proc/meminfo)")
    return total


# ---------------------------------------------------------------------------------------------------------------------
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


def text_encoder_parts(config: dict, where: str) -> list[Part]:
    """A T5 encoder's fp32 weights (its vocabulary's embedding named where it is most of them)."""
    from transformers import T5Config, T5EncoderModel

    t5 = T5Config.from_dict({k: v for k, v in config.items() if not k.startswith("_")})
    params = count_parameters(lambda: T5EncoderModel(t5))
    embedding = config["vocab_size"] * config["d_model"]
    blame = (f"{where}: field 'vocab_size' ({config['vocab_size']})" if 2 * embedding >= params
             else f"{where}: field 'num_layers' ({config['num_layers']})")
    return [Part(f"text encoder weights ({params:,} parameters)", params * FLOAT32, blame)]


def vae_parts(config: dict, where: str, latents: tuple[int, int, int], size_blame: str) -> list[Part]:
    """The VAE's fp32 weights and its decoder's traced run on a batch of 2 latents (C, h, w)."""
    from diffusers import AutoencoderKL

    params = count_parameters(lambda: AutoencoderKL.from_config(config))
    channels = config.get("block_out_channels") or (64,)
    scale = 2 ** (len(channels) - 1)
    _, h, w = latents
    decoded = TRACE_BATCH * channels[0] * (h * scale) * (w * scale) * FLOAT32 * DECODER_COPIES
    return [Part(f"VAE weights ({params:,} parameters)", params * FLOAT32,
                 f"{where}: field 'block_out_channels' ({list(channels)})"),
            Part(f"VAE decoder activations ({h * scale}x{w * scale} px)", decoded, size_blame)]


def build_parts(spec) -> list[Part]:
    """The estimate of a build of ``spec`` (a diffusers folder's model; none for the other models, whose sizes are
    presets): the transformer's parts plus the larger of its components'."""
    from ..models.diffusers import DiffusersConfig

    config = spec.config
    if not isinstance(config, DiffusersConfig):
        return []
    family, found = spec.family, spec.components
    transformer_dir = Path(spec.weights)
    where = str(transformer_dir / "config.json")
    size_blame = (f"--image-size ({config.latent_size} latents on a side)" if config.latent_size is not None
                  else f"{where}: field 'sample_size' ({config.get('sample_size')})"
                  if "sample_size" in config.transformer else f"--image-size (default {family.num_tokens(config)} "
                                                               f"image tokens)")
    parts = transformer_parts(family, config, where, size_blame)
    components = []
    if found is not None and found.text_encoder_config is not None:
        components.append(text_encoder_parts(found.text_encoder_config, str(found.text_encoder / "config.json")))
    if found is not None and found.vae_config is not None:
        components.append(vae_parts(found.vae_config, str(found.vae / "config.json"), family.vae_latents(config),
                                    size_blame))
    if components:
        parts += max(components, key=lambda group: sum(part.bytes for part in group))
    return parts


def check_build_fits(spec, available: int | None = None) -> int:
    """:func:`check_fits` of :func:`build_parts`: refuses a build that cannot fit, before anything is allocated."""
    parts = build_parts(spec)
    return check_fits(parts, "the build", available) if parts else 0


# ---------------------------------------------------------------------------------------------------------------------
def _resolved(shape: list, sizes: dict[str, int]) -> int:
    """Elements of one sample of a manifest tensor shape ``[batch, ...]`` with its named axes resolved."""
    return math.prod(sizes.get(dim, 1) if isinstance(dim, str) else int(dim) for dim in shape[1:])


def run_parts(manifest: dict, samples: int, guiding: bool, blame: str) -> list[Part]:
    """The estimate of one request of ``samples`` samples on a build (``manifest``), doubled when ``guiding``."""
    batch = samples * (2 if guiding else 1)
    model = manifest["model"]
    prompt = int(model.get("max_sequence_length") or 0)
    slots = manifest.get("cache_slots", [])
    sample_shape = model["output"]["shape"]
    tokens = max([int(s["shape"][1]) for s in slots if isinstance(s["shape"][1], int)] or [1])
    width = max([int(s["shape"][-1]) for s in slots] or [1])
    sizes = {"prompt_tokens": prompt, "joint_tokens": tokens + prompt}
    cache = sum(_resolved(slot["shape"], sizes) for slot in slots) * batch * FLOAT32
    joint = tokens + prompt
    config = model["config"].get("transformer", model["config"])  # a diffusers model's, or the family's own
    heads = int(config.get("num_attention_heads") or config.get("num_heads") or 1)
    parts = [Part(f"cache ({len(slots)} slots)", cache, blame),
             Part(f"activations ({joint:,} tokens x {width} wide)", batch * joint * width * FLOAT32 * ACTIVATION_COPIES,
                  blame),
             Part(f"attention scores ({heads} heads x {joint:,}^2)", batch * heads * joint * joint * FLOAT32, blame),
             Part("samples", batch * math.prod(int(d) for d in sample_shape[1:]) * FLOAT32 * 4, blame)]
    decoder = manifest.get("components", {}).get("vae_decoder")
    if decoder is not None:
        image = decoder["outputs"][0]["shape"]
        parts.append(Part("decoded images", samples * math.prod(int(d) for d in image[1:]) * FLOAT32 * DECODER_COPIES,
                          blame))
    return parts


def check_run_fits(manifest: dict, samples: int, guiding: bool, blame: str, available: int | None = None) -> int:
    """:func:`check_fits` of :func:`run_parts`: refuses a request that cannot fit, before it is sampled."""
    return check_fits(run_parts(manifest, samples, guiding, blame),
                      f"sampling {samples} image(s){' with guidance (x2)' if guiding else ''}", available)
