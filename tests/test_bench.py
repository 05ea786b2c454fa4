"""The benchmark's output contract (fields and their arithmetic). Speed itself is never asserted in a test."""

from __future__ import annotations

import json

import pytest

from l2c_export.builder.build import BuildRequest, build
from l2c_export.models.zoo import embedded_default

from .conftest import run_cli

FIELDS = {"backend", "batch", "full_seconds", "schedule_seconds", "speedup", "ideal_speedup", "step_overhead_fraction",
          "memory_all_engines_bytes", "memory_full_engine_bytes", "model_weights_bytes"}


def test_bench_writes_every_field_and_a_plot(tmp_path):
    spec = embedded_default()
    out = tmp_path / "engines"
    build(BuildRequest(spec=spec, schedule=spec.schedule(), sampler=spec.sampler(), out_dir=out), progress=False)
    result = run_cli("bench", str(out), "--repeats", "1", "--batch", "1", "--json", str(tmp_path / "b.json"),
                     "--png", str(tmp_path / "b.png"))
    assert "of ideal" in result.stdout
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["machine"]["cores"] >= 1
    rows = data["results"]
    assert [r["backend"] for r in rows] == ["onnxruntime", "torch"]
    for row in rows:
        assert FIELDS <= set(row)
        assert row["speedup"] == pytest.approx(row["full_seconds"] / row["schedule_seconds"])
        assert row["ideal_speedup"] == pytest.approx(json.loads((out / "manifest.json").read_text())["macs"]
                                                     ["ideal_speedup"])
        assert 0.0 <= row["step_overhead_fraction"] < 1.0
        assert row["memory_all_engines_bytes"] > 0 and row["memory_full_engine_bytes"] > 0
        assert row["model_weights_bytes"] == (out / "weights.bin").stat().st_size
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_runs_diffusers_builds_with_the_manifests_conditioning(tiny_diffusers, tmp_path):
    """A DiT build (class labels) and a PixArt build (prompt embeddings and masks, the model's only conditioning) of
    tiny diffusers folders, each over a schedule that reuses sub-layers, measured together on both backends."""
    import numpy as np

    from l2c_export.core.schedule import Schedule
    from l2c_export.models.zoo import from_diffusers

    folders = []
    for family in ("dit", "pixart"):
        spec = from_diffusers(tiny_diffusers(family))
        rows = np.ones((4, len(spec.sublayer_names)), dtype=bool)
        rows[1::2, 1:] = False
        out = tmp_path / family
        build(BuildRequest(spec=spec, schedule=Schedule(rows, sublayers=spec.sublayer_names, mode="general"),
                           sampler=spec.sampler(None, 4), out_dir=out), progress=False)
        folders.append(out)
    run_cli("bench", *map(str, folders), "--repeats", "1", "--batch", "1", "--prompt-tokens", "9",
            "--json", str(tmp_path / "b.json"))
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    assert [(r["model"].split()[0], r["backend"]) for r in rows] == [
        ("DiTTransformer2DModel", "onnxruntime"), ("PixArtTransformer2DModel", "onnxruntime"),
        ("DiTTransformer2DModel", "torch"), ("PixArtTransformer2DModel", "torch")]
    for row, folder in zip(rows, folders * 2):
        manifest = json.loads((folder / "manifest.json").read_text())
        assert row["ideal_speedup"] == pytest.approx(manifest["macs"]["ideal_speedup"]) and row["ideal_speedup"] > 1
        assert row["num_subsets"] == 2 and row["full_seconds"] > 0 and row["schedule_seconds"] > 0
        assert row["memory_all_engines_bytes"] > 0 and row["memory_full_engine_bytes"] > 0
