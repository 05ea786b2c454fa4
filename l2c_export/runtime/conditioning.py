"""What a request conditions on, checked and turned into the model batch's inputs, from the manifest alone (numpy).

A model's conditioning inputs are the manifest's ``model/inputs`` with a conditioning role: ``label`` (class labels,
guided against the null class), or text: ``prompt_embeds`` (text-encoder embeddings, (n, L, D)), with
``prompt_attention_mask`` ((n, L), 1 keep / 0 padding; PixArt) and ``pooled_prompt_embeds`` ((n, P); SD3, FLUX.1)
where the model has them, each guided against the ``negative_`` array of the same shape (the pipelines' argument
names). With classifier-free guidance the model batch is 2n: the conditional half first, the unconditional half
second (the order changes no value: every sample is its own). A guidance-distilled model (FLUX.1, manifest
``guidance/classifier_free`` false) runs no such batch: its ``guidance`` input, where it has one, is fed the scale.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..samplers.guidance import check_labels

TEXT_ROLES = ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")
GUIDANCE_ROLE = "guidance"
CONDITIONING_ROLES = ("label", *TEXT_ROLES, GUIDANCE_ROLE)
TEXT_ARGUMENTS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")


# How messages call a request's parts: the command line's flags, or L2CPipeline's Python arguments.
FLAG_NAMES = {"labels": "--labels", "conditioning": "--conditioning", "cfg_scale": "--cfg-scale",
              "prompt": "--prompt/--prompts", "negative_prompt": "--negative-prompt"}
ARGUMENT_NAMES = {name: name for name in FLAG_NAMES}


class ConditioningError(ValueError):
    """Conditioning that does not fit the model; the message names the array (and file) and what was expected."""


def conditioning_inputs(manifest: dict) -> dict[str, dict]:
    """role -> the manifest's input record, for each conditioning input of the model."""
    return _by_role(manifest["model"]["inputs"])


def _by_role(input_records: Sequence[dict]) -> dict[str, dict]:
    return {tensor["role"]: tensor for tensor in input_records if tensor["role"] in CONDITIONING_ROLES}


def classifier_free_batch(manifest: dict, cfg_scale: float) -> bool:
    """Whether a request at ``cfg_scale`` runs the 2n classifier-free batch: the scale is above 1 and the model's
    pipeline guides that way (not a guidance-distilled one)."""
    return manifest["guidance"].get("classifier_free", True) and cfg_scale > 1.0


