"""Hardening, round three (issue 27), the command line's cases: schedule modes, the negative prompt, conditioning
files, long prompt lists sampled in bounded batches, prompt files bounded before they are read, and what the installed
package needs (the wheel with and without the ``diffusers`` extra)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from l2c_export.core import manifest as manifest_io
from l2c_export.core.schedule import SCHEDULE_MODES, Schedule, ScheduleError
from l2c_export.runtime.components import MAX_PROMPT_BYTES, PromptError
from l2c_export.runtime.conditioning import ConditioningError
from l2c_export.runtime.pipeline import L2CPipeline
from l2c_export.samplers.guidance import InitialNoiseRows, NoiseRows, make_noise, step_noise

from .conftest import REPO, run_cli
from .test_diffusers_text import text_build  # noqa: F401  (a fixture: the tiny PixArt build with a T5 encoder)
from .test_hardening import _copy, _manifest, _refused, _write_manifest

DEFAULT_SCHEDULE = REPO / "l2c_export" / "demo" / "dit-digits" / "schedule.json"
PROMPTS = ["a handwritten seven", "the digit 3", "number one", "a picture of the digit two", "nine"]


# ---------------------------------------------------------------------------------------------------------------------
# Schedules: field 'mode' is one of the schedule modes, wherever a schedule is read.

def _turbo_schedule(tmp_path: Path) -> Path:
    data = json.loads(DEFAULT_SCHEDULE.read_text())
    data["mode"] = "turbo"
    (tmp_path / "turbo.json").write_text(json.dumps(data))
    return tmp_path / "turbo.json"


@pytest.mark.parametrize("command", [["build", "--out", "{out}"], ["schedule"], ["sample", "--out", "{out}.png"]])
def test_a_schedule_of_an_unknown_mode_is_refused_by_every_command_and_nothing_is_written(tmp_path, command):
    path = _turbo_schedule(tmp_path)
    arguments = [a.format(out=tmp_path / "out") for a in command]
    line = _refused(*arguments, "--schedule", str(path))
    assert f"{path}: field 'mode' is 'turbo'; expected one of official, general" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["turbo.json"]


def test_a_schedule_made_in_python_with_an_unknown_mode_is_refused():
    data = json.loads(DEFAULT_SCHEDULE.read_text())
    with pytest.raises(ScheduleError, match="field 'mode' is 'turbo'"):
        Schedule(np.asarray(data["compute"], dtype=bool), mode="turbo")
    assert Schedule(np.asarray(data["compute"], dtype=bool), mode="general").mode == "general"


def test_a_manifest_whose_schedule_mode_is_unknown_is_refused_and_the_schema_lists_the_modes(default_build, tmp_path):
    folder = _copy(default_build, tmp_path / "E")
    data = _manifest(folder)
    data["schedule"]["mode"] = "turbo"
    _write_manifest(folder, data)
    line = _refused("run", str(folder), "--labels", "1")
    assert "schedule/mode" in line and "turbo" in line
    assert manifest_io.schema()["properties"]["schedule"]["properties"]["mode"]["enum"] == [*SCHEDULE_MODES, None]


# ---------------------------------------------------------------------------------------------------------------------
# The negative prompt is used or refused, never dropped.

def test_a_negative_prompt_with_conditioning_or_alone_is_refused_naming_what_it_needs(default_build, tmp_path):
    arrays = {"prompt_embeds": np.zeros((1, 4, 8), np.float32), "prompt_attention_mask": np.ones((1, 4), np.float32)}
    np.savez(tmp_path / "cond.npz", **arrays)
    line = _refused("run", str(default_build), "--conditioning", str(tmp_path / "cond.npz"), "--negative-prompt",
                    "blurry")
    assert "--negative-prompt is not used with --conditioning" in line and "carries its own negative arrays" in line
    line = _refused("run", str(default_build), "--negative-prompt", "blurry")
    assert line.endswith("--negative-prompt needs --prompt/--prompts: it is the text the prompts are guided against")
    assert not list(tmp_path.glob("*.npy"))


def test_the_python_api_refuses_an_unused_negative_prompt_naming_its_arguments(default_build, text_build):  # noqa: F811
    pipe = L2CPipeline.from_engine_dir(default_build)
    with pytest.raises(PromptError, match="^negative_prompt needs prompt: "):
        pipe([1], negative_prompt="blurry")
    with pytest.raises(PromptError, match="^negative_prompt is not used with conditioning: "):
        pipe(conditioning={"prompt_embeds": np.zeros((1, 4, 8), np.float32)}, negative_prompt="blurry")
    text = L2CPipeline.from_engine_dir(text_build[1])
    with pytest.raises(PromptError, match="^negative_prompt is not used: no classifier-free batch runs .* cfg_scale"):
        text(prompt=["seven"], negative_prompt="blurry", cfg_scale=1.0)
    with pytest.raises(ConditioningError, match=r"^labels: this model is conditioned on prompt embeddings "
                                                r"\(conditioning\), not class labels"):
        text([1])
    guided = [text(prompt=["seven"], negative_prompt=negative, seed=0).samples for negative in ("", "blurry")]
    assert not np.array_equal(*guided)  # used where it runs


def test_an_unused_negative_prompt_on_the_command_line_names_the_flag(text_build, tmp_path):  # noqa: F811
    line = _refused("run", str(text_build[1]), "--prompt", "seven", "--negative-prompt", "x", "--cfg-scale", "1",
                    "--save-latents", str(tmp_path / "o.npy"))
    assert line.endswith("--negative-prompt is not used: no classifier-free batch runs (a --cfg-scale of 1, or a "
                         "guidance-distilled model); leave it out")
    assert not (tmp_path / "o.npy").exists()


# ---------------------------------------------------------------------------------------------------------------------
# --conditioning: anything but an .npz of arrays is one line naming the file.

def _write_conditioning(path: Path, kind: str) -> None:
    arrays = {"prompt_embeds": np.ones((2, 4, 8), np.float32), "prompt_attention_mask": np.ones((2, 4), np.float32)}
    if kind == "text":
        path.write_text("prompt_embeds = [[1, 2, 3]]\n")
    elif kind == "pickle":
        np.savez(path, prompt_embeds=np.array([{"run": "me"}], dtype=object))
    elif kind == "truncated":
        np.savez(path, **arrays)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "damaged":  # the archive's index intact, a member's data overwritten
        np.savez_compressed(path, **arrays)
        data = bytearray(path.read_bytes())
        data[60:120] = b"\xff" * 60
        path.write_bytes(bytes(data))
    elif kind == "zip":  # a zip of no .npy
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("prompt_embeds.npy", b"not an array")


@pytest.mark.parametrize("kind, message", [
    ("text", "not a readable .npz archive"),
    ("pickle", "array 'prompt_embeds' is not readable (Object arrays cannot be loaded when allow_pickle=False)"),
    ("truncated", "not a readable .npz archive"),
    ("damaged", "is not readable"),
    ("zip", "array 'prompt_embeds' is not readable"),
])
def test_a_conditioning_file_that_is_not_an_npz_of_arrays_is_one_line_naming_it(default_build, tmp_path, kind,
                                                                                message):
    path = tmp_path / "cond.npz"
    _write_conditioning(path, kind)
    line = _refused("run", str(default_build), "--conditioning", str(path), "--save-latents", str(tmp_path / "o.npy"))
    assert f"--conditioning {path}: " in line and message in line
    assert not (tmp_path / "o.npy").exists()
    with pytest.raises(ConditioningError, match=f"^conditioning {path}: .*{message[:20]}"):
        L2CPipeline.from_engine_dir(default_build)(conditioning=path)  # the Python API takes the path too


@pytest.mark.parametrize("kind", ["npz", "truncated"])
def test_noise_that_is_not_one_npy_array_is_one_line_naming_it(default_build, tmp_path, kind):
    path = tmp_path / "z.npz"
    np.savez(path, z=np.zeros((1, 1, 8, 8), np.float32))
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    line = _refused("run", str(default_build), "--labels", "1", "--noise", str(path))
    assert f"--noise {path}: " in line and ("an .npz archive" if kind == "npz" else "not a readable") in line


def test_a_conditioning_data_file_is_named_by_its_flag(tmp_path):
    (tmp_path / "c.npz").write_text("not an archive")
    line = _refused("learn", "--model", "t2i-digits", "--conditioning-data", str(tmp_path / "c.npz"), "--out",
                    str(tmp_path / "r.safetensors"))
    assert line.startswith(f"Error: --conditioning-data {tmp_path / 'c.npz'}: not a readable .npz archive")


def test_the_python_api_refuses_conditioning_that_is_not_a_dict_of_arrays(default_build):
    with pytest.raises(ConditioningError, match="^conditioning is a list; expected a dict of arrays"):
        L2CPipeline.from_engine_dir(default_build)(conditioning=[np.zeros((1, 4, 8))])


# ---------------------------------------------------------------------------------------------------------------------
# Long prompt lists: encoded and sampled a bounded batch at a time, the samples those of one batch: the same noise,
# bit for bit, and the same numbers up to the rounding of ONNX Runtime's kernels, which differs with the batch size
# (6.6e-6 seen after 6 DDPM steps); a sample given another's noise would differ by about 1.

BATCH_ROUNDING = 1e-4

def test_noise_drawn_some_rows_at_a_time_is_the_noise_of_one_draw():
    """The initial noise (InitialNoiseRows: torch's draw of all 5 rows, made once) and a DDPM step's noise stream
    (NoiseRows: numpy's, which continues where it stopped) handed out 2, 2 and 1 rows at a time."""
    rows = InitialNoiseRows(7, (1, 8, 8), 5)
    np.testing.assert_array_equal(np.concatenate([rows.draw(2), rows.draw(2), rows.draw(1)]),
                                  make_noise(7, (5, 1, 8, 8)))
    stream = NoiseRows(7, (1, 8, 8))  # step_noise(seed, s, ...) is the stream of seed + s + 1
    np.testing.assert_array_equal(np.concatenate([stream.draw(2), stream.draw(2), stream.draw(1)]),
                                  step_noise(6, 0, (5, 1, 8, 8)))


def test_prompts_sampled_two_at_a_time_equal_one_batch_and_show_progress(text_build, tmp_path):  # noqa: F811
    engines = text_build[1]
    pipe = L2CPipeline.from_engine_dir(engines)
    one_batch = pipe(prompt=PROMPTS, negative_prompt=["", "blurry", "", "x", ""], seed=3, decode=True)
    in_twos = pipe(prompt=PROMPTS, negative_prompt=["", "blurry", "", "x", ""], seed=3, decode=True, batch_size=2)
    np.testing.assert_allclose(in_twos.samples, one_batch.samples, rtol=0, atol=BATCH_ROUNDING)
    np.testing.assert_allclose(in_twos.decoded, one_batch.decoded, rtol=0, atol=BATCH_ROUNDING)
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    result = run_cli("run", str(engines), "--prompts", str(tmp_path / "p.txt"), "--batch-size", "2", "--seed", "3",
                     "--save-latents", str(tmp_path / "a.npy"))
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), pipe(prompt=PROMPTS, seed=3).samples, rtol=0,
                               atol=BATCH_ROUNDING)
    assert "sampling 5 image(s)" in result.stderr  # the progress bar, over every batch's model calls


