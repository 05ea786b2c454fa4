"""The vocabulary of a model's graph interface, as a family declares it and a manifest records it (no PyTorch).

Every input of a model graph has a role: ``sample`` (x), ``time`` (the timestep, float) or ``conditioning``; a
subset graph adds ``cache`` inputs, and returns its ``output`` and ``fresh`` values. A conditioning input says what
it is, so that a runtime feeds it without knowing the family:

- ``argument``: the name of the pipeline's call argument it is fed from (``prompt_embeds``, ``class_labels``,
  ``guidance_scale``); a request's arrays are named so (``run --conditioning cond.npz``, Triton's inputs).
- ``kind``, one of :data:`CONDITIONING_KINDS`: how the per-sample value is shaped and checked.
- ``negative``: where guidance runs an unconditional half, the argument that half is fed from
  (``negative_prompt_embeds``); without one the conditional value is fed to both halves (a label's
  unconditional half is the null class, ``guidance/null_class``).
- ``pads_negative`` (a ``token_mask`` with a partner): the model treats a masked token as absent, so the partners'
  token axis may differ in length; the shorter half is padded with zero embeddings under mask 0 (Qwen-Image's).

A named size in a shape (``prompt_tokens``) varies per request: every conditioning array that names it has the same
size there (a mask's tokens are its embeddings' tokens), at most ``model/max_sequence_length``.

The manifest's ``guidance/rule`` (:data:`GUIDANCE_RULES`) says how ``--cfg-scale`` acts, and
``guidance/scale_argument`` which pipeline argument it is (``guidance_scale``, Qwen-Image's ``true_cfg_scale``): a
conditioning input whose ``argument`` is that name is fed the scale, per sample. ``model/latent_layout``
(:data:`LATENT_LAYOUTS`) says how the sample's axes lie.
"""

from __future__ import annotations

# Roles of the tensors of a graph interface.
SAMPLE, TIME, CONDITIONING, OUTPUT, CACHE, FRESH = "sample", "time", "conditioning", "output", "cache", "fresh"
INPUT_ROLES = (SAMPLE, TIME, CONDITIONING, CACHE)
OUTPUT_ROLES = (OUTPUT, FRESH)

# Conditioning kinds: the per-sample shape (named sizes vary per request), dtype and values of each.
TOKEN_EMBEDDINGS = "token_embeddings"  # (L, D) float, finite: a text encoder's tokens, L at most max_sequence_length
TOKEN_MASK = "token_mask"  # (L,) 0/1, at least one 1: which of the embeddings' L tokens are kept
POOLED = "pooled"  # (P,) float, finite: one vector per sample (a pooled text embedding)
SCALAR = "scalar"  # () float, finite: one number per sample (a distilled guidance scale)
LABEL = "label"  # () int64: a class index 0 .. null_class - 1; the unconditional half is the null class
CONDITIONING_KINDS = (TOKEN_EMBEDDINGS, TOKEN_MASK, POOLED, SCALAR, LABEL)
KIND_RANKS = {TOKEN_EMBEDDINGS: 2, TOKEN_MASK: 1, POOLED: 1, SCALAR: 0, LABEL: 0}  # per-sample dimensions
KIND_DTYPES = {TOKEN_EMBEDDINGS: "float32", TOKEN_MASK: "float32", POOLED: "float32", SCALAR: "float32",
               LABEL: "int64"}

# Guidance rules: how the scale s acts.
CLASSIFIER_FREE = "classifier_free"  # one batch of 2n, conditional half first: uncond + s * (cond - uncond)
GUIDANCE_EMBEDDING = "guidance_embedding"  # guidance-distilled (FLUX.1-dev): s is fed to the model; no second half
TRUE_CFG = "true_cfg"  # Qwen-Image: as classifier_free, then each token rescaled to the norm of cond's (last axis)
GUIDANCE_RULES = (CLASSIFIER_FREE, GUIDANCE_EMBEDDING, TRUE_CFG)
BATCHED_RULES = (CLASSIFIER_FREE, TRUE_CFG)  # the rules that run an unconditional half

# Latent layouts: the per-sample axes of the sample and the model output.
NCHW = "nchw"  # (C, H, W)
PACKED_2X2 = "packed_2x2"  # (T, 4 C): 2x2 latent patches as tokens (FluxPipeline._pack_latents)
NCFHW = "ncfhw"  # (C, F, H, W): video latents, frames after channels
LATENT_LAYOUTS = (NCHW, PACKED_2X2, NCFHW)
LAYOUT_RANKS = {NCHW: 3, PACKED_2X2: 2, NCFHW: 4}  # per-sample dimensions

DEFAULT_SCALE_ARGUMENT = "guidance_scale"  # the pipelines' name for the guidance scale


def conditioning_records(input_records) -> list[dict]:
    """The conditioning inputs among a model's input records (the manifest's ``model/inputs``), in graph order."""
    return [record for record in input_records if record["role"] == CONDITIONING]


def label_record(input_records) -> dict | None:
    """The label input (kind ``label``) of a model conditioned on class labels; None for any other."""
    return next((r for r in conditioning_records(input_records) if r["kind"] == LABEL), None)


def runs_unconditional_half(guidance: dict) -> bool:
    """Whether the guidance rule (the manifest's ``guidance`` record) runs a 2n batch with an unconditional half
    (when the scale is above 1)."""
    return guidance.get("rule", CLASSIFIER_FREE) in BATCHED_RULES


def scale_fed(record: dict, guidance: dict) -> bool:
    """Whether a conditioning input is fed the guidance scale (its argument is the guidance's scale argument)."""
    return record["argument"] == guidance.get("scale_argument", DEFAULT_SCALE_ARGUMENT)


def request_records(input_records, guidance: dict) -> list[dict]:
    """The conditioning inputs a request feeds by argument name: every one but a label (``--labels``) and those fed
    the guidance scale."""
    return [r for r in conditioning_records(input_records) if r["kind"] != LABEL and not scale_fed(r, guidance)]


def argument_names(records, negatives: bool) -> list[str]:
    """The arguments of ``records`` (:func:`request_records`), then with ``negatives`` their ``negative`` partners."""
    names = [r["argument"] for r in records]
    return names + ([r["negative"] for r in records if r.get("negative")] if negatives else [])
