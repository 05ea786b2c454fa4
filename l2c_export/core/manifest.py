"""``manifest.json``: the only contract between building and running. No PyTorch here.

Checked against the JSON Schema shipped in ``l2c_export/schemas/manifest.schema.json`` when written and when read; a
manifest of a newer schema version than this reader knows is refused before anything else is looked at, and an older
one is upgraded in memory to the current shape when read: version 1 (DiT only, before model families) to version 2,
version 2 (conditioning inputs by a closed list of roles) to version 3 (each conditioning input names its pipeline
argument and kind; guidance states its rule; the model its latent layout: :mod:`l2c_export.core.interface`). Read strictly: no NaN or
Infinity, and the records must agree with one another (:func:`check_consistency`).

A build folder is a closed world: every file a manifest names is a plain relative path that stays inside the folder
(no absolute path, no ``..``, no symbolic link anywhere on the way); :func:`file_path` is the one way to turn a file
record into a path, and it refuses anything else.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from pathlib import Path

from .interface import (CLASSIFIER_FREE, CONDITIONING, DEFAULT_SCALE_ARGUMENT, GUIDANCE_EMBEDDING, KIND_DTYPES,
                        KIND_RANKS, LABEL, LAYOUT_RANKS, NCFHW, NCHW, PACKED_2X2, POOLED, SCALAR, TOKEN_EMBEDDINGS,
                        TOKEN_MASK, conditioning_records, label_record, scale_fed)
from .latents import packed_2x2_shape
from .util import read_json, short_repr, write_json

SCHEMA_VERSION = 3
MANIFEST_NAME = "manifest.json"
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "manifest.schema.json"


class ManifestError(ValueError):
    """A manifest or one of its files that cannot be used; the message names the file and the field."""


# Each graph carries, under this ONNX metadata key, the manifest fields that its build fixed (:data:`STAMPED_FIELDS`,
# and a later expert's graphs ``experts/models/<e>/config``),
# as compact JSON ``{"model/config": {...}, "guidance/null_class": 10}``. A runtime compares them with the manifest, so
# a field edited after the build (hashes fixed up or not) is refused whether or not the runtime reads it itself.
GRAPH_STAMP_KEY = "l2c.built_for"
STAMPED_FIELDS = ("model/config", "guidance/null_class")


def graph_stamp(fields: dict) -> str:
    """The value of :data:`GRAPH_STAMP_KEY`: ``fields`` maps each of :data:`STAMPED_FIELDS` to its value."""
    assert set(STAMPED_FIELDS) <= set(fields), fields  # a later expert's graphs fix its config too
    return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def stamp_difference(data: dict, stamp: dict) -> str | None:
    """The first field where manifest ``data`` differs from a graph's stamp, as ``field 'model/config/num_classes' is
    1000; the graph was built for 10``; None when they agree."""
    if not isinstance(stamp, dict):
        return "the graph's stamp is not a JSON object"
    for path in sorted(stamp):
        recorded: object = data
        for key in path.split("/"):  # a list indexed by a number (experts/models/1/config)
            recorded = (recorded.get(key) if isinstance(recorded, dict) else
                        recorded[int(key)] if isinstance(recorded, list) and key.isdigit() and int(key) < len(recorded)
                        else None)
        difference = _difference(recorded, stamp[path], path)
        if difference:
            return difference
    return None


def _difference(recorded: object, built: object, path: str) -> str | None:
    if isinstance(recorded, dict) and isinstance(built, dict):
        for key in sorted(set(recorded) | set(built)):
            if key not in built:
                return f"field '{path}/{key}' is not in what the graph was built for"
            if key not in recorded:
                return f"field '{path}/{key}' is missing; the graph was built for {short_repr(built[key])}"
            difference = _difference(recorded[key], built[key], f"{path}/{key}")
            if difference:
                return difference
        return None
    if recorded != built or isinstance(recorded, bool) != isinstance(built, bool):
        return f"field '{path}' is {short_repr(recorded)}; the graph was built for {short_repr(built)}"
    return None


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
        message = error.message
        if error.validator == "pattern" and field.endswith("/file"):
            message = (f"file {short_repr(error.instance)} is not a plain relative path inside the build folder (no "
                       f"absolute path, '..', hidden component or backslash)")
        raise ManifestError(f"{where}: field '{field}': {message}") from None


def write(folder: Path, data: dict) -> Path:
    """Validates and writes ``folder/manifest.json`` atomically, as strict JSON."""
    path = Path(folder) / MANIFEST_NAME
    validate(data, str(path))
    check_consistency(data, str(path))
    write_json(path, data)
    return path


def file_path(folder: Path, name: object, where: str) -> Path:
    """``folder / name`` for a file a manifest names, refusing any name that could lead out of ``folder``: absolute
    paths, ``..``, hidden or empty components, backslashes, and symbolic links on the way (the link itself or a
    folder that is one). Raises ManifestError naming ``where``."""
    folder = Path(folder)
    plain = isinstance(name, str) and name and not name.startswith("/") and "\\" not in name and all(
        part and not part.startswith(".") for part in name.split("/"))
    if not plain:
        raise ManifestError(f"{where}: file {short_repr(name)} is not a plain relative path inside the build folder "
                            f"(no absolute path, '..', hidden component or backslash)")
    path = folder
    for part in name.split("/"):
        path = path / part
        if path.is_symlink():
            raise ManifestError(f"{where}: file {short_repr(name)} is (or lies in) a symbolic link; a build folder "
                                f"holds no links, so nothing outside it is ever read")
    return path


def all_files(data: dict) -> list[dict]:
    """Every file record of a manifest: weights, graphs, engines, timing cache, components (each once)."""
    entries = [data["weights"]]
    for subset in data["subsets"]:
        entries += [subset["graph"], subset["engine"]]
    if "tensorrt" in data and "timing_cache" in data["tensorrt"]:
        entries.append(data["tensorrt"]["timing_cache"])
    for component in data.get("components", {}).values():
        entries += [component[field] for field in ("graph", "weights", "file") if field in component]
    unique = {}
    for entry in entries:
        unique.setdefault(entry["file"], entry)
    return list(unique.values())


def load(folder: str | Path, verify_files: bool = True) -> dict:
    """Reads and validates ``folder/manifest.json`` (schema, consistency, every file path inside the folder); with
    ``verify_files`` also checks every file's size and sha256."""
    folder = Path(folder)
    if not folder.exists():
        raise ManifestError(f"{folder}: no such build folder")
    path = folder / MANIFEST_NAME if folder.is_dir() else folder
    folder = path.parent
    if path.is_symlink():
        raise ManifestError(f"{path}: is a symbolic link; a build folder holds no links")
    data = read_json(path, ManifestError, f" (is {folder} an l2c-export build?)")
    if isinstance(data, dict) and data.get("schema_version") == 1:
        data = upgrade_v1(data, str(path))
    if isinstance(data, dict) and data.get("schema_version") == 2:
        data = upgrade_v2(data, str(path))
    validate(data, str(path))
    check_consistency(data, str(path))
    for entry in all_files(data):
        file = file_path(folder, entry["file"], str(path))
        if not file.is_file():
            raise ManifestError(f"{path}: file {entry['file']} is missing from {folder}")
        if verify_files:
            size = file.stat().st_size
            if size != entry["bytes"]:
                raise ManifestError(f"{file}: sha256 cannot match: {size} bytes where the manifest says "
                                    f"{entry['bytes']} (the file was changed after the build)")
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
    data["schema_version"] = 2
    return data


