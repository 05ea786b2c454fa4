"""The files of a diffusers pipeline folder as a build reads them: JSON objects within their size caps, and
safetensors weights (a checkpoint is never unpickled here)."""

from __future__ import annotations

from pathlib import Path

from ...core.util import read_folder_json, short_repr

MODEL_INDEX = "model_index.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


class DiffusersFolderError(ValueError):
    """A diffusers folder that cannot be used; the message names the file and the field."""


def read_json_object(path: Path, what: str, kind: str = "config") -> dict:
    """A JSON object from a folder's file (size-capped by ``kind``: :data:`l2c_export.core.util.FOLDER_JSON_CAPS`);
    ``what``: what the file is, said when it is missing."""
    if not path.is_file():
        raise DiffusersFolderError(f"{path}: missing; {what}")
    data = read_folder_json(path, kind, DiffusersFolderError)
    if not isinstance(data, dict):
        raise DiffusersFolderError(f"{path}: expected a JSON object")
    return data


def safetensors_weights(part: Path, stem: str) -> None:
    """Refuses a component whose weights are not safetensors (a checkpoint is never unpickled here)."""
    if not ((part / f"{stem}.safetensors").is_file() or (part / f"{stem}.safetensors.index.json").is_file()):
        pickled = sorted(p.name for p in part.glob("*.bin"))
        raise DiffusersFolderError(f"{part}: no {stem}.safetensors"
                                   + (f" ({', '.join(pickled)} is pickled, which is never loaded here; re-save with "
                                      f"safe_serialization=True)" if pickled else ""))


def weight_files(transformer_dir: Path) -> list[Path]:
    """The transformer's safetensors files: the single file, or the shards its index names (each inside the
    folder). Pickled ``.bin`` weights are refused: a checkpoint is never unpickled here."""
    single, sharded = transformer_dir / WEIGHTS_FILE, transformer_dir / WEIGHTS_INDEX
    if single.is_file():
        return [single]
    if sharded.is_file():
        weight_map = read_json_object(sharded, "", kind="weights_index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise DiffusersFolderError(f"{sharded}: field 'weight_map' must map parameter names to shard files")
        files = []
        for name in dict.fromkeys(weight_map.values()):
            if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".") \
                    or not name.endswith(".safetensors"):
                raise DiffusersFolderError(f"{sharded}: field 'weight_map' names {short_repr(name)}; expected a "
                                           f".safetensors file inside {transformer_dir}")
            if not (transformer_dir / name).is_file():
                raise DiffusersFolderError(f"{sharded}: field 'weight_map' names {short_repr(name)}, which is missing")
            files.append(transformer_dir / name)
        return files
    pickled = sorted(p.name for p in transformer_dir.glob("*.bin"))
    raise DiffusersFolderError(f"{transformer_dir}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX}"
                               + (f" ({', '.join(pickled)} is pickled, which is never loaded here; re-save with "
                                  f"safe_serialization=True)" if pickled else ""))
