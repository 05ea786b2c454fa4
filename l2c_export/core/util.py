"""Small shared helpers: atomic file writes with the user's file modes, strict JSON in and out (files of a model
folder size-capped before they are parsed), values echoed in messages shortened."""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import reprlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


def _umask() -> int:
    """The process umask (read by setting it and setting it back: POSIX has no read-only call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so that a reader (or a
    process killed half-way) never sees a half-written file. The file gets the mode a plain ``open`` would give
    (0666 less the umask), not ``mkstemp``'s 0600."""
    atomic_write_with(path, lambda f: f.write(data))


def atomic_write_with(path: Path, write) -> None:
    """:func:`atomic_write_bytes` for content written piece by piece: ``write(f)`` writes it to the open binary
    file ``f`` (a multi-GB weights file is streamed rather than held in memory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:  # name the file the user asked for, not the temporary one
        raise OSError(error.errno, error.strerror, str(path)) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def to_json(data, where: str, indent: int | None = 1) -> str:
    """Strict JSON: NaN and infinities are refused (they are not JSON, and the C++ and Triton readers reject them)."""
    try:
        return json.dumps(data, indent=indent, allow_nan=False)
    except ValueError as error:
        raise ValueError(f"{where}: refusing to write a non-finite number (NaN or infinity) into JSON ({error})") \
            from None


def write_json(path: Path, data) -> None:
    """``data`` as strict JSON, written atomically."""
    atomic_write_text(Path(path), to_json(data, str(path)) + "\n")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number (expected a finite number)")


# Arrays and objects nested deeper than this are refused: every file l2c-export reads nests fewer than 10 levels, and
# Python's parser would otherwise end a deeply nested file (a million '[') in a RecursionError.
MAX_JSON_DEPTH = 64


def parse_json(text: str, where: str, error: type[Exception], constants: dict[str, float] | None = None) -> object:
    """Strict ``json.loads`` of ``text`` (no NaN or Infinity, except the tokens ``constants`` maps to values; at most
    :data:`MAX_JSON_DEPTH` levels of nesting), raising ``error`` naming ``where`` when it is not such JSON."""
    allowed = constants or {}

    def constant(name: str) -> float:
        return allowed[name] if name in allowed else _no_constant(name)

    too_deep = (f"{where}: JSON arrays or objects nested more than {MAX_JSON_DEPTH} levels deep; expected at most "
                f"{MAX_JSON_DEPTH}")
    try:
        data = json.loads(text, parse_constant=constant)
    except RecursionError:
        raise error(too_deep) from None
    except json.JSONDecodeError as decode_error:
        raise error(f"{where}: not valid JSON ({decode_error})") from None
    except ValueError as value_error:  # NaN / Infinity tokens
        raise error(f"{where}: not valid JSON ({value_error})") from None
    if _nesting_depth(data) > MAX_JSON_DEPTH:
        raise error(too_deep)
    return data


def _nesting_depth(data: object) -> int:
    """How many arrays and objects deep ``data`` nests (iteratively: no recursion to exhaust)."""
    deepest, pending = 0, [(data, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, (list, dict)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:  # deeper is refused anyway; no need to walk on
                pending.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return deepest


def read_json(path: Path, error: type[Exception], missing_hint: str = "",
              constants: dict[str, float] | None = None) -> object:
    """Strict JSON (:func:`parse_json`, ``constants`` as there) read from ``path``, raising ``error`` naming the file
    when it is missing, unreadable or not such JSON."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise error(f"{path}: no such file{missing_hint}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder; expected a JSON file") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not valid JSON (not UTF-8 text)") from None
    return parse_json(text, str(path), error, constants)


# ---------------------------------------------------------------------------------------------------------------------
# Values from a file, echoed in a message: at most this many characters (a 50 MB class name is not echoed whole).
MAX_ECHO = 80

_ECHO = reprlib.Repr()
_ECHO.maxstring = _ECHO.maxother = _ECHO.maxlong = MAX_ECHO
_ECHO.maxlist = _ECHO.maxtuple = _ECHO.maxdict = _ECHO.maxset = 8
_ECHO.maxlevel = 3


