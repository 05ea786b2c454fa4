"""Evaluation: Frechet distance, PSNR, the shipped digits classifier, the baselines' schedules, the shipped router and
schedule, and `l2c-export eval` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from l2c_export.demo.classifier import FEATURE_DIM, accuracy, features, load_classifier, split_digits, train_classifier
from l2c_export.demo.evaluate import frechet_distance, psnr
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
