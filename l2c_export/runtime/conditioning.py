"""What a request conditions on, checked and turned into the model batch's inputs, from the manifest alone (numpy).

A model's conditioning inputs are the manifest's ``model/inputs`` with a conditioning role: ``label`` (class labels,
guided against the null class), or ``prompt_embeds`` and ``prompt_attention_mask`` (text-encoder embeddings, (n, L, D),
and their mask, (n, L), 1 keep / 0 padding; guided against ``negative_prompt_embeds`` and
``negative_prompt_attention_mask``, the pipelines' argument names). With guidance the model batch is 2n: the
conditional half first, the unconditional half second (the order changes no value: every sample is its own).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..samplers.guidance import check_labels

TEXT_ROLES = ("prompt_embeds", "prompt_attention_mask")
CONDITIONING_ROLES = ("label", *TEXT_ROLES)
TEXT_ARGUMENTS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")


class ConditioningError(ValueError):
    """Conditioning that does not fit the model; the message names the array (and file) and what was expected."""


def conditioning_inputs(manifest: dict) -> dict[str, dict]:
    """role -> the manifest's input record, for each conditioning input of the model."""
    return _by_role(manifest["model"]["inputs"])


def _by_role(input_records: Sequence[dict]) -> dict[str, dict]:
    return {tensor["role"]: tensor for tensor in input_records if tensor["role"] in CONDITIONING_ROLES}


def model_batch_conditioning(manifest: dict, guiding: bool, labels: Sequence[int] | None = None,
                             conditioning: Mapping[str, np.ndarray] | None = None,
                             where: str = "conditioning") -> tuple[int, dict[str, np.ndarray]]:
    """The number of samples n and, for each conditioning input of the model, its model-batch array (2n rows when
    ``guiding``). ``labels``: class labels (models with a label input); ``conditioning``: the text arrays by the
    pipelines' argument names (models with text inputs). Anything missing, extra, misshapen, of the wrong dtype or not
    finite is refused naming it."""
    return batch_conditioning(manifest["model"]["inputs"], manifest["guidance"].get("null_class"), guiding, labels,
                              conditioning, where, manifest["model"].get("max_sequence_length"))


def batch_conditioning(input_records: Sequence[dict], null_class: int | None, guiding: bool,
                       labels: Sequence[int] | None = None, conditioning: Mapping[str, np.ndarray] | None = None,
                       where: str = "conditioning", max_tokens: int | None = None) -> tuple[int, dict[str, np.ndarray]]:
    """:func:`model_batch_conditioning` from the model's input records (the manifest's ``model/inputs``, or a
    family's ``TensorSpec.record()``s: the PyTorch reference checks a request as the runtimes do), null class and
    longest prompt (``model/max_sequence_length``; None: unbounded)."""
    inputs = _by_role(input_records)
    if "label" in inputs:
        if conditioning:
            raise ConditioningError(f"{where}: this model is conditioned on class labels (--labels), not on "
                                    f"{', '.join(sorted(conditioning))}")
        if labels is None or len(labels) == 0:
            raise ConditioningError("no labels given; expected at least one class label")
        labels = np.asarray([int(label) for label in labels], dtype=np.int64)
        check_labels(labels, null_class)
        batch = np.concatenate([labels, np.full_like(labels, null_class)]) if guiding else labels
        return len(labels), {inputs["label"]["name"]: batch}
    if not set(TEXT_ROLES) <= set(inputs):
        raise ConditioningError(f"{where}: the manifest's model inputs have no conditioning this runtime knows "
                                f"(roles {', '.join(CONDITIONING_ROLES)})")
    if labels is not None:
        raise ConditioningError("--labels: this model is conditioned on prompt embeddings (--conditioning), not class "
                                "labels")
    return _text_conditioning(inputs, guiding, dict(conditioning or {}), where, max_tokens)


def _text_conditioning(inputs: dict, guiding: bool, arrays: dict, where: str,
                       max_tokens: int | None) -> tuple[int, dict[str, np.ndarray]]:
    embeds, mask, negative, negative_mask = check_prompts(arrays, inputs["prompt_embeds"]["shape"][-1], guiding, where,
                                                          max_tokens)
    n = len(embeds)
    if guiding:
        embeds, mask = np.concatenate([embeds, negative]), np.concatenate([mask, negative_mask])
    return n, {inputs["prompt_embeds"]["name"]: np.ascontiguousarray(embeds),
               inputs["prompt_attention_mask"]["name"]: np.ascontiguousarray(mask)}