def short_repr(value: object, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` shortened to at most ``limit`` characters (long strings, numbers, lists and nested values
    elided with ``...``), for every message that echoes a value read from a file."""
    text = _ECHO.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class JsonCap:
    """The largest JSON file of one kind that is parsed, and why that is enough (parsing takes some 20-40x the file's
    size in memory, so a file is measured before it is read)."""

    max_bytes: int
    reason: str


_KIB, _MIB = 1 << 10, 1 << 20
# The JSON files read from a model folder (a diffusers pipeline folder), by kind.
FOLDER_JSON_CAPS = {
    "model_index": JsonCap(64 * _KIB, "a pipeline's model_index.json names a handful of components (under 1 KB)"),
    "config": JsonCap(1 * _MIB, "a model's or scheduler's config.json holds some tens of options (under 10 KB; "
                                "trained_betas, the longest, 1000 numbers)"),
    "weights_index": JsonCap(16 * _MIB, "a sharded model's index maps each parameter to its shard (FLUX.1's "
                                        "transformer: about 120 KB)"),
    "tokenizer": JsonCap(48 * _MIB, "the largest tokenizer.json in common use (a 262k-token vocabulary) is about "
                                    "33 MB; T5's is 2.4 MB"),
    "tokenizer_config": JsonCap(16 * _MIB, "tokenizer_config.json and special_tokens_map.json name the special "
                                           "tokens (T5's: about 20 KB)"),
}


def check_file_size(path: Path, kind: str, error: type[Exception]) -> int:
    """The size of ``path`` (a file of kind ``kind``, :data:`FOLDER_JSON_CAPS`), refused with the reason when it is
    larger than that kind's cap; for files handed to a library (tokenizers, transformers) unread."""
    cap = FOLDER_JSON_CAPS[kind]
    try:
        size = Path(path).stat().st_size
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    if size > cap.max_bytes:
        raise error(f"{path}: {format_bytes(size)}; at most {format_bytes(cap.max_bytes)} is read ({cap.reason})")
    return size


def read_folder_json(path: Path, kind: str, error: type[Exception], missing_hint: str = "",
                     constants: dict[str, float] | None = None) -> object:
    """:func:`read_json` for a file of a model folder: its size is checked against the cap of its kind
    (:data:`FOLDER_JSON_CAPS`) before it is read, and no more than the cap is ever read (a file growing meanwhile,
    or a device, is refused the same way)."""
    cap = FOLDER_JSON_CAPS[kind]
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a folder; expected a JSON file")
    try:
        with open(path, "rb") as f:
            data = f.read(cap.max_bytes + 1)
    except FileNotFoundError:
        raise error(f"{path}: no such file{missing_hint}") from None
    if len(data) > cap.max_bytes:
        size = max(len(data), path.stat().st_size)
        raise error(f"{path}: {format_bytes(size)}; at most {format_bytes(cap.max_bytes)} is read ({cap.reason})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not valid JSON (not UTF-8 text)") from None
    return parse_json(text, str(path), error, constants)


def format_bytes(size: float) -> str:
    """``size`` bytes as 812 B, 3.4 KiB, 1.2 GiB, ... (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(size) < 1024 or unit == "PiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def check_finite(value: float, what: str, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a float if it is finite and within [low, high]; else ValueError naming ``what``."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} is {short_repr(value)}; expected a finite number")
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = (f"at least {low}" if high is None else f"at most {high}" if low is None
                  else f"in [{low}, {high}]")
        raise ValueError(f"{what} is {short_repr(value)}; expected a number {bounds}")
    return number


def replace_folder(staging: Path, out_dir: Path) -> None:
    """Puts the finished staging folder in place of ``out_dir``: one atomic exchange where the file system allows it,
    else two renames (a build killed between them is repaired by the next: ``builder.output_folder.recover``)."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    if exchange_names(staging, out_dir):
        shutil.rmtree(staging, ignore_errors=True)  # now the previous build
        return
    old = out_dir.parent / f".{out_dir.name}.old"
    os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange_names(a: Path, b: Path) -> bool:
    """Atomically swaps the names ``a`` and ``b`` (Linux ``renameat2`` with ``RENAME_EXCHANGE``; Python's ``os`` has
    no binding for it, hence ctypes). False where the kernel, C library or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