# Version 2's conditioning roles (a closed list, before inputs named their pipeline argument): role -> (the
# argument it was fed from, its kind, its negative partner under classifier-free guidance). Read only to upgrade.
_V2_CONDITIONING = {"label": ("class_labels", LABEL, None),
                    "prompt_embeds": ("prompt_embeds", TOKEN_EMBEDDINGS, "negative_prompt_embeds"),
                    "prompt_attention_mask": ("prompt_attention_mask", TOKEN_MASK, "negative_prompt_attention_mask"),
                    "pooled_prompt_embeds": ("pooled_prompt_embeds", POOLED, "negative_pooled_prompt_embeds"),
                    "guidance": (DEFAULT_SCALE_ARGUMENT, SCALAR, None)}


def upgrade_v2(data: dict, where: str) -> dict:
    """A version 2 manifest in the version 3 shape: each input of a version 2 conditioning role becomes role
    ``conditioning`` with the argument, kind and partner that role stood for; ``guidance/classifier_free`` becomes
    ``guidance/rule`` (with the pipelines' ``guidance_scale``); the model states its latent layout (a sample of two
    per-sample axes is FLUX.1's packed one), as does the VAE decoder's record (``spatial`` is ``nchw``)."""
    try:
        guidance = data["guidance"]
        classifier_free = guidance.pop("classifier_free", True)
        guidance["rule"] = CLASSIFIER_FREE if classifier_free else GUIDANCE_EMBEDDING
        guidance["scale_argument"] = DEFAULT_SCALE_ARGUMENT
        model = data["model"]
        for tensor in (*model["inputs"], *(t for subset in data["subsets"] for t in subset["inputs"])):
            if tensor["role"] in _V2_CONDITIONING:
                argument, kind, negative = _V2_CONDITIONING[tensor["role"]]
                tensor.update(role=CONDITIONING, argument=argument, kind=kind)
                if negative is not None and classifier_free:
                    tensor["negative"] = negative
        sample = next(t for t in model["inputs"] if t["role"] == "sample")
        model["latent_layout"] = PACKED_2X2 if len(sample["shape"]) == 3 else NCHW
        decoder = data.get("components", {}).get("vae_decoder")
        if decoder is not None and decoder.get("latent_layout") == "spatial":
            decoder["latent_layout"] = NCHW
    except (KeyError, TypeError, AttributeError, StopIteration) as error:
        raise ManifestError(f"{where}: a version 2 manifest without the field {error} cannot be upgraded; rebuild "
                            f"the engines") from None
    data["schema_version"] = SCHEMA_VERSION
    return data