def test_ddpm_labels_sampled_in_batches_equal_one_batch(tmp_path):
    """DDPM adds seeded noise at every step: each batch draws its own rows of every step's stream."""
    from l2c_export.builder.build import BuildRequest, build
    from l2c_export.models.zoo import embedded_default

    spec = embedded_default()
    schedule = spec.schedule().full(6, spec.config.depth)
    schedule.compute[1::2, 2:8] = False
    build(BuildRequest(spec=spec, schedule=schedule, sampler=spec.sampler("ddpm", 6), out_dir=tmp_path / "E"),
          progress=False)
    pipe = L2CPipeline.from_engine_dir(tmp_path / "E")
    labels = [3, 1, 4, 1, 5]
    in_twos, one_batch = pipe(labels, seed=9, batch_size=2).samples, pipe(labels, seed=9).samples
    np.testing.assert_allclose(in_twos, one_batch, rtol=0, atol=BATCH_ROUNDING)
    assert np.abs(pipe(labels[::-1], seed=9, batch_size=2).samples[::-1] - one_batch).max() > 0.1  # noise by row
    with pytest.raises(ValueError, match="batch_size is 0; expected a positive integer"):
        pipe(labels, batch_size=0)


# ---------------------------------------------------------------------------------------------------------------------
# Prompt files and prompts are bounded before they are read.

