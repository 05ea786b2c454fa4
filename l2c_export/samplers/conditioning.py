"""A request's conditioning checked and batched from the model's input records alone (numpy): what the runtime, the
PyTorch reference sampler and learning share. :mod:`l2c_export.runtime.conditioning` reads the records from a
manifest; a family's :class:`~l2c_export.models.TensorSpec` records say the same before a build.

A model's conditioning inputs are its input records of role ``conditioning`` (:mod:`l2c_export.core.interface`):
each fed from the pipeline argument it names, checked by its kind: a ``label`` (class labels, guided against the
null class), ``token_embeddings`` (n, L, D), a ``token_mask`` (n, L) of 0/1 over the same tokens, a ``pooled``
vector (n, P), a ``scalar`` (n,); where the guidance rule runs an unconditional half, each is guided against its
``negative`` partner of the same shape (or, without one, the same value): where a token mask covers the token axis,
the partners' prompt length may differ (Qwen-Image's prompt and negative prompt), and the shorter half is
padded to the longer with zero embeddings under mask 0 (:func:`pad_halves`), where the mask's record says
``pads_negative`` (its model treats a masked token as absent). The input whose argument is the
guidance's scale argument is fed the scale. With an unconditional half the model batch is 2n: the conditional half
first, the unconditional half second.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..core.interface import (CONDITIONING, DEFAULT_SCALE_ARGUMENT, POOLED, SCALAR, TOKEN_EMBEDDINGS, TOKEN_MASK,
                              argument_names, conditioning_records, label_record, request_records,
                              runs_unconditional_half, scale_fed)
from .guidance import check_labels

# How messages call a request's parts by default: L2CPipeline's Python arguments (the command line passes its flags,
# l2c_export.cli.options.FLAG_NAMES; L2CPipeline the names a call used, guidance_scale's among them).
ARGUMENT_NAMES = {"labels": "labels", "conditioning": "conditioning", "cfg_scale": DEFAULT_SCALE_ARGUMENT,
                  "prompt": "prompt", "negative_prompt": "negative_prompt"}


class ConditioningError(ValueError):
    """Conditioning that does not fit the model; the message names the array (and file) and what was expected."""


def _array(where: str, name: str) -> str:
    """How a message names array ``name``: ``where: array 'name'`` (of a file, or of a dict of arrays), or with
    ``where`` empty (the arrays given as the pipeline's keyword arguments) the argument ``name`` itself."""
    return f"{where}: array {name!r}" if where else name


def _at(where: str) -> str:
    return f"{where}: " if where else ""


def batch_conditioning(input_records: Sequence[dict], guidance: Mapping, guiding: bool,
                       labels: Sequence[int] | None = None, conditioning: Mapping[str, np.ndarray] | None = None,
                       where: str = "conditioning", max_tokens: int | None = None,
                       guidance_scale: float | None = None,
                       names: Mapping[str, str] = ARGUMENT_NAMES) -> tuple[int, dict[str, np.ndarray]]:
    """:func:`model_batch_conditioning` from the model's input records (the manifest's ``model/inputs``, or a
    family's ``TensorSpec.record()``s: the PyTorch reference checks a request as the runtimes do), its guidance
    record (``rule``, ``scale_argument``, ``null_class``: the manifest's ``guidance``, or a family's
    ``guidance_record``), longest prompt (``model/max_sequence_length``; None: unbounded) and the scale an input fed
    the scale takes."""
    label = label_record(input_records)
    if label is not None:
        if conditioning:
            raise ConditioningError(f"{_at(where)}this model is conditioned on class labels ({names['labels']}), not "
                                    f"on {', '.join(sorted(conditioning))}")
        if labels is None or len(labels) == 0:
            raise ConditioningError("no labels given; expected at least one class label")
        labels = np.asarray([int(label) for label in labels], dtype=np.int64)
        null_class = guidance.get("null_class")
        check_labels(labels, null_class)
        batch = np.concatenate([labels, np.full_like(labels, null_class)]) if guiding else labels
        return len(labels), {label["name"]: batch}
    records = request_records(input_records, guidance)
    if not records:
        raise ConditioningError(f"{_at(where)}the manifest's model inputs have no conditioning a request feeds (no "
                                f"input of role {CONDITIONING} but those fed the guidance scale)")
    if labels is not None:
        raise ConditioningError(f"{names['labels']}: this model is conditioned on prompt embeddings "
                                f"({names['conditioning']}), not class labels")
    arrays = dict(conditioning or {})
    if not runs_unconditional_half(guidance):
        refuse_negatives(arrays, where, names)
    checked = check_text_conditioning(arrays, records, guiding, where, max_tokens)
    n = len(next(iter(checked.values()))[0])
    if guiding:
        checked = pad_halves(checked, records)
    feeds = {record["name"]: np.ascontiguousarray(np.concatenate(checked[record["argument"]]) if guiding
                                                  else checked[record["argument"]][0])
             for record in records}
    for record in conditioning_records(input_records):
        if scale_fed(record, guidance):
            if guidance_scale is None:
                raise ConditioningError(f"{_at(where)}the model's {record['argument']} input needs a guidance scale "
                                        f"({names['cfg_scale']})")
            feeds[record["name"]] = np.full(2 * n if guiding else n, guidance_scale, dtype=np.float32)
    return n, feeds


def padded_token_axes(records: Sequence[dict]) -> set[str]:
    """The named token axes covered by a token mask that ``pads_negative``: there the two halves' prompt lengths may
    differ (a masked token is absent), the shorter padded under mask 0 (:func:`pad_halves`)."""
    return {r["shape"][1] for r in records if r["kind"] == TOKEN_MASK and r.get("pads_negative")}


def pad_halves(checked: Mapping[str, tuple[np.ndarray, np.ndarray]],
               records: Sequence[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """:func:`check_text_conditioning`'s (array, unconditional array) pairs with the token axis (axis 1) of each
    token input made as long in both halves: the shorter padded with zeros (zero embeddings, mask 0), so that both
    halves run as one batch. Equal lengths are left as they are."""
    padded = dict(checked)
    for record in records:
        if record["kind"] not in (TOKEN_EMBEDDINGS, TOKEN_MASK):
            continue
        array, negative = checked[record["argument"]]
        length = max(array.shape[1], negative.shape[1])

        def pad(a):
            return np.pad(a, [(0, 0), (0, length - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
        padded[record["argument"]] = (pad(array), pad(negative))
    return padded


def refuse_negatives(arrays: Mapping[str, np.ndarray], where: str, names: Mapping[str, str] = ARGUMENT_NAMES) -> None:
    """A guidance-distilled model (a guidance rule with no unconditional half) runs no negative prompt: a
    ``negative_`` array is refused by name rather than ignored."""
    negatives = sorted(name for name in arrays if name.startswith("negative_"))
    if negatives:
        raise ConditioningError(f"{_array(where, negatives[0])} is not used: this model is guidance-distilled "
                                f"({names['cfg_scale']} feeds its guidance embedding; no negative prompt runs); leave "
                                f"it out")


def check_text_conditioning(arrays: Mapping[str, np.ndarray], records: Sequence[dict], guiding: bool,
                            where: str = "conditioning",
                            max_tokens: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A request's arrays by the pipelines' argument names, for the conditioning inputs a request feeds
    (``records``: :func:`l2c_export.core.interface.request_records`), checked by kind: argument -> (array, the
    unconditional half's when ``guiding``: its ``negative`` partner, or the array itself where the input has none;
    else None), float32. Token embeddings (n, L, D) with L at most ``max_tokens`` (the manifest's
    ``model/max_sequence_length``) where given, their partners of the same shape; a token mask (n, L) 0/1 over the
    embeddings' L; a pooled vector (n, P); a scalar (n,). Raises :class:`ConditioningError` naming the array."""
    expected = argument_names(records, negatives=True)
    unknown = sorted(set(arrays) - set(expected))
    if unknown:
        raise ConditioningError(f"{_at(where)}unknown array {unknown[0]!r}; expected {', '.join(expected)}")
    needed = argument_names(records, negatives=guiding)
    missing = [name for name in needed if name not in arrays]
    if missing:
        why = " (guidance runs the negative prompt as the unconditional half)" if missing[0].startswith("neg") else ""
        raise ConditioningError(f"{_array(where, missing[0])} is missing{why}; expected {', '.join(needed)}")
    checked: dict[str, tuple] = {}
    paddable = padded_token_axes(records)
    halves = (False, True) if guiding else (False,)
    for negative in halves:
        n, axes = None, {}  # the prompts, and the size of each named axis in this half
        for record in records:
            if negative and not record.get("negative"):
                checked[record["argument"]] = (checked[record["argument"]][0],) * 2
                continue
            name = record["negative"] if negative else record["argument"]
            kind, shape = record["kind"], record["shape"][1:]
            if n is None and np.ndim(arrays[name]) > 0:  # the first array given says how many prompts
                n = len(arrays[name])
            if kind == TOKEN_EMBEDDINGS:
                like = checked[record["argument"]][0] if negative else None
                array = _embeddings(arrays[name], name, shape[-1], where, like, record["argument"],
                                    any_length=shape[0] in paddable)
                if max_tokens is not None and array.shape[1] > max_tokens:
                    raise ConditioningError(f"{_array(where, name)} has shape {array.shape}: {array.shape[1]} "
                                            f"prompt tokens; expected at most the model's max_sequence_length "
                                            f"{max_tokens}")
                axes.setdefault(shape[0], array.shape[1])
            elif kind == TOKEN_MASK:
                array = _mask(arrays[name], name, (n, axes.get(shape[0])), where)
            elif kind == POOLED:
                array = _pooled(arrays[name], name, n, shape[-1], where)
            elif kind == SCALAR:
                array = _scalars(arrays[name], name, n, where)
            else:
                raise ConditioningError(f"{_at(where)}input {record['name']!r} is of kind {kind!r}, which a request's "
                                        f"arrays do not feed")
            checked[record["argument"]] = (array, None) if not negative else (checked[record["argument"]][0], array)
    return checked


def _embeddings(array, name: str, width: int, where: str, like: np.ndarray | None = None,
                positive: str = "", any_length: bool = False) -> np.ndarray:
    """Token embeddings (n, L, width), finite; the unconditional half's of ``like``'s shape (its ``positive``
    argument's), as both halves run as one batch, or of any length L with ``any_length`` (a mask covers the tokens:
    the shorter half is padded)."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ConditioningError(f"{_array(where, name)} holds {array.dtype} values; expected float32 embeddings")
    if array.ndim != 3 or array.shape[0] < 1 or array.shape[1] < 1 or array.shape[2] != width:
        raise ConditioningError(f"{_array(where, name)} has shape {array.shape}; expected (n, L, {width})")
    if not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise ConditioningError(f"{_array(where, name)}: {bad} of its {array.size} values are NaN or infinite; "
                                f"expected finite embeddings")
    if like is not None and any_length and array.shape[::2] != like.shape[::2]:
        raise ConditioningError(f"{_array(where, name)} has shape {array.shape}; expected ({like.shape[0]}, L, "
                                f"{like.shape[2]}), as many prompts as {positive!r} (any length L: the shorter is "
                                f"padded under its mask)")
    if like is not None and not any_length and array.shape != like.shape:
        raise ConditioningError(f"{_array(where, name)} has shape {array.shape}; expected {like.shape}, that of "
                                f"{positive!r} (both halves run as one batch)")
    return array.astype(np.float32)


def _scalars(array, name: str, n: int, where: str) -> np.ndarray:
    array = np.asarray(array)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ConditioningError(f"{_array(where, name)} holds {array.dtype} values; expected numbers")
    if array.shape != (n,) or not np.isfinite(array).all():
        raise ConditioningError(f"{_array(where, name)} has shape {array.shape}; expected ({n},) finite numbers "
                                f"(one per prompt)")
    return array.astype(np.float32)


def _pooled(array, name: str, n: int, width: int, where: str) -> np.ndarray:
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ConditioningError(f"{_array(where, name)} holds {array.dtype} values; expected float32 embeddings")
    if array.shape != (n, width):
        raise ConditioningError(f"{_array(where, name)} has shape {array.shape}; expected ({n}, {width}) (one "
                                f"pooled embedding per prompt)")
    if not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise ConditioningError(f"{_array(where, name)}: {bad} of its {array.size} values are NaN or infinite; "
                                f"expected finite embeddings")
    return array.astype(np.float32)


def _mask(array, name: str, shape: tuple[int, int], where: str) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != shape:
        raise ConditioningError(f"{_array(where, name)} has shape {array.shape}; expected {shape} (n, L of the "
                                f"embeddings)")
    if not (array.dtype == bool or np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ConditioningError(f"{_array(where, name)} holds {array.dtype} values; expected a 0/1 mask")
    values = array.astype(np.float64)
    if not np.isin(values, (0.0, 1.0)).all():
        raise ConditioningError(f"{_array(where, name)} holds values other than 0 and 1; expected a 0/1 mask")
    if not values.any(axis=1).all():
        raise ConditioningError(f"{_array(where, name)} masks every token of a prompt; expected at least one 1 "
                                f"per row")
    return values.astype(np.float32)
