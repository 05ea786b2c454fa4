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
