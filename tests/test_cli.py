"""The command line, run as a real subprocess."""

from __future__ import annotations

import json

from .conftest import run_cli


def test_schedule_decodes_the_authors_router(tmp_path, authors_router):
    out = run_cli("schedule", "--router", str(authors_router), "--steps", "20", "--threshold", "0.1",
                  "--json", str(tmp_path / "s.json"), "--png", str(tmp_path / "s.png")).stdout
    assert "computing 312 of 560 sub-layers (44.29% removed)" in out
    assert "distinct subsets: 7" in out
    assert "ideal speedup: 1.285x" in out
    data = json.loads((tmp_path / "s.json").read_text())
    assert (data["num_steps"], data["depth"], data["timesteps"][0]) == (20, 28, 999)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schedule_inspects_a_schedule_file(tmp_path):
    path = tmp_path / "s.json"
    rows = [[1] * 12, [1, 0] * 6]
    path.write_text(json.dumps({"num_steps": 2, "depth": 6, "compute": rows}))
    out = run_cli("schedule", "--schedule", str(path)).stdout
    assert "call   1     6/12" in out
    assert "distinct subsets: 2" in out


def test_an_invalid_schedule_is_a_clear_error_and_exit_code(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"num_steps": 1, "depth": 1, "compute": [[0, 1]]}))
    result = run_cli("schedule", "--schedule", str(path), "--json", str(tmp_path / "out.json"), check=False)
    assert result.returncode == 2
    assert f"{path}: field 'compute' row 0 (the first step)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.json").exists()


def test_steps_that_do_not_match_the_router_are_refused(authors_router):
    result = run_cli("schedule", "--router", str(authors_router), "--steps", "50", check=False)
    assert result.returncode == 2
    assert "holds routers for 20 steps; --steps is 50" in result.stderr


def test_the_schedule_picture_and_listing_label_model_calls_with_rounded_times(tmp_path):
    """DPM-Solver's model times are floats (951.8417600387976): the heatmap's rows and the listing say which model
    call and the time rounded to one decimal (whole times as they are), as every plot in the README."""
    import re

    from l2c_export.core.schedule import Schedule
    from l2c_export.models.zoo import embedded_default
    from l2c_export.tools.plots import schedule_figure

    uvit = embedded_default("uvit-digits").default_schedule
    out = run_cli("schedule", "--model", "uvit-digits", "--schedule", str(uvit), "--png", str(tmp_path / "u.png"))
    assert "call   1 t= 951.8    10/10" in out.stdout and "951.84" not in out.stdout
    assert (tmp_path / "u.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for schedule, first in ((Schedule.load(uvit), ["0 (t=1000)", "1 (t=951.8)", "2 (t=900.1)"]),
                            (embedded_default().schedule(), ["0 (t=999)", "1 (t=946)", "2 (t=894)"])):
        axis = schedule_figure(schedule).axes[0]
        rows = [label.get_text() for label in axis.get_yticklabels()]
        assert rows[:3] == first
        assert len(rows) == schedule.num_steps and all(re.fullmatch(r"\d+ \(t=\d+(\.\d)?\)", row) for row in rows)
        assert axis.get_ylabel() == "model call (time the model sees)"


def test_sample_equals_run_on_the_embedded_default(default_build, tmp_path):
    """The PyTorch reference sampler (`sample`, the embedded default and its schedule, noise from --seed) and the
    build's runtime (`run`) give the same digits; `sample` writes the grid of a pixel model."""
    import numpy as np

    run_cli("sample", "--labels", "3,7", "--seed", "2", "--save-latents", str(tmp_path / "reference.npy"),
            "--out", str(tmp_path / "grid.png"))
    run_cli("run", str(default_build), "--labels", "3,7", "--seed", "2", "--save-latents", str(tmp_path / "run.npy"))
    want, got = np.load(tmp_path / "reference.npy"), np.load(tmp_path / "run.npy")
    assert want.shape == got.shape == (2, 1, 8, 8)
    assert np.abs(got - want).max() <= 1e-4 * (want.max() - want.min())
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_onnx_runtime_telemetry_is_off_in_the_cli_unless_asked_for(default_build, tmp_path):
    """`run` (ONNX Runtime sessions) leaves no telemetry database in the home folder: the package sets
    ORT_DISABLE_TELEMETRY=1 before ONNX Runtime is imported, as the Triton server's environment does; an explicit
    ORT_DISABLE_TELEMETRY=0 is kept (ONNX Runtime then makes its database, which shows this test can see it)."""
    import subprocess
    import sys

    from .conftest import REPO, telemetry_home

    for setting, made in ((None, False), ("0", True)):
        env, database = telemetry_home(tmp_path / f"home-{setting}", setting)
        result = subprocess.run([sys.executable, "-m", "l2c_export.cli", "run", str(default_build), "--labels", "3",
                                 "--out", str(tmp_path / "grid.png")], capture_output=True, text=True, env=env,
                                cwd=REPO)
        assert result.returncode == 0, result.stderr
        assert database.is_file() is made, setting


def test_build_takes_the_step_count_from_the_schedule_and_refuses_a_steps_it_was_not_made_for(tmp_path):
    """The embedded default samples 20 steps; a 10-step schedule builds a 10-step sampler without --steps, and with
    --steps 20 is refused naming both counts and the fix, writing nothing."""
    path = tmp_path / "s10.json"
    path.write_text(json.dumps({"num_steps": 10, "depth": 6, "compute": [[1] * 12] * 10}))
    refused = run_cli("build", "--schedule", str(path), "--steps", "20", "--out", str(tmp_path / "no"), check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "--steps: 20, but --schedule" in refused.stderr and "is for 10 model calls" in refused.stderr
    assert "drop --steps" in refused.stderr and not (tmp_path / "no").exists()
    run_cli("build", "--schedule", str(path), "--out", str(tmp_path / "E"))
    manifest = json.loads((tmp_path / "E" / "manifest.json").read_text())
    assert manifest["sampler"]["num_calls"] == len(manifest["sampler"]["model_times"]) == 10
