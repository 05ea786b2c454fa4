"""Reading a diffusers pipeline folder: what a pipeline's ``save_pretrained`` writes, ``model_index.json``,
``transformer/`` (``config.json`` and ``diffusion_pytorch_model.safetensors`` or a sharded
``.safetensors.index.json``), ``scheduler/`` (``scheduler_config.json``), and ``vae/``, ``text_encoder*/``,
``tokenizer*/`` where present. :func:`read_folder` checks it and refuses, in one line naming the file and field, what
is not supported; the components a build carries beside the transformer (:class:`FolderComponents`: a VAE decoder,
the declared text-encoder stack's encoders and tokenizers, :mod:`.text_encoders`) are found and checked here, and exported by
:mod:`l2c_export.builder.components`. The transformer classes read are those of the declared families
(:func:`transformer_families`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import FAMILIES, get_family
from ...core.util import short_repr
from .family import DiffusersConfig, DiffusersFamily
from .files import (MODEL_INDEX, DiffusersFolderError, check_tokenizer, read_json_object,  # noqa: F401
                    safetensors_weights, weight_files)  # (check_tokenizer, weight_files: re-exported)
from .text_encoders import read_text_encoders


def transformer_families() -> dict[str, DiffusersFamily]:
    """Transformer class -> the declared family that reads it (every ``diffusers-`` family of the registry)."""
    families = [get_family(name) for name in FAMILIES if name.startswith("diffusers-")]
    return {family.transformer_class: family for family in families}


@dataclass(frozen=True)
class FolderComponents:
    """The parts of a pipeline folder a build carries beside the transformer, each checked (None, empty: not in the
    folder): ``vae/`` (of the declared :class:`~.declaration.VaeKind`'s classes: its decoder), its config as read
    (what the memory estimate reads) and ``_class_name``; the declared stack's text encoders with their tokenizers
    (:class:`.text_encoders.FoundTextEncoder`, in the stack's order), and the pipelines' ``tokenizer_max_length``
    where the stack reads it (CLIP's 77)."""

    vae: Path | None = None
    vae_config: dict | None = field(default=None, compare=False)
    text_encoders: tuple = ()
    tokenizer_max_length: int | None = None
    vae_class: str | None = None


@dataclass(frozen=True)
class FolderExpert:
    """A transformer that takes over from the folder's ``transformer/`` (Wan2.2's ``transformer_2/``): its component
    name, folder and config (checked: its class, options and sizes, and the fields the experts share)."""

    name: str
    path: Path
    config: DiffusersConfig


@dataclass(frozen=True)
class FolderExperts:
    """``model_index.json``'s boundary ratio (in (0, 1)) and the experts after the first, in the order they run."""

    boundary_ratio: float
    later: tuple[FolderExpert, ...]


@dataclass(frozen=True)
class DiffusersFolder:
    """A checked diffusers pipeline folder."""

    path: Path
    pipeline_class: str
    family: DiffusersFamily
    config: DiffusersConfig
    scheduler_config: dict | None  # scheduler/scheduler_config.json (None where the folder has no scheduler/)
    components: FolderComponents = FolderComponents()
    experts: FolderExperts | None = None  # None: one transformer (no boundary ratio in model_index.json)

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
    if index.get("expand_timesteps"):
        raise DiffusersFolderError(f"{where}: field 'expand_timesteps' is {short_repr(index['expand_timesteps'])}; "
                                   f"per-token timesteps (Wan2.2's image-to-video 5B) are not supported: expected "
                                   f"false")
    components = read_components(folder, index, family, config)
    experts = read_experts(folder, index, family, config)
    return DiffusersFolder(folder, pipeline_class, family, config, scheduler, components, experts)


def read_experts(folder: Path, index: dict, family: DiffusersFamily, config: DiffusersConfig) -> FolderExperts | None:
    """The declared experts after the first (:class:`~.declaration.Experts`) where ``model_index.json`` gives a
    boundary ratio: the ratio in (0, 1), each expert named, its folder's config of the first's class, checked as the
    first's and equal to it in the declared shape fields, its weights safetensors. None without a ratio (the pipeline
    then runs the first transformer alone)."""
    declared = family.declaration.experts
    where = folder / MODEL_INDEX
    ratio = index.get(declared.boundary) if declared is not None else None
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise DiffusersFolderError(f"{where}: field {declared.boundary!r} is {short_repr(ratio)}; expected a number "
                                   f"strictly between 0 and 1 (the fraction of the scheduler's num_train_timesteps "
                                   f"below which {declared.components[1]} takes over)")
    later = []
    for name in declared.components[1:]:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            raise DiffusersFolderError(f"{where}: field {name!r} is {short_repr(entry)}; a {declared.boundary} needs "
                                       f"a {name} ([library, class]) to take over below it")
        path = folder / name
        config_path = path / "config.json"
        raw = read_json_object(config_path, f"expected {name}'s config.json (model_index.json names it)")
        expert = DiffusersConfig(raw.get("_class_name"), {k: v for k, v in raw.items() if not k.startswith("_")})
        family.check_config(expert, str(config_path))
        for field_name in declared.shape_fields:
            if expert.get(field_name) != config.get(field_name):
                raise DiffusersFolderError(f"{config_path}: field {field_name!r} is "
                                           f"{short_repr(expert.get(field_name))}; transformer/config.json has "
                                           f"{short_repr(config.get(field_name))} (the experts share the sample, the "
                                           f"prompt and the sub-layers' shapes: {', '.join(declared.shape_fields)})")
        weight_files(path)
        later.append(FolderExpert(name, path, expert))
    return FolderExperts(float(ratio), tuple(later))


def read_components(folder: Path, index: dict, family: DiffusersFamily, config: DiffusersConfig) -> FolderComponents:
    """The folder's VAE and the declared stack's text encoders and tokenizers where ``model_index.json`` names them,
    checked: their classes, integer fields (:mod:`.sizes`), safetensors weights, the VAE's latent channels against the
    transformer and its scaling and shift factors, the arrays the encoders make against the conditioning the
    transformer takes, and each tokenizer against its encoder (:func:`.text_encoders.read_text_encoders`)."""
    def named(part: str) -> bool:
        entry = index.get(part)
        return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None

    vae = vae_config = vae_class = None
    declared = family.declaration
    vae_kind = declared.vae  # carried as a graph: the declared VAE kind (:mod:`.vae`)
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
    if declared.text_encoders is None:
        if named("text_encoder"):
            raise DiffusersFolderError(f"{folder / MODEL_INDEX}: names a text encoder, but a "
                                       f"{config.transformer_class} takes no prompt embeddings")
        return FolderComponents(vae, vae_config, vae_class=vae_class)
    widths = {tensor.argument: tensor.shape[-1] for tensor in family.graph_inputs(config)
              if tensor.argument is not None and tensor.shape}
    encoders, length = read_text_encoders(folder, index, declared.text_encoders, widths, read_json_object,
                                          DiffusersFolderError)
    return FolderComponents(vae, vae_config, encoders, length, vae_class)