def test_a_prompts_file_over_the_size_cap_is_refused_before_it_is_read(default_build, tmp_path):
    from l2c_export.cli.run import MAX_PROMPTS_FILE_BYTES

    path = tmp_path / "huge.txt"
    with open(path, "wb") as file:
        file.truncate(MAX_PROMPTS_FILE_BYTES + 1)  # sparse: no disk used
    line = _refused("run", str(default_build), "--prompts", str(path))
    assert f"--prompts {path}: {MAX_PROMPTS_FILE_BYTES + 1} bytes; expected at most {MAX_PROMPTS_FILE_BYTES}" in line


def test_too_many_prompts_and_too_long_a_prompt_are_refused_naming_the_line(default_build, tmp_path):
    from l2c_export.cli.run import MAX_PROMPTS

    (tmp_path / "many.txt").write_text("seven\n" * (MAX_PROMPTS + 1))
    line = _refused("run", str(default_build), "--prompts", str(tmp_path / "many.txt"))
    assert f"{MAX_PROMPTS + 1} prompts; expected at most {MAX_PROMPTS}" in line
    (tmp_path / "long.txt").write_text("seven\n" + "seven " * MAX_PROMPT_BYTES + "\n")
    line = _refused("run", str(default_build), "--prompts", str(tmp_path / "long.txt"))
    assert f"long.txt line 2: {6 * MAX_PROMPT_BYTES} bytes; expected a prompt of at most {MAX_PROMPT_BYTES}" in line
    line = _refused("run", str(default_build), "--prompt", "seven " * MAX_PROMPT_BYTES)
    assert len(line) < 300 and f"expected a prompt of at most {MAX_PROMPT_BYTES} bytes" in line


