"""A request's conditioning checked and batched from the model's input records alone (numpy): what the runtime, the
PyTorch reference sampler and learning share. :mod:`l2c_export.runtime.conditioning` reads the records from a
manifest.

A model's conditioning inputs are its input records with a conditioning role: ``label`` (class labels, guided against
the null class), or text: ``prompt_embeds`` (text-encoder embeddings, (n, L, D)), with ``prompt_attention_mask``
or ``prompt_embeds_mask`` ((n, L), 1 keep / 0 padding; PixArt, Qwen-Image) and ``pooled_prompt_embeds`` ((n, P); SD3,
FLUX.1) where the model has them, each guided against the ``negative_`` array of the same shape (the pipelines'
argument names; Qwen-Image's negative prompt may have another length, padded to the longer). With classifier-free
guidance the model batch is 2n: the conditional half first, the unconditional half second.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .guidance import check_labels

TEXT_ROLES = ("prompt_embeds", "prompt_attention_mask", "prompt_embeds_mask", "pooled_prompt_embeds")
# Token masks, 1 keep / 0 padding, by the pipelines' names: PixArt's prompt_attention_mask; Qwen-Image's
# prompt_embeds_mask, whose model treats a masked token as absent, so its prompt and negative prompt may differ in
# length (the shorter is padded to the longer under mask 0: pad_prompt_pair).
MASK_ROLES = ("prompt_attention_mask", "prompt_embeds_mask")
PADDABLE_MASK_ROLE = "prompt_embeds_mask"
GUIDANCE_ROLE = "guidance"
CONDITIONING_ROLES = ("label", *TEXT_ROLES, GUIDANCE_ROLE)
TEXT_ARGUMENTS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask",
                  "prompt_embeds_mask", "negative_prompt_embeds_mask")

# How messages call a request's parts: the command line's flags, or L2CPipeline's Python arguments.
FLAG_NAMES = {"labels": "--labels", "conditioning": "--conditioning", "cfg_scale": "--cfg-scale",
              "prompt": "--prompt/--prompts", "negative_prompt": "--negative-prompt"}
ARGUMENT_NAMES = {name: name for name in FLAG_NAMES}


class ConditioningError(ValueError):
    """Conditioning that does not fit the model; the message names the array (and file) and what was expected."""


def by_role(input_records: Sequence[dict]) -> dict[str, dict]:
    """role -> input record, for each record with a conditioning role."""
    return {tensor["role"]: tensor for tensor in input_records if tensor["role"] in CONDITIONING_ROLES}


def batch_conditioning(input_records: Sequence[dict], null_class: int | None, guiding: bool,
                       labels: Sequence[int] | None = None, conditioning: Mapping[str, np.ndarray] | None = None,
                       where: str = "conditioning", max_tokens: int | None = None, classifier_free: bool = True,
                       guidance_scale: float | None = None,
                       names: Mapping[str, str] = FLAG_NAMES) -> tuple[int, dict[str, np.ndarray]]:
    """:func:`model_batch_conditioning` from the model's input records (the manifest's ``model/inputs``, or a
    family's ``TensorSpec.record()``s: the PyTorch reference checks a request as the runtimes do), null class,
    longest prompt (``model/max_sequence_length``; None: unbounded), whether the model guides with a classifier-free
    batch (``guidance/classifier_free``) and the scale a ``guidance`` input is fed."""
    inputs = by_role(input_records)
    if "label" in inputs:
        if conditioning:
            raise ConditioningError(f"{where}: this model is conditioned on class labels ({names['labels']}), not "
                                    f"on {', '.join(sorted(conditioning))}")
        if labels is None or len(labels) == 0:
            raise ConditioningError("no labels given; expected at least one class label")
        labels = np.asarray([int(label) for label in labels], dtype=np.int64)
        check_labels(labels, null_class)
        batch = np.concatenate([labels, np.full_like(labels, null_class)]) if guiding else labels
        return len(labels), {inputs["label"]["name"]: batch}
    if "prompt_embeds" not in inputs:
        raise ConditioningError(f"{where}: the manifest's model inputs have no conditioning this runtime knows "
                                f"(roles {', '.join(CONDITIONING_ROLES)})")
    if labels is not None:
        raise ConditioningError(f"{names['labels']}: this model is conditioned on prompt embeddings "
                                f"({names['conditioning']}), not class labels")
    arrays = dict(conditioning or {})
    if not classifier_free:
        refuse_negatives(arrays, where, names)
    checked = check_text_conditioning(arrays, inputs, guiding, where, max_tokens)
    n = len(checked["prompt_embeds"][0])
    feeds = {inputs[role]["name"]: np.ascontiguousarray(np.concatenate(pad_prompt_pair(pair)) if guiding else pair[0])
             for role, pair in checked.items()}
    if GUIDANCE_ROLE in inputs:
        if guidance_scale is None:
            raise ConditioningError(f"{where}: the model's guidance input needs a guidance scale "
                                    f"({names['cfg_scale']})")
        feeds[inputs[GUIDANCE_ROLE]["name"]] = np.full(2 * n if guiding else n, guidance_scale, dtype=np.float32)
    return n, feeds


def pad_prompt_pair(pair: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A conditional array and its negative twin, the shorter along the prompt axis (axis 1) padded with zeros to the
    longer (embeddings: zero vectors; a mask: 0, absent), so that both halves run as one batch; of equal lengths (or
    no prompt axis), as they are. :func:`check_text_conditioning` lets the lengths differ only for a model with a
    :data:`PADDABLE_MASK_ROLE`."""
    array, negative = pair
    if array.ndim < 2 or array.shape[1] == negative.shape[1]:
        return pair
    length = max(array.shape[1], negative.shape[1])

    def padded(a):
        return np.pad(a, [(0, 0), (0, length - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
    return padded(array), padded(negative)


def refuse_negatives(arrays: Mapping[str, np.ndarray], where: str, names: Mapping[str, str] = FLAG_NAMES) -> None:
    """A guidance-distilled model (``guidance/classifier_free`` false) runs no negative prompt: a ``negative_`` array
    is refused by name rather than ignored."""
    negatives = sorted(name for name in arrays if name.startswith("negative_"))
    if negatives:
        raise ConditioningError(f"{where}: array {negatives[0]!r} is not used: this model is guidance-distilled "
                                f"({names['cfg_scale']} feeds its guidance embedding; no negative prompt runs); leave "
                                f"it out")


def check_text_conditioning(arrays: Mapping[str, np.ndarray], inputs: dict, guiding: bool,
                            where: str = "conditioning",
                            max_tokens: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Text conditioning by the pipelines' argument names, for the text roles the model has (``inputs``: role ->
    manifest record), checked: role -> (array, its ``negative_`` counterpart when ``guiding``, else None), float32;
    prompt_embeds (n, L, D) with L at most ``max_tokens`` (the manifest's ``model/max_sequence_length``) where given,
    prompt_attention_mask (n, L) 0/1, pooled_prompt_embeds (n, P). Raises :class:`ConditioningError` naming the
    array."""
    roles = [role for role in TEXT_ROLES if role in inputs]
    names = [*roles, *(f"negative_{role}" for role in roles)]
    unknown = sorted(set(arrays) - set(names))
    if unknown:
        raise ConditioningError(f"{where}: unknown array {unknown[0]!r}; expected {', '.join(names)}")
    needed = names if guiding else roles
    missing = [name for name in needed if name not in arrays]
    if missing:
        why = " (guidance runs the negative prompt as the unconditional half)" if missing[0].startswith("neg") else ""
        raise ConditioningError(f"{where}: array {missing[0]!r} is missing{why}; expected {', '.join(needed)}")
    checked = {}
    for prefix in ("", "negative_") if guiding else ("",):
        embeds = _embeddings(arrays[f"{prefix}prompt_embeds"], f"{prefix}prompt_embeds",
                             inputs["prompt_embeds"]["shape"][-1], where)
        paddable = PADDABLE_MASK_ROLE in inputs  # the halves' lengths may differ
        if prefix and paddable and embeds.shape[::2] != checked["prompt_embeds"][0].shape[::2]:
            want = checked["prompt_embeds"][0].shape
            raise ConditioningError(f"{where}: array 'negative_prompt_embeds' has shape {embeds.shape}; expected "
                                    f"({want[0]}, L, {want[2]}), as many prompts as 'prompt_embeds' (any length L)")
        if prefix and not paddable and embeds.shape != checked["prompt_embeds"][0].shape:
            raise ConditioningError(f"{where}: array 'negative_prompt_embeds' has shape {embeds.shape}; expected "
                                    f"{checked['prompt_embeds'][0].shape}, that of 'prompt_embeds' (both halves run "
                                    f"as one batch)")
        n, length = embeds.shape[:2]
        if max_tokens is not None and length > max_tokens:
            raise ConditioningError(f"{where}: array '{prefix}prompt_embeds' has shape {embeds.shape}: {length} prompt "
                                    f"tokens; expected at most the model's max_sequence_length {max_tokens}")
        found = {"prompt_embeds": embeds}
        for mask_role in MASK_ROLES:
            if mask_role in inputs:
                name = f"{prefix}{mask_role}"
                found[mask_role] = _mask(arrays[name], name, (n, length), where)
        if "pooled_prompt_embeds" in inputs:
            name = f"{prefix}pooled_prompt_embeds"
            found["pooled_prompt_embeds"] = _pooled(arrays[name], name, n, inputs["pooled_prompt_embeds"]["shape"][-1],
                                                    where)
        for role, array in found.items():
            checked[role] = (array, None) if not prefix else (checked[role][0], array)
    return checked


def check_prompts(arrays: Mapping[str, np.ndarray], width: int, guiding: bool, where: str = "conditioning",
                  max_tokens: int | None = None):
    """Prompt conditioning with a mask (PixArt) by the pipelines' argument names, checked: -> prompt_embeds (n, L,
    width) float32, prompt_attention_mask (n, L) float32 0/1, and when ``guiding`` the negative ones of the same
    shapes (else None); L at most ``max_tokens`` where given. Raises :class:`ConditioningError` naming the array."""
    inputs = {"prompt_embeds": {"shape": ["batch", "prompt_tokens", width]},
              "prompt_attention_mask": {"shape": ["batch", "prompt_tokens"]}}
    checked = check_text_conditioning(arrays, inputs, guiding, where, max_tokens)
    (embeds, negative), (mask, negative_mask) = checked["prompt_embeds"], checked["prompt_attention_mask"]
    return embeds, mask, negative, negative_mask


def _embeddings(array, name: str, width: int, where: str) -> np.ndarray:
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ConditioningError(f"{where}: array {name!r} holds {array.dtype} values; expected float32 embeddings")
    if array.ndim != 3 or array.shape[0] < 1 or array.shape[1] < 1 or array.shape[2] != width:
        raise ConditioningError(f"{where}: array {name!r} has shape {array.shape}; expected (n, L, {width})")
    if not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise ConditioningError(f"{where}: array {name!r}: {bad} of its {array.size} values are NaN or infinite; "
                                f"expected finite embeddings")
    return array.astype(np.float32)


def _pooled(array, name: str, n: int, width: int, where: str) -> np.ndarray:
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ConditioningError(f"{where}: array {name!r} holds {array.dtype} values; expected float32 embeddings")
    if array.shape != (n, width):
        raise ConditioningError(f"{where}: array {name!r} has shape {array.shape}; expected ({n}, {width}) (one "
                                f"pooled embedding per prompt)")
    if not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise ConditioningError(f"{where}: array {name!r}: {bad} of its {array.size} values are NaN or infinite; "
                                f"expected finite embeddings")
    return array.astype(np.float32)


def _mask(array, name: str, shape: tuple[int, int], where: str) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != shape:
        raise ConditioningError(f"{where}: array {name!r} has shape {array.shape}; expected {shape} (n, L of the "
                                f"embeddings)")
    if not (array.dtype == bool or np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ConditioningError(f"{where}: array {name!r} holds {array.dtype} values; expected a 0/1 mask")
    values = array.astype(np.float64)
    if not np.isin(values, (0.0, 1.0)).all():
        raise ConditioningError(f"{where}: array {name!r} holds values other than 0 and 1; expected a 0/1 mask")
    if not values.any(axis=1).all():
        raise ConditioningError(f"{where}: array {name!r} masks every token of a prompt; expected at least one 1 "
                                f"per row")
    return values.astype(np.float32)
