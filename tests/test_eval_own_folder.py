"""The budget curve on a user's own folder (``eval --diffusers DIR --prompts prompts.txt --budgets ...``): the
learned schedule against every cache a diffusers user can switch on, on the folder's own pipeline, with seconds per
image in each method's runtime. One shared run on a tiny PixArt-alpha folder with a T5 encoder (6 steps, 2 budgets,
4 prompts, the small search, one timing round)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from .conftest import run_cli

BUDGETS = (0.5, 0.8)
STEPS = 6
OURS = ("l2c", "fora", "random", "fewer-steps")
PEERS = ("cache-dit", "cache-dit+taylorseer", "diffusers-fbc", "diffusers-taylorseer", "diffusers-magcache",
         "diffusers-fastercache", "diffusers-pab")
PROMPTS = "a handwritten seven\nthe digit three\n\nnumber one\na handwritten digit zero\n"


@pytest.fixture(scope="module")
def own_curve(tiny_diffusers, tmp_path_factory):
    """The folder, the run's stdout and the files it wrote: a random router over the folder's sub-layers (general
    mode) decoded at each budget."""
    from l2c_export.models.zoo import from_diffusers
    from l2c_export.routers import RouterLogits

    folder = tiny_diffusers("pixart-t5", "ddim")
    root = tmp_path_factory.mktemp("own-curve")
    (root / "prompts.txt").write_text(PROMPTS)
    names = list(from_diffusers(folder).sublayer_names)
    logits = np.random.default_rng(0).standard_normal((STEPS, len(names))).astype(np.float32)
    RouterLogits(logits, "random", {"sublayers": names}).save(root / "router.safetensors")
    out = root / "curve"
    result = run_cli("eval", "--diffusers", str(folder), "--prompts", str(root / "prompts.txt"), "--router",
                     str(root / "router.safetensors"), "--mode", "general", "--budgets", ",".join(map(str, BUDGETS)),
                     "--batch-size", "4", "--search", "small", "--repeats", "1", "--random-seeds", "1",
                     "--json", f"{out}.json", "--markdown", f"{out}.md", "--png", f"{out}.png",
                     "--grid", f"{out}-grid.png")
    return folder, result.stdout, root


@pytest.mark.slow
def test_own_folder_curve_has_every_method_at_every_budget_timed_in_its_runtime(own_curve):
    """A row per method and budget: ours on ONNX Runtime (and full compute and l2c on PyTorch too), every peer on
    diffusers' PixArtAlphaPipeline; each with its MAC fraction counted from what ran (or the error that stopped it),
    FD and PSNR to full, no digits metrics (no classifier applies to the user's prompts), seconds per image, speedup
    against full compute in its runtime and its ratio to the MAC-counted ideal; the learned schedule's ratio in ONNX
    Runtime is in the JSON and the table."""
    _, stdout, root = own_curve
    report = json.loads((root / "curve.json").read_text())
    assert report["num_samples"] == 4 and report["sampler"]["num_calls"] == STEPS  # the 4 prompts, once each
    assert "random projection" in report["features"] and "PixArtAlphaPipeline" in report["timing"]["diffusers"]
    rows = report["results"]
    full = {row["method"]: row for row in rows if row["budget"] is None}
    assert set(full) == {"full", "full (diffusers)"}
    assert full["full (diffusers)"]["mac_fraction"] == pytest.approx(1.0)  # every sub-layer ran, by the hooks
    assert full["full (diffusers)"]["psnr"] > 40  # the same model in PyTorch: rounding apart
    assert full["full"]["seconds_per_image"] > 0 and full["full"]["seconds_per_image_torch"] > 0
    for budget in BUDGETS:
        at = {row["method"]: row for row in rows if row["budget"] == budget}
        assert tuple(at) == OURS + PEERS, budget
        for method, row in at.items():
            assert row["runtime"] == ("onnxruntime" if method in OURS else "diffusers"), method
            if method in OURS:  # the subsets the engines report they ran give the schedule's own count
                assert row["engines_mac_fraction"] == pytest.approx(row["mac_fraction"], abs=1e-5), method
            if "error" in row:  # a cache that cannot run on this transformer says why, and nothing else
                assert row["error"] and row["mac_fraction"] is None and "seconds_per_image" not in row, method
                continue
            assert row["fd"] is None and row["accuracy"] is None, method
            assert np.isfinite(row["fd_to_full"]) and np.isfinite(row["psnr"]), method
            assert row["reached"] == (abs(row["mac_fraction"] - budget) <= 0.03), (method, budget)
            assert row["reached"] or row["note"], (method, budget)
            assert row["seconds_per_image"] > 0 and row["speedup"] > 0, method
            assert row["speedup_of_ideal"] == pytest.approx(row["speedup"] * row["mac_fraction"]), method
        assert at["l2c"]["seconds_per_image_torch"] > 0 and at["l2c"]["speedup_of_ideal_torch"] > 0
        assert report["l2c_speedup_of_ideal"]["by_budget"][str(budget)] == at["l2c"]["speedup_of_ideal"]
        own = at["cache-dit"]
        assert own["own_mac_fraction"] == pytest.approx(own["mac_fraction"], abs=1e-6)  # cache-dit's count agrees
    # PixArtTransformer2DModel is no CacheMixin: the error its users get from enable_cache is in the row, and the hook
    # was applied as enable_cache applies it
    pab = next(row for row in rows if row["method"] == "diffusers-pab")
    assert "enable_cache" in pab.get("enable_cache_error", pab.get("error", ""))
    assert "l2c in ONNX Runtime engines, achieved / ideal speedup" in stdout
    table = (root / "curve.md").read_text()
    assert "| achieved / ideal |" in table and "| diffusers-magcache |" in table


@pytest.mark.slow
def test_own_folder_curve_writes_its_plots_and_refuses_what_it_does_not_take(own_curve, tmp_path):
    """The plots and the grid are written; --router with --schedule, and --int8, are refused in one line (exit 2,
    nothing written)."""
    from l2c_export.core.schedule import Schedule
    from l2c_export.models.zoo import from_diffusers

    folder, _, root = own_curve
    for png in ("curve.png", "curve-speed.png", "curve-grid.png"):
        assert Image.open(root / png).size[0] > 200, png
    table = tmp_path / "t.md"
    Schedule.full(STEPS, sublayers=list(from_diffusers(folder).sublayer_names)).save(tmp_path / "s.json")
    for flags, named in ((["--schedule", str(tmp_path / "s.json")], "not both"), (["--int8"], "--int8")):
        refused = run_cli("eval", "--diffusers", str(folder), "--prompts", str(root / "prompts.txt"), "--router",
                          str(root / "router.safetensors"), "--mode", "general", *flags, "--markdown", str(table),
                          check=False)
        assert refused.returncode == 2 and named in refused.stderr, refused.stderr
        assert refused.stderr.count("\n") == 1 and not table.exists()


@pytest.mark.slow
def test_on_a_cache_mixin_transformer_the_hooks_switch_on_with_enable_cache(tiny_diffusers):
    """On a FLUX.1 folder (FluxTransformer2DModel is a CacheMixin; packed latents, guidance-distilled: one pass a
    step) the peers' pipeline runs as its users call it, at the image's height and width: full compute counts every
    sub-layer; FirstBlockCache and PAB are switched on with ``transformer.enable_cache`` itself and compute less;
    cache-dit's DBCache runs, its own count not comparable (FLUX.1's single blocks are another list)."""
    from l2c_export.demo import diffusers_caches as caches
    from l2c_export.models.zoo import from_diffusers
    from l2c_export.samplers.guidance import make_noise

    folder = tiny_diffusers("flux-text", "flow")
    spec = from_diffusers(folder, 8)
    macs = spec.family.count_macs(spec.config)
    sample_shape = next(t.shape for t in spec.family.graph_inputs(spec.config) if t.role == "sample")
    captions, noise = ["a handwritten seven", "the digit three"], make_noise(0, (2, *sample_shape))
    pipelines = caches.FolderPipelines(folder, STEPS, spec.cfg_scale, spec.family.scale_argument, image_size=(8, 8),
                                       passes=1)
    count = dict(macs=macs, sublayers=spec.sublayer_names, batch_size=2)
    full = caches.draw(pipelines.open(None, {}, {}), captions, noise, **count)
    assert full.mac_fraction == pytest.approx(1.0) and full.images.shape == (2, 3, 8, 8)
    for name, knobs in (("diffusers-fbc", {"threshold": 10.0}), ("diffusers-pab", caches.PEERS["diffusers-pab"].grid(
            "small")[0])):
        run = caches.draw(pipelines.open(caches.PEERS[name], knobs, {}), captions, noise, **count)
        assert run.info["applied_with"].startswith("transformer.enable_cache(") and "enable_cache_error" not in \
            run.info, name
        assert run.mac_fraction < 0.9, name
    knobs = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 1, "residual_diff_threshold": 10.0}
    dbcache = caches.draw(pipelines.open(caches.PEERS["cache-dit"], knobs, {}), captions, noise, **count)
    assert dbcache.mac_fraction < 0.9 and sum(dbcache.own["cached_steps_per_call"]) > 0
    assert caches.own_mac_fraction(dbcache.own, macs, spec.sublayer_names, STEPS) is None
