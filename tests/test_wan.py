"""Wan2.1 from a diffusers folder (issue 30, point 1): ``WanTransformer3DModel`` as ``WanPipeline`` samples it, text
to video: 5-D latents (N, C, F', H', W') end to end, F' = (num_frames - 1) / 4 + 1; sub-layers ``blocks.{i}.attn1``,
``.attn2``, ``.ffn``; classifier-free guidance with ``negative_prompt_embeds`` (no mask), on only above scale 1. A
tiny random transformer saved with ``save_pretrained`` (no text encoder, no VAE: the pipeline's scale factors are
then 4 in time and 8 in space), flow-matching Euler with Wan's shift; the reference is diffusers' own pipeline on the
same latents and embeddings, with forward hooks that make the named sub-modules return their last computed output
(one cache per pass: the pipeline calls the transformer for the prompt, then for the negative prompt)."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from l2c_export.core.schedule import Schedule
from l2c_export.models.diffusers import read_folder

from .conftest import run_cli
from .diffusers_pipelines import WAN_CONFIG, load_pipeline, schedule_hooks

STEPS = 6
CFG_SCALE = 4.0
NUM_FRAMES = 5  # 2 latent frames
HEIGHT, WIDTH = 16, 32  # pixels: 2 x 4 latents at the scale factor 8, 1 x 2 patches of (1, 2, 2)
LATENTS = (WAN_CONFIG["in_channels"], 2, 2, 4)  # (C, F', H', W')
PROMPT_TOKENS = 7  # not the traced length (5): the prompt axis is dynamic


def _sized(folder, image_size=(HEIGHT, WIDTH), num_frames=NUM_FRAMES):
    found = read_folder(folder)
    return found, found.family.sized_config(found.config, image_size, found.vae_scale_factor, num_frames)


def test_sublayers_latents_and_graph_interface(tiny_diffusers):
    """blocks.{i}.attn1, .attn2, .ffn in forward order, each caching the T = F' (H' / 2) (W' / 2) tokens; the sample
    and the output (C, F', H', W'); the prompt embeddings with their negative partner and no mask."""
    found, config = _sized(tiny_diffusers("wan", "flow"))
    family = found.family
    assert family.name == "diffusers-wan" and family.latent_layout == "ncfhw"
    names = family.sublayer_names(config)
    assert names == tuple(f"blocks.{i}.{s}" for i in range(2) for s in ("attn1", "attn2", "ffn"))
    assert set(family.cached_shapes(config)) == {(4, 24)}
    records = [tensor.record() for tensor in family.graph_inputs(config)]
    assert records[0]["shape"] == ["batch", *LATENTS] and family.graph_output(config).shape == LATENTS
    assert [(r["role"], r.get("argument"), r.get("negative")) for r in records[1:]] == [
        ("time", None, None), ("conditioning", "prompt_embeds", "negative_prompt_embeds")]
    # 17 frames of 48 x 48 (the acceptance size): 5 latent frames of 6 x 6
    assert family.sized_config(found.config, 48, 8, 17).latent_shape == (5, 6, 6)


# -- build and run against the pipeline ------------------------------------------------------------------------------
def _schedule(names: tuple[str, ...]) -> Schedule:
    """Odd steps reuse every ffn; every third step the attentions of block 1 too."""
    rows = np.ones((STEPS, len(names)), dtype=bool)
    for step in range(1, STEPS):
        for column, name in enumerate(names):
            if (step % 2 == 1 and name.endswith(".ffn")) or (step % 3 == 2 and name.startswith("blocks.1.attn")):
                rows[step, column] = False
    return Schedule(rows, sublayers=names, mode="general", source="parity schedule")


def _request(seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Latents (2, C, F', H', W') and embeddings by the pipeline's argument names: the rows past each prompt zeroed,
    as the pipeline's UMT5 encoding leaves them."""
    generator = torch.Generator().manual_seed(seed)
    width = WAN_CONFIG["text_dim"]
    embeds = torch.randn(2, PROMPT_TOKENS, width, generator=generator)
    negative = torch.randn(2, PROMPT_TOKENS, width, generator=generator)
    embeds[1, 5:] = 0
    negative[:, 3:] = 0
    return torch.randn(2, *LATENTS, generator=generator), {"prompt_embeds": embeds, "negative_prompt_embeds": negative}


def _pipeline_latents(folder, latents, conditioning, schedule: Schedule | None, cfg_scale: float) -> np.ndarray:
    pipe = load_pipeline(folder)
    passes = 2 if cfg_scale > 1 else 1
    hooks = (schedule_hooks(pipe.transformer, schedule.sublayer_names, schedule.compute, passes)
             if schedule is not None else contextlib.nullcontext([STEPS * passes]))
    arguments = conditioning if cfg_scale > 1 else {"prompt_embeds": conditioning["prompt_embeds"]}
    with torch.no_grad(), hooks as calls:
        out = pipe(prompt=None, latents=latents.clone(), num_inference_steps=STEPS, guidance_scale=cfg_scale,
                   num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH, output_type="latent", **arguments).frames
    assert calls[0] == STEPS * passes
    return out.numpy()


@pytest.fixture(scope="module")
def wan_build(tiny_diffusers, tmp_path_factory):
    """``build --diffusers DIR --steps 6 --num-frames 5 --image-size 16x32 --schedule s.json`` of the tiny Wan2.1
    (CLI, a real subprocess), its request files beside; tests read it, never change it."""
    root = tmp_path_factory.mktemp("wan-build")
    folder = tiny_diffusers("wan", "flow")
    found, config = _sized(folder)
    schedule = _schedule(found.family.sublayer_names(config))
    schedule.save(root / "s.json")
    latents, conditioning = _request()
    np.save(root / "z.npy", latents.numpy())
    np.savez(root / "cond.npz", **{name: value.numpy() for name, value in conditioning.items()})
    run_cli("build", "--diffusers", str(folder), "--steps", str(STEPS), "--num-frames", str(NUM_FRAMES),
            "--image-size", f"{HEIGHT}x{WIDTH}", "--schedule", str(root / "s.json"), "--out", str(root / "E"))
    return root, folder, schedule, latents, conditioning


@pytest.mark.slow
def test_build_and_run_equal_the_pipeline_full_and_with_a_schedule(wan_build):
    """run --noise z.npy --conditioning cond.npz --cfg-scale 4 --save-latents equals WanPipeline (output_type="latent",
    guidance_scale 4, the same 5-D latents and embeddings) to 1e-4 of the range, with --full and with the schedule
    (the pipeline with hooks, one cache per pass); without guidance (scale 1) the negatives are not run, as the
    pipeline's."""
    root, folder, schedule, latents, conditioning = wan_build
    manifest = json.loads((root / "E" / "manifest.json").read_text())
    assert manifest["model"]["latent_layout"] == "ncfhw"
    assert manifest["model"]["inputs"][0]["shape"] == ["batch", *LATENTS]
    assert [(t["role"], t.get("kind")) for t in manifest["model"]["inputs"]] == [
        ("sample", None), ("time", None), ("conditioning", "token_embeddings")]
    assert manifest["guidance"]["rule"] == "classifier_free" and manifest["model"]["max_sequence_length"] == 512
    results = {}
    for full, cfg_scale in ((True, CFG_SCALE), (False, CFG_SCALE), (True, 1.0)):
        out = root / f"out-{full}-{cfg_scale}.npy"
        cond = root / ("cond.npz" if cfg_scale > 1 else "cond-positive.npz")
        if cfg_scale == 1:
            np.savez(cond, prompt_embeds=conditioning["prompt_embeds"].numpy())
        run_cli("run", str(root / "E"), "--noise", str(root / "z.npy"), "--conditioning", str(cond),
                "--cfg-scale", str(cfg_scale), "--save-latents", str(out), *(["--full"] if full else []))
        want = _pipeline_latents(folder, latents, conditioning, None if full else schedule, cfg_scale)
        got = results[full, cfg_scale] = np.load(out)
        assert got.shape == want.shape == tuple(latents.shape)
        assert np.abs(got - want).max() <= 1e-4 * np.ptp(want), (full, cfg_scale, np.abs(got - want).max())
    # the schedule's reuse and the guidance each change the latents well beyond the tolerance
    assert np.abs(results[True, CFG_SCALE] - results[False, CFG_SCALE]).max() > 2e-4 * np.ptp(results[True, CFG_SCALE])
    assert np.abs(results[True, CFG_SCALE] - results[True, 1.0]).max() > 1e-2 * np.ptp(results[True, CFG_SCALE])
