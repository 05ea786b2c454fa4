"""``manifest.json``: the only contract between building and running. No PyTorch here.

Checked against the JSON Schema shipped in ``schemas/manifest.schema.json`` when written and when read; a manifest of
a newer schema version than this reader knows is refused before anything else is looked at, and one of version 1
(DiT only, before model families) is upgraded in memory to the current shape when read.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from .util import atomic_write_text, read_json

SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
SCHEMA_PATH = Path(__file__).parent / "schemas" / "manifest.schema.json"


class ManifestError(ValueError):
    """A manifest or one of its files that cannot be used; the message names the file and the field."""


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(folder: Path, name: str, key: str | None = None) -> dict:
    """The manifest record of ``folder / name``: file, sha256, bytes (and the key that produced it)."""
    path = folder / name
    entry = {"file": name, "sha256": sha256_of(path), "bytes": path.stat().st_size}
    if key is not None:
        entry["key"] = key
    return entry


def validate(data: dict, where: str) -> None:
    import jsonschema

    version = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ManifestError(f"{where}: field 'schema_version' is {version}, newer than this l2c-export reads "
                            f"({SCHEMA_VERSION}); upgrade l2c-export or rebuild the engines")
    try:
        jsonschema.validate(data, schema())
    except jsonschema.ValidationError as error:
        field = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ManifestError(f"{where}: field '{field}': {error.message}") from None


def write(folder: Path, data: dict) -> Path:
    """Validates and writes ``folder/manifest.json`` atomically."""
    path = Path(folder) / MANIFEST_NAME
    validate(data, str(path))
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")
    return path


def all_files(data: dict) -> list[dict]:
    """Every file record of a manifest: weights, graphs, engines, timing cache (each once)."""
    entries = [data["weights"]]
    for subset in data["subsets"]:
        entries += [subset["graph"], subset["engine"]]
    if "tensorrt" in data and "timing_cache" in data["tensorrt"]:
        entries.append(data["tensorrt"]["timing_cache"])
    unique = {}
    for entry in entries:
        unique.setdefault(entry["file"], entry)
    return list(unique.values())


def load(folder: str | Path, verify_files: bool = True) -> dict:
    """Reads and validates ``folder/manifest.json``; with ``verify_files`` checks every file's sha256."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME if folder.is_dir() else folder
    folder = path.parent
    data = read_json(path, ManifestError, f" (is {folder} an l2c-export build?)")
    if isinstance(data, dict) and data.get("schema_version") == 1:
        data = upgrade_v1(data, str(path))
    validate(data, str(path))
    if verify_files:
        for entry in all_files(data):
            file = folder / entry["file"]
            if not file.is_file():
                raise ManifestError(f"{path}: file {entry['file']} is missing from {folder}")
            actual = sha256_of(file)
            if actual != entry["sha256"]:
                raise ManifestError(f"{file}: sha256 {actual} does not match the manifest's {entry['sha256']} "
                                    f"(the file was changed after the build)")
    return data


_V1_ROLES = {"x": "sample", "t": "time", "y": "label", "model_out": "output"}


def upgrade_v1(data: dict, where: str) -> dict:
    """A version 1 manifest (DiT, DDIM/DDPM, tensors without roles) in the version 2 shape: family ``dit``, roles by
    the names version 1 used, the model interface taken from the first subset, and the sampler's calls."""
    try:
        for subset in data["subsets"]:
            for tensor in (*subset["inputs"], *subset["outputs"]):
                tensor["role"] = _V1_ROLES.get(tensor["name"], "cache" if tensor["name"].startswith("cache_")
                                               else "fresh")
        first = data["subsets"][0]
        data["model"]["family"] = "dit"
        data["model"]["inputs"] = [t for t in first["inputs"] if t["role"] in ("sample", "time", "label")]
        data["model"]["output"] = next(t for t in first["outputs"] if t["role"] == "output")
        sampler = data["sampler"]
        sampler["num_calls"] = sampler["num_steps"]
        sampler["model_times"] = [float(t) for t in sampler["timesteps"]]
    except (KeyError, TypeError, IndexError, StopIteration) as error:
        raise ManifestError(f"{where}: a version 1 manifest without the field {error} cannot be upgraded; rebuild "
                            f"the engines") from None
    data["schema_version"] = SCHEMA_VERSION
    return data
