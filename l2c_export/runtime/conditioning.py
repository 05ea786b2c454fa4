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

# The record-level checks live a stage down, where the PyTorch reference sampler and learning can use them too;
# re-exported here, the runtime's conditioning module, for its callers.
from ..samplers.conditioning import (CONDITIONING_ROLES, GUIDANCE_ROLE, MASK_ROLES, TEXT_ARGUMENTS,  # noqa: F401
                                     TEXT_ROLES, ARGUMENT_NAMES, FLAG_NAMES, ConditioningError, batch_conditioning, by_role,
                                     check_prompts, check_text_conditioning, refuse_negatives)


def conditioning_inputs(manifest: dict) -> dict[str, dict]:
    """role -> the manifest's input record, for each conditioning input of the model."""
    return by_role(manifest["model"]["inputs"])


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
    for mask_role in MASK_ROLES:
        if mask_role in inputs:
            arrays.update({mask_role: mask, f"negative_{mask_role}": np.ones((n, length), np.float32)})
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
