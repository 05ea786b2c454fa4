"""What a build or a request will cost in memory, estimated before anything is allocated, and refused (one line
naming the field that costs most, the estimate and what the machine has) when it cannot fit.

The estimate errs low on purpose: it counts only what surely must be held at once, so it never refuses what would
have run, and refuses what could never have.

A build (:func:`l2c_export.builder.memory.build_parts`, a diffusers folder's model; there because it counts
with torch, diffusers and transformers, which this stage must not import) holds at once:

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
def _resolved(shape: list, sizes: dict[str, int]) -> int:
    """Elements of one sample of a manifest tensor shape ``[batch, ...]`` with its named axes resolved."""
    return math.prod(sizes.get(dim, 1) if isinstance(dim, str) else int(dim) for dim in shape[1:])


def run_parts(manifest: dict, samples: int, guiding: bool, blame: str, batch: int | None = None) -> list[Part]:
    """The estimate of one request of ``samples`` samples on a build (``manifest``), sampled ``batch`` at a time
    (default all at once): the working set of one batch (doubled when ``guiding``) and every sample's result."""
    working = min(samples, batch or samples)
    batch = working * (2 if guiding else 1)
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
    sample = math.prod(int(d) for d in sample_shape[1:]) * FLOAT32
    parts = [Part(f"cache ({len(slots)} slots)", cache, blame),
             Part(f"activations ({joint:,} tokens x {width} wide)", batch * joint * width * FLOAT32 * ACTIVATION_COPIES,
                  blame),
             Part(f"attention scores ({heads} heads x {joint:,}^2)", batch * heads * joint * joint * FLOAT32, blame),
             Part("samples being sampled", batch * sample * 4, blame),
             Part("results", samples * sample, blame)]
    decoder = manifest.get("components", {}).get("vae_decoder")
    if decoder is not None:
        image = decoder["outputs"][0]["shape"]
        pixels = math.prod(int(d) for d in image[1:]) * FLOAT32
        parts.append(Part("decoded images", (samples + working * (DECODER_COPIES - 1)) * pixels, blame))
    return parts


def check_run_fits(manifest: dict, samples: int, guiding: bool, blame: str, available: int | None = None,
                   batch: int | None = None) -> int:
    """:func:`check_fits` of :func:`run_parts`: refuses a request that cannot fit, before it is sampled."""
    return check_fits(run_parts(manifest, samples, guiding, blame, batch),
                      f"sampling {samples} image(s){' with guidance (x2)' if guiding else ''}", available)