_ROWS = re.compile(r"^(?P<stored>.+\.T)\[(?P<start>\d+):(?P<stop>\d+)\]$")


def weight_name(parameter: str, transposed: bool = False, rows: tuple[int, int] | None = None) -> str:
    """The name of a tensor of ``weights.bin`` (``weight_tensors``): the model parameter it holds, ``.T`` where it is
    stored transposed (a Linear weight, (in, out)), and ``[start:stop]`` where it holds rows start..stop of that
    transposed weight alone (a Linear applied to a slice of its inputs: each of FLUX.1's single-stream branches
    reads its own columns of ``proj_out``)."""
    if rows is not None and not transposed:
        raise ValueError(f"{parameter}: only a transposed weight is stored by rows")
    return parameter + (".T" if transposed else "") + (f"[{rows[0]}:{rows[1]}]" if rows is not None else "")


def folded_weight_name(parameters: list[str], value: str) -> str:
    """The name of a tensor of ``weights.bin`` that the exporter computed from ``parameters`` alone, standing for the
    graph value ``value`` (a parameter-only chain folded at export: SD3's crop of its position-embedding table),
    ``<parameter>[+<parameter>...]@<value>``. It holds no parameter of the model: the parameters stay in weights.bin
    as they are, and the PyTorch reference reads them, not this."""
    return "+".join(parameters) + "@" + value


def is_folded_weight_name(name: str) -> bool:
    """Whether ``name`` is a :func:`folded_weight_name` (a parameter's name has no ``@``)."""
    return "@" in name


def parse_weight_name(name: str) -> tuple[str, bool, tuple[int, int] | None]:
    """The inverse of :func:`weight_name`: (parameter, transposed, rows or None)."""
    sliced = _ROWS.match(name)
    stored, rows = (sliced["stored"], (int(sliced["start"]), int(sliced["stop"]))) if sliced else (name, None)
    return stored.removesuffix(".T"), stored.endswith(".T"), rows


_ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int8": 1, "uint8": 1, "int32": 4,
               "float8_e4m3fn": 1}