def check_prompts(arrays: Mapping[str, np.ndarray], width: int, guiding: bool, where: str = "conditioning",
                  max_tokens: int | None = None):
    """Prompt conditioning by the pipelines' argument names, checked: -> prompt_embeds (n, L, width) float32,
    prompt_attention_mask (n, L) float32 0/1, and when ``guiding`` the negative ones of the same shapes (else None);
    L at most ``max_tokens`` (the manifest's ``model/max_sequence_length``) where given.
    Raises :class:`ConditioningError` naming the array."""
    arrays = dict(arrays)
    unknown = sorted(set(arrays) - set(TEXT_ARGUMENTS))
    if unknown:
        raise ConditioningError(f"{where}: unknown array {unknown[0]!r}; expected {', '.join(TEXT_ARGUMENTS)}")
    needed = TEXT_ARGUMENTS if guiding else TEXT_ARGUMENTS[:2]
    missing = [name for name in needed if name not in arrays]
    if missing:
        why = " (guidance runs the negative prompt as the unconditional half)" if missing[0].startswith("neg") else ""
        raise ConditioningError(f"{where}: array {missing[0]!r} is missing{why}; expected {', '.join(needed)}")
    embeds = _embeddings(arrays["prompt_embeds"], "prompt_embeds", width, where)
    n, length = embeds.shape[:2]
    if max_tokens is not None and length > max_tokens:
        raise ConditioningError(f"{where}: array 'prompt_embeds' has shape {embeds.shape}: {length} prompt tokens; "
                                f"expected at most the model's max_sequence_length {max_tokens}")
    mask = _mask(arrays["prompt_attention_mask"], "prompt_attention_mask", (n, length), where)
    if not guiding:
        return embeds, mask, None, None
    negative = _embeddings(arrays["negative_prompt_embeds"], "negative_prompt_embeds", width, where)
    if negative.shape != embeds.shape:
        raise ConditioningError(f"{where}: array 'negative_prompt_embeds' has shape {negative.shape}; expected "
                                f"{embeds.shape}, that of 'prompt_embeds' (both halves run as one batch)")
    negative_mask = _mask(arrays["negative_prompt_attention_mask"], "negative_prompt_attention_mask", (n, length),
                          where)
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


def example_conditioning(manifest: dict, n: int, seed: int = 0, prompt_tokens: int = 6) -> dict:
    """Conditioning for checks (verify, bench): ``{"labels": [...]}`` for a label model, else ``{"conditioning":
    {...}}`` with seeded random prompt embeddings of ``prompt_tokens`` tokens, the last two of the first prompt
    padded."""
    inputs = conditioning_inputs(manifest)
    if "label" in inputs:
        null_class = manifest["guidance"]["null_class"]
        return {"labels": [i % null_class for i in range(n)]}
    width, length = inputs["prompt_embeds"]["shape"][-1], prompt_tokens
    generator = np.random.default_rng(seed)
    mask = np.ones((n, length), dtype=np.float32)
    mask[0, max(1, length - 2):] = 0  # padded, one token kept
    return {"conditioning": {
        "prompt_embeds": generator.standard_normal((n, length, width), dtype=np.float32),
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": generator.standard_normal((n, length, width), dtype=np.float32),
        "negative_prompt_attention_mask": np.ones((n, length), dtype=np.float32)}}


def load_conditioning(path) -> dict[str, np.ndarray]:
    """``--conditioning cond.npz``: its arrays by name (never unpickled)."""
    from pathlib import Path

    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ConditioningError(f"--conditioning {path}: a single .npy array; expected an .npz archive of arrays "
                                    f"named {', '.join(TEXT_ARGUMENTS)}")
        with archive:
            return {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise ConditioningError(f"--conditioning {path}: no such file") from None
    except ConditioningError:
        raise
    except (OSError, ValueError, EOFError) as error:
        raise ConditioningError(f"--conditioning {path}: not a readable .npz archive ({error})") from None
