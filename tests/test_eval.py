"""Evaluation: Frechet distance, PSNR, the shipped digits classifier, the baselines' schedules, the shipped router and
schedule, and `l2c-export eval` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l2c_export.demo.classifier import FEATURE_DIM, accuracy, features, load_classifier, split_digits, train_classifier
from l2c_export.demo.metrics import FrameProjection, RandomProjection, frame_psnr, frechet_distance, psnr
from l2c_export.models.dit import count_macs
from l2c_export.models.zoo import embedded_default
from l2c_export.routers import baselines, load_router

from .conftest import run_cli


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # Same covariance, mean shifted by (3, 0, 0): FD = 9. Scaled by 2: |mu|^2 + Tr(S) + Tr(4 S) - 2 Tr(2 S).
    assert frechet_distance(a, a + np.array([3.0, 0.0, 0.0])) == pytest.approx(9.0, abs=1e-9)
    expected = (a.mean(0) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_the_matrix_square_root_formula():
    from scipy import linalg

    rng = np.random.default_rng(1)
    a = rng.standard_normal((300, 8))
    b = rng.standard_normal((200, 8)) @ rng.standard_normal((8, 8)) + 0.5
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sigma_a + sigma_b)
                - 2 * np.trace(linalg.sqrtm(sigma_a @ sigma_b).real))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_psnr():
    reference = np.zeros((2, 1, 8, 8), dtype=np.float32)
    assert psnr(reference + 0.1, reference) == pytest.approx(10 * np.log10(4 / 0.01), rel=1e-6)
    assert psnr(reference, reference) is None


def test_clips_are_judged_frame_by_frame():
    """A video model's clips (n, C, F, H, W): PSNR is each frame's against the same frame of the reference, averaged
    over all frames (not one PSNR of the whole clips; an identical frame left out), over the reference's whole range;
    the features are each frame's (C, H, W) random projection, n F rows, as an image model's latents of that shape."""
    rng = np.random.default_rng(0)
    reference = rng.standard_normal((2, 4, 3, 5, 6))
    clips = reference.copy()
    clips[:, :, 0] += 0.1  # frame 0 of each clip off by 0.1, frame 1 by 0.3, frame 2 exact in clip 0
    clips[:, :, 1] += 0.3
    clips[1, :, 2] += 0.1
    peak = np.ptp(reference) ** 2
    per_frame = [10 * np.log10(peak / e) for e in (0.01, 0.09, 0.01, 0.09, 0.01)]
    assert frame_psnr(clips, reference) == pytest.approx(np.mean(per_frame), rel=1e-9)
    assert frame_psnr(clips, reference) != pytest.approx(psnr(clips, reference, None), rel=1e-3)
    assert frame_psnr(reference, reference) is None

    judge = FrameProjection((4, 3, 5, 6))
    frames = reference.transpose(0, 2, 1, 3, 4).reshape(6, 4, 5, 6)  # clip 0's 3 frames, then clip 1's
    assert np.allclose(judge(reference), RandomProjection((4, 5, 6))(frames))
    assert judge(reference).shape == (6, 64) and judge.psnr(clips, reference) == frame_psnr(clips, reference)
    assert "each of the 3 latent frames (4x5x6)" in judge.description


def test_the_shipped_classifier_tells_digits_apart():
    model = load_classifier()
    _, _, test_x, test_y = split_digits()
    assert accuracy(model, test_x, test_y) >= 0.95  # digits it never saw in training
    real = features(model, test_x)
    assert real.shape == (len(test_x), FEATURE_DIM)
    noise = np.random.default_rng(0).uniform(-1, 1, test_x.shape).astype(np.float32)
    half = len(test_x) // 2
    assert frechet_distance(real[:half], real[half:]) * 5 < frechet_distance(features(model, noise), real)


def test_classifier_training_reproduces():
    _, held_out = train_classifier(epochs=3, progress=False)
    assert held_out > 0.85  # three epochs already classify unseen digits; the shipped 30 reach 0.97


# ---------------------------------------------------------------------------------------------------------------------
MACS = count_macs(embedded_default().config)


def test_fora_computes_everything_every_nth_step():
    schedule = baselines.reuse_every_n(20, MACS, 0.52)
    assert schedule.compute.all(axis=1).tolist() == [s % 2 == 0 for s in range(20)]
    assert (~schedule.compute[1::2]).all()  # reused steps reuse every sub-layer
    assert schedule.extra["interval"] == 2.0
    fractional = baselines.reuse_every_n(20, MACS, 0.7)
    assert abs(fractional.mac_fraction(MACS) - 0.7) <= 0.5 / 20  # the closest k: within half a step of MACs
    assert fractional.compute[0].all()


def test_random_drop_meets_the_budget_and_keeps_the_first_step():
    a = baselines.random_drop(20, MACS, 0.7, seed=0)
    b = baselines.random_drop(20, MACS, 0.7, seed=1)
    assert a.compute[0].all() and b.compute[0].all()
    for schedule in (a, b):
        assert abs(schedule.mac_fraction(MACS) - 0.7) <= MACS.mlp / (20 * MACS.full)
        assert schedule.extra["dropped"] == int((~schedule.compute).sum())
    assert a.compute.tolist() != b.compute.tolist()


def test_fewer_steps():
    schedule = baselines.fewer_steps(20, 6, 0.7)
    assert schedule.num_steps == 14 and schedule.compute.all()
    assert schedule.timesteps[0] == 999 and schedule.timesteps[-1] == 0
    assert schedule.extra["mac_fraction"] == pytest.approx(0.7)


# ---------------------------------------------------------------------------------------------------------------------
def test_the_shipped_schedule_is_decoded_from_the_shipped_router():
    router_path = embedded_default().default_router
    spec = embedded_default()
    schedule = spec.schedule()
    router = load_router(router_path)
    assert schedule.source == "router.safetensors" or schedule.source.endswith("router.safetensors")
    decoded = router.to_schedule(schedule.threshold, schedule.mode, spec.sampler().timesteps.tolist())
    assert decoded.compute.tolist() == schedule.compute.tolist()
    assert router.meta["learned_by"] == "l2c-export learn" and router.meta["data"] == "scikit-learn digits"


@pytest.mark.slow
def test_cli_eval_writes_results_and_plot(tmp_path):
    out = run_cli("eval", "--num-samples", "10", "--budgets", "0.8", "--random-seeds", "1",
                  "--json", str(tmp_path / "eval.json"), "--png", str(tmp_path / "fd.png")).stdout
    assert "| l2c | matched |" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    rows = report["results"]
    assert {row["method"] for row in rows} == {"full", "l2c", "fora", "random", "fewer-steps", "int8 full", "int8 l2c"}
    for row in rows:
        assert set(row) >= {"method", "mac_fraction", "fd", "accuracy", "psnr"}
        assert row["fd"] >= 0 and 0 <= row["accuracy"] <= 1
        assert (row["psnr"] is None) == (row["method"] == "full")
    matched = {row["method"]: row for row in rows if row["point"] == "matched"}
    assert matched["int8 l2c"]["mac_fraction"] == pytest.approx(matched["l2c"]["mac_fraction"])
    assert 20 < matched["int8 l2c"]["psnr"] < 80  # quantized and cached, against fp32 full compute
    learned = matched["l2c"]["mac_fraction"]
    assert learned == pytest.approx(report["learned_mac_fraction"], abs=1e-6)
    for method in ("fora", "random", "fewer-steps"):
        assert abs(matched[method]["mac_fraction"] - learned) <= 0.03, method
    assert any(row["point"] == "sweep" and row["method"] == "l2c" and row["budget"] == 0.8 for row in rows)
    assert (tmp_path / "fd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- diffusers folders: the same evaluation, features from a fixed random projection ----------------------------------
def _prompts(n: int, length: int = 5, width: int = 12) -> dict:
    generator = np.random.default_rng(0)
    mask = np.ones((n, length), dtype=np.int64)
    mask[0, 3:] = 0
    return {"prompt_embeds": generator.standard_normal((n, length, width)).astype(np.float32),
            "prompt_attention_mask": mask,
            "negative_prompt_embeds": generator.standard_normal((n, length, width)).astype(np.float32),
            "negative_prompt_attention_mask": np.ones((n, length), dtype=np.int64)}


def _check_diffusers_report(report: dict, budget: float) -> dict:
    """The rows every diffusers evaluation has: full compute, l2c and each method at the matched MAC fraction and at
    ``budget``; PSNR and FD to full against full compute, no FD to data or accuracy (no reference data)."""
    rows = report["results"]
    assert "random projection" in report["features"] and report["fd_reference"] is None
    assert {row["method"] for row in rows} == {"full", "l2c", "fora", "random", "fewer-steps"}
    for row in rows:
        assert row["fd"] is None and row["accuracy"] is None and row["fd_to_full"] >= 0
        assert (row["psnr"] is None) == (row["method"] == "full")
    full = next(row for row in rows if row["method"] == "full")
    assert full["fd_to_full"] == pytest.approx(0.0, abs=1e-6)
    matched = {row["method"]: row for row in rows if row["point"] == "matched"}
    learned = report["learned_mac_fraction"]
    assert learned < 0.999 and matched["l2c"]["mac_fraction"] == pytest.approx(learned, abs=1e-6)
    for method in ("fora", "random", "fewer-steps"):
        assert abs(matched[method]["mac_fraction"] - learned) <= 0.1, method
        assert matched[method]["psnr"] > 0 and matched[method]["fd_to_full"] > 0, method
    assert {row["method"] for row in rows if row["point"] == "sweep" and row["budget"] == budget} >= {
        "fora", "random", "fewer-steps"}
    return matched


@pytest.mark.slow
def test_cli_eval_on_a_diffusers_pixart_with_a_learned_router(tiny_diffusers, tmp_path):
    """learn --diffusers on prompts, then eval --diffusers --schedule --router --conditioning-data: the learned schedule
    against FORA, random and fewer steps at its MAC fraction and on the router's sweep; JSON and plot."""
    folder = str(tiny_diffusers("pixart"))
    np.savez(tmp_path / "prompts.npz", **_prompts(3))
    router = tmp_path / "router.safetensors"
    run_cli("learn", "--diffusers", folder, "--steps", "6", "--conditioning-data", str(tmp_path / "prompts.npz"),
            "--trajectories", "4", "--batch-size", "2", "--iterations", "5", "--mode", "general", "--lr", "0.5",
            "--target-mac-fraction", "0.75", "--json", str(tmp_path / "s.json"), "--out", str(router))
    out = run_cli("eval", "--diffusers", folder, "--schedule", str(tmp_path / "s.json"), "--router", str(router),
                  "--conditioning-data", str(tmp_path / "prompts.npz"), "--num-samples", "8", "--budgets", "0.85",
                  "--random-seeds", "1", "--json", str(tmp_path / "eval.json"), "--png", str(tmp_path / "fd.png"))
    assert "| l2c | matched |" in out.stdout and "features: a fixed random projection" in out.stdout
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["sampler"] == {"kind": "diffusers_ddim", "num_calls": 6} and report["num_samples"] == 8
    _check_diffusers_report(report, 0.85)
    assert any(row["method"] == "l2c" and row["point"] == "sweep" for row in report["results"])
    assert (tmp_path / "fd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_eval_on_a_diffusers_dit_with_labels_and_its_int8_build(tiny_diffusers, tmp_path):
    """A DiT folder evaluated on --labels with a schedule over its named sub-layers (no router: baselines only on the
    sweep), the int8 build's rows included."""
    from l2c_export.core.schedule import Schedule
    from l2c_export.models.zoo import from_diffusers

    folder = tiny_diffusers("dit")
    names = from_diffusers(folder).sublayer_names
    rows = np.ones((6, len(names)), dtype=bool)
    rows[1::2, 1:] = False
    Schedule(rows, sublayers=names, mode="general").save(tmp_path / "s.json")
    run_cli("eval", "--diffusers", str(folder), "--schedule", str(tmp_path / "s.json"), "--labels", "207,3",
            "--num-samples", "6", "--budgets", "0.8", "--random-seeds", "1", "--int8", "--cfg-scale", "2",
            "--json", str(tmp_path / "eval.json"), "--threads", "1")
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["cfg_scale"] == 2.0
    # --threads reached torch (the reference sampler) and the int8 build's ONNX Runtime pool
    assert (report["threads"]["torch_threads"], report["threads"]["onnxruntime_threads"]) == (1, 1)
    int8 = {row["method"]: row for row in report["results"] if row.get("precision") == "int8"}
    assert set(int8) == {"int8 full", "int8 l2c"} and all(row["psnr"] > 10 for row in int8.values())
    report["results"] = [row for row in report["results"] if row.get("precision") != "int8"]
    _check_diffusers_report(report, 0.8)


@pytest.mark.slow
def test_eval_refuses_conditioning_that_does_not_fit_the_model(tiny_diffusers, tmp_path):
    pixart, dit = str(tiny_diffusers("pixart")), str(tiny_diffusers("dit"))
    from l2c_export.core.schedule import Schedule
    from l2c_export.models.zoo import from_diffusers

    Schedule.full(4, sublayers=from_diffusers(pixart).sublayer_names).save(tmp_path / "s.json")
    no_prompts = run_cli("eval", "--diffusers", pixart, "--schedule", str(tmp_path / "s.json"), check=False)
    assert no_prompts.returncode == 2 and "give --conditioning-data prompts.npz" in no_prompts.stderr
    bad = _prompts(2)
    bad["prompt_attention_mask"] = bad["prompt_attention_mask"][:, :4]
    np.savez(tmp_path / "bad.npz", **bad)
    misshapen = run_cli("eval", "--diffusers", pixart, "--schedule", str(tmp_path / "s.json"), "--conditioning-data",
                        str(tmp_path / "bad.npz"), check=False)
    assert misshapen.returncode == 2 and misshapen.stderr.count("\n") == 1
    assert f"--conditioning-data {tmp_path / 'bad.npz'}: array 'prompt_attention_mask' has shape (2, 4)" in \
        misshapen.stderr
    np.savez(tmp_path / "prompts.npz", **_prompts(2))
    label_model = run_cli("eval", "--diffusers", dit, "--conditioning-data", str(tmp_path / "prompts.npz"),
                          "--schedule", str(tmp_path / "s.json"), check=False)
    assert label_model.returncode == 2 and "conditioned on class labels" in label_model.stderr
    other_model = run_cli("eval", "--diffusers", dit, "--schedule", str(tmp_path / "s.json"), check=False)
    assert other_model.returncode == 2 and "not a sub-layer" in other_model.stderr
