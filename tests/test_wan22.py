"""Wan2.2's two experts from a diffusers folder (issue 30, point 2): ``WanPipeline`` with ``transformer`` and
``transformer_2`` and ``boundary_ratio`` in ``model_index.json``; the first runs while the timestep is >= boundary_ratio
x num_train_timesteps, the second after, each guided with its own scale (``guidance_scale``, ``guidance_scale_2``).

A tiny random folder saved with ``save_pretrained`` (:data:`~tests.diffusers_pipelines.WAN22_BOUNDARY` 0.9: 4 of 12
UniPC steps on ``transformer``, the timestep 900 on the boundary included; ``transformer_2`` with a wider feed-forward;
no VAE),
built once with a general schedule that caches in both experts; the reference is diffusers' own pipeline on the same
5-D latents and embeddings, with forward hooks that make each expert's named sub-modules return their last computed
output (one cache per expert and per pass)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil

import numpy as np
import onnx
import pytest
import torch

from l2c_export.core.manifest import ManifestError, check_consistency
from l2c_export.core.schedule import Schedule
from l2c_export.runtime.pipeline import L2CPipeline

from .conftest import run_cli
from .diffusers_pipelines import WAN_CONFIG, load_pipeline, schedule_hooks

STEPS = 12
FIRST_EXPERT_STEPS = 4  # timesteps 999, 970, 937, 900 >= 0.9 x 1000
NUM_FRAMES, IMAGE_SIZE = 5, 48  # 2 latent frames of 6 x 6 at the pipeline's scale factor 8 (no VAE): 18 tokens
LATENTS = (WAN_CONFIG["in_channels"], 2, 6, 6)
SUBLAYERS = tuple(f"blocks.{i}.{s}" for i in range(2) for s in ("attn1", "attn2", "ffn"))
CFG_SCALE, CFG_SCALE_2 = 4.0, 2.0


def _schedule(first_of_second: bool = True) -> Schedule:
    """Odd steps reuse every ffn, every third step block 1's attentions, except the first step of each expert (0 and
    4), which computes everything (``first_of_second`` False: step 4 reuses too, which is refused)."""
    rows = np.ones((STEPS, len(SUBLAYERS)), dtype=bool)
    for step in range(1, STEPS):
        if step == FIRST_EXPERT_STEPS and first_of_second:
            continue
        for column, name in enumerate(SUBLAYERS):
            if (step % 2 == 1 and name.endswith(".ffn")) or (step % 3 == 2 and name.startswith("blocks.1.attn")) \
                    or (step == FIRST_EXPERT_STEPS and name == "blocks.0.ffn"):
                rows[step, column] = False
    return Schedule(rows, sublayers=SUBLAYERS, mode="general", source="two-expert schedule")


@pytest.fixture(scope="module")
def wan22_build(tiny_diffusers, tmp_path_factory):
    """``build --diffusers DIR --steps 12 --num-frames 5 --image-size 48 --schedule s.json`` of the tiny two-expert
    folder (CLI, a real subprocess), its request files beside; tests read it, never change it."""
    root = tmp_path_factory.mktemp("wan22-build")
    folder = tiny_diffusers("wan22", "unipc")
    _schedule().save(root / "s.json")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, *LATENTS, generator=generator)
    embeds = torch.randn(2, 7, WAN_CONFIG["text_dim"], generator=generator)
    negative = torch.randn(2, 7, WAN_CONFIG["text_dim"], generator=generator)
    embeds[1, 5:], negative[:, 3:] = 0, 0  # the rows past each prompt, zeroed as UMT5's encoding leaves them
    conditioning = {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
    np.save(root / "z.npy", latents.numpy())
    np.savez(root / "cond.npz", **{name: value.numpy() for name, value in conditioning.items()})
    run_cli("build", "--diffusers", str(folder), "--steps", str(STEPS), "--num-frames", str(NUM_FRAMES),
            "--image-size", str(IMAGE_SIZE), "--schedule", str(root / "s.json"), "--out", str(root / "E"))
    return root, folder, latents, conditioning


def _pipeline_latents(folder, latents, conditioning, schedule: Schedule | None) -> np.ndarray:
    """WanPipeline's output_type="latent" frames at guidance_scale 4, guidance_scale_2 2; with ``schedule``, each
    expert's sub-modules follow its rows (hooks on each transformer: one cache per expert, per pass)."""
    pipe = load_pipeline(folder)
    with torch.no_grad(), contextlib.ExitStack() as hooks:
        if schedule is not None:
            hooks.enter_context(schedule_hooks(pipe.transformer, SUBLAYERS, schedule.compute[:FIRST_EXPERT_STEPS], 2))
            hooks.enter_context(schedule_hooks(pipe.transformer_2, SUBLAYERS, schedule.compute[FIRST_EXPERT_STEPS:],
                                               2))
        out = pipe(prompt=None, latents=latents.clone(), num_inference_steps=STEPS, guidance_scale=CFG_SCALE,
                   guidance_scale_2=CFG_SCALE_2, num_frames=NUM_FRAMES, height=IMAGE_SIZE, width=IMAGE_SIZE,
                   output_type="latent", **conditioning).frames
    return out.numpy()