def check_consistency(data: dict, where: str) -> None:
    """What the schema cannot say: the records agree with one another. Subsets are numbered 0..n-1; every step names
    one; the first step's subset computes everything; a step reads only slots that an earlier step wrote; each
    subset's cache inputs and fresh outputs are the slots it reads and writes; every record of the graph interface
    says the same names, dtypes and shapes (:func:`_check_interfaces_agree`); weight tensors lie inside weights.bin
    and are as long as their shapes say."""
    subsets = data["subsets"]
    for position, record in enumerate(subsets):
        if record["index"] != position:
            raise ManifestError(f"{where}: field 'subsets/{position}/index' is {record['index']}; expected {position}")
    schedule = data["schedule"]
    step_subset = schedule["step_subset"]
    if not step_subset:
        raise ManifestError(f"{where}: field 'schedule/step_subset' is empty; expected one subset per step")
    if len(schedule["compute"]) != len(step_subset):
        raise ManifestError(f"{where}: field 'schedule/compute' has {len(schedule['compute'])} rows for "
                            f"{len(step_subset)} steps in 'schedule/step_subset'")
    sampler = data["sampler"]
    if not len(sampler["model_times"]) == sampler["num_calls"] == len(step_subset):
        raise ManifestError(f"{where}: field 'sampler/num_calls' is {sampler['num_calls']}, with "
                            f"{len(sampler['model_times'])} 'sampler/model_times' and {len(step_subset)} "
                            f"'schedule/step_subset'; expected one of each per model call")
    # DDIM/DDPM: one call per step, every table per step; DPM-Solver-2S: per-call tables and per-step ones (half).
    per_call = {"model_times", "times", "alphas", "sigmas"}
    steps = sampler["num_calls"] // 2 if sampler["kind"] == "dpm_solver_2s" else sampler["num_calls"]
    if "num_steps" in sampler and sampler["num_steps"] != steps:
        raise ManifestError(f"{where}: field 'sampler/num_steps' is {sampler['num_steps']}; expected {steps} for "
                            f"{sampler['num_calls']} model calls of {sampler['kind']}")
    for name, table in sampler.items():
        counted, size = ("num_calls", sampler["num_calls"]) if name in per_call else ("num_steps", steps)
        if isinstance(table, list) and len(table) != size:
            raise ManifestError(f"{where}: field 'sampler/{name}' has {len(table)} entries; expected {counted} = "
                                f"{size}")
    slots = {slot["name"] for slot in data["cache_slots"]}
    written: set[str] = set()
    for step, index in enumerate(step_subset):
        if index >= len(subsets):
            raise ManifestError(f"{where}: field 'schedule/step_subset/{step}' names subset {index}, but there are "
                                f"only {len(subsets)} (0..{len(subsets) - 1})")
        record = subsets[index]
        if step == 0 and not all(record["compute"]):
            raise ManifestError(f"{where}: field 'schedule/step_subset/0' names subset {index}, which reuses "
                                f"sub-layers; the first step must compute every sub-layer (nothing is cached yet)")
        unwritten = [slot for slot in record["reads"] if slot not in written]
        if unwritten:
            raise ManifestError(f"{where}: step {step} runs subset {index}, which reads cache slot(s) "
                                f"{', '.join(unwritten)} that no earlier step writes")
        written.update(record["writes"])
    for record in subsets:
        at = f"{where}: field 'subsets/{record['index']}"
        unknown = [slot for slot in (*record["reads"], *record["writes"]) if slot not in slots]
        if unknown:
            raise ManifestError(f"{at}' uses cache slot(s) {', '.join(unknown)} missing from 'cache_slots'")
        if [t["slot"] for t in record["inputs"] if "slot" in t] != record["reads"]:
            raise ManifestError(f"{at}/inputs': the cache inputs' slots differ from 'reads' {record['reads']}")
        if [t["slot"] for t in record["outputs"] if "slot" in t] != record["writes"]:
            raise ManifestError(f"{at}/outputs': the fresh outputs' slots differ from 'writes' {record['writes']}")
    _check_interfaces_agree(data, where)
    _check_experts(data, where)
    _check_components(data, where)
    weights_bytes = data["weights"]["bytes"]
    for position, tensor in enumerate(data["weight_tensors"]):
        at = f"{where}: field 'weight_tensors/{position}' ({tensor['name']})"
        count = 1
        for dim in tensor["shape"]:
            count *= dim
        if tensor["length"] != count * _ITEM_BYTES[tensor["dtype"]]:
            raise ManifestError(f"{at}: length {tensor['length']} does not fit shape {tensor['shape']} of "
                                f"{tensor['dtype']}")
        if tensor["offset"] + tensor["length"] > weights_bytes:
            raise ManifestError(f"{at}: bytes {tensor['offset']}..{tensor['offset'] + tensor['length']} lie past "
                                f"the end of {data['weights']['file']} ({weights_bytes} bytes)")
    names = {tensor["name"] for tensor in data["weight_tensors"]}
    for position, tensor in enumerate(data["weight_tensors"]):
        record = tensor.get("quantization")
        if record is None:
            continue
        at = f"{where}: field 'weight_tensors/{position}/quantization' ({tensor['name']})"
        missing = [record[key] for key in ("scale", "zero_point") if record[key] not in names]
        if missing:
            raise ManifestError(f"{at}: names {', '.join(missing)}, which 'weight_tensors' does not hold")
        if record["axis"] >= len(tensor["shape"]):
            raise ManifestError(f"{at}: axis {record['axis']} of a tensor of {len(tensor['shape'])} dimensions")


def expert_of_time(time: float, boundary_timestep: float) -> int:
    """The expert of a model call at ``time`` (``experts/step_expert``'s rule): 0 where ``time >= boundary_timestep``,
    else 1, compared in float32 as ``WanPipeline`` compares its timestep tensor (float32 or int64) with the boundary
    (a Python float torch casts to float32)."""
    import numpy as np

    return 0 if np.float32(time) >= np.float32(boundary_timestep) else 1


