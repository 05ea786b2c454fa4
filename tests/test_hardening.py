"""Hardening, tried as a user and as an attacker would: nothing lost, nothing outside a build folder read, no bad
number accepted, one clear line and a documented exit code for every user error.

Exit codes: 1 a check failed (verify), 2 bad input, 3 backend unavailable, 4 the file system refused.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from l2c_export.core import manifest as manifest_io
from l2c_export.core.util import exchange_names, short_repr

from .conftest import REPO, cli_command, restamp_graphs, run_cli


def _copy(build_dir: Path, target: Path) -> Path:
    shutil.copytree(build_dir, target)
    return target


def _refused(*args: str, code: int = 2) -> str:
    """Runs the CLI, expecting exit ``code`` and exactly one line on stderr, no traceback; returns that line."""
    result = run_cli(*args, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "it/s]" not in line]  # not tqdm
    assert result.returncode == code, f"exit {result.returncode}, expected {code}:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    return lines[0]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder: Path, data: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(data, indent=1))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------------------------------------------------------------
# Nothing lost: --out must be absent, empty or a previous build.

def test_build_refuses_a_folder_of_the_users_files_and_writes_nothing(tmp_path):
    docs = tmp_path / "mydocs"
    (docs / "sub").mkdir(parents=True)
    (docs / "thesis.txt").write_text("x\n")
    before = _snapshot(tmp_path)
    line = _refused("build", "--out", str(docs))
    assert f"--out {docs}: not empty and not an l2c-export build" in line and "thesis.txt" in line
    assert _snapshot(tmp_path) == before  # nothing written beside it either (no staging folder, no lock)


def test_build_refuses_a_previous_build_with_foreign_files_and_a_file_as_out(default_build, tmp_path):
    folder = _copy(default_build, tmp_path / "build")
    (folder / "notes.txt").write_text("mine")
    line = _refused("build", "--out", str(folder))
    assert "also holds files the build did not write (notes.txt)" in line
    assert (folder / "notes.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("data")
    assert "afile' is a file" in _refused("build", "--out", str(tmp_path / "afile"))
    assert "afile is a file, not a folder" in _refused("build", "--out", str(tmp_path / "afile" / "sub"))
    assert (tmp_path / "afile").read_text() == "data"


def test_build_replaces_an_empty_folder_and_a_previous_build(default_build, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    run_cli("build", "--out", str(empty))
    manifest_io.load(empty)
    run_cli("build", "--out", str(empty))  # a previous build: replaced, everything reused
    manifest_io.load(empty)


# ---------------------------------------------------------------------------------------------------------------------
# A build folder is a closed world.

@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_a_manifest_naming_a_file_outside_its_folder_is_refused_by_run_and_build(default_build, tmp_path, how):
    folder = _copy(default_build, tmp_path / "planted")
    data = _manifest(folder)
    record = data["subsets"][1]
    outside = tmp_path / "outside.onnx"
    shutil.copy(folder / record["engine"]["file"], outside)  # the same bytes: only the path check can stop it
    if how == "symlink":
        (folder / record["engine"]["file"]).unlink()
        (folder / record["engine"]["file"]).symlink_to(outside)
        name = record["engine"]["file"]
    else:
        (folder / record["engine"]["file"]).unlink()
        name = str(outside) if how == "absolute" else "../outside.onnx"
        record["engine"]["file"] = record["graph"]["file"] = name
        _write_manifest(folder, data)
    line = _refused("run", str(folder), "--labels", "1")
    assert str(folder / "manifest.json") in line
    assert (f"file {name!r} is (or lies in) a symbolic link" in line if how == "symlink"
            else short_repr(name) in line and "not a plain relative path inside the build folder" in line)
    # A build over the planted folder refuses it and never hard-links the outside file in.
    assert "not an l2c-export build" in _refused("build", "--out", str(folder))
    assert os.stat(outside).st_nlink == 1


def test_a_graph_whose_weights_point_outside_the_build_is_refused(default_build, tmp_path):
    import onnx

    folder = _copy(default_build, tmp_path / "external")
    data = _manifest(folder)
    record = data["subsets"][0]
    path = folder / record["graph"]["file"]
    graph = onnx.load(path, load_external_data=False)
    tensor = next(t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in tensor.external_data if e.key == "location").value = "../secret.bin"
    onnx.save_model(graph, str(path))
    record["graph"] = record["engine"] = manifest_io.file_entry(folder, record["graph"]["file"], record["graph"]["key"])
    _write_manifest(folder, data)
    line = _refused("run", str(folder), "--labels", "1")
    assert f"{path}: initializer {tensor.name!r} reads '../secret.bin'" in line


# ---------------------------------------------------------------------------------------------------------------------
# Inconsistent manifests.

def _edit(default_build: Path, tmp_path: Path, edit) -> Path:
    folder = _copy(default_build, tmp_path / "edited")
    data = _manifest(folder)
    edit(data)
    _write_manifest(folder, data)
    return folder


def test_a_step_naming_a_missing_subset_is_refused(default_build, tmp_path):
    def edit(data):
        data["schedule"]["step_subset"][3] = 42

    line = _refused("run", str(_edit(default_build, tmp_path, edit)), "--labels", "1")
    assert "field 'schedule/step_subset/3' names subset 42" in line


def test_a_first_step_that_reuses_is_refused(default_build, tmp_path):
    def edit(data):
        data["schedule"]["step_subset"][0] = 1

    line = _refused("run", str(_edit(default_build, tmp_path, edit)), "--labels", "1")
    assert "the first step must compute every sub-layer" in line


def test_weight_offsets_past_the_end_of_the_weights_file_are_refused(default_build, tmp_path):
    def edit(data):
        data["weight_tensors"][-1]["offset"] = data["weights"]["bytes"]

    line = _refused("run", str(_edit(default_build, tmp_path, edit)), "--labels", "1")
    assert "lie past the end of weights.bin" in line


def test_a_graph_whose_interface_differs_from_the_manifest_is_refused(default_build, tmp_path):
    def edit(data):  # every record renamed alike: only the graphs themselves say otherwise
        for tensor in (data["model"]["inputs"][0], *(subset["inputs"][0] for subset in data["subsets"])):
            tensor["name"] = "latents"

    line = _refused("run", str(_edit(default_build, tmp_path, edit)), "--labels", "1")
    assert "the graph's inputs" in line and "are not the manifest's" in line and "'latents'" in line


def test_nan_in_the_manifests_sampler_tables_is_refused(default_build, tmp_path):
    folder = _copy(default_build, tmp_path / "nan")
    text = (folder / "manifest.json").read_text()
    data = json.loads(text)
    first = json.dumps(data["sampler"]["alphas_cumprod"][0])
    (folder / "manifest.json").write_text(text.replace(first, "NaN", 1))
    line = _refused("run", str(folder), "--labels", "1")
    assert "manifest.json: not valid JSON (NaN is not a JSON number" in line


# ---------------------------------------------------------------------------------------------------------------------
# Locked, atomic, and the modes a user's umask gives.

def test_two_builds_into_one_folder_at_once_are_serialised(tmp_path):
    out = tmp_path / "engines"
    cli, variables = cli_command()
    command = [*cli, "build", "--out", str(out)]
    env = {**os.environ, **variables, "PYTHONUNBUFFERED": "1"}
    first, second = (subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=REPO) for _ in range(2))
    outputs = [process.communicate(timeout=600) for process in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    assert any("waiting for the build already running into" in stdout for stdout, _ in outputs)
    manifest_io.load(out, verify_files=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]  # the lock is gone with the builds


def test_a_build_killed_between_the_two_renames_is_restored_before_anything_else(default_build, tmp_path):
    """The two-rename fallback (file systems without RENAME_EXCHANGE) moves the previous build to .<name>.old first;
    a kill right then leaves nothing at --out. The next build puts it back, and it is a usable build meanwhile."""
    out = tmp_path / "engines"
    old = tmp_path / ".engines.old"
    _copy(default_build, old)
    (tmp_path / ".engines.staging").mkdir()  # the half-written new build
    full = tmp_path / "full.json"
    full.write_text(json.dumps({"num_steps": 20, "depth": 6, "compute": [[1] * 12] * 20}))
    result = run_cli("build", "--out", str(out), "--schedule", str(full))
    # Restored first: the new build reuses the previous one's weights and full graph without tracing.
    assert "1 exported, 1 file(s) reused" in result.stdout  # weights.bin, from the restored build
    assert not old.exists() and not (tmp_path / ".engines.staging").exists()
    assert len(manifest_io.load(out)["subsets"]) == 1


def test_the_output_swap_is_one_atomic_exchange(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "f").write_text("b")
    if not exchange_names(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this file system cannot exchange names atomically (renameat2 RENAME_EXCHANGE)")
    assert (tmp_path / "a" / "f").read_text() == "b" and (tmp_path / "b" / "f").read_text() == "a"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_build_files_get_the_modes_of_the_users_umask(tmp_path, umask):
    out = tmp_path / "engines"
    cli, variables = cli_command()
    env = {**os.environ, **variables, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*cli, "build", "--out", str(out)], check=True, capture_output=True, env=env, cwd=REPO,
                   preexec_fn=lambda: os.umask(umask))
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


# ---------------------------------------------------------------------------------------------------------------------
# Every number that enters is finite and in range.

def test_nan_weights_are_refused_naming_the_tensor(tmp_path):
    from l2c_export.models.dit.model import DiT, dit_config

    state = DiT(dit_config("DiT-S/2", input_size=4, num_classes=10)).state_dict()
    state["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    line = _refused("build", "--checkpoint", str(tmp_path / "nan.pt"), "--model", "DiT-S/2", "--image-size", "32",
                    "--num-classes", "10", "--out", str(tmp_path / "out"))
    assert f"{tmp_path / 'nan.pt'}: tensor 'blocks.1.attn.qkv.weight' holds 1 NaN or infinite value(s)" in line
    assert not (tmp_path / "out").exists()


def test_nan_router_logits_are_refused_naming_the_key(tmp_path):
    from argparse import Namespace

    routers = {f"{i}.prob": torch.zeros(12) for i in range(20)}
    routers["7.prob"][3] = float("nan")
    torch.save({"routers": routers, "args": Namespace(model="x")}, tmp_path / "router.pt")
    line = _refused("schedule", "--router", str(tmp_path / "router.pt"))
    assert "field 'routers' key '7.prob' holds NaN or infinite logits" in line
    from safetensors.numpy import save_file

    save_file({"logits": np.full((20, 12), np.inf, dtype=np.float32)}, str(tmp_path / "router.safetensors"))
    assert "tensor 'logits' holds NaN or infinite values" in _refused("schedule", "--router",
                                                                      str(tmp_path / "router.safetensors"))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_noise_is_refused(default_build, tmp_path, value):
    noise = np.zeros((1, 1, 8, 8), dtype=np.float32)
    noise[0, 0, 2, 3] = float(value)
    np.save(tmp_path / "z.npy", noise)
    line = _refused("run", str(default_build), "--labels", "1", "--noise", str(tmp_path / "z.npy"),
                    "--save-latents", str(tmp_path / "out.npy"))
    assert "1 of its 64 values are NaN or infinite" in line
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.parametrize("flags, message", [
    (("run", "{build}", "--cfg-scale", "nan"), "'nan' is not a finite number"),
    (("run", "{build}", "--cfg-scale", "inf"), "'inf' is not a finite number"),
    (("run", "{build}", "--cfg-scale", "-3"), "expected a number >= 1.0"),
    (("build", "--threshold", "nan", "--router", "{router}", "--out", "{out}"), "'nan' is not a finite number"),
    (("build", "--steps", "0", "--out", "{out}"), "0 is not in the range 1<=x<=1000"),
    (("schedule", "--router", "{router}", "--target-mac-fraction", "1.5"), "expected a number > 0.0 and <= 1.0"),
])
def test_flags_out_of_range_are_refused(default_build, tmp_path, flags, message):
    from l2c_export.models.zoo import embedded_default

    args = [f.format(build=default_build, router=embedded_default().default_router, out=tmp_path / "out")
            for f in flags]
    assert message in _refused(*args)
    assert not (tmp_path / "out").exists()


def test_json_is_written_and_read_strictly(tmp_path):
    from l2c_export.core.schedule import Schedule, ScheduleError
    from l2c_export.core.util import write_json

    with pytest.raises(ValueError, match="x.json: refusing to write a non-finite number"):
        write_json(tmp_path / "x.json", {"threshold": float("nan")})
    assert not (tmp_path / "x.json").exists()
    (tmp_path / "s.json").write_text('{"num_steps": 1, "depth": 1, "compute": [[1, 1]], "threshold": Infinity}')
    with pytest.raises(ScheduleError, match="s.json: not valid JSON \\(Infinity is not a JSON number"):
        Schedule.load(tmp_path / "s.json")


# ---------------------------------------------------------------------------------------------------------------------
# Backends, checkpoints, I/O.

def test_a_missing_backend_is_exit_3_for_run_and_verify(default_build):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here; this test covers machines without it")
    except ImportError:
        pass
    for command in ("run", "verify"):
        assert "TensorRT is not installed" in _refused(command, str(default_build), "--backend", "tensorrt", code=3)


def test_a_pickle_exploit_is_refused_without_torchs_advice_to_unpickle(tmp_path):
    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    for protocol in (2, 4):  # torch.save's protocol, and one its safe unpickler does not speak
        with open(tmp_path / "evil.pt", "wb") as f:
            pickle.dump({"weight": Exploit()}, f, protocol=protocol)
        line = _refused("build", "--checkpoint", str(tmp_path / "evil.pt"), "--model", "DiT-S/2", "--image-size",
                        "32", "--out", str(tmp_path / "out"))
        if protocol == 2:
            assert "refused: it needs 'posix.system', which only unrestricted unpickling would create" in line
        else:
            assert "not a torch file that loads without unrestricted unpickling" in line
        assert "weights_only" not in line
        assert not (tmp_path / "pwned").exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs (a real full disk); skipped where this process may not mount (it needs root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_exit_4_and_leaves_the_previous_build(default_build, small_tmpfs):
    out = small_tmpfs / "engines"
    line = _refused("build", "--out", str(out), code=4)  # the default's weights alone are 7 MB
    assert "No space left on device" in line and f"writing the build into {out}" in line
    assert sorted(p.name for p in small_tmpfs.iterdir()) == []  # no staging folder, no lock


def test_a_read_only_folder_is_one_line_exit_4(default_build, small_tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    line = _refused("run", str(default_build), "--labels", "1", "--save-latents", str(small_tmpfs / "l.npy"), code=4)
    assert "Read-only file system" in line


@pytest.mark.parametrize("field, value, message", [
    ("alphas_cumprod", 1.5, "field 'sampler/alphas_cumprod/2': 1.5 is greater than the maximum of 1"),
    ("log_betas", 0.7, "field 'sampler/log_betas/2': 0.7 is greater than the maximum of 0"),
    ("timesteps", 5000, "field 'sampler/timesteps/2': 5000 is greater than the maximum of 999"),
])
def test_manifest_tables_out_of_range_are_refused(default_build, tmp_path, field, value, message):
    def edit(data):
        data["sampler"][field][2] = value

    assert message in _refused("run", str(_edit(default_build, tmp_path, edit)), "--labels", "1")


def test_a_sampler_table_of_the_wrong_length_is_refused(default_build, tmp_path):
    def edit(data):
        data["sampler"]["posterior_mean_coef1"].pop()

    line = _refused("run", str(_edit(default_build, tmp_path, edit)), "--labels", "1")
    assert "field 'sampler/posterior_mean_coef1' has 19 entries; expected num_steps = 20" in line


# The common Python .gitignore template (github/gitignore Python.gitignore) ignores these folders at any depth as
# generated output; no tracked file may sit under one, or a contributor who adopts the template loses it from git.
PYTHON_GITIGNORE_TEMPLATE_FOLDERS = ["build/", "develop-eggs/", "dist/", "downloads/", "eggs/", ".eggs/", "lib/",
                                     "lib64/", "parts/", "sdist/", "var/", "wheels/", "share/python-wheels/",
                                     "htmlcov/", ".tox/", ".nox/", "env/", "venv/", "ENV/", "site/"]


def test_no_tracked_file_is_ignored_by_the_common_python_gitignore_template(tmp_path):
    template = tmp_path / "python.gitignore"
    template.write_text("\n".join(PYTHON_GITIGNORE_TEMPLATE_FOLDERS) + "\n")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, check=True, capture_output=True, text=True).stdout
    assert "l2c_export/builder/build.py" in tracked.splitlines()
    ignored = subprocess.run(["git", "-c", f"core.excludesFile={template}", "check-ignore", "--no-index", "--stdin"],
                             cwd=REPO, input=tracked, capture_output=True, text=True)
    assert ignored.returncode == 1, f"tracked files the template would drop from git:\n{ignored.stdout}"


# ---------------------------------------------------------------------------------------------------------------------
# Round two: what cannot work is refused at the first command that sees it, and a refused command leaves nothing.

@pytest.mark.parametrize("dtype, where, suffix", [
    (torch.int8, None, ".pt"),  # a whole state_dict of integers
    (torch.int32, "blocks.1.mlp.fc1.weight", ".safetensors"),  # one integer tensor among float ones
])
def test_a_checkpoint_of_integer_weights_is_refused_naming_the_tensor(tmp_path, dtype, where, suffix):
    from safetensors.torch import save_file

    from l2c_export.models.dit.model import DiT, dit_config

    state = DiT(dit_config("DiT-S/2", input_size=4, num_classes=10)).state_dict()
    state = {name: (tensor * 100).to(dtype) if where in (None, name) else tensor for name, tensor in state.items()}
    checkpoint = tmp_path / f"quantized{suffix}"
    if suffix == ".pt":
        torch.save(state, checkpoint)
    else:
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(checkpoint))
    before = _snapshot(tmp_path)
    out = tmp_path / "new" / "deeper" / "engines"  # folders above --out that the refused build would have created
    line = _refused("build", "--checkpoint", str(checkpoint), "--model", "DiT-S/2", "--image-size", "32",
                    "--num-classes", "10", "--out", str(out))
    name = where or next(iter(state))
    assert f"{checkpoint}: tensor {name!r} is {str(dtype).removeprefix('torch.')}; expected floating-point " \
           f"weights" in line
    assert _snapshot(tmp_path) == before  # no output, no staging folder, no lock, no parent folders


def test_bf16_for_onnxruntime_is_refused_at_build_naming_the_backends_that_take_it(default_build, tmp_path):
    before = _snapshot(tmp_path)
    line = _refused("build", "--precision", "bf16", "--backend", "onnxruntime", "--out", str(tmp_path / "engines"))
    assert "--precision bf16 --backend onnxruntime: onnxruntime cannot run bf16 graphs; bf16 is for --backend " \
           "tensorrt only" in line
    assert _snapshot(tmp_path) == before
    # A bf16 manifest (an older build's) is still refused by the runtime, naming the field.
    folder = _edit(default_build, tmp_path, lambda data: data.update(precision="bf16"))
    assert "manifest.json: field 'precision' is bf16: onnxruntime cannot run bf16 graphs" in _refused(
        "run", str(folder), "--labels", "1")


def test_a_build_refused_under_the_lock_leaves_the_previous_build_and_no_lock(default_build, tmp_path):
    """A checkpoint is read only under the lock (an unchanged rebuild never loads it): refused there, the previous
    build stays as it was and the lock goes with the refused build. (A build that succeeds leaves no lock either:
    test_two_builds_into_one_folder_at_once_are_serialised.)"""
    from l2c_export.models.dit.model import DiT, dit_config

    state = DiT(dit_config("DiT-S/2", input_size=4, num_classes=10)).state_dict()
    torch.save({name: tensor.to(torch.int8) for name, tensor in state.items()}, tmp_path / "int8.pt")
    out = _copy(default_build, tmp_path / "engines")
    before = _snapshot(tmp_path)
    line = _refused("build", "--checkpoint", str(tmp_path / "int8.pt"), "--model", "DiT-S/2", "--image-size", "32",
                    "--num-classes", "10", "--out", str(out))
    assert "is int8; expected floating-point weights" in line
    assert _snapshot(tmp_path) == before
    manifest_io.load(out, verify_files=True)


def _edit_records(data: dict, role: str, shape: list) -> None:
    """Sets ``shape`` on every record of the tensors with ``role`` (model record and every subset's), so that the
    manifest agrees with itself and only its graphs say otherwise."""
    model = data["model"]
    for tensor in (*model["inputs"], model["output"], *data["cache_slots"],
                   *(t for s in data["subsets"] for t in (*s["inputs"], *s["outputs"]))):
        if tensor.get("role") == role or (role == "cache" and "role" not in tensor):
            tensor["shape"] = shape


def _set_cache_shape(data: dict) -> None:
    for tensor in (*data["cache_slots"], *(t for s in data["subsets"] for t in (*s["inputs"], *s["outputs"])
                                           if "slot" in t)):
        tensor["shape"] = ["batch", 16, 64]


@pytest.mark.parametrize("edit, backend, message", [
    (lambda d: (d["model"]["config"].update(num_classes=1000), d["guidance"].update(null_class=1000)), "onnxruntime",
     "field 'guidance/null_class' is 1000; the graph was built for 10 (graph full.onnx)"),
    (lambda d: _edit_records(d, "sample", ["batch", 1, 16, 16]), "onnxruntime",
     "field 'subsets/0/inputs/0/shape' (x) is ['batch', 1, 16, 16]; the graph full.onnx has ['batch', 1, 8, 8]"),
    (lambda d: _edit_records(d, "output", ["batch", 1, 8, 8]), "onnxruntime",  # learned sigma dropped
     "field 'subsets/0/outputs/0/shape' (model_out) is ['batch', 1, 8, 8]; the graph full.onnx has ['batch', 2, 8, "
     "8]"),
    (_set_cache_shape, "onnxruntime",
     "(fresh_attn_0) is ['batch', 16, 64]; the graph full.onnx has ['batch', 16, 128]"),
    (lambda d: next(w for w in d["weight_tensors"] if w["name"] == "y_embedder.embedding_table.weight").update(
        shape=[128, 11]), "onnxruntime",
     "(y_embedder.embedding_table.weight) says float32 [128, 11]; the graph full.onnx has float32 [11, 128]"),
    (lambda d: d["guidance"].update(guided_channels=4), "onnxruntime",
     "field 'guidance/guided_channels' is 4; expected at most the sample's 1 channel(s)"),
    (lambda d: d["subsets"][1]["inputs"][0].update(shape=["batch", 1, 4, 4]), "onnxruntime",
     "field 'subsets/1/inputs': the model inputs"),
    (lambda d: d["subsets"][1]["compute"].__setitem__(5, 1), "onnxruntime",
     "field 'subsets/1/reads' reads sub-layers"),
    (lambda d: d["model"]["config"].update(num_classes=1000), "torch",  # the torch backend rebuilds the model from it
     "field 'model/config/num_classes' is 1000; the graph was built for 10 (graph full.onnx)"),
    (lambda d: d["model"]["config"].update(num_classes=1000), "onnxruntime",  # a number this runtime never reads
     "field 'model/config/num_classes' is 1000; the graph was built for 10 (graph full.onnx)"),
    (lambda d: d["model"]["config"].update(learn_sigma=False), "onnxruntime",
     "field 'model/config/learn_sigma' is False; the graph was built for True (graph full.onnx)"),
    (lambda d: d["guidance"].update(null_class=5), "onnxruntime",  # lowered: every label still indexes the table
     "field 'guidance/null_class' is 5; the graph was built for 10 (graph full.onnx)"),
], ids=["num-classes", "sample-shape", "output-shape", "cache-shape", "weight-shape", "guided-channels",
        "one-subset", "compute-vs-reads", "config-torch", "config-onnxruntime", "config-flag", "null-class-down"])
def test_a_manifest_that_contradicts_its_graphs_is_refused_naming_the_field(default_build, tmp_path, edit, backend,
                                                                            message):
    """The graphs' hashes are intact; only the manifest's numbers were edited. Every number the runtime takes is
    checked against the graph it loads (or against the manifest's other records of the same thing)."""
    folder = _edit(default_build, tmp_path, edit)
    line = _refused("run", str(folder), "--labels", "1", "--backend", backend, "--save-latents",
                    str(tmp_path / "out.npy"))
    assert f"{folder / 'manifest.json'}: " in line and message in line
    assert not (tmp_path / "out.npy").exists()


def test_a_null_class_past_the_label_table_is_refused_even_with_the_graphs_restamped(default_build, tmp_path):
    """Behind the stamps: every graph re-stamped for 1000 classes and its sha256 fixed up, the label table itself
    (11 rows) still contradicts the manifest."""
    folder = _copy(default_build, tmp_path / "restamped")
    data = _manifest(folder)
    data["model"]["config"]["num_classes"] = data["guidance"]["null_class"] = 1000
    restamp_graphs(folder, data)
    _write_manifest(folder, data)
    line = _refused("run", str(folder), "--labels", "1")
    assert ("field 'guidance/null_class' is 1000 (labels 0..999, null class 1000); the graph full.onnx's label table "
            "'y_embedder.embedding_table.weight' has 11 rows") in line


def _deeply_nested(levels: int = 1_000_000) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.slow
def test_json_nested_a_million_deep_is_one_line_exit_2(default_build, tmp_path):
    schedule = tmp_path / "deep.json"
    schedule.write_text('{"num_steps": 1, "depth": 1, "compute": ' + _deeply_nested() + "}")
    expected = "JSON arrays or objects nested more than 64 levels deep; expected at most 64"
    assert f"{schedule}: {expected}" in _refused("schedule", "--schedule", str(schedule))
    folder = _copy(default_build, tmp_path / "build")
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text.replace('"name":', f'"deep": {_deeply_nested()}, "name":', 1))
    assert f"{folder / 'manifest.json'}: {expected}" in _refused("run", str(folder), "--labels", "1")
    config = tmp_path / "config.json"  # learn --model-config
    config.write_text('{"family": "dit", "depth": ' + _deeply_nested(100) + "}")
    assert f"{config}: {expected}" in _refused("learn", "--checkpoint", str(tmp_path / "x.pt"), "--model-config",
                                               str(config), "--out", str(tmp_path / "r.safetensors"))