@pytest.mark.slow
def test_two_experts_build_and_run_equal_the_pipeline(wan22_build):
    """The manifest records the boundary and each call's expert (the timestep 900 on the boundary runs transformer,
    as the pipeline's ``t >= boundary``); each expert's subsets are graphs of its own weights, stored once in one
    weights.bin under its prefix, with its own cache slots. run --cfg-scale 4 --cfg-scale-2 2 equals WanPipeline
    (guidance_scale 4, guidance_scale_2 2) to 1e-4 of the range with --full and with the schedule; L2CPipeline's
    guidance_scale_2 gives the CLI's latents, and leaving it out (the first scale at every step) others; verify passes
    every subset of both experts."""
    root, folder, latents, conditioning = wan22_build
    build = root / "E"
    manifest = json.loads((build / "manifest.json").read_text())
    experts = manifest["experts"]
    assert (experts["boundary_ratio"], experts["boundary_timestep"]) == (0.9, 900.0)
    assert experts["step_expert"] == [0] * FIRST_EXPERT_STEPS + [1] * (STEPS - FIRST_EXPERT_STEPS)
    assert [(m["name"], m["prefix"], m["scale_argument"]) for m in experts["models"]] == [
        ("transformer", "", "guidance_scale"), ("transformer_2", "transformer_2.", "guidance_scale_2")]
    assert experts["models"][1]["config"]["transformer"]["ffn_dim"] == 24
    stored = {t["name"] for t in manifest["weight_tensors"]}
    first = {name for name in stored if not name.startswith("transformer_2.")}
    assert {"transformer_2." + name for name in first} == stored - first  # each expert's tensors, once each
    for record in manifest["subsets"]:
        prefix = experts["models"][record["expert"]]["prefix"]
        assert record["steps"] and {experts["step_expert"][s] for s in record["steps"]} == {record["expert"]}
        assert all(slot.startswith(prefix) for slot in record["reads"] + record["writes"])
        graph = onnx.load(str(build / record["graph"]["file"]), load_external_data=False).graph
        weights = {t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        assert weights and weights <= (stored - first if prefix else first), record["name"]
    assert sum(1 for r in manifest["subsets"] if r["expert"] == 1 and not all(r["compute"])) >= 2
    # the records must agree: a call on the other side of the boundary, a subset of another expert, one prefix
    second_full = next(r["index"] for r in manifest["subsets"] if r["expert"] == 1 and all(r["compute"]))
    assert manifest["schedule"]["step_subset"][FIRST_EXPERT_STEPS] == second_full
    for path, value, message in (
            (("experts", "step_expert", 4), 0, "field 'experts/step_expert/4' is 0"),
            (("subsets", second_full, "expert"), 0, f"field 'schedule/step_subset/4' names subset {second_full}, of "
                                                    f"expert 0; the call runs expert 1"),
            (("experts", "models", 1, "prefix"), "", "field 'experts/models' has prefixes")):
        edited = json.loads(json.dumps(manifest))
        target = edited
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(ManifestError, match=re.escape(message)):
            check_consistency(edited, "manifest.json")
    results = {}
    for full in (True, False):
        out = root / f"out-{full}.npy"
        run_cli("run", str(build), "--noise", str(root / "z.npy"), "--conditioning", str(root / "cond.npz"),
                "--cfg-scale", str(CFG_SCALE), "--cfg-scale-2", str(CFG_SCALE_2), "--save-latents", str(out),
                *(["--full"] if full else []))
        want = _pipeline_latents(folder, latents, conditioning, None if full else _schedule())
        got = results[full] = np.load(out)
        assert got.shape == want.shape == tuple(latents.shape)
        assert np.abs(got - want).max() <= 1e-4 * np.ptp(want), (full, np.abs(got - want).max())
    assert np.abs(results[True] - results[False]).max() > 2e-4 * np.ptp(results[True])  # the reuse shows
    pipe = L2CPipeline.from_pretrained(build)
    arrays = {name: value.numpy() for name, value in conditioning.items()}
    second = pipe(latents=latents.numpy(), guidance_scale=CFG_SCALE, guidance_scale_2=CFG_SCALE_2,
                  output_type="latent", **arrays).samples
    assert np.abs(second - results[False]).max() <= 1e-5 * np.ptp(results[False])
    same = pipe(latents=latents.numpy(), guidance_scale=CFG_SCALE, output_type="latent", **arrays).samples
    assert np.abs(same - second).max() > 1e-3 * np.ptp(second)
    # verify: every subset engine against the PyTorch experts rebuilt from weights.bin, switched by timestep
    checked = run_cli("verify", str(build)).stdout
    assert "transformer_2.full" in checked and f"all {len(manifest['subsets'])} subset engine(s) agree" in checked


def _refusal(*args: str) -> str:
    """The one stderr line of a CLI command refused as bad input (exit 2)."""
    result = run_cli(*args, check=False)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.mark.slow
def test_bad_two_expert_input_is_refused_in_one_line(wan22_build, default_build, tmp_path):
    """One line, exit 2, nothing written: a boundary_ratio outside (0, 1) (naming model_index.json and the field), a
    transformer_2 whose blocks differ from transformer's (naming its config and the field), a schedule whose first step
    of transformer_2 reuses a sub-layer (naming the step and the expert), --cfg-scale-2 on a one-transformer build."""
    root, folder, _, _ = wan22_build
    build = ["build", "--steps", str(STEPS), "--num-frames", str(NUM_FRAMES), "--image-size", str(IMAGE_SIZE)]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    index = json.loads((bad / "model_index.json").read_text())
    for ratio in (1.5, 0):
        (bad / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": ratio}))
        line = _refusal(*build, "--diffusers", str(bad), "--out", str(tmp_path / "E"))
        assert "model_index.json: field 'boundary_ratio'" in line and str(ratio) in line, line
    (bad / "model_index.json").write_text(json.dumps(index))
    config = json.loads((bad / "transformer_2" / "config.json").read_text())
    (bad / "transformer_2" / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    line = _refusal(*build, "--diffusers", str(bad), "--out", str(tmp_path / "E"))
    assert "transformer_2/config.json: field 'num_layers' is 3; transformer/config.json has 2" in line, line
    _schedule(first_of_second=False).save(tmp_path / "s.json")
    line = _refusal(*build, "--diffusers", str(folder), "--schedule", str(tmp_path / "s.json"), "--out",
                    str(tmp_path / "E"))
    assert "row 4 (the first step of transformer_2) reuses blocks.0.ffn" in line, line
    assert not (tmp_path / "E").exists()
    line = _refusal("run", str(default_build), "--labels", "1", "--cfg-scale-2", "2", "--save-latents",
                    str(tmp_path / "out.npy"))
    assert line.startswith("Error: --cfg-scale-2: the build") and "one transformer" in line, line
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.slow
def test_a_router_learned_on_two_experts_keeps_each_experts_first_step_whole(wan22_build, tmp_path):
    """learn --diffusers on the two-expert folder (the switched experts' own trajectories, guided): the first step of
    each expert (calls 0 and 4) is not learned and always computes; schedule --png decodes it at a MAC fraction and
    names where the experts switch, the first step of transformer_2 whole in the decoded schedule."""
    from l2c_export.routers import ALWAYS_COMPUTE, load_router

    root, folder = wan22_build[:2]
    shape = ["--num-frames", str(NUM_FRAMES), "--image-size", str(IMAGE_SIZE)]
    router = tmp_path / "router.safetensors"
    run_cli("learn", "--diffusers", str(folder), *shape, "--steps", str(STEPS), "--conditioning-data",
            str(root / "cond.npz"), "--trajectories", "2", "--batch-size", "2", "--iterations", "3", "--mode",
            "general", "--lr", "0.5", "--cfg-scale", str(CFG_SCALE), "--out", str(router))
    logits = load_router(router).logits
    assert (logits[[0, FIRST_EXPERT_STEPS]] == ALWAYS_COMPUTE).all()
    assert np.abs(logits[1:FIRST_EXPERT_STEPS]).max() < ALWAYS_COMPUTE and np.abs(logits[5:]).max() < ALWAYS_COMPUTE
    shown = run_cli("schedule", "--diffusers", str(folder), *shape, "--router", str(router), "--mode", "general",
                    "--target-mac-fraction", "0.8", "--png", str(tmp_path / "s.png"), "--json",
                    str(tmp_path / "s.json")).stdout
    assert "experts: transformer from call 0, transformer_2 from call 4" in shown, shown
    decoded = Schedule.load(tmp_path / "s.json")
    assert decoded.compute[FIRST_EXPERT_STEPS].all() and not decoded.compute.all()
    assert (tmp_path / "s.png").stat().st_size > 0
