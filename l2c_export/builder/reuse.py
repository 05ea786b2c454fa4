"""Incremental builds: the key of each file (a hash of what produced it) and reusing a previous build's file of the
same key."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

from ..core import manifest as manifest_io

PACKAGE = Path(__file__).resolve().parents[1]
# The stages whose code makes a build's files (what ``builder.build`` imports, directly or not; tests/test_imports.py
# checks that it imports nothing else): a change to any of their sources changes every key.
EXPORTER_STAGES = ("core", "samplers", "models", "export", "builder")


def previous_files(out_dir: Path) -> dict[str, Path]:
    """key -> file of the previous build in ``out_dir`` (only files inside it whose size and sha256 still match)."""
    try:
        data = manifest_io.load(out_dir, verify_files=False)
    except manifest_io.ManifestError:
        return {}
    files = {}
    for entry in manifest_io.all_files(data):
        path = manifest_io.file_path(out_dir, entry["file"], str(out_dir / manifest_io.MANIFEST_NAME))
        if "key" in entry and path.is_file() and path.stat().st_size == entry["bytes"] \
                and manifest_io.sha256_of(path) == entry["sha256"]:
            files[entry["key"]] = path
    return files


def reuse(previous: dict[str, Path], key: str, target: Path, reused: list[str]) -> bool:
    source = previous.get(key)
    if source is None:
        return False
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    reused.append(target.name)
    return True


def key_of(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tool_versions(packages=("l2c-export", "torch", "onnx", "onnxruntime-gpu", "onnxruntime", "tensorrt",
                         "polygraphy")) -> dict[str, str | None]:
    from importlib import metadata

    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


@functools.lru_cache(maxsize=None)
def exporter_digest(package: Path = PACKAGE) -> str:
    """The exporter's own version: sha256 (32 hex digits) of the path and bytes of every ``.py`` file of
    :data:`EXPORTER_STAGES` under ``package`` (``l2c_export/``), read once per process. Part of every file's key,
    so a changed exporter rebuilds what an unchanged one would reuse, whether or not its package version moved."""
    digest = hashlib.sha256()
    for stage in EXPORTER_STAGES:
        for path in sorted((Path(package) / stage).rglob("*.py")):
            digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:32]
