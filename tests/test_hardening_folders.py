"""Hostile diffusers folders (issue 27): component entries that are paths, JSON files that are huge, sizes that are
numbers and not memory, tokenizers that do not fit their encoder, and folders of links (a Hugging Face cache
snapshot). Each is refused in one line naming the file and field, exit 2, nothing written, in seconds; or, where the
input is valid, built."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from l2c_export.builder.memory import build_parts, check_build_fits
from l2c_export.core.memory import MemoryEstimateError, Part, check_fits
from l2c_export.core.util import MAX_ECHO, short_repr
from l2c_export.models.diffusers import DiffusersFolderError, read_folder
from l2c_export.models.zoo import from_diffusers

from .conftest import REPO, run_cli
from .test_hardening import _refused, _snapshot

MIB = 1 << 20


def _copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def _edit(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _refused_build(folder: Path, tmp_path: Path, *flags: str) -> str:
    """``build --diffusers folder`` refused in one line, exit 2, with nothing written beside the output."""
    before = _snapshot(tmp_path)
    line = _refused("build", "--diffusers", str(folder), "--out", str(tmp_path / "E"), *flags)
    assert _snapshot(tmp_path) == before
    return line


# ---------------------------------------------------------------------------------------------------------------------
# model_index.json: a component is [library, class], two names, never a path.

def test_a_component_entry_that_is_a_path_is_refused_by_the_cli(tiny_diffusers, tmp_path):
    folder = _copy(tiny_diffusers("pixart"), tmp_path / "f")
    _edit(folder / "model_index.json", transformer=["diffusers", "../../../tmp/x/PixArtTransformer2DModel"])
    line = _refused_build(folder, tmp_path)
    assert f"{folder / 'model_index.json'}: field 'transformer' is ['diffusers', '../../../tmp/x/PixArtTransformer" \
        in line and "expected [library, class]" in line


@pytest.mark.parametrize("key, entry", [
    ("transformer", ["diffusers", "x/PixArtTransformer2DModel"]),
    ("transformer", ["../diffusers", "PixArtTransformer2DModel"]),
    ("vae", ["diffusers", "Autoencoder KL"]),
    ("scheduler", ["diffusers", 7]),
    ("transformer", ["diffusers", "PixArtTransformer2DModel", "extra"]),
])
def test_component_entries_that_are_not_two_names_are_refused(tiny_diffusers, tmp_path, key, entry):
    folder = _copy(tiny_diffusers("pixart"), tmp_path / "f")
    _edit(folder / "model_index.json", **{key: entry})
    with pytest.raises(DiffusersFolderError, match=f"model_index.json: field '{key}' is "):
        read_folder(folder)


# ---------------------------------------------------------------------------------------------------------------------
# JSON files are measured before they are parsed; values are echoed at most ~80 characters.

_PEAK_RSS = """import resource, subprocess, sys
result = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(result.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(result.returncode)
"""


def _cli_peak_kib(*args: str) -> tuple[int, str, int]:
    """Runs the CLI in a fresh process whose only child it is: (exit code, stderr, the CLI's peak RSS in KiB)."""
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", "l2c_export.cli", *args],
                            capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return result.returncode, result.stderr, int(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("file", ["model_index.json", "tokenizer/tokenizer.json"])
def test_a_64_mib_json_file_is_refused_before_it_is_parsed_within_1_gib(tiny_diffusers, tmp_path, file):
    """A 64 MiB model_index.json (once 2.2 GiB at peak: 44x the file) and a 64 MiB tokenizer.json: refused by their
    size, with the reason, in a CLI that peaks well under 1 GiB."""
    folder = _copy(tiny_diffusers("pixart-t5"), tmp_path / "f")
    path = folder / file
    data = json.loads(path.read_text())
    name = "A" * (64 * MIB)  # a 64 MiB class name (model_index) or token (tokenizer)
    if file == "model_index.json":
        data["transformer"] = ["diffusers", name]
    else:
        data["added_tokens"].append({**data["added_tokens"][0], "id": 999, "content": name})
    path.write_text(json.dumps(data))
    assert path.stat().st_size > 64 * MIB
    code, stderr, peak_kib = _cli_peak_kib("build", "--diffusers", str(folder), "--out", str(tmp_path / "E"))
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert f"{path}: 64.0 MiB; at most" in lines[0] and "is read (" in lines[0]
    assert len(lines[0]) < 400
    assert peak_kib < 1024 * 1024, f"peak RSS {peak_kib} KiB"
    assert not (tmp_path / "E").exists()


def test_a_huge_value_is_echoed_shortened(tiny_diffusers, tmp_path):
    """A 900 KB option value and a 60 KB pipeline class name (each under its file's cap) are named, not echoed
    whole."""
    folder = _copy(tiny_diffusers("pixart"), tmp_path / "f")
    _edit(folder / "transformer" / "config.json", norm_type="n" * 900_000)
    line = _refused_build(folder, tmp_path)
    assert "field 'norm_type' is 'nnn" in line and len(line) < 400
    _edit(folder / "transformer" / "config.json", norm_type="ada_norm_single")
    _edit(folder / "model_index.json", _class_name="P" * 60_000)
    with pytest.raises(DiffusersFolderError, match="field '_class_name' is 'PPP") as refusal:
        read_folder(folder)
    assert len(str(refusal.value)) < 400


def test_short_repr_bounds_every_kind_of_value():
    for value in ("x" * 10**6, 10**1000, list(range(10**5)), {"k": ["v" * 10**5] * 100}, [[[[[1]]]]] * 10**4):
        text = short_repr(value)
        assert len(text) <= MAX_ECHO, text
    assert short_repr("PixArtAlphaPipeline") == "'PixArtAlphaPipeline'"
    assert short_repr([1, 2]) == "[1, 2]"


# ---------------------------------------------------------------------------------------------------------------------
# Every integer field is bounded before anything is allocated.

@pytest.mark.parametrize("file, changes, message", [
    ("transformer/config.json", {"sample_size": 65536}, "field 'sample_size' is 65536; expected an integer in 1..1024"),
    ("transformer/config.json", {"num_layers": 10**9}, "field 'num_layers' is 1000000000; expected an integer in "
                                                       "1..128"),
    ("text_encoder/config.json", {"vocab_size": 10**12}, "field 'vocab_size' is 1000000000000; expected an integer "
                                                         "in 1..1048576"),
])
def test_sizes_that_are_not_memory_are_refused_by_the_cli_in_one_line(tiny_diffusers, tmp_path, file, changes,
                                                                      message):
    folder = _copy(tiny_diffusers("pixart-t5"), tmp_path / "f")
    _edit(folder / file, **changes)
    line = _refused_build(folder, tmp_path)
    assert f"{folder / file}: {message}" in line and "(" in line.split(message)[1]  # the reason follows


def test_an_image_size_past_the_latent_bound_is_refused_for_flux(tiny_diffusers, tmp_path):
    folder = tiny_diffusers("flux", "flow")
    line = _refused("build", "--diffusers", str(folder), "--image-size", "1000000", "--out", str(tmp_path / "E"))
    assert line.startswith("Error: --image-size 1000000: expected at most 1024 pixels")
    assert not (tmp_path / "E").exists()


@pytest.mark.parametrize("file, changes, message", [
    ("transformer/config.json", {"num_attention_heads": 10**6}, "field 'num_attention_heads' is 1000000"),
    ("transformer/config.json", {"patch_size": True}, "field 'patch_size' is True"),
    ("transformer/config.json", {"norm_num_groups": -1}, "field 'norm_num_groups' is -1"),
    ("transformer/config.json", {"caption_channels": 2**40}, "field 'caption_channels' is 1099511627776"),
    ("text_encoder/config.json", {"d_ff": 10**9}, "field 'd_ff' is 1000000000"),
    ("text_encoder/config.json", {"num_heads": 0}, "field 'num_heads' is 0"),
    ("text_encoder/config.json", {"relative_attention_num_buckets": 1e9}, "field 'relative_attention_num_buckets' "
                                                                         "is 1000000000.0"),
    ("text_encoder/config.json", {"pad_token_id": 5000}, "field 'pad_token_id' is 5000; expected a token id (or a "
                                                         "list of them) below vocab_size"),
    ("vae/config.json", {"block_out_channels": [8, 10**9]}, "field 'block_out_channels' is [8, 1000000000]"),
    ("vae/config.json", {"block_out_channels": [8] * 20}, "expected a list of 1 to 8 integers"),
    ("vae/config.json", {"block_out_channels": [12]}, "each must be a multiple of norm_num_groups 8"),
    ("vae/config.json", {"layers_per_block": 10**6}, "field 'layers_per_block' is 1000000"),
])
def test_every_integer_field_of_the_configs_is_bounded(tiny_diffusers, tmp_path, file, changes, message):
    folder = _copy(tiny_diffusers("pixart-t5"), tmp_path / "f")
    _edit(folder / file, **changes)
    with pytest.raises(DiffusersFolderError) as refusal:
        read_folder(folder)
    assert str(refusal.value).startswith(f"{folder / file}: ") and message in str(refusal.value)


# ---------------------------------------------------------------------------------------------------------------------
# The memory estimate, before torch allocates.

def test_a_config_that_fits_is_estimated_from_its_real_parameter_count(tiny_diffusers):
    """The estimate counts the transformer's parameters as diffusers builds it (on the meta device), and a folder
    that fits passes; the same estimate against less memory than it needs is refused naming the largest part."""
    spec = from_diffusers(tiny_diffusers("pixart-t5"))
    model = spec.load_model()
    real = sum(t.numel() for t in model.transformer.parameters()) + sum(
        t.numel() for t in model.transformer.buffers())
    parts = build_parts(spec)
    assert parts[0].bytes == real * 4 and str(real) in parts[0].what.replace(",", "")
    total = check_build_fits(spec)
    assert total == sum(part.bytes for part in parts) > real * 4
    assert check_fits(parts, "the build", available=total) == total
    with pytest.raises(MemoryEstimateError, match=r"fields 'num_layers' \(2\) and 'num_attention_heads' x "
                                                  r"'attention_head_dim' \(16\): the build needs at least"):
        check_fits(parts, "the build", available=total - 1)


def test_a_config_that_cannot_fit_is_refused_naming_the_field_before_allocating(tiny_diffusers, tmp_path):
    """Heads x head width 262144 (each within its bound): 10 TiB of weights, refused from the estimate with the
    fields that make it and the memory available."""
    folder = _copy(tiny_diffusers("dit"), tmp_path / "f")
    _edit(folder / "transformer" / "config.json", num_attention_heads=256, attention_head_dim=1024)
    line = _refused_build(folder, tmp_path)
    assert (f"{folder / 'transformer' / 'config.json'}: fields 'num_layers' (2) and 'num_attention_heads' x "
            f"'attention_head_dim' (262144): the build needs at least") in line
    assert "TiB (transformer weights (" in line and "available (MemAvailable, /proc/meminfo)" in line


def test_a_request_that_cannot_fit_is_refused_with_the_estimate(default_build):
    """10 million labels sampled at once on the digits DiT: the cache alone is terabytes; refused before any noise
    is drawn. (Sampled a batch at a time, as by default, only the results are held for all of them.)"""
    from l2c_export.runtime.pipeline import L2CPipeline

    pipe = L2CPipeline.from_engine_dir(default_build)
    with pytest.raises(MemoryEstimateError, match=r"^10000000 labels: sampling 10000000 image\(s\) with guidance "
                                                  r"\(x2\) needs at least .* \(cache \(\d+ slots\) "):
        pipe(labels=np.zeros(10_000_000, dtype=np.int64), batch_size=10_000_000)
    assert pipe(labels=[1, 2]).samples.shape[0] == 2  # a request that fits runs


def test_check_fits_names_the_largest_part():
    parts = [Part("small", 10, "a: field 'x'"), Part("large", 1000, "b: field 'y'")]
    with pytest.raises(MemoryEstimateError, match=r"^b: field 'y': doing it needs at least 1010 B \(large 1000 B, "
                                                  r"small 10 B\) against 100 B available"):
        check_fits(parts, "doing it", available=100)


# ---------------------------------------------------------------------------------------------------------------------
# The tokenizer is read and cross-checked with the text encoder before the first export.

@pytest.mark.slow  # CLI runs that each load a text-encoder folder
def test_a_malformed_tokenizer_is_refused_naming_the_file_before_any_export(tiny_diffusers, tmp_path):
    folder = _copy(tiny_diffusers("pixart-t5"), tmp_path / "f")
    path = folder / "tokenizer" / "tokenizer.json"
    original = path.read_text()
    path.write_text(original[:-200])  # cut short
    line = _refused_build(folder, tmp_path)
    assert f"{path}: not valid JSON" in line
    path.write_text(original)
    _edit(path, model={"type": "Unigram", "vocab": "not a list"})
    line = _refused_build(folder, tmp_path)
    assert f"{path}: not a tokenizers library file (" in line


def test_token_ids_past_the_encoders_vocabulary_are_refused_at_build_not_at_run(tiny_diffusers, tmp_path):
    """Once built, then failed at run with ONNX Runtime's Gather error; now refused naming both files."""
    folder = _copy(tiny_diffusers("pixart-t5"), tmp_path / "f")
    vocabulary = json.loads((folder / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    _edit(folder / "text_encoder" / "config.json", vocab_size=len(vocabulary) - 1)
    line = _refused_build(folder, tmp_path)
    assert (f"{folder / 'tokenizer' / 'tokenizer.json'}: its vocabulary has token id {len(vocabulary) - 1}; the text "
            f"encoder's vocab_size is {len(vocabulary) - 1}") in line


PADDING = {"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": None, "pad_id": 10**6,
           "pad_type_id": 0, "pad_token": "<pad>"}  # a tokenizer.json's padding, its id past the vocabulary


@pytest.mark.parametrize("edit, message", [
    (lambda t: _edit(t / "tokenizer_config.json", pad_token="<nothere>"),
     "tokenizer_config.json: field 'pad_token' is '<nothere>', which is not in"),
    (lambda t: _edit(t / "tokenizer_config.json", eos_token={"content": 5}), "field 'eos_token' is {'content': 5}"),
    (lambda t: _edit(t / "tokenizer.json", padding=PADDING), "field 'padding/pad_id' has token id 1000000"),
    (lambda t: (t / "special_tokens_map.json").write_bytes(b" " * (17 * MIB)), "special_tokens_map.json: 17.0 MiB; "
                                                                               "at most 16.0 MiB is read"),
])
def test_special_tokens_are_checked_against_the_vocabulary(tiny_diffusers, tmp_path, edit, message):
    folder = _copy(tiny_diffusers("pixart-t5"), tmp_path / "f")
    edit(folder / "tokenizer")
    with pytest.raises(DiffusersFolderError, match=message.replace("(", r"\(").replace("{", r"\{")):
        read_folder(folder)


# ---------------------------------------------------------------------------------------------------------------------
# Input folders may be links (a Hugging Face cache snapshot); a build folder holds none.

def _hub_snapshot(folder: Path, cache: Path) -> Path:
    """``folder`` laid out as the Hugging Face cache stores it: every file a link from ``snapshots/<revision>/...``
    to ``../../blobs/<sha256>`` (one more ``..`` per sub-folder)."""
    blobs, snapshot = cache / "blobs", cache / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blobs / digest)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blobs / digest, link.parent))
    return snapshot


def test_a_hub_snapshot_of_links_builds_and_the_build_holds_no_links(tiny_diffusers, tmp_path):
    from l2c_export.core import manifest as manifest_io

    snapshot = _hub_snapshot(tiny_diffusers("pixart-t5"), tmp_path / "hub")
    assert all(p.is_symlink() for p in snapshot.rglob("*") if not p.is_dir())
    assert os.readlink(snapshot / "transformer" / "config.json").startswith("../../../blobs/")
    run_cli("build", "--diffusers", str(snapshot), "--steps", "2", "--out", str(tmp_path / "E"))
    build = tmp_path / "E"
    assert not any(p.is_symlink() for p in build.rglob("*"))
    data = manifest_io.load(build)  # every file inside, hashed, no link on the way
    tokenizer = build / data["components"]["tokenizer"]["file"]["file"]
    assert tokenizer.is_file() and json.loads(tokenizer.read_text())["model"]["type"] == "Unigram"
    assert {p.name for p in build.iterdir()} >= {"text_encoder.onnx", "vae_decoder.onnx", "tokenizer.json"}