# ---------------------------------------------------------------------------------------------------------------------
# The installed package: `pip install .` runs the embedded models and prompt builds; `pip install ".[diffusers]"`
# reads diffusers folders; without the extra a diffusers folder is one line naming the command that installs it.

WITHOUT_THE_EXTRA = ("diffusers", "transformers")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout (built without downloads, from a copy without builds or virtual environments)."""
    root = tmp_path_factory.mktemp("wheel")
    wheels, source = root / "wheels", root / "source"
    skipped_anywhere = shutil.ignore_patterns(".venv*", ".git", "*.egg-info", "__pycache__", ".pytest_cache")

    def ignore(folder, names):  # build/ (setuptools', cpp's) anywhere; engines/ and cpp/ only at the top
        top = {"engines", "cpp"} & set(names) if Path(folder) == REPO else set()
        return set(skipped_anywhere(folder, names)) | top | ({"build"} & set(names))

    shutil.copytree(REPO, source, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(source)], check=True, capture_output=True)
    (found,) = wheels.glob("l2c_export-*.whl")
    return found


def _venv(wheel: Path, root: Path, without: tuple[str, ...] = ()) -> Path:
    """A fresh venv with the wheel installed and, as its dependencies, this environment's site-packages (without
    its .pth files, so the editable install of this checkout is not seen) less the distributions ``without``: a
    folder of links to every other entry stands in for it. Nothing is downloaded."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)  # this pip installs
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    here = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    dependencies = here
    if without:
        dependencies = root / "site-packages"
        dependencies.mkdir()
        for entry in here.iterdir():
            distribution = entry.name.split("-")[0].lower()
            if distribution not in without and entry.name != "__pycache__":
                (dependencies / entry.name).symlink_to(entry)
    (site / "dependencies.pth").write_text(f"{dependencies}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    str(wheel)], check=True, capture_output=True)
    return venv


def _installed_cli(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(venv / "bin" / "l2c-export"), *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.mark.slow  # a wheel and fresh environments
def test_the_wheel_declares_tokenizers_and_a_diffusers_extra_pinned_as_requirements_txt(wheel):
    pins = {line.split("==")[0]: line for line in (REPO / "requirements.txt").read_text().splitlines() if "==" in line}
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.removeprefix("Requires-Dist: ") for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ")]
    assert pins["tokenizers"] in requires
    for name in WITHOUT_THE_EXTRA:
        assert f'{pins[name]}; extra == "diffusers"' in requires
        assert not any(r.startswith(name) and "extra" not in r for r in requires)


@pytest.mark.slow  # a wheel and fresh environments
def test_without_the_diffusers_extra_the_wheel_builds_the_default_and_refuses_a_folder_in_one_line(
        wheel, tiny_diffusers, tmp_path):
    venv = _venv(wheel, tmp_path, without=WITHOUT_THE_EXTRA)
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import l2c_export, importlib.util; "
                            "print(l2c_export.__file__, importlib.util.find_spec('diffusers'))"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert where.startswith(str(venv)) and where.strip().endswith("None")
    result = _installed_cli(venv, "schedule", "--diffusers", str(tiny_diffusers("dit")), cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 3 and len(lines) == 1, result.stderr
    assert lines[0].endswith('needs diffusers, which is not installed: pip install "l2c-export[diffusers]"')
    result = _installed_cli(venv, "build", "--out", str(tmp_path / "engines"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    manifest_io.load(tmp_path / "engines")


@pytest.mark.slow  # a wheel and fresh environments
def test_with_the_diffusers_extra_the_wheel_reads_a_diffusers_folder(wheel, tiny_diffusers, tmp_path):
    venv = _venv(wheel, tmp_path)
    result = _installed_cli(venv, "schedule", "--diffusers", str(tiny_diffusers("dit")), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "DiTTransformer2DModel" in result.stdout and "transformer_blocks.0.attn1" in result.stdout
