"""Small shared helpers: atomic file and folder writes, JSON files read with errors that name them."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so that a reader (or a
    process killed half-way) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def read_json(path: Path, error: type[Exception], missing_hint: str = "") -> object:
    """``json.loads`` of ``path``, raising ``error`` naming the file when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such file{missing_hint}") from None
    except json.JSONDecodeError as decode_error:
        raise error(f"{path}: not valid JSON ({decode_error})") from None


def replace_folder(staging: Path, target: Path) -> None:
    """Puts the finished ``staging`` folder in place of ``target`` with renames only (both in one parent folder, or
    at least on one file system), so a reader sees the old folder or the new one, never a mix."""
    old = target.parent / f".{target.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