def _check_experts(data: dict, where: str) -> None:
    """A pipeline of experts (``experts``, Wan2.2's): the first expert's prefix is empty and its config
    'model/config', the prefixes differ; every subset names its expert and only then; 'experts/step_expert' has one
    expert per call, the one the boundary gives for the call's timestep, and the subset of each call is of that
    expert, the first call of each computing every sub-layer; each subset's cache slots are its expert's (its prefix,
    then the sub-layer's name)."""
    experts = data.get("experts")
    subsets = data["subsets"]
    if experts is None:
        marked = next((record["index"] for record in subsets if "expert" in record), None)
        if marked is not None:
            raise ManifestError(f"{where}: field 'subsets/{marked}/expert' is given; only a build with 'experts' has "
                                f"one")
        return
    models = experts["models"]
    prefixes = [model["prefix"] for model in models]
    if prefixes[0] != "" or len(set(prefixes)) != len(prefixes):
        raise ManifestError(f"{where}: field 'experts/models' has prefixes {prefixes}; expected the first empty and "
                            f"each different")
    if models[0]["config"] != data["model"]["config"]:
        raise ManifestError(f"{where}: field 'experts/models/0/config' differs from 'model/config' (the first "
                            f"expert's)")
    for record in subsets:
        expert = record.get("expert")
        if expert is None or expert >= len(models):
            raise ManifestError(f"{where}: field 'subsets/{record['index']}/expert' is {short_repr(expert)}; expected "
                                f"the index of one of the {len(models)} 'experts/models'")
    step_expert, times = experts["step_expert"], data["sampler"]["model_times"]
    if len(step_expert) != len(times):
        raise ManifestError(f"{where}: field 'experts/step_expert' has {len(step_expert)} entries; expected one per "
                            f"model call ({len(times)})")
    started: set[int] = set()
    for call, (expert, time, index) in enumerate(zip(step_expert, times, data["schedule"]["step_subset"])):
        expected = expert_of_time(time, experts["boundary_timestep"])
        if expert != expected:
            raise ManifestError(f"{where}: field 'experts/step_expert/{call}' is {expert}; the call's timestep "
                                f"{time} is {'>=' if expected == 0 else '<'} 'experts/boundary_timestep' "
                                f"{experts['boundary_timestep']}, which runs expert {expected}")
        if subsets[index]["expert"] != expert:
            raise ManifestError(f"{where}: field 'schedule/step_subset/{call}' names subset {index}, of expert "
                                f"{subsets[index]['expert']}; the call runs expert {expert} ('experts/step_expert')")
        if expert not in started and not all(subsets[index]["compute"]):
            raise ManifestError(f"{where}: field 'schedule/step_subset/{call}' names subset {index}, which reuses "
                                f"sub-layers at the first call of {models[expert]['name']}; the first call of each "
                                f"expert must compute every sub-layer (its cache is empty)")
        started.add(expert)
    sublayers = data["model"].get("sublayers")
    slots = {slot["name"]: slot for slot in data["cache_slots"]}
    for record in subsets:
        prefix = prefixes[record["expert"]]
        for name in (*record["reads"], *record["writes"]):
            index = slots[name]["index"]
            expected = prefix + (sublayers[index] if sublayers and index < len(sublayers) else name[len(prefix):])
            if name != expected or not name.startswith(prefix):
                raise ManifestError(f"{where}: field 'subsets/{record['index']}' uses cache slot {name}; a subset of "
                                    f"expert {record['expert']} uses its own slots ({expected!r})")


def _tensor(record: dict) -> tuple:
    """What the interface's records must agree on: name, dtype, shape, role and what a conditioning input is fed."""
    return tuple(record.get(key) for key in ("name", "dtype", "shape", "role", "argument", "kind", "negative")
                 if key in record)


