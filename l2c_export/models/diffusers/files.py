"""The files of a diffusers pipeline folder as a build reads them: JSON objects within their size caps, safetensors
weights (a checkpoint is never unpickled here), and tokenizers (:func:`check_tokenizer`)."""

from __future__ import annotations

import json
from pathlib import Path

from ...core.util import read_folder_json, short_repr

MODEL_INDEX = "model_index.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"


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


def _special_token(value: object) -> str | None:
    """A special token as tokenizer_config.json and special_tokens_map.json write it: the text, or an object with
    its ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def check_tokenizer(tokenizer: Path, vocab_size: int, encoder: str = "text_encoder") -> None:
    """Reads ``tokenizer/`` as the build and the runtime will, before anything is exported: every file within its
    size cap, ``tokenizer.json`` JSON the ``tokenizers`` library loads, every token id it can produce (its
    vocabulary, added tokens, post-processor's special tokens, padding id) below the text encoder's ``vocab_size``
    (``encoder``: its folder part), and the pad and end-of-sequence tokens the configs name present in the
    vocabulary. A CLIP tokenizer saved as ``vocab.json`` and ``merges.txt`` alone (no ``tokenizer.json``) is made
    into one at build time as transformers makes it (:func:`l2c_export.builder.components.check_components` checks
    its ids then). Raises :class:`DiffusersFolderError` naming the file."""
    from ...core.util import check_file_size
    from .sizes import is_integer

    path = tokenizer / TOKENIZER_FILE
    bpe_files = [tokenizer / "vocab.json", tokenizer / "merges.txt"]
    if not path.is_file() and not all(file.is_file() for file in bpe_files):
        raise DiffusersFolderError(f"{path}: missing; expected the tokenizer as a tokenizers library file (a fast "
                                   f"tokenizer's save_pretrained writes it), or a BPE's vocab.json and merges.txt")
    for file in sorted(tokenizer.iterdir()):  # what transformers will read besides: each within its cap
        if file.is_file() and file.name != TOKENIZER_FILE:
            check_file_size(file, "tokenizer_config" if file.suffix == ".json" and file.name != "vocab.json"
                            else "tokenizer", DiffusersFolderError)
    if not path.is_file():
        return
    data = read_json_object(path, "", kind="tokenizer")
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_str(json.dumps(data))
    except Exception as error:  # the tokenizers library raises its own Exception on a bad file
        raise DiffusersFolderError(f"{path}: not a tokenizers library file ({short_repr(str(error), 160)[1:-1]})") \
            from None
    vocabulary = backend.get_vocab(with_added_tokens=True)
    ids = [("its vocabulary", max(vocabulary.values(), default=0))]
    processor = data.get("post_processor")
    pending = [processor] if isinstance(processor, (dict, list)) else []
    while pending:  # the special tokens' ids of a (nested) post-processor
        value = pending.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if key == "ids" and isinstance(item, list):
                ids += [("field 'post_processor' special token", i) for i in item if is_integer(i)]
            elif isinstance(item, (dict, list)):
                pending.append(item)
    padding = data.get("padding")
    if isinstance(padding, dict) and is_integer(padding.get("pad_id")):
        ids.append(("field 'padding/pad_id'", padding["pad_id"]))
    for what, token_id in ids:
        if not 0 <= token_id < vocab_size:
            raise DiffusersFolderError(f"{path}: {what} has token id {token_id}; the text encoder's vocab_size is "
                                       f"{vocab_size} ({encoder}/config.json), so ids must be below it")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config_path = tokenizer / name
        if not config_path.is_file():
            continue
        tokens = read_json_object(config_path, "", kind="tokenizer_config")
        for key in ("pad_token", "eos_token"):
            token = _special_token(tokens.get(key))
            if tokens.get(key) is not None and token is None:
                raise DiffusersFolderError(f"{config_path}: field {key!r} is {short_repr(tokens.get(key))}; expected "
                                           f"a token (text)")
            if token is not None and token not in vocabulary:
                raise DiffusersFolderError(f"{config_path}: field {key!r} is {short_repr(token)}, which is not in "
                                           f"{path}'s vocabulary")
