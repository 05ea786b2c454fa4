"""What a request conditions on, checked and turned into the model batch's inputs, from the manifest alone (numpy).

A model's conditioning inputs are the manifest's ``model/inputs`` of role ``conditioning``, each naming the
pipeline argument it is fed from and its kind (:mod:`l2c_export.core.interface`): class labels (guided against the
null class), or arrays by the pipelines' argument names (token embeddings, their mask, a pooled vector), each guided
against its ``negative`` partner. The manifest's ``guidance/rule`` says whether a request at a scale above 1 runs a
batch of 2n (the conditional half first, the unconditional half second: the order changes no value, every sample is
its own), or (a guidance-distilled model) feeds the scale to the input named by ``guidance/scale_argument``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..core.interface import (TOKEN_MASK, argument_names, conditioning_records, label_record,
                              request_records, runs_unconditional_half)
# The record-level checks live a stage down, where the PyTorch reference sampler and learning can use them too;
# re-exported here, the runtime's conditioning module, for its callers.
from ..samplers.conditioning import (ARGUMENT_NAMES, ConditioningError, batch_conditioning,  # noqa: F401
                                     check_text_conditioning, refuse_negatives)


def conditioning_inputs(manifest: dict) -> list[dict]:
    """The manifest's records of the model's conditioning inputs, in graph order."""
    return conditioning_records(manifest["model"]["inputs"])


def takes_labels(manifest: dict) -> bool:
    """Whether the model is conditioned on class labels (``--labels``)."""
    return label_record(manifest["model"]["inputs"]) is not None


def request_inputs(manifest: dict) -> list[dict]:
    """The conditioning inputs a request feeds by argument name (all but a label and those fed the scale)."""
    return request_records(manifest["model"]["inputs"], manifest["guidance"])


def request_arguments(manifest: dict, negatives: bool | None = None) -> list[str]:
    """The arrays a request may carry, by the pipelines' argument names: the model's, then (where the guidance
    rule runs an unconditional half, or ``negatives``) their ``negative`` partners."""
    if negatives is None:
        negatives = runs_unconditional_half(manifest["guidance"])
    return argument_names(request_inputs(manifest), negatives)


def classifier_free_batch(manifest: dict, cfg_scale: float) -> bool:
    """Whether a request at ``cfg_scale`` runs the 2n batch with an unconditional half: the scale is above 1 and the
    model's guidance rule runs one (not a guidance-distilled model's)."""
    return runs_unconditional_half(manifest["guidance"]) and cfg_scale > 1.0


def images_per_batch(manifest: dict, cfg_scale: float) -> int:
    """The most images one sampling batch holds: the build's model batch maximum (``batch/max``: the engines' range),
    halved when guiding, as the conditional and unconditional halves run as one batch."""
    limit = manifest["batch"]["max"]
    return max(1, limit // 2) if classifier_free_batch(manifest, cfg_scale) else limit


def model_batch_conditioning(manifest: dict, guiding: bool, labels: Sequence[int] | None = None,
                             conditioning: Mapping[str, np.ndarray] | None = None,
                             where: str = "conditioning", cfg_scale: float | None = None,
                             names: Mapping[str, str] = ARGUMENT_NAMES) -> tuple[int, dict[str, np.ndarray]]:
    """The number of samples n and, for each conditioning input of the model, its model-batch array (2n rows when
    ``guiding``: :func:`classifier_free_batch`). ``labels``: class labels (models with a label input);
    ``conditioning``: the arrays by the pipelines' argument names (the other models); ``cfg_scale``: what an input
    fed the scale takes (the manifest's scale when None). Anything missing, extra, misshapen, of the wrong dtype or
    not finite is refused naming it (``names``: how messages call labels, conditioning and the scale; the CLI passes
    its flags)."""
    guidance = manifest["guidance"]
    return batch_conditioning(manifest["model"]["inputs"], guidance, guiding, labels, conditioning, where,
                              manifest["model"].get("max_sequence_length"),
                              guidance["cfg_scale"] if cfg_scale is None else cfg_scale, names)


def example_conditioning(manifest: dict, n: int, seed: int = 0, prompt_tokens: int = 6) -> dict:
    """Conditioning for checks (verify, bench): ``{"labels": [...]}`` for a label model, else ``{"conditioning":
    {...}}`` with seeded random values of every array a request feeds, token inputs ``prompt_tokens`` long, the
    last two tokens of the first prompt masked (the unconditional half's masks keep every token)."""
    if takes_labels(manifest):
        null_class = manifest["guidance"]["null_class"]
        return {"labels": [i % null_class for i in range(n)]}
    generator = np.random.default_rng(seed)
    negatives = runs_unconditional_half(manifest["guidance"])
    arrays = {}
    for record in request_inputs(manifest):
        for negative in (False, True) if negatives else (False,):
            name = record.get("negative") if negative else record["argument"]
            if name is None:
                continue
            shape = [n, *(prompt_tokens if isinstance(size, str) else size for size in record["shape"][1:])]
            if record["kind"] == TOKEN_MASK:
                arrays[name] = np.ones(shape, dtype=np.float32)
                if not negative:
                    arrays[name][0, max(1, prompt_tokens - 2):] = 0  # padded, one token kept
            else:
                arrays[name] = generator.standard_normal(shape, dtype=np.float32)
    return {"conditioning": arrays}


def load_conditioning(path, where: str | None = None, arguments: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """``--conditioning cond.npz``: its arrays by name (never unpickled). Anything else (not a zip, a damaged or
    truncated one, a pickled object array) is a :class:`ConditioningError` naming the file (``where``: how it is
    named; default ``--conditioning PATH``) and the array, and the arrays expected (``arguments``: the model's,
    :func:`request_arguments`)."""
    import zipfile
    import zlib
    from pathlib import Path

    path = Path(path)
    where = where or f"--conditioning {path}"
    unreadable = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
    expected = (f"expected an .npz archive of arrays named {', '.join(arguments)} (numpy.savez)" if arguments
                else "expected an .npz archive of arrays (numpy.savez)")
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
