"""The embedded models, the digits DiT (DDIM) and the digits U-ViT (DPM-Solver-2S): what ships with each (trained
weights, the router and the schedule decoded from it), selecting them with ``--model``, and the U-ViT through the
whole toolchain (schedule, build, verify, run, eval) in real subprocesses."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l2c_export.core import manifest as manifest_io
from l2c_export.demo.classifier import accuracy, load_classifier
from l2c_export.models.zoo import EMBEDDED_MODELS, TEXT_TO_IMAGE_MODELS, TEXT_TO_VIDEO_MODELS, embedded_default, resolve
from l2c_export.routers import baselines, load_router
from l2c_export.samplers import make_noise
from l2c_export.models.reference import sample_reference

from .conftest import run_cli


@pytest.mark.parametrize("name", [name for name in EMBEDDED_MODELS
                                  if name not in TEXT_TO_IMAGE_MODELS + TEXT_TO_VIDEO_MODELS])
def test_the_shipped_schedule_is_decoded_from_the_shipped_router(name):  # t2i, t2v: tests/test_t2[iv]_digits.py
    spec = embedded_default(name)
    schedule, router = spec.schedule(), load_router(spec.default_router)
    assert router.sampler == spec.sampler_kind == schedule.sampler or (name == "dit-digits" and
                                                                       schedule.sampler in (None, "ddim"))
    decoded = router.to_schedule(schedule.threshold, schedule.mode, spec.sampler().model_times.tolist())
    assert decoded.compute.tolist() == schedule.compute.tolist()
    assert router.meta["learned_by"] == "l2c-export learn" and router.meta["data"] == "scikit-learn digits"
    assert schedule.mac_fraction(spec.family.count_macs(spec.config)) < 0.8


def test_the_digits_uvit_is_trained_and_its_samples_are_the_digits_asked_for():
    """Random or badly trained weights classify at chance (0.1); the shipped U-ViT's samples are the labels'."""
    spec = embedded_default("uvit-digits")
    assert spec.family.name == "uvit" and spec.sampler_kind == "dpm_solver_2s" and spec.cfg_scale == 1.4
    labels = [i % 10 for i in range(60)]
    samples = sample_reference(spec.load_model(), spec.sampler(), labels, make_noise(3, (60, 1, 8, 8)),
                               spec.cfg_scale, progress=False)
    assert accuracy(load_classifier(), samples, np.asarray(labels)) >= 0.9


def test_model_selects_an_embedded_model_and_refuses_a_preset_without_its_checkpoint():
    assert resolve(None, "uvit-digits", None, None).family.name == "uvit"
    assert resolve(None, None, None, None).name == "dit-digits"
    with pytest.raises(ValueError, match="U-ViT-H/2 needs --checkpoint"):
        resolve(None, "U-ViT-H/2", None, None)
    result = run_cli("build", "--model", "nope", "--out", "unused", check=False)
    assert result.returncode == 2 and "dit-digits, uvit-digits" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_dpm_solver_baselines_keep_whole_solver_steps_and_the_official_floor():
    spec = embedded_default("uvit-digits")
    macs = spec.family.count_macs(spec.config)
    fewer = baselines.fewer_steps(20, spec.num_layers, 0.7, kind="dpm_solver_2s")
    assert fewer.num_steps == 14 and fewer.sampler == "dpm_solver_2s"  # 7 solver steps of two calls
    assert baselines.fewer_steps(20, spec.num_layers, 0.62, kind="dpm_solver_2s").num_steps % 2 == 0
    # Official mode decides calls 2, 4, .., 18 only: the floor reuses all of those nine and computes the other 11.
    least = baselines.least_mac_fraction(20, macs, "official", "dpm_solver_2s")
    assert least == pytest.approx((20 * macs.full - 9 * (macs.full - macs.always)) / (20 * macs.full))
    assert baselines.least_mac_fraction(20, macs, "general", "dpm_solver_2s") < least


def test_the_digits_uvit_builds_verifies_and_runs_with_its_schedule(uvit_digits_build, tmp_path):
    uvit_build = uvit_digits_build  # `l2c-export build --model uvit-digits` (tests/conftest.py)
    manifest = manifest_io.load(uvit_build)
    spec = embedded_default("uvit-digits")
    assert manifest["model"]["family"] == "uvit" and manifest["sampler"]["kind"] == "dpm_solver_2s"
    assert len(manifest["subsets"]) == len(spec.schedule().distinct_subsets())
    verify = run_cli("verify", str(uvit_build)).stdout
    assert "FAIL" not in verify
    noise = make_noise(5, (4, 1, 8, 8))
    np.save(tmp_path / "z.npy", noise)
    run_cli("run", str(uvit_build), "--labels", "1,4,7,9", "--noise", str(tmp_path / "z.npy"),
            "--save-latents", str(tmp_path / "out.npy"), "--out", str(tmp_path / "grid.png"))
    reference = sample_reference(spec.load_model(), spec.sampler(), [1, 4, 7, 9], noise, spec.cfg_scale,
                                 schedule=spec.schedule(), progress=False)
    samples = np.load(tmp_path / "out.npy")
    assert np.abs(samples - reference).max() <= 1e-4 * (reference.max() - reference.min())
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_eval_on_the_digits_uvit_the_learned_schedule_beats_fora_and_random_at_equal_macs(tmp_path):
    run_cli("eval", "--model", "uvit-digits", "--num-samples", "40", "--budgets", "0.8", "--random-seeds", "1",
            "--no-int8", "--json", str(tmp_path / "eval.json"))
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["model"] == "uvit-digits" and report["sampler"] == {"kind": "dpm_solver_2s", "num_calls": 20}
    rows = report["results"]
    assert {row["method"] for row in rows} == {"full", "l2c", "fora", "random", "fewer-steps"}
    matched = {row["method"]: row for row in rows if row["point"] == "matched"}
    assert matched["fewer-steps"]["steps"] % 2 == 0
    for method in ("fora", "random", "fewer-steps"):
        assert abs(matched[method]["mac_fraction"] - matched["l2c"]["mac_fraction"]) <= 0.05, method
    for method in ("fora", "random"):  # the margins at 1000 samples: 10 and 14 dB (README)
        assert matched["l2c"]["psnr"] > matched[method]["psnr"] + 3, method
        assert matched["l2c"]["fd_to_full"] < matched[method]["fd_to_full"], method


@pytest.mark.slow
def test_the_digits_uvit_builds_static_int8_with_calibration_on_its_own_model_calls(tmp_path):
    """Q/DQ int8 (TensorRT's form) calibrates on the model's own calls, for any family: 20 DPM-Solver calls here."""
    from l2c_export.export.quantize import calibration_batches

    spec = embedded_default("uvit-digits")
    batches = calibration_batches(spec.load_model(), spec.sampler(), spec.cfg_scale, 10, images=2)
    assert len(batches) == 20 and set(batches[0]) == {"x", "t", "y"}
    assert batches[0]["x"].shape == (4, 1, 8, 8) and batches[0]["y"].tolist() == [0, 1, 10, 10]
    out = tmp_path / "qdq"
    run_cli("build", "--model", "uvit-digits", "--precision", "int8", "--quantization", "qdq",
            "--calibration-images", "2", "--out", str(out))
    assert "FAIL" not in run_cli("verify", str(out)).stdout
