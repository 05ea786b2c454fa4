"""What ``--out`` may be (absent, empty, or a previous build and nothing else), and putting back a previous build that
a killed build left beside it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..core import manifest as manifest_io


class OutputFolderError(ValueError):
    """``--out`` is not a place a build may be written to; the message says why and what is expected."""


def check_output_folder(out_dir: Path) -> None:
    """Refuses an ``--out`` that is not absent, empty, or a previous l2c-export build (a valid manifest and nothing
    but the files it names), so that replacing it can lose nothing of the user's."""
    if out_dir.is_symlink():
        raise OutputFolderError(f"--out {out_dir}: is a symbolic link; give the folder itself")
    if not out_dir.exists():
        parent = next((p for p in out_dir.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise OutputFolderError(f"--out {out_dir}: {parent} is a file, not a folder")
        return
    if not out_dir.is_dir():
        raise OutputFolderError(f"--out {out_dir}: is a file; expected a folder (absent, empty or a previous build)")
    entries = sorted(os.listdir(out_dir))
    if not entries:
        return
    not_a_build = (f"--out {out_dir}: not empty and not an l2c-export build, refusing to replace it (it holds "
                   f"{', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''}); give an absent or empty folder, "
                   f"or a previous build's")
    if manifest_io.MANIFEST_NAME not in entries:
        raise OutputFolderError(not_a_build)
    try:
        data = manifest_io.load(out_dir, verify_files=False)
    except manifest_io.ManifestError as error:
        raise OutputFolderError(f"{not_a_build}: {error}") from None
    named = {manifest_io.MANIFEST_NAME} | {entry["file"].split("/")[0] for entry in manifest_io.all_files(data)}
    foreign = [entry for entry in entries if entry not in named]
    if foreign:
        raise OutputFolderError(f"--out {out_dir}: a previous build, but it also holds files the build did not write "
                                f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); move them away "
                                f"first, a new build replaces the whole folder")


def recover(out_dir: Path) -> None:
    """Before anything else (under the lock): a build killed between the two renames of
    :func:`l2c_export.core.util.replace_folder` left the
    previous build at ``.<name>.old`` and nothing at ``out_dir``: put it back. A leftover ``.old`` beside a complete
    ``out_dir`` is stale and removed."""
    old = out_dir.parent / f".{out_dir.name}.old"
    if old.exists():
        if out_dir.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, out_dir)