def _check_interfaces_agree(data: dict, where: str) -> None:
    """Every number the runtime takes about the graph interface says the same wherever the manifest says it: each
    subset computes ``model/num_sublayers`` sub-layers and reads exactly those it does not compute, and the schedule's
    rows are the compute of the subsets its steps name; each subset's model inputs and output are ``model/inputs``
    and ``model/output``; each cache input and fresh output has its slot's dtype and shape; shapes have ``batch``
    first and only there; ``guidance/guided_channels`` is at most the sample's channels. (That these records are the
    graphs' own interface is checked by the runtime against each graph it loads.)"""
    model = data["model"]
    _check_conditioning(data, where)
    model_inputs = [_tensor(t) for t in model["inputs"]]
    for field, tensors in (("model/inputs", model["inputs"]), ("model/output", [model["output"]])):
        for position, tensor in enumerate(tensors):
            shape = tensor["shape"]
            if not shape or shape[0] != "batch" or "batch" in shape[1:]:
                at = field if field == "model/output" else f"{field}/{position}"
                raise ManifestError(f"{where}: field '{at}/shape' is {shape}; expected 'batch' first, then the "
                                    f"per-sample sizes")
    sample = next((t for t in model["inputs"] if t["role"] == "sample"), None)
    guided = data["guidance"]["guided_channels"]
    if sample is not None and (len(sample["shape"]) < 2 or guided > sample["shape"][1]):
        raise ManifestError(f"{where}: field 'guidance/guided_channels' is {guided}; expected at most the sample's "
                            f"{sample['shape'][1] if len(sample['shape']) > 1 else 0} channel(s) ('model/inputs' "
                            f"{sample['name']} {sample['shape']})")
    slots = {slot["name"]: slot for slot in data["cache_slots"]}
    num_sublayers = model["num_sublayers"]
    for record in data["subsets"]:
        at = f"{where}: field 'subsets/{record['index']}"
        if len(record["compute"]) != num_sublayers:
            raise ManifestError(f"{at}/compute' has {len(record['compute'])} entries; expected 'model/num_sublayers' "
                                f"= {num_sublayers}")
        reused = sorted(k for k, computed in enumerate(record["compute"]) if not computed)
        read = sorted(slots[name]["index"] for name in record["reads"] if name in slots)
        if read != reused:
            raise ManifestError(f"{at}/reads' reads sub-layers {read}; expected exactly those its 'compute' reuses "
                                f"{reused}")
        feeds = [_tensor(t) for t in record["inputs"] if t["role"] != "cache"]
        if feeds != model_inputs:
            raise ManifestError(f"{at}/inputs': the model inputs {feeds} differ from 'model/inputs' {model_inputs}")
        outputs = [_tensor(t) for t in record["outputs"] if t["role"] != "fresh"]
        if outputs != [_tensor(model["output"])]:
            raise ManifestError(f"{at}/outputs': the model output {outputs} differs from 'model/output' "
                                f"{[_tensor(model['output'])]}")
        for kind in ("inputs", "outputs"):
            for position, tensor in enumerate(record[kind]):
                slot = slots.get(tensor.get("slot"))
                if slot is not None and (tensor["dtype"], tensor["shape"]) != (slot["dtype"], slot["shape"]):
                    raise ManifestError(f"{at}/{kind}/{position}' ({tensor['name']}): {tensor['dtype']} "
                                        f"{tensor['shape']} differs from its cache slot {slot['name']}'s "
                                        f"{slot['dtype']} {slot['shape']} in 'cache_slots'")
    compute = data["schedule"]["compute"]
    for step, index in enumerate(data["schedule"]["step_subset"]):
        if compute[step] != data["subsets"][index]["compute"]:
            raise ManifestError(f"{where}: field 'schedule/compute/{step}' differs from the 'compute' of subset "
                                f"{index}, which 'schedule/step_subset/{step}' names")


