"""Router learning: the soft-routed forward, the L2C objective's gradients, data sources, checkpoint/resume, MAC
budgets, the CLI round trip with `schedule`, and data-parallel learning under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from l2c_export.core.schedule import Schedule
from l2c_export.learn.data import NoisedData, load_image_folder, load_latents, sample_trajectories
from l2c_export.learn.files import router_metadata, write_router
from l2c_export.learn.learner import learn_router
from l2c_export.learn.objective import Router, l2c_loss, learned_calls
from l2c_export.learn.settings import LearnSettings
from l2c_export.models import get_family
from l2c_export.models.dit import count_macs
from l2c_export.models.uvit.model import UViT, UViTConfig, uvit_config
from l2c_export.routers import RouterLogits, baselines, load_router
from l2c_export.samplers import create_sampler
from l2c_export.samplers.gaussian import GaussianSampler
from l2c_export.samplers.guidance import make_noise
from l2c_export.models.reference import sample_reference

from .conftest import REPO, TINY, run_cli


def _batch(n: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((n, TINY.in_channels, TINY.input_size, TINY.input_size), generator=generator)
    return x, torch.randint(TINY.num_classes, (n,), generator=generator), torch.full((n,), 500)


def _latent_data(count: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((count, TINY.in_channels, TINY.input_size, TINY.input_size)).astype(np.float32),
            rng.integers(TINY.num_classes, size=count))


# ---------------------------------------------------------------------------------------------------------------------
def test_forward_soft_with_all_weights_one_is_the_full_forward(tiny_model):
    x, y, t = _batch()
    cache = {k: torch.randn(3, TINY.num_tokens, TINY.hidden_size) for k in range(TINY.num_sublayers)}
    fresh = {}
    with torch.no_grad():
        soft = tiny_model.forward_soft(x, t, y, torch.ones(TINY.num_sublayers), cache, fresh)
        torch.testing.assert_close(soft, tiny_model(x, t, y), rtol=0, atol=1e-5)
    assert sorted(fresh) == list(range(TINY.num_sublayers))


def test_forward_soft_with_hard_weights_is_the_cached_forward(tiny_model):
    x, y, t = _batch()
    with torch.no_grad():
        cache = {}
        tiny_model.forward_cached(x, torch.full((3,), 700), y, [True] * TINY.num_sublayers, cache)
        compute = [True, False, False, True, True, False]
        expected = tiny_model.forward_cached(x, t, y, compute, dict(cache))
        fresh = {}
        soft = tiny_model.forward_soft(x, t, y, torch.tensor(compute, dtype=torch.float32), cache, fresh)
    torch.testing.assert_close(soft, expected, rtol=0, atol=1e-5)
    # The fresh value of a reused sub-layer is computed all the same (the student needs it), and differs.
    assert not torch.allclose(fresh[1], cache[1])


def test_gradients_reach_only_the_router(tiny_model):
    sampler = GaussianSampler.create("ddim", 6)
    tiny_model.requires_grad_(False)
    router = Router(6, TINY.num_sublayers, learned_calls(sampler, "official"), torch.Generator().manual_seed(0))
    x, y, _ = _batch(4)
    target = learned_calls(sampler, "official")[1]
    terms = l2c_loss(tiny_model, sampler, router(), x, y, target - 1, target, l1=1e-3, cfg_scale=4.0)
    terms.loss.backward()
    grad = router.logits.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert grad[target].abs().min() > 0  # every sub-layer of the learned step gets a gradient ...
    others = [s for s in range(6) if s != target]
    assert grad[others].abs().max() == 0  # ... and no other step does (its cache is the full previous step)
    assert all(p.grad is None for p in tiny_model.parameters())


def test_in_general_mode_the_loss_reaches_earlier_routers_through_the_cache(tiny_model):
    sampler = GaussianSampler.create("ddim", 6)
    tiny_model.requires_grad_(False)
    router = Router(6, TINY.num_sublayers, learned_calls(sampler, "general"), torch.Generator().manual_seed(0))
    x, y, _ = _batch(4)
    l2c_loss(tiny_model, sampler, router(), x, y, 0, 3, l1=0.0).loss.backward()
    grad = router.logits.grad
    assert grad[1].abs().max() > 0 and grad[2].abs().max() > 0 and grad[3].abs().max() > 0
    assert grad[0].abs().max() == 0 and grad[4:].abs().max() == 0


def test_learning_changes_the_router_not_the_model_and_clamps(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    sampler = GaussianSampler.create("ddim", 4)
    x0, labels = _latent_data()
    settings = LearnSettings(mode="official", iterations=6, batch_size=4, lr=3.0, l1=1.0, seed=0)
    result = learn_router(tiny_model, sampler, NoisedData(x0, labels, sampler, "test"), settings, progress=False)
    initial = Router(4, TINY.num_sublayers, learned_calls(sampler, "official"),
                     torch.Generator().manual_seed(0)).logits.detach().numpy()
    learned = result.router.logits
    assert not np.allclose(learned[learned_calls(sampler, "official")], initial[learned_calls(sampler, "official")])
    assert np.abs(learned).max() <= 5.0 and (learned == -5.0).any()  # lr 3 with lambda 1 drives logits to the clamp
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_resume_ends_where_an_uninterrupted_run_ends(tiny_model, tmp_path):
    sampler = GaussianSampler.create("ddim", 4)
    x0, labels = _latent_data()
    source = NoisedData(x0, labels, sampler, "test")

    def run(iterations, state=None, resume=False):
        settings = LearnSettings(mode="general", iterations=iterations, batch_size=4, lr=0.1, l1=1e-3, seed=3)
        return learn_router(tiny_model, sampler, source, settings, state_path=state, resume=resume, save_every=2,
                            progress=False).router.logits

    straight = run(6)
    run(3, tmp_path / "state.safetensors")
    resumed = run(6, tmp_path / "state.safetensors", resume=True)
    np.testing.assert_array_equal(resumed, straight)


def test_resume_refuses_a_state_of_other_settings(tiny_model, tmp_path):
    sampler = GaussianSampler.create("ddim", 4)
    x0, labels = _latent_data()
    source = NoisedData(x0, labels, sampler, "test")
    state = tmp_path / "state.safetensors"
    learn_router(tiny_model, sampler, source, LearnSettings(iterations=1, batch_size=2, l1=1e-3), state_path=state,
                 progress=False)
    with pytest.raises(ValueError, match=r"field 'settings' differs from this run in l1 \(saved 0.001, now 0.002\)"):
        learn_router(tiny_model, sampler, source, LearnSettings(iterations=2, batch_size=2, l1=2e-3),
                     state_path=state, resume=True, progress=False)


# ---------------------------------------------------------------------------------------------------------------------
def test_trajectories_follow_the_full_model(tiny_model):
    sampler = GaussianSampler.create("ddim", 4)
    pool = sample_trajectories(tiny_model, sampler, count=3, cfg_scale=1.0, seed=0, progress=False)
    assert pool.states.shape == (3, 4, TINY.in_channels, TINY.input_size, TINY.input_size)
    with torch.no_grad():
        for s in range(3):
            out = tiny_model(pool.states[:, s], torch.full((3,), int(sampler.timesteps[s])), pool.labels)
            torch.testing.assert_close(sampler.step(s, pool.states[:, s], out), pool.states[:, s + 1])


def test_noised_data_is_at_the_step_timestep():
    sampler = GaussianSampler.create("ddim", 10)
    x0 = np.ones((1, 1, 8, 8), dtype=np.float32)
    x, labels = NoisedData(x0, np.array([7]), sampler, "ones").draw(torch.Generator().manual_seed(0), 4000, 9)
    # The last step (t = 0) has alpha_bar = 1 - 1e-4: the data almost unchanged, and noise of std 0.01.
    assert abs(float(x.mean()) - np.sqrt(sampler.alphas_cumprod[9])) < 1e-3
    assert abs(float(x.std()) - np.sqrt(1 - sampler.alphas_cumprod[9])) < 1e-3
    assert set(labels.tolist()) == {7}


def test_image_folder_and_latents(tmp_path):
    from PIL import Image

    for name, value in (("a", 0), ("b", 255)):
        (tmp_path / "images" / name).mkdir(parents=True)
        Image.new("L", (16, 12), value).save(tmp_path / "images" / name / "0.png")
    images, labels, classes = load_image_folder(tmp_path / "images", 8, 1)
    assert images.shape == (2, 1, 8, 8) and classes == ["a", "b"] and labels.tolist() == [0, 1]
    assert images[0].max() == -1.0 and images[1].min() == 1.0

    np.save(tmp_path / "bad.npy", np.zeros((3, 4, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"bad.npy: latents of shape \(3, 4, 4, 4\); expected \(n, 4, 8, 8\)"):
        load_latents(tmp_path / "bad.npy", None, (TINY.in_channels, TINY.input_size, TINY.input_size))


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["official", "general"])
def test_a_mac_budget_is_met_with_the_least_removed(mode):
    from l2c_export.models.zoo import embedded_default

    macs = count_macs(embedded_default().config)
    logits = np.random.default_rng(1).normal(size=(20, 12)).astype(np.float32)
    router = RouterLogits(logits, source="random")
    for target in (0.55, 0.6, 0.7, 0.85):
        result = baselines.schedule_for_mac_fraction(router, target, macs, mode)
        fraction = result.mac_fraction(macs)
        assert fraction <= target
        # The next lower router probability as threshold computes one more sub-layer, and exceeds the budget.
        probabilities = np.sort(router.probabilities()[router.probabilities() < result.threshold])
        if len(probabilities):
            looser = router.to_schedule(float(probabilities[-1]) - 1e-9, mode)
            assert looser.mac_fraction(macs) > target
        assert router.to_schedule(result.threshold, mode).compute.tolist() == result.compute.tolist()


def test_an_unreachable_budget_is_refused():
    from l2c_export.models.zoo import embedded_default

    macs = count_macs(embedded_default().config)
    router = RouterLogits(np.zeros((20, 12), dtype=np.float32), source="zeros")
    with pytest.raises(ValueError, match=r"target MAC fraction 0.4 is below the least that mode 'official' reaches "
                                         r"with 20 steps \(0.51"):
        baselines.schedule_for_mac_fraction(router, 0.4, macs, "official")


@pytest.mark.slow
def test_cli_official_schedule_equals_what_schedule_decodes(tmp_path):
    router = tmp_path / "router.safetensors"
    out = run_cli("learn", "--iterations", "4", "--batch-size", "4", "--lr", "1.0", "--out", str(router),
                  "--target-mac-fraction", "0.8", "--json", str(tmp_path / "learned.json"), "--threads", "1").stdout
    assert "learned in" in out and "1 process(es) of 1 thread(s)" in out  # --threads reached torch
    learned = Schedule.load(tmp_path / "learned.json")
    assert learned.mode == "official" and learned.mac_fraction(count_macs(learned_config())) <= 0.8
    assert (tmp_path / "router.state.safetensors").is_file()
    run_cli("schedule", "--router", str(router), "--mode", "official", "--threshold", repr(learned.threshold),
            "--json", str(tmp_path / "by-threshold.json"))
    run_cli("schedule", "--router", str(router), "--mode", "official", "--target-mac-fraction", "0.8",
            "--json", str(tmp_path / "by-budget.json"))
    for name in ("by-threshold.json", "by-budget.json"):
        decoded = Schedule.load(tmp_path / name)
        assert decoded.compute.tolist() == learned.compute.tolist(), name
    meta = load_router(router).meta
    assert meta["format"] == "l2c-export-router-v1" and json.loads(meta["settings"])["mode"] == "official"
    assert "model" not in meta  # the embedded default: `schedule` counts its MACs, not an official model's


def learned_config():
    from l2c_export.models.zoo import embedded_default

    return embedded_default().config


# ---------------------------------------------------------------------------------------------------------------------
TORCHRUN_TOLERANCE = 1e-5  # logits after 5 AdamW steps; the runs differ only in float summation order (~2e-7)


@pytest.mark.slow
def test_two_torchrun_processes_give_the_router_of_one(tiny_model, tmp_path):
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(tmp_path / "tiny.safetensors"))
    (tmp_path / "tiny.json").write_text(json.dumps(TINY.to_dict()))
    latents, labels = _latent_data(32)
    np.save(tmp_path / "latents.npy", latents)
    np.save(tmp_path / "labels.npy", labels)
    common = ["learn", "--checkpoint", str(tmp_path / "tiny.safetensors"), "--model-config", str(tmp_path / "tiny.json"),
              "--data", str(tmp_path / "latents.npy"), "--data-labels", str(tmp_path / "labels.npy"),
              "--steps", "6", "--mode", "general", "--window", "2", "--iterations", "5", "--batch-size", "8",
              "--lr", "0.05", "--l1", "1e-3", "--cfg-scale", "2.0"]
    run_cli(*common, "--out", str(tmp_path / "one.safetensors"))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "l2c_export.cli", *common, "--out", str(tmp_path / "two.safetensors")],
        check=False, capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es) of 1 thread(s)" in result.stdout  # OMP_NUM_THREADS, as torchrun sets it
    one, two = load_router(tmp_path / "one.safetensors"), load_router(tmp_path / "two.safetensors")
    initial = Router(6, TINY.num_sublayers, learned_calls(GaussianSampler.create("ddim", 6), "general"),
                     torch.Generator().manual_seed(0)).logits.detach().numpy()
    assert np.abs(one.logits - initial).max() > 0.1  # it learned something, so the comparison means something
    np.testing.assert_allclose(two.logits, one.logits, rtol=0, atol=TORCHRUN_TOLERANCE)


# ---------------------------------------------------------------------------------------------------------------------
# U-ViT with DPM-Solver-2S: the objective through the sampler's model calls, official mode as the authors' dpm20.

TINY_UVIT = UViTConfig(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=4, num_heads=2, num_classes=11)


@pytest.fixture
def tiny_uvit() -> UViT:
    torch.manual_seed(5)
    model = UViT(TINY_UVIT).eval()
    with torch.no_grad():  # larger than U-ViT's init, so that reusing a sub-layer visibly changes the output
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    return model.requires_grad_(False)


def _uvit_batch(n: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 4, 8, 8), generator=generator)
    return x, torch.randint(10, (n,), generator=generator), torch.full((n,), 512.5)


def test_uvit_forward_soft_is_the_full_forward_at_one_and_the_cached_forward_at_hard_weights(tiny_uvit):
    x, y, t = _uvit_batch()
    width = TINY_UVIT.num_sublayers
    cache = {}
    with torch.no_grad():
        full = tiny_uvit.forward_cached(x, torch.full((3,), 800.0), y, [True] * width, cache)
        fresh = {}
        soft = tiny_uvit.forward_soft(x, t, y, torch.ones(width), cache, fresh)
        torch.testing.assert_close(soft, tiny_uvit(x, t, y), rtol=0, atol=1e-5)
        assert sorted(fresh) == list(range(width))
        compute = [True, False, False, True, True, True, False, False, True, False]
        expected = tiny_uvit.forward_cached(x, t, y, compute, dict(cache))
        soft = tiny_uvit.forward_soft(x, t, y, torch.tensor(compute, dtype=torch.float32), cache)
    torch.testing.assert_close(soft, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, full, atol=1e-3)  # the cache matters, so the comparison means something


def test_official_dpm_solver_learning_reuses_the_previous_midpoint_call(tiny_uvit):
    """At a learned outer call 2k the student's cache is what the full model computed at the midpoint call 2k - 1
    of the run the sampler makes from step k - 1: with hard weights the loss is the MSE of the cached forward there."""
    sampler = create_sampler("dpm_solver_2s", 8)
    calls = learned_calls(sampler, "official")
    assert calls == [2, 4, 6]
    x, y, _ = _uvit_batch(2, seed=1)
    compute = torch.tensor([True, False] * 5, dtype=torch.float32)
    weights = torch.ones(8, TINY_UVIT.num_sublayers)
    weights[4] = compute
    terms = l2c_loss(tiny_uvit, sampler, weights, x, y, 1, 4, l1=0.0, cfg_scale=1.4, learned=calls)

    # The same through the one denoising loop from step 1: the full model guided, a cache filled at call 3.
    xb, yb = torch.cat([x, x]), torch.cat([y, torch.full_like(y, 10)])
    cache, expected = {}, {}

    def full_model(call):
        t = torch.full((4,), call.t)
        out = tiny_uvit.forward_cached(call.x, t, yb, [True] * TINY_UVIT.num_sublayers, cache)
        if call.index == 4:
            cached = tiny_uvit.forward_cached(call.x, t, yb, compute.bool().tolist(), dict(cache_at_3))
            expected["mse"] = ((out - cached) ** 2).mean()
        if call.index == 3:
            cache_at_3.update(cache)
        cond, uncond = out.chunk(2)
        guided = uncond + 1.4 * (cond - uncond)
        return torch.cat([guided, guided])

    cache_at_3 = {}
    with torch.no_grad():
        steps = sampler.calls(xb, first_step=1)
        call = next(steps)
        while call.index <= 4:
            call = steps.send(full_model(call))
    assert expected["mse"] > 1e-6
    torch.testing.assert_close(terms.mse, expected["mse"], rtol=1e-4, atol=1e-9)


@pytest.mark.slow
def test_learning_a_uvit_router_for_dpm_solver_decodes_to_a_schedule_that_builds_and_runs(tmp_path):
    """Learning runs real AdamW steps on a U-ViT-S/2 checkpoint, the loss falls, only the router's calls move, and
    the learned file decodes to a schedule that `build` and `run` accept."""
    config = uvit_config("U-ViT-S/2", img_size=8, num_classes=1001)
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.05 for k, v in UViT(config).state_dict().items()}
    checkpoint = tmp_path / "uvit-s2.pth"
    torch.save(state, checkpoint)
    model = get_family("uvit").load(checkpoint, config)
    sampler = create_sampler("dpm_solver_2s", 4)
    x0 = np.random.default_rng(0).standard_normal((16, 4, 8, 8)).astype(np.float32)
    settings = LearnSettings(mode="official", iterations=6, batch_size=1, lr=0.3, l1=1e-2, cfg_scale=1.4)
    result = learn_router(model, sampler, NoisedData(x0, np.arange(16) % 1000, sampler, "test"), settings,
                          progress=False, log_every=1)
    losses = [entry["loss"] for entry in result.history]
    assert len(losses) == 6 and losses[-1] < losses[0]
    logits = result.router.logits
    assert logits.shape == (4, config.num_sublayers) and result.router.sampler == "dpm_solver_2s"
    assert (logits[[0, 1, 3]] == 5.0).all() and (logits[2] < 0).any()  # only the outer call of step 1 learns

    router_file = tmp_path / "learned.safetensors"
    write_router(result.router, router_file, router_metadata("uvit-s2", sampler, settings, "test", result.seconds))
    schedule = load_router(router_file).to_schedule(0.5)
    assert schedule.sampler == "dpm_solver_2s" and not schedule.compute[2].all() and schedule.compute[[0, 1, 3]].all()
    out = tmp_path / "engines"
    run_cli("build", "--checkpoint", str(checkpoint), "--model", "U-ViT-S/2", "--image-size", "64",
            "--num-classes", "1001", "--router", str(router_file), "--threshold", "0.5", "--steps", "4",
            "--out", str(out))
    noise = make_noise(3, (1, 4, 8, 8))
    np.save(tmp_path / "z.npy", noise)
    run_cli("run", str(out), "--labels", "207", "--cfg-scale", "1.4", "--noise", str(tmp_path / "z.npy"),
            "--save-latents", str(tmp_path / "out.npy"))
    reference = sample_reference(model, sampler, [207], noise, cfg_scale=1.4, schedule=schedule, progress=False)
    samples = np.load(tmp_path / "out.npy")
    assert np.abs(samples - reference).max() <= 1e-4 * (reference.max() - reference.min())


@pytest.mark.slow
def test_learn_cli_on_a_uvit_checkpoint_samples_trajectories_and_decodes_at_a_budget(tmp_path):
    config = uvit_config("U-ViT-S/2", img_size=8, num_classes=1001)
    torch.manual_seed(0)
    torch.save({k: torch.randn_like(v) * 0.05 for k, v in UViT(config).state_dict().items()}, tmp_path / "u.pth")
    result = run_cli("learn", "--checkpoint", str(tmp_path / "u.pth"), "--model", "U-ViT-S/2", "--image-size", "64",
                     "--num-classes", "1001", "--data", "none", "--trajectories", "2", "--steps", "4",
                     "--iterations", "2", "--batch-size", "1", "--out", str(tmp_path / "r.safetensors"),
                     "--target-mac-fraction", "0.9", "--json", str(tmp_path / "s.json"))
    assert "learning 26 x 4 router logits (official mode, dpm_solver_2s)" in result.stdout
    router = load_router(tmp_path / "r.safetensors")
    assert router.logits.shape == (4, 26) and router.sampler == "dpm_solver_2s"
    schedule = Schedule.load(tmp_path / "s.json")
    assert schedule.compute[[0, 1, 3]].all() and not schedule.compute[2].all()


@pytest.mark.slow
def test_model_config_describes_a_checkpoint_of_another_family(tmp_path):
    """--model-config with ``"family": "uvit"``: any U-ViT architecture learns on its family's sampler."""
    config = UViTConfig(img_size=4, patch_size=2, in_chans=4, embed_dim=16, depth=2, num_heads=2, num_classes=5)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in UViT(config).state_dict().items()}, str(tmp_path / "u.safetensors"))
    (tmp_path / "u.json").write_text(json.dumps({"family": "uvit", **config.to_dict()}))
    run_cli("learn", "--checkpoint", str(tmp_path / "u.safetensors"), "--model-config", str(tmp_path / "u.json"),
            "--data", "none", "--trajectories", "4", "--steps", "6", "--iterations", "2", "--batch-size", "2",
            "--out", str(tmp_path / "r.safetensors"))
    router = load_router(tmp_path / "r.safetensors")
    assert router.sampler == "dpm_solver_2s" and router.logits.shape == (6, 2 * config.num_layers)
    (tmp_path / "bad.json").write_text(json.dumps({"family": "nope"}))
    result = run_cli("learn", "--checkpoint", str(tmp_path / "u.safetensors"), "--model-config",
                     str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.safetensors"), check=False)
    assert result.returncode == 2 and "unknown model family 'nope'" in result.stderr
