"""Small shared helpers: atomic file writes with the user's file modes, strict JSON in and out."""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import shutil
import tempfile
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


def check_finite(value: float, what: str, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a float if it is finite and within [low, high]; else ValueError naming ``what``."""
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} is {value!r}; expected a finite number")
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = (f"at least {low}" if high is None else f"at most {high}" if low is None
                  else f"in [{low}, {high}]")
        raise ValueError(f"{what} is {value!r}; expected a number {bounds}")
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