def _check_conditioning(data: dict, where: str) -> None:
    """The model's inputs: one sample whose per-sample axes are as many as its latent layout has, one time; every
    conditioning input (and only one) names its pipeline argument and kind, has its kind's dtype and number of
    per-sample axes, and no argument is named twice; a label model states its null class; an input fed the guidance
    scale is a scalar, and a rule with no unconditional half names no partners."""
    model, guidance = data["model"], data["guidance"]
    roles = [t["role"] for t in model["inputs"]]
    if roles.count("sample") != 1 or roles.count("time") != 1:
        raise ManifestError(f"{where}: field 'model/inputs' has roles {roles}; expected one sample and one time")
    sample = model["inputs"][roles.index("sample")]
    layout = model["latent_layout"]
    if len(sample["shape"]) - 1 != LAYOUT_RANKS[layout]:
        raise ManifestError(f"{where}: field 'model/latent_layout' is {layout}, of {LAYOUT_RANKS[layout]} per-sample "
                            f"axes; the sample {sample['name']} is {sample['shape']}")
    arguments = []
    for position, tensor in enumerate(model["inputs"]):
        at = f"{where}: field 'model/inputs/{position}'"
        if (tensor["role"] == CONDITIONING) != ("argument" in tensor and "kind" in tensor) or (
                tensor["role"] != CONDITIONING and "negative" in tensor):
            raise ManifestError(f"{at}' ({tensor['name']}): a conditioning input, and only one, names its argument "
                                f"and kind")
        if tensor["role"] != CONDITIONING:
            continue
        kind = tensor["kind"]
        if tensor["dtype"] != KIND_DTYPES[kind] or len(tensor["shape"]) - 1 != KIND_RANKS[kind]:
            raise ManifestError(f"{at}' ({tensor['name']}): a {kind} input is {KIND_DTYPES[kind]} of "
                                f"{KIND_RANKS[kind]} per-sample axes; it is {tensor['dtype']} {tensor['shape']}")
        if scale_fed(tensor, guidance) and kind != SCALAR:
            raise ManifestError(f"{at}' ({tensor['name']}): it is fed the guidance scale "
                                f"('guidance/scale_argument' {guidance['scale_argument']}); expected a scalar input")
        if "negative" in tensor and guidance["rule"] == GUIDANCE_EMBEDDING:
            raise ManifestError(f"{at}' ({tensor['name']}): names a negative partner; guidance rule "
                                f"{guidance['rule']} runs no unconditional half")
        arguments += [tensor["argument"], *([tensor["negative"]] if "negative" in tensor else [])]
    if len(set(arguments)) != len(arguments):
        raise ManifestError(f"{where}: field 'model/inputs' names a pipeline argument twice: {arguments}")
    if not conditioning_records(model["inputs"]):
        raise ManifestError(f"{where}: field 'model/inputs' has no input with role {CONDITIONING}")
    if (label_record(model["inputs"]) is not None) != ("null_class" in guidance):
        raise ManifestError(f"{where}: field 'guidance/null_class' is "
                            + ("missing; a label model guides against its null class" if "null_class" not in guidance
                               else "given; only a model with a label input has one"))


def _packed_2x2(shape: list | None) -> list | None:
    """(batch, C, h, w) -> the packed latents' shape (batch, T, 4 C) (:func:`~l2c_export.core.latents.packed_2x2_shape`);
    None where that is not a shape that packs."""
    if shape is None or len(shape) != 4 or not all(isinstance(size, int) for size in shape[1:]):
        return None
    try:
        return [shape[0], *packed_2x2_shape(*shape[1:])]
    except ValueError:
        return None


def _check_prompt_encoding(components: dict, by_argument: dict, max_tokens: int | None, where: str) -> None:
    """The text-encoder stack's record ('components/prompt_encoding') against its encoders' records and the model:
    every text_encoder*/tokenizer* component is one of its entries; each entry's graph takes input_ids (and
    attention_mask where 'masked'), int64 (batch, tokens); each array is one of the model's inputs, made of outputs
    its encoders have (:mod:`.text_stack`), as wide as the model's input (``by_argument``: the conditioning records
    by pipeline argument), and the token embeddings at most 'model/max_sequence_length' tokens long."""
    from .text_stack import ATTENTION_MASK, combined_width, split_piece

    record = components.get("prompt_encoding")
    parts = sorted(name for name in components if name.startswith(("text_encoder", "tokenizer")))
    if record is None:
        if parts:
            raise ManifestError(f"{where}: field 'components/prompt_encoding' is missing beside "
                                f"'components/{parts[0]}'; rebuild with this l2c-export")
        return
    entries = {entry["encoder"]: entry for entry in record["encoders"]}
    listed = sorted({*entries, *(entry["tokenizer"] for entry in record["encoders"])})
    if listed != parts or len(entries) != len(record["encoders"]):
        raise ManifestError(f"{where}: field 'components/prompt_encoding/encoders' names {listed}; the components "
                            f"are {parts} (each encoder and its tokenizer once)")
    widths, tokens = {}, {}
    for name, entry in entries.items():
        encoder = components[name]
        expected = ["input_ids", "attention_mask"] if entry["masked"] else ["input_ids"]
        got = [(t["name"], t["dtype"], len(t["shape"])) for t in encoder["inputs"]]
        if got != [(input_name, "int64", 2) for input_name in expected]:
            raise ManifestError(f"{where}: field 'components/{name}/inputs' is {got}; expected {expected}, int64 "
                                f"(batch, tokens)")
        longest = entry.get("template_max_length", entry["max_length"])
        if entry.get("selection") == "first_and_last" and not \
                entry["selection_count"] <= entry["max_length"] <= longest:
            raise ManifestError(f"{where}: field 'components/prompt_encoding/encoders' entry {name!r} keeps the first "
                                f"{entry['selection_count']} and the last of {entry['max_length']} tokens; expected "
                                f"selection_count <= max_length <= template_max_length")
        for output in encoder["outputs"]:
            widths[f"{name}/{output['name']}"] = output["shape"][-1]
            length = output["shape"][1] if len(output["shape"]) == 3 else None
            tokens[f"{name}/{output['name']}"] = entry["max_length"] if isinstance(length, str) else length
        widths[f"{name}/{ATTENTION_MASK}"], tokens[f"{name}/{ATTENTION_MASK}"] = None, entry["max_length"]
    for array, groups in record["arrays"].items():
        field = f"'components/prompt_encoding/arrays/{array}'"
        unknown = [piece for group in groups for piece in group if piece not in widths]
        if unknown:
            raise ManifestError(f"{where}: field {field} reads {unknown[0]!r}, which no encoder of the build gives")
        if array not in by_argument:
            raise ManifestError(f"{where}: field {field}: the model takes no {array} ('model/inputs')")
        if split_piece(groups[0][0])[1] == ATTENTION_MASK:
            continue
        try:
            width = combined_width(groups, widths, f"{where}: field {field}")
        except TypeError:
            raise ManifestError(f"{where}: field {field} mixes masks and embeddings") from None
        except ValueError as error:
            raise ManifestError(str(error)) from None
        if width != by_argument[array]["shape"][-1]:
            raise ManifestError(f"{where}: field {field} makes {width} channels; 'model/inputs' {array} takes "
                                f"{by_argument[array]['shape'][-1]}")
        if by_argument[array]["kind"] == TOKEN_EMBEDDINGS and max_tokens is not None:
            length = sum(tokens[group[0]] or 0 for group in groups)
            if length > max_tokens:
                raise ManifestError(f"{where}: field {field} makes {length} tokens; 'model/max_sequence_length' is "
                                    f"{max_tokens}")


