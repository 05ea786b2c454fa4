"""Reading a diffusers pipeline folder: what a pipeline's ``save_pretrained`` writes, ``model_index.json``,
``transformer/`` (``config.json`` and ``diffusion_pytorch_model.safetensors`` or a sharded
``.safetensors.index.json``), ``scheduler/`` (``scheduler_config.json``), and ``vae/``, ``text_encoder/``,
``tokenizer/`` where present. :func:`read_folder` checks it and refuses, in one line naming the file and field, what
is not supported; the components a build carries beside the transformer (:class:`FolderComponents`: a VAE decoder,
a text encoder and its tokenizer, of the kinds the family declares) are found and checked here, and exported by
:mod:`l2c_export.builder.components`. The transformer classes read are those of the declared families
(:func:`transformer_families`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import FAMILIES, get_family
from ...core.util import short_repr
from .declaration import LAST_HIDDEN_STATE
from .family import DiffusersConfig, DiffusersFamily
from .files import (MODEL_INDEX, DiffusersFolderError, read_json_object, safetensors_weights,
                    weight_files)  # noqa: F401  (weight_files: re-exported)
from .sizes import TEXT_ENCODER_SIZES, check_sizes, is_integer


def transformer_families() -> dict[str, DiffusersFamily]:
    """Transformer class -> the declared family that reads it (every ``diffusers-`` family of the registry)."""
    families = [get_family(name) for name in FAMILIES if name.startswith("diffusers-")]
    return {family.transformer_class: family for family in families}


@dataclass(frozen=True)
class FolderComponents:
    """The parts of a pipeline folder a build carries beside the transformer, each checked (None: not in the
    folder): ``vae/`` (of the declared :class:`~.declaration.VaeKind`'s classes: its decoder), ``text_encoder/``
    (a ``T5EncoderModel``) with ``tokenizer/`` (a ``tokenizer.json``; the two come together); their configs as read
    (what the memory estimate and the tokenizer's cross-check read), and the VAE's ``_class_name``."""

    vae: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    vae_config: dict | None = field(default=None, compare=False)
    text_encoder_config: dict | None = field(default=None, compare=False)
    vae_class: str | None = None


@dataclass(frozen=True)
class DiffusersFolder:
    """A checked diffusers pipeline folder."""

    path: Path
    pipeline_class: str
    family: DiffusersFamily
    config: DiffusersConfig
    scheduler_config: dict | None  # scheduler/scheduler_config.json (None where the folder has no scheduler/)
    components: FolderComponents = FolderComponents()

    @property
    def transformer_dir(self) -> Path:
        return self.path / "transformer"

    @property
    def scheduler_config_path(self) -> Path:
        return self.path / "scheduler" / "scheduler_config.json"

    @property
    def vae_scale_factor(self) -> int:
        """The pipeline's, from its ``vae/`` by the family's VAE kind (:mod:`.vae`), 8 without one."""
        path = self.path / "vae" / "config.json"
        if not path.is_file() or self.family.declaration.vae is None:
            return 8
        return self.family.declaration.vae.code.scale_factor(read_json_object(path, ""), str(path))


def _is_name(value: object, dotted: bool = False) -> bool:
    """A Python identifier (``dotted``: or a dotted module path), as diffusers imports a component's library and
    class by name: never a path."""
    return isinstance(value, str) and value.isascii() and all(
        part.isidentifier() for part in (value.split(".") if dotted else [value]))


def check_model_index(index: dict, where: Path) -> None:
    """Every component entry of ``model_index.json`` is ``[library, class]``: a module name and a class name (each
    may be null: a component saved as absent), never a path."""
    for key, entry in index.items():
        if not isinstance(entry, list):
            continue  # a pipeline option (requires_safety_checker, ...), not a component
        if not (len(entry) == 2 and (entry[0] is None or _is_name(entry[0], dotted=True))
                and (entry[1] is None or _is_name(entry[1]))):
            raise DiffusersFolderError(f"{where}: field {short_repr(key)} is {short_repr(entry)}; expected [library, "
                                       f"class], a module and a class name (Python identifiers), or nulls")


def read_folder(folder: str | Path) -> DiffusersFolder:
    """Reads and checks a diffusers pipeline folder: its model index, its transformer's class, config and weight
    files, and its scheduler config. Raises :class:`DiffusersFolderError` naming the file and field.

    The folder's files may be symbolic links (a Hugging Face cache snapshot links each to ``../../blobs/<hash>``):
    they are read through them, as files; what a build takes from them is their content."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DiffusersFolderError(f"--diffusers {folder}: no such folder; expected a diffusers pipeline folder "
                                   f"(what a pipeline's save_pretrained writes)")
    index = read_json_object(folder / MODEL_INDEX, "expected a diffusers pipeline folder (what a pipeline's "
                                             "save_pretrained writes: model_index.json, transformer/, scheduler/)",
                       kind="model_index")
    where = folder / MODEL_INDEX
    check_model_index(index, where)
    entry = index.get("transformer")
    if not (isinstance(entry, list) and entry[1]):
        raise DiffusersFolderError(f"{where}: field 'transformer' is {short_repr(entry)}; expected a pipeline with a "
                                   f"transformer ([library, class])")
    if not (folder / "transformer").is_dir():
        raise DiffusersFolderError(f"{folder}: no transformer/ folder (model_index.json names {short_repr(entry[1])})")
    config_path = folder / "transformer" / "config.json"
    raw = read_json_object(config_path, "expected the transformer's config.json")
    class_name = raw.get("_class_name")
    families = transformer_families()
    if class_name not in families:
        raise DiffusersFolderError(f"{config_path}: field '_class_name' is {short_repr(class_name)}; supported "
                                   f"transformer classes: {', '.join(families)}")
    family = families[class_name]
    config = DiffusersConfig(class_name, {k: v for k, v in raw.items() if not k.startswith("_")})
    family.check_config(config, str(config_path))
    weight_files(folder / "transformer")
    pipeline_class = index.get("_class_name")
    if pipeline_class not in family.pipeline_classes:
        raise DiffusersFolderError(f"{where}: field '_class_name' is {short_repr(pipeline_class)}; a {class_name} is "
                                   f"sampled as {' or '.join(family.pipeline_classes)} does")
    scheduler = None
    if (folder / "scheduler").is_dir():
        from ...samplers.diffusers import read_scheduler_config

        path = folder / "scheduler" / "scheduler_config.json"
        if not path.is_file():
            raise DiffusersFolderError(f"{path}: missing; expected the scheduler's config")
        scheduler = read_scheduler_config(path)
        if scheduler.get("_class_name") not in family.scheduler_classes:
            raise DiffusersFolderError(f"{path}: field '_class_name' is {short_repr(scheduler.get('_class_name'))}; "
                                       f"{pipeline_class} is run here with {' or '.join(family.scheduler_classes)}")
    components = read_components(folder, index, family, config)
    return DiffusersFolder(folder, pipeline_class, family, config, scheduler, components)


TOKENIZER_FILE = "tokenizer.json"




def read_components(folder: Path, index: dict, family: DiffusersFamily, config: DiffusersConfig) -> FolderComponents:
    """The folder's VAE, text encoder and tokenizer where ``model_index.json`` names them, checked: their classes,
    integer fields (:mod:`.sizes`), safetensors weights, the VAE's latent channels against the transformer and its
    scaling and shift factors, the text encoder's width against the prompt embeddings the transformer takes, and the
    tokenizer against the text encoder (:func:`check_tokenizer`)."""
    def named(part: str) -> bool:
        entry = index.get(part)
        return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None

    vae = text_encoder = tokenizer = vae_config = text_encoder_config = vae_class = None
    declared = family.declaration
    # carried as graphs: the declared VAE kind (:mod:`.vae`); one text encoder whose outputs feed the model as
    # they are (a stack of several is not carried yet: such a build takes embeddings)
    vae_kind = declared.vae
    encoder = None if declared.text_encoders is None else declared.text_encoders.single
    if encoder is not None and (encoder.template is not None or set(encoder.outputs) != {LAST_HIDDEN_STATE}):
        encoder = None
    if named("vae") and vae_kind is not None:
        vae = folder / "vae"
        raw = read_json_object(vae / "config.json", "expected the VAE's config.json (model_index.json names a vae)")
        where = vae / "config.json"
        if raw.get("_class_name") not in vae_kind.classes:
            raise DiffusersFolderError(f"{where}: field '_class_name' is {short_repr(raw.get('_class_name'))}; "
                                       f"supported VAE classes: {', '.join(vae_kind.classes)}")
        vae_kind.code.check(raw, str(where), family.vae_latents(config)[0])
        safetensors_weights(vae, "diffusion_pytorch_model")
        vae_config = {k: v for k, v in raw.items() if not k.startswith("_")}
        vae_class = raw["_class_name"]
    if declared.text_encoders is None and named("text_encoder"):
        raise DiffusersFolderError(f"{folder / MODEL_INDEX}: names a text encoder, but a "
                                   f"{config.transformer_class} takes no prompt embeddings")
    if encoder is not None and (named(encoder.encoder) or named(encoder.tokenizer)):
        if not (named(encoder.encoder) and named(encoder.tokenizer)):
            missing = encoder.tokenizer if named(encoder.encoder) else encoder.encoder
            raise DiffusersFolderError(f"{folder / MODEL_INDEX}: field {missing!r} is missing; a text encoder and its "
                                       f"tokenizer come together")
        text_encoder, tokenizer = folder / encoder.encoder, folder / encoder.tokenizer
        raw = read_json_object(text_encoder / "config.json", "expected the text encoder's config.json")
        where = text_encoder / "config.json"
        architectures = raw.get("architectures")
        if not (isinstance(architectures, list) and len(architectures) == 1
                and architectures[0] in encoder.classes):
            raise DiffusersFolderError(f"{where}: field 'architectures' is {short_repr(architectures)}; supported "
                                       f"text encoders: {', '.join(encoder.classes)}")
        check_sizes(raw, TEXT_ENCODER_SIZES, str(where), DiffusersFolderError)
        for key in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            if raw.get(key) is not None and raw[key] >= raw["vocab_size"]:
                raise DiffusersFolderError(f"{where}: field {key!r} is {raw[key]}; expected a token id below "
                                           f"vocab_size {raw['vocab_size']}")
        width = family.text_channels(config)
        if raw.get(encoder.width) != width:
            raise DiffusersFolderError(f"{where}: field {encoder.width!r} is {short_repr(raw.get(encoder.width))}; the "
                                       f"transformer takes prompt embeddings {width} wide (caption_channels)")
        safetensors_weights(text_encoder, "model")
        check_tokenizer(tokenizer, raw["vocab_size"])
        text_encoder_config = raw
    return FolderComponents(vae, text_encoder, tokenizer, vae_config, text_encoder_config, vae_class)


def _special_token(value: object) -> str | None:
    """A special token as tokenizer_config.json and special_tokens_map.json write it: the text, or an object with
    its ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def check_tokenizer(tokenizer: Path, vocab_size: int) -> None:
    """Reads ``tokenizer/`` as the build and the runtime will, before anything is exported: every file within its
    size cap, ``tokenizer.json`` JSON the ``tokenizers`` library loads, every token id it can produce (its
    vocabulary, added tokens, post-processor's special tokens, padding id) below the text encoder's ``vocab_size``,
    and the pad and end-of-sequence tokens the configs name present in the vocabulary. Raises
    :class:`DiffusersFolderError` naming the file."""
    from ...core.util import check_file_size

    path = tokenizer / TOKENIZER_FILE
    if not path.is_file():
        raise DiffusersFolderError(f"{path}: missing; expected the tokenizer as a tokenizers library file (a fast "
                                   f"tokenizer's save_pretrained writes it)")
    for file in sorted(tokenizer.iterdir()):  # what transformers will read besides: each within its cap
        if file.is_file() and file.name != TOKENIZER_FILE:
            check_file_size(file, "tokenizer_config" if file.suffix == ".json" else "tokenizer", DiffusersFolderError)
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
                                       f"{vocab_size} (text_encoder/config.json), so ids must be below it")
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
