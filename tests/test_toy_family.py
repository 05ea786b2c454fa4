"""Adding a model family is one folder: the toy family in ``tests/toy_family/`` (no gates, a long skip, register
tokens, its own tensor names) goes through build, verify and run without any stage knowing it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from l2c_export.builder.build import BuildRequest, build
from l2c_export.core import manifest as manifest_io
from l2c_export.core.schedule import Schedule
from l2c_export.models import get_family, register
from l2c_export.models.zoo import ModelSpec
from l2c_export.samplers import create_sampler
from l2c_export.samplers.guidance import make_noise
from l2c_export.models.reference import sample_reference
from l2c_export.tools.verify import verify_build

from .conftest import run_cli
from .toy_family import FAMILY, ToyConfig

# 3 layers, 5 DDIM calls; three distinct subsets.
ROWS = [[1] * 6, [1, 0, 1, 1, 0, 1], [1, 1, 0, 0, 1, 1], [1, 0, 1, 1, 0, 1], [1] * 6]


@pytest.fixture(scope="module")
def toy_build(tmp_path_factory):
    register(FAMILY)
    folder = tmp_path_factory.mktemp("toy")
    config = ToyConfig()
    torch.manual_seed(0)
    model = FAMILY.create(config)
    state = {k: torch.randn_like(v) * 0.3 for k, v in model.state_dict().items()}
    save_file(state, str(folder / "toy.safetensors"))
    spec = ModelSpec(name="toy", config=config, weights=folder / "toy.safetensors", space="pixel", cfg_scale=2.0)
    schedule = Schedule(np.array(ROWS, dtype=bool))
    build(BuildRequest(spec=spec, schedule=schedule, sampler=create_sampler("ddim", 5), out_dir=folder / "engines"),
          progress=False)
    return spec, schedule, folder / "engines"


def test_the_toy_family_builds_with_its_own_interface_and_liveness(toy_build):
    _, _, out = toy_build
    assert get_family("toy") is FAMILY
    data = manifest_io.load(out)
    assert data["model"]["family"] == "toy"
    assert [t["name"] for t in data["model"]["inputs"]] == ["noisy", "time_step", "class_id"]
    assert data["model"]["output"]["name"] == "prediction"
    names = {s["name"]: ([i["name"] for i in s["inputs"]], [o["name"] for o in s["outputs"]]) for s in data["subsets"]}
    assert names == {  # liveness: each subset reads what it reuses, returns only what the next call reuses
        "full": (["noisy", "time_step", "class_id"], ["prediction", "fresh_mlp_0", "fresh_attn_2"]),
        "subset01_4of6": (["noisy", "time_step", "class_id", "cache_mlp_0", "cache_attn_2"],
                          ["prediction", "fresh_attn_1", "fresh_mlp_1"]),
        "subset02_4of6": (["noisy", "time_step", "class_id", "cache_attn_1", "cache_mlp_1"],
                          ["prediction", "fresh_mlp_0", "fresh_attn_2"]),
    }
    assert data["cache_slots"][0]["shape"] == ["batch", 3 + 1 + 16, 16]  # registers, label and patch tokens
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".bin") == ["weights.bin"]


def test_the_toy_family_verifies_and_runs_from_the_manifest_alone(toy_build, tmp_path):
    spec, schedule, out = toy_build
    checks, _ = verify_build(out)
    assert len(checks) == 3 and all(check.passed for check in checks)
    # The runtime in a fresh process: it never imports the toy family, only reads the manifest.
    run_cli("run", str(out), "--labels", "1,4", "--seed", "3", "--save-latents", str(tmp_path / "toy.npy"))
    samples = np.load(tmp_path / "toy.npy")
    reference = sample_reference(spec.load_model(), create_sampler("ddim", 5), [1, 4], make_noise(3, (2, 1, 8, 8)),
                                 cfg_scale=2.0, schedule=schedule, progress=False)
    assert np.abs(samples - reference).max() <= 1e-4 * (reference.max() - reference.min())
