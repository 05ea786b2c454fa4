"""The whole budget curve on t2i-digits (``eval --model t2i-digits --budgets ...``): every method, ours and every
cache a diffusers user can switch on, at every budget, in quality and wall time, with its compute counted by hooks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from .conftest import run_cli

# one budget here (the suite's time; tests/test_eval_own_folder.py runs two), below the least official mode reaches
# (0.547 at 20 steps of DPM-Solver++): the shipped general-mode router's l2c-general row reaches it, l2c cannot
BUDGETS = (0.35,)
OURS = ("l2c", "l2c-general", "fora", "random", "fewer-steps")  # built and run on ONNX Runtime
METHODS = OURS + ("cache-dit", "cache-dit+taylorseer", "diffusers-fbc",
           "diffusers-taylorseer", "diffusers-magcache", "diffusers-fastercache", "diffusers-pab")
QUALITY = ("fd_to_full", "psnr", "fd", "accuracy")


@pytest.mark.slow
def test_eval_budgets_runs_every_method_at_every_budget_and_writes_the_files(tmp_path):
    """eval --budgets 0.5 on 4 captions, the small search: a row per method and budget with its MAC fraction
    (within 0.03 of the budget, or a note with the nearest, or the error that stopped it), every quality metric and
    the seconds per image in its own runtime with the speedup against full compute there; full compute and the
    learned schedule also timed on the PyTorch backend; the hooks' fractions are counted from what ran (cache-dit's
    own count agrees); the learned schedule in official mode (l2c) cannot reach the budget and says so, the shipped
    general-mode router (l2c-general) reaches it; the table, JSON, plots and grid are written."""
    out = tmp_path / "curve"
    result = run_cli("eval", "--model", "t2i-digits", "--budgets", ",".join(map(str, BUDGETS)), "--num-samples", "4",
                     "--batch-size", "4", "--search", "small", "--repeats", "1", "--random-seeds", "1",
                     "--json", f"{out}.json", "--markdown", f"{out}.md", "--png", f"{out}.png",
                     "--grid", f"{out}-grid.png")
    report = json.loads((tmp_path / "curve.json").read_text())
    rows = report["results"]
    full = {row["method"]: row for row in rows if row["budget"] is None}
    assert set(full) == {"full", "full (diffusers)"}
    assert report["general_router"].endswith("t2i-digits/router-general.safetensors")
    assert full["full"]["fd_to_full"] == 0.0 and full["full"]["seconds_per_image_torch"] > 0
    assert full["full (diffusers)"]["mac_fraction"] == pytest.approx(1.0)  # every sub-layer ran, by the hooks
    assert full["full (diffusers)"]["psnr"] > 60  # the same model in PyTorch: only rounding apart
    for budget in BUDGETS:
        at = {row["method"]: row for row in rows if row["budget"] == budget}
        assert tuple(at) == METHODS, budget
        for method, row in at.items():
            if "error" in row:  # a hook that cannot run on this transformer says why, and nothing else
                assert row["error"] and row["mac_fraction"] is None
                continue
            assert row["reached"] == (abs(row["mac_fraction"] - budget) <= 0.03), (method, budget)
            assert row["reached"] or "nearest" in row["note"] or "calibration" in row["note"], (method, row)
            for name in QUALITY:
                assert np.isfinite(row[name]), (method, budget, name)
            assert row["seconds_per_image"] > 0 and row["speedup"] > 0 and row["speedup_of_ideal"] > 0
            assert row["runtime"] == ("onnxruntime" if method in OURS else "diffusers")
            if row["runtime"] == "diffusers":
                assert row["search"]["tried"] and all("mac_fraction" in t for t in row["search"]["tried"])
        assert at["l2c"]["seconds_per_image_torch"] > 0 and at["l2c"]["speedup_of_ideal_torch"] > 0
        assert at["l2c"]["mode"] == "official" and not at["l2c"]["reached"] and "cannot reach" in at["l2c"]["note"]
        general = at["l2c-general"]  # the general-mode router decoded at the budget, run by the engines
        assert general["mode"] == "general" and general["reached"], general
        assert general["engines_mac_fraction"] == pytest.approx(general["mac_fraction"], abs=1e-6)
        assert report["l2c_general_speedup_of_ideal"]["by_budget"][str(budget)] == general["speedup_of_ideal"]
        cache_dit = at["cache-dit"]
        assert cache_dit["own_mac_fraction"] == pytest.approx(cache_dit["mac_fraction"], abs=1e-6)
    # PixArtTransformer2DModel is no CacheMixin: the error a user of enable_cache gets is recorded with each hook
    assert "enable_cache" in next(r for r in rows if r["method"] == "diffusers-pab").get(
        "enable_cache_error", next(r for r in rows if r["method"] == "diffusers-pab").get("error", ""))
    table = (tmp_path / "curve.md").read_text()
    assert "| diffusers-magcache |" in result.stdout and "| l2c |" in table and "| l2c-general |" in table
    for png in ("curve.png", "curve-speed.png", "curve-grid.png"):
        assert Image.open(tmp_path / png).size[0] > 200, png


def test_eval_budgets_refuses_what_the_curve_does_not_take(tmp_path):
    """--markdown is the curve's table (refused without --budgets); the curve decodes the router, so a --schedule is
    refused: one line naming the flag, exit 2, nothing written."""
    table = tmp_path / "t.md"
    refused = run_cli("eval", "--model", "t2i-digits", "--markdown", str(table), check=False)
    assert refused.returncode == 2 and "--markdown" in refused.stderr and not table.exists()
    refused = run_cli("eval", "--model", "t2i-digits", "--budgets", "0.5", "--schedule",
                      "l2c_export/demo/t2i-digits/schedule.json", "--markdown", str(table), check=False)
    assert refused.returncode == 2 and "--schedule" in refused.stderr and not table.exists()
    assert "Traceback" not in refused.stderr