def _check_components(data: dict, where: str) -> None:
    """A text model (prompt embeddings among 'model/inputs') states its longest prompt, 'model/max_sequence_length',
    and only a text model does; the components fit the model: the VAE decoder takes the sample's shape (unpacked,
    where its 'latent_layout' is packed_2x2), the text encoders make what the model takes
    (:func:`_check_prompt_encoding`); the files of the components are named once each."""
    model = data["model"]
    by_role = {tensor["role"]: tensor for tensor in model["inputs"]}
    embeddings = next((t for t in conditioning_records(model["inputs"]) if t["kind"] == TOKEN_EMBEDDINGS), None)
    text = embeddings is not None
    if text != ("max_sequence_length" in model):
        raise ManifestError(f"{where}: field 'model/max_sequence_length' is "
                            + ("missing; a text model states its longest prompt (rebuild with this l2c-export)" if text
                               else "given; only a model with token embeddings among 'model/inputs' has one"))
    components = data.get("components", {})
    decoder = components.get("vae_decoder")
    if decoder is not None:
        expected = by_role["sample"]["shape"] if "sample" in by_role else None
        shapes = [t["shape"] for t in decoder["inputs"]]
        sample = shapes[0] if len(shapes) == 1 else None
        if decoder.get("latent_layout") == PACKED_2X2:
            sample = _packed_2x2(sample)
            what = f"(batch, C, h, w), h and w even, that packs 2x2 into the sample's shape {expected}"
        else:
            what = f"of the sample's shape {expected}"
        if sample is None or sample != expected:
            raise ManifestError(f"{where}: field 'components/vae_decoder/inputs' is {shapes}; expected one input "
                                f"{what}")
        clip = model.get("latent_layout") == NCFHW  # a video model's decoder gives every frame
        if len(decoder["outputs"]) != 1 or len(decoder["outputs"][0]["shape"]) != (5 if clip else 4):
            raise ManifestError(f"{where}: field 'components/vae_decoder/outputs': expected one "
                                + ("clip output (batch, C, F, H, W)" if clip else "image output (batch, C, H, W)"))
    _check_prompt_encoding(components, {t["argument"]: t for t in conditioning_records(model["inputs"])},
                           model.get("max_sequence_length"), where)
    named = {entry["file"] for entry in all_files({**data, "components": {}})}
    for name, component in components.items():
        for field in ("graph", "weights", "file"):
            if field in component:
                file = component[field]["file"]
                if file in named:
                    raise ManifestError(f"{where}: field 'components/{name}/{field}' names {file}, which another "
                                        f"record of the manifest names too")
                named.add(file)
