"""Loading checkpoints in their official layout (DiT, U-ViT, any family), and torch files in general, without
unrestricted unpickling.

Accepted: a plain ``state_dict`` ``.pt`` (``DiT-XL-2-256x256.pt``), a DiT training checkpoint
(``{"model", "ema", "opt", "args"}``, of which ``ema`` is taken, as DiT's ``find_model`` does) and ``.safetensors``.
"""

from __future__ import annotations

import argparse
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch

from ..core.util import short_repr
from .dit.model import DiT, DiTConfig

# The only non-tensor global that DiT and L2C training files contain (their ``args``). weights_only=True forbids
# everything else, so a crafted file can construct nothing beyond tensors, containers and this plain namespace.
_ALLOWED_GLOBALS = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


def load_torch_file(path: str | Path) -> object:
    """``torch.load`` with ``weights_only=True``, allowing only ``argparse.Namespace`` beyond tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says what matters
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ... depending on the damage
        raise CheckpointError(f"{path}: {_why_not_loadable(error)}") from None


def _why_not_loadable(error: Exception) -> str:
    """torch's message, less its advice to pass ``weights_only=False`` (which would run whatever the file holds)."""
    text = str(error)
    refused = re.search(r"(?:[Uu]nsupported global:|unsupported) GLOBAL ([\w.]+)", text)
    if refused:
        return (f"refused: it needs {refused.group(1)!r}, which only unrestricted unpickling would create (a "
                f"checkpoint holds tensors; only argparse.Namespace is allowed besides them)")
    if "Unsupported operand" in text:
        return ("not a torch file that loads without unrestricted unpickling (its pickle stream has an instruction "
                "torch's safe loader refuses: a damaged file, not a torch file, or objects other than tensors)")
    if "weights_only" in text or "Weights only load failed" in text:
        return "refused: it holds objects other than tensors, which only unrestricted unpickling would create"
    return f"not a torch file (.pt/.pth zip or pickle archive) that loads safely ({type(error).__name__}: " \
           f"{text.strip().splitlines()[0] if text.strip() else 'no detail'})"


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state_dict of a ``.pt``/``.pth``/``.bin`` or ``.safetensors`` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        try:
            return check_finite_tensors(load_file(str(path)), path)
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
    data = load_torch_file(path)
    if isinstance(data, Mapping) and "ema" in data:
        data = data["ema"]
    elif isinstance(data, Mapping) and "model" in data and isinstance(data["model"], Mapping):
        data = data["model"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: expected a state_dict (parameter name -> tensor), "
                              f"or a training checkpoint with an 'ema' or 'model' state_dict")
    return check_finite_tensors(dict(data), path)


# safetensors' dtype names (its header's "dtype") -> torch's, for checking a file against a model before reading it
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def load_safetensors_into(files: list[Path], module: torch.nn.Module, source: str) -> None:
    """Copies the tensors of ``files`` (one model's safetensors shards) into ``module``'s state one tensor at a time,
    cast to the module's dtypes, after checking names, shapes and dtypes from the files' headers alone: the weights
    are never held twice (an SD3-medium transformer is 8 GB in fp32). Refuses as :func:`load_state_dict` and
    :func:`check_state_dict` do, naming the file."""
    from safetensors import safe_open

    headers: dict[str, torch.Tensor] = {}  # name -> a meta tensor of the file's shape and dtype
    for file in files:
        if not Path(file).is_file():
            raise CheckpointError(f"{file}: no such file")
        try:
            with safe_open(str(file), framework="pt") as opened:
                for name in opened.keys():
                    header = opened.get_slice(name)
                    dtype = _SAFETENSORS_DTYPES.get(header.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"{file}: tensor {short_repr(name)} has dtype {header.get_dtype()}; "
                                              f"expected one of {', '.join(_SAFETENSORS_DTYPES)}")
                    headers[name] = torch.empty(header.get_shape(), dtype=dtype, device="meta")
        except CheckpointError:
            raise
        except Exception as error:
            raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from None
    check_state_dict(headers, module, source)
    target = module.state_dict()
    with torch.no_grad():
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as opened:
                    for name in opened.keys():
                        target[name].copy_(check_finite_tensors({name: opened.get_tensor(name)}, file)[name])
            except CheckpointError:
                raise
            except Exception as error:
                raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from None


def check_finite_tensors(state_dict: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """Refuses a state_dict with NaN or infinite values, naming the first tensor that has them."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{path}: tensor {short_repr(name)} holds {bad} NaN or infinite value(s); expected "
                                  f"finite weights")
    return state_dict


def check_state_dict(state_dict: Mapping[str, torch.Tensor], model: torch.nn.Module, source: str) -> None:
    """Raises CheckpointError naming the missing and unexpected keys and the mismatched shapes, or the first tensor
    that is not floating-point where the model has floating weights (an int8 or int32 state_dict, a quantized
    export: ``load_state_dict`` would cast its integers to float without a word)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{name}: file {tuple(state_dict[name].shape)}, model {tuple(expected[name].shape)}"
        for name in expected
        if name in state_dict and tuple(state_dict[name].shape) != tuple(expected[name].shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_abbreviate(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_abbreviate(unexpected)}")
        if mismatched:
            problems.append(f"mismatched shapes ({len(mismatched)}): {_abbreviate(mismatched)}")
        raise CheckpointError(f"{source}: does not fit the model; " + "; ".join(problems))
    for name, tensor in state_dict.items():
        if expected[name].is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(f"{source}: tensor {short_repr(name)} is {str(tensor.dtype).removeprefix('torch.')}; "
                                  f"expected floating-point weights (float32, float16 or bfloat16), not an integer "
                                  f"or quantized export of them")


def load_dit(path: str | Path, config: DiTConfig) -> DiT:
    """A DiT of ``config`` with the weights of ``path``, in eval mode, in fp32."""
    return load_into(path, DiT(config))


def load_into(path: str | Path, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (of any family) with the weights of ``path``, checked key by key and shape by shape, in eval mode,
    in fp32."""
    state_dict = load_state_dict(path)
    check_state_dict(state_dict, model, str(path))
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.eval()


def _abbreviate(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")