def images_per_batch(manifest: dict, cfg_scale: float) -> int:
    """The most images one sampling batch holds: the build's model batch maximum (``batch/max``: the engines' range),
    halved when guiding, as the conditional and unconditional halves run as one batch."""
    limit = manifest["batch"]["max"]
    return max(1, limit // 2) if classifier_free_batch(manifest, cfg_scale) else limit


def model_batch_conditioning(manifest: dict, guiding: bool, labels: Sequence[int] | None = None,
                             conditioning: Mapping[str, np.ndarray] | None = None,
                             where: str = "conditioning", cfg_scale: float | None = None,
                             names: Mapping[str, str] = FLAG_NAMES) -> tuple[int, dict[str, np.ndarray]]:
    """The number of samples n and, for each conditioning input of the model, its model-batch array (2n rows when
    ``guiding``: :func:`classifier_free_batch`). ``labels``: class labels (models with a label input);
    ``conditioning``: the text arrays by the pipelines' argument names (models with text inputs); ``cfg_scale``: what
    a ``guidance`` input is fed (the manifest's scale when None). Anything missing, extra, misshapen, of the wrong
    dtype or not finite is refused naming it (``names``: how messages call labels, conditioning and cfg_scale)."""
    guidance = manifest["guidance"]
    return batch_conditioning(manifest["model"]["inputs"], guidance.get("null_class"), guiding, labels, conditioning,
                              where, manifest["model"].get("max_sequence_length"),
                              guidance.get("classifier_free", True),
                              guidance["cfg_scale"] if cfg_scale is None else cfg_scale, names)


def batch_conditioning(input_records: Sequence[dict], null_class: int | None, guiding: bool,
                       labels: Sequence[int] | None = None, conditioning: Mapping[str, np.ndarray] | None = None,
                       where: str = "conditioning", max_tokens: int | None = None, classifier_free: bool = True,
                       guidance_scale: float | None = None,
                       names: Mapping[str, str] = FLAG_NAMES) -> tuple[int, dict[str, np.ndarray]]:
    """:func:`model_batch_conditioning` from the model's input records (the manifest's ``model/inputs``, or a
    family's ``TensorSpec.record()``s: the PyTorch reference checks a request as the runtimes do), null class,
    longest prompt (``model/max_sequence_length``; None: unbounded), whether the model guides with a classifier-free
    batch (``guidance/classifier_free``) and the scale a ``guidance`` input is fed."""
    inputs = _by_role(input_records)
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
    feeds = {inputs[role]["name"]: np.ascontiguousarray(np.concatenate(pair) if guiding else pair[0])
             for role, pair in checked.items()}
    if GUIDANCE_ROLE in inputs:
        if guidance_scale is None:
            raise ConditioningError(f"{where}: the model's guidance input needs a guidance scale "
                                    f"({names['cfg_scale']})")
        feeds[inputs[GUIDANCE_ROLE]["name"]] = np.full(2 * n if guiding else n, guidance_scale, dtype=np.float32)
    return n, feeds


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
        if prefix and embeds.shape != checked["prompt_embeds"][0].shape:
            raise ConditioningError(f"{where}: array 'negative_prompt_embeds' has shape {embeds.shape}; expected "
                                    f"{checked['prompt_embeds'][0].shape}, that of 'prompt_embeds' (both halves run "
                                    f"as one batch)")
        n, length = embeds.shape[:2]
        if max_tokens is not None and length > max_tokens:
            raise ConditioningError(f"{where}: array '{prefix}prompt_embeds' has shape {embeds.shape}: {length} prompt "
                                    f"tokens; expected at most the model's max_sequence_length {max_tokens}")
        found = {"prompt_embeds": embeds}
        if "prompt_attention_mask" in inputs:
            name = f"{prefix}prompt_attention_mask"
            found["prompt_attention_mask"] = _mask(arrays[name], name, (n, length), where)
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
    arrays = {"prompt_embeds": generator.standard_normal((n, length, width), dtype=np.float32),
              "negative_prompt_embeds": generator.standard_normal((n, length, width), dtype=np.float32)}
    if "prompt_attention_mask" in inputs:
        arrays.update(prompt_attention_mask=mask, negative_prompt_attention_mask=np.ones((n, length), np.float32))
    if "pooled_prompt_embeds" in inputs:
        pooled = inputs["pooled_prompt_embeds"]["shape"][-1]
        arrays.update(pooled_prompt_embeds=generator.standard_normal((n, pooled), dtype=np.float32),
                      negative_pooled_prompt_embeds=generator.standard_normal((n, pooled), dtype=np.float32))
    if not manifest["guidance"].get("classifier_free", True):
        arrays = {name: array for name, array in arrays.items() if not name.startswith("negative_")}
    return {"conditioning": arrays}


def load_conditioning(path, where: str | None = None) -> dict[str, np.ndarray]:
    """``--conditioning cond.npz``: its arrays by name (never unpickled). Anything else (not a zip, a damaged or
    truncated one, a pickled object array) is a :class:`ConditioningError` naming the file (``where``: how it is
    named; default ``--conditioning PATH``) and the array."""
    import zipfile
    import zlib
    from pathlib import Path

    path = Path(path)
    where = where or f"--conditioning {path}"
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
    expected = f"expected an .npz archive of arrays named {', '.join(TEXT_ARGUMENTS)} (numpy.savez)"
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ConditioningError(f"{where}: no such file") from None
    except unreadable as error:
        raise ConditioningError(f"{where}: not a readable .npz archive ({_first_line(error)}); {expected}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ConditioningError(f"{where}: a single .npy array; {expected}")
    arrays = {}
    with archive:
        for name in archive.files:
            try:
                arrays[name] = archive[name]
            except unreadable as error:
                raise ConditioningError(f"{where}: array {name[:40]!r} is not readable ({_first_line(error)}); "
                                        f"{expected}, of numbers") from None
            if not isinstance(arrays[name], np.ndarray):  # numpy hands back a member that is no .npy as bytes
                raise ConditioningError(f"{where}: array {name[:40]!r} is not readable (not a .npy array); "
                                        f"{expected}, of numbers")
    return arrays


def _first_line(error: Exception, limit: int = 120) -> str:
    text = (str(error).splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else f"{text[:limit]}..."
