"""The runtime: parity with the PyTorch reference sampler, per-request caches under threads, backends, bad input."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from l2c_export.builder.build import BuildRequest, build
from l2c_export.core import manifest as manifest_io
from l2c_export.models.zoo import embedded_default
from l2c_export.routers import load_router
from l2c_export.runtime.pipeline import L2CPipeline
from l2c_export.samplers.guidance import make_noise
from l2c_export.models.reference import sample_reference

from .conftest import REPO, run_cli

LABELS = [0, 3, 5, 9]


def _parity(samples: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(samples - reference).max() / (reference.max() - reference.min()))


def test_onnxruntime_run_matches_the_pytorch_reference_on_the_embedded_default(default_build):
    spec = embedded_default()
    pipe = L2CPipeline.from_engine_dir(default_build)
    assert pipe.providers == ["CPUExecutionProvider"]
    result = pipe(LABELS, seed=7)
    reference = sample_reference(spec.load_model(), spec.sampler(), LABELS, make_noise(7, (4, 1, 8, 8)),
                                 cfg_scale=spec.cfg_scale, schedule=spec.schedule(), progress=False)
    assert _parity(result.samples, reference) <= 1e-4
    assert result.step_subsets == pipe.manifest["schedule"]["step_subset"]
    assert len(set(result.step_subsets)) == len(pipe.manifest["subsets"]) > 1
    # The schedule changes the samples: reuse is not a no-op.
    assert _parity(pipe(LABELS, seed=7, full=True).samples, reference) > 1e-3


def test_torch_backend_reads_the_same_build_and_agrees(default_build):
    onnx_result = L2CPipeline.from_engine_dir(default_build)(LABELS, seed=1)
    torch_pipe = L2CPipeline.from_engine_dir(default_build, backend="torch")
    assert torch_pipe.providers == ["torch-cpu"]
    assert _parity(torch_pipe(LABELS, seed=1).samples, onnx_result.samples) <= 1e-4


def test_ddpm_runs_match_the_reference(tmp_path):
    spec = embedded_default()
    sampler = spec.sampler("ddpm", 12)
    schedule = spec.schedule().full(12, spec.config.depth)
    schedule.compute[1::2, 2:8] = False
    out = tmp_path / "ddpm"
    build(BuildRequest(spec=spec, schedule=schedule, sampler=sampler, out_dir=out), progress=False)
    result = L2CPipeline.from_engine_dir(out)(LABELS, seed=4)
    reference = sample_reference(spec.load_model(), sampler, LABELS, make_noise(4, (4, 1, 8, 8)),
                                 cfg_scale=spec.cfg_scale, schedule=schedule, step_noise_seed=4, progress=False)
    assert _parity(result.samples, reference) <= 1e-4


def test_eight_concurrent_requests_give_the_serial_results(default_build):
    pipe = L2CPipeline.from_engine_dir(default_build)
    requests = [([i % 10, (i + 3) % 10], 100 + i) for i in range(8)]
    serial = [pipe(labels, seed=seed).samples for labels, seed in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        concurrent = list(pool.map(lambda r: pipe(r[0], seed=r[1]).samples, requests))
    for one, other in zip(serial, concurrent):
        np.testing.assert_array_equal(one, other)
    assert not np.allclose(serial[0], serial[1])


def test_a_label_build_is_called_as_dit_pipeline_is(default_build):
    """DiTPipeline's manners on the embedded DiT: the class labels first (or class_labels=), guidance_scale and
    num_inference_steps (the build's; another count refused naming the rebuild), a generator read by its seed (one
    per image in a list), output_type "pil" (the default: 8 x 8 grey images), "np" ((n, H, W, 1) in [0, 1]) or
    "latent" (the samples), num_images_per_prompt (each label's images side by side)."""
    from l2c_export.runtime.conditioning import ConditioningError

    pipe = L2CPipeline.from_pretrained(default_build)
    plain = pipe(LABELS, seed=4)
    same = pipe(class_labels=LABELS, guidance_scale=pipe.default_guidance_scale,
                num_inference_steps=pipe.num_inference_steps, generator=torch.Generator().manual_seed(4),
                output_type="np")
    np.testing.assert_array_equal(same.samples, plain.samples)
    np.testing.assert_array_equal(same.images, np.clip(plain.samples / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))
    assert [(image.mode, image.size) for image in plain.images] == [("L", (8, 8))] * len(LABELS)
    twice = pipe([3, 7], seed=4, num_images_per_prompt=2, output_type="latent").images
    np.testing.assert_array_equal(twice, pipe([3, 3, 7, 7], seed=4).samples)
    per_image = pipe([3, 7], generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).samples
    np.testing.assert_allclose(per_image[1], pipe([7], seed=6).samples[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"^num_inference_steps is 50; this build samples 20 steps .*--steps 50"):
        pipe(LABELS, num_inference_steps=50)
    with pytest.raises(ConditioningError, match=r"^prompt: this model is conditioned on class labels \(labels\)"):
        pipe("a red cat")
    used = torch.Generator().manual_seed(1)
    torch.randn(1, generator=used)
    with pytest.raises(ValueError, match=r"^generator has drawn numbers since it was seeded with 1; .*seed=1"):
        pipe(LABELS, generator=used)
    with pytest.raises(TypeError, match="got labels and the first argument: they are the same argument"):
        pipe(LABELS, labels=LABELS)


def test_the_runtime_needs_no_pytorch(default_build):
    code = ("import sys; from l2c_export.runtime.pipeline import L2CPipeline; "
            f"r = L2CPipeline.from_pretrained({str(default_build)!r})([1, 2], seed=0, output_type='np'); "
            "assert r.samples.shape == (2, 1, 8, 8) and r.images.shape == (2, 8, 8, 1) and r.images.max() <= 1; "
            "loaded = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not loaded, loaded; print('no torch')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "no torch" in result.stdout


def test_asking_for_cuda_reports_what_really_runs(default_build):
    import onnxruntime as ort

    pipe = L2CPipeline.from_engine_dir(default_build, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    actual = pipe.providers
    assert actual == sorted(set(s for sess in pipe.backend.sessions.values() for s in sess.get_providers()),
                            key=ort.get_available_providers().index)
    if "CUDAExecutionProvider" not in actual:  # no usable GPU here: the silent fallback is visible
        assert actual == ["CPUExecutionProvider"]


# ---------------------------------------------------------------------------------------------------------------------
def _authors_router(path: Path, num_steps: int, depth: int, seed: int = 0) -> Path:
    generator = torch.Generator().manual_seed(seed)
    routers = OrderedDict((f"{i}.prob", torch.randn(2 * depth, generator=generator) * 2) for i in range(num_steps))
    torch.save({"routers": routers, "opt": {}, "args": argparse.Namespace(model="DiT-S/2", image_size=256,
                                                                           num_sampling_steps=num_steps)}, path)
    return path


@pytest.mark.slow
def test_dit_s2_with_an_authors_router_matches_the_reference(tmp_path):
    from l2c_export.models.checkpoint import load_dit
    from l2c_export.models.dit.model import DiT, dit_config
    from l2c_export.samplers.gaussian import GaussianSampler

    config = dit_config("DiT-S/2", input_size=32)
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.05 for k, v in DiT(config).state_dict().items()}
    checkpoint = tmp_path / "DiT-S-2-256x256.pt"
    torch.save(state, checkpoint)
    router = _authors_router(tmp_path / "DDIM6_router.pt", 6, 12)
    out = tmp_path / "s2"
    run_cli("build", "--checkpoint", str(checkpoint), "--model", "DiT-S/2", "--image-size", "256", "--router",
            str(router), "--threshold", "0.5", "--steps", "6", "--out", str(out))
    schedule = load_router(router).to_schedule(0.5)
    assert not schedule.compute.all()
    pipe = L2CPipeline.from_engine_dir(out)
    labels = [207, 992]
    result = pipe(labels, cfg_scale=4.0, seed=5)
    reference = sample_reference(load_dit(checkpoint, config), GaussianSampler.create("ddim", 6), labels,
                                 make_noise(5, (2, 4, 32, 32)), cfg_scale=4.0, schedule=schedule, progress=False)
    assert _parity(result.samples, reference) <= 1e-4


# ---------------------------------------------------------------------------------------------------------------------
def _copy_build(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_run_cli_writes_a_grid_and_latents(default_build, tmp_path):
    result = run_cli("run", str(default_build), "--labels", "1,2", "--seed", "3", "--out", str(tmp_path / "g.png"),
                     "--save-latents", str(tmp_path / "l.npy"), "--compare-full")
    assert "L2C schedule:" in result.stdout and "full compute:" in result.stdout and "speedup" in result.stdout
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    saved = np.load(tmp_path / "l.npy")
    np.testing.assert_allclose(saved, L2CPipeline.from_engine_dir(default_build)([1, 2], seed=3).samples, atol=1e-6)


def test_run_cli_takes_noise_from_a_file(default_build, tmp_path):
    noise = make_noise(11, (2, 1, 8, 8))
    np.save(tmp_path / "noise.npy", noise)
    run_cli("run", str(default_build), "--labels", "4,4", "--noise", str(tmp_path / "noise.npy"),
            "--save-latents", str(tmp_path / "l.npy"))
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"),
                               L2CPipeline.from_engine_dir(default_build)([4, 4], noise=noise).samples, atol=1e-6)


def _bad_run(folder: Path, tmp_path: Path, *extra: str) -> str:
    out = tmp_path / "grid.png"
    result = run_cli("run", str(folder), "--labels", "1,2", "--out", str(out), *extra, check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert not out.exists()
    return result.stderr


def test_a_label_out_of_range_is_a_clear_error(default_build, tmp_path):
    stderr = _bad_run(default_build, tmp_path, "--labels", "3,10")
    assert "labels [10] are out of range; expected class indices in 0..9" in stderr


def test_noise_of_the_wrong_shape_is_a_clear_error(default_build, tmp_path):
    np.save(tmp_path / "noise.npy", np.zeros((2, 1, 16, 16), dtype=np.float32))
    stderr = _bad_run(default_build, tmp_path, "--noise", str(tmp_path / "noise.npy"))
    assert "noise has shape (2, 1, 16, 16); expected (2, 1, 8, 8)" in stderr


def test_a_tampered_engine_is_refused(default_build, tmp_path):
    folder = _copy_build(default_build, tmp_path / "tampered")
    graph = folder / manifest_io.load(folder)["subsets"][1]["engine"]["file"]
    graph.write_bytes(graph.read_bytes() + b"\0")
    assert f"{graph}: sha256" in _bad_run(folder, tmp_path)


def test_a_newer_manifest_is_refused(default_build, tmp_path):
    folder = _copy_build(default_build, tmp_path / "newer")
    data = json.loads((folder / "manifest.json").read_text())
    data["schema_version"] = 99
    (folder / "manifest.json").write_text(json.dumps(data))
    expected = f"'schema_version' is 99, newer than this l2c-export reads ({manifest_io.SCHEMA_VERSION})"
    assert expected in _bad_run(folder, tmp_path)


def test_a_missing_engine_file_is_named(default_build, tmp_path):
    folder = _copy_build(default_build, tmp_path / "missing")
    name = manifest_io.load(folder)["subsets"][1]["engine"]["file"]
    (folder / name).unlink()
    assert f"file {name} is missing from {folder}" in _bad_run(folder, tmp_path)


def test_verify_passes_and_catches_a_wrong_graph(default_build, tmp_path):
    result = run_cli("verify", str(default_build))
    count = len(manifest_io.load(default_build)["subsets"])
    assert count > 1 and f"all {count} subset engine(s) agree with PyTorch" in result.stdout
    import onnx

    folder = _copy_build(default_build, tmp_path / "wrong")
    data = json.loads((folder / "manifest.json").read_text())
    record = data["subsets"][1]
    path = folder / record["graph"]["file"]
    graph = onnx.load(path, load_external_data=False)
    norm = next(n for n in graph.graph.node if n.op_type == "LayerNormalization")
    next(a for a in norm.attribute if a.name == "epsilon").f = 0.5  # a wrong graph with a consistent manifest
    onnx.save_model(graph, str(path))
    record["graph"] = record["engine"] = manifest_io.file_entry(folder, record["graph"]["file"], record["graph"]["key"])
    (folder / "manifest.json").write_text(json.dumps(data))
    failed = run_cli("verify", str(folder), check=False)
    assert failed.returncode == 1
    assert f"FAIL {record['name']}" in failed.stdout


@pytest.mark.slow  # a VAE export and decode
def test_a_latent_model_decodes_through_a_local_vae(tmp_path):
    pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
    from diffusers import AutoencoderKL

    from l2c_export.core.schedule import Schedule
    from l2c_export.models.dit.model import DiT, DiTConfig
    from l2c_export.models.zoo import ModelSpec

    vae_dir = tmp_path / "vae"
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1, sample_size=32).save_pretrained(vae_dir)
    config = DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                       num_classes=10)
    torch.save(DiT(config).state_dict(), tmp_path / "w.pt")
    spec = ModelSpec(name="latent", config=config, weights=tmp_path / "w.pt", space="latent", num_steps=4)
    build(BuildRequest(spec=spec, schedule=Schedule.full(4, 2), sampler=spec.sampler(), out_dir=tmp_path / "b"),
          progress=False)
    assert "--out needs --vae" in run_cli("run", str(tmp_path / "b"), "--labels", "1", "--out",
                                          str(tmp_path / "x.png"), check=False).stderr
    refused = run_cli("run", str(tmp_path / "b"), "--labels", "1", "--vae", str(vae_dir), "--out",
                      str(tmp_path / "x.mp4"), check=False)  # an image grid is PNG data: not under another name
    assert refused.returncode == 2 and "name the file .png" in refused.stderr and not (tmp_path / "x.mp4").exists()
    run_cli("run", str(tmp_path / "b"), "--labels", "1,2", "--vae", str(vae_dir), "--out", str(tmp_path / "x.png"))
    from PIL import Image

    assert Image.open(tmp_path / "x.png").size == (2 * 32 * 8 + 6, 32 * 8 + 4)
