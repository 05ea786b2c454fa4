"""MMDiT families from diffusers folders (issue 21): SD3/3.5 (``StableDiffusion3Pipeline``) and FLUX.1
(``FluxPipeline``), sampled with flow matching. Tiny random transformers saved without text encoders; the reference is
diffusers' own pipeline on the same latents, embeddings and guidance, with forward hooks that make the named
sub-modules return their last computed output at the calls a schedule skips. The folders' tiny VAEs have SD3's and
FLUX.1's scaling and shift factors: the builds' VAE decoders give the pipelines' images."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import onnx
import pytest
import torch

from l2c_export.core.schedule import Schedule
from l2c_export.models.diffusers import read_folder

from .conftest import run_cli
from .diffusers_pipelines import FLUX_CONFIG, SD3_CONFIG, load_pipeline, schedule_hooks

FAMILIES = ("sd3", "sd35", "flux")
STEPS = 8
CFG_SCALE = 3.0
PROMPT_TOKENS = 7  # unlike the traced length (5): the prompt axis of every graph is dynamic
IMAGE_SIZE = 8  # FLUX: pixels; the tiny VAE has one level (scale factor 1), so 8 x 8 latents, 16 packed tokens


def _names(folder) -> tuple[str, ...]:
    found = read_folder(folder)
    return found.family.sublayer_names(found.config)


def test_sd3_sublayers_follow_the_blocks_in_forward_order(tiny_diffusers):
    """SD3: attn, ff, ff_context per block, no ff_context in the last (context_pre_only); SD3.5: attn2 in the
    dual-attention blocks. The order is the one the forward calls them in."""
    assert _names(tiny_diffusers("sd3", "flow")) == (
        "transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
        "transformer_blocks.1.attn", "transformer_blocks.1.ff", "transformer_blocks.1.ff_context",
        "transformer_blocks.2.attn", "transformer_blocks.2.ff")
    folder = tiny_diffusers("sd35", "flow")
    names = _names(folder)
    assert names[:4] == ("transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.0.ff",
                         "transformer_blocks.0.ff_context")
    assert "transformer_blocks.2.attn2" not in names and len(names) == 10
    found = read_folder(folder)
    model = found.family.load(found.transformer_dir, found.config)
    order = []
    for name in names:
        model.transformer.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: order.append(n))
    with torch.no_grad():
        model(*found.family.dummy_inputs(found.config, 2))
    assert tuple(order) == names


def test_flux_sublayers_and_what_each_caches(tiny_diffusers):
    """FLUX.1: double-stream attn/ff/ff_context, then each single-stream block's attn and proj_mlp; the cached
    shapes name the per-request sizes (text + image tokens, text tokens)."""
    found = read_folder(tiny_diffusers("flux", "flow"))
    config = found.family.sized_config(found.config, IMAGE_SIZE, found.vae_scale_factor)
    names = found.family.sublayer_names(config)
    assert names == tuple(f"transformer_blocks.{i}.{s}" for i in range(2) for s in ("attn", "ff", "ff_context")) + \
        tuple(f"single_transformer_blocks.{j}.{s}" for j in range(2) for s in ("attn", "proj_mlp"))
    shapes = dict(zip(names, found.family.cached_shapes(config)))
    assert shapes["transformer_blocks.0.attn"] == ("joint_tokens", 16)
    assert shapes["transformer_blocks.0.ff"] == (16, 16) and shapes["transformer_blocks.0.ff_context"] == (
        "prompt_tokens", 16)
    assert shapes["single_transformer_blocks.1.proj_mlp"] == ("joint_tokens", 16)  # its share of proj_out: D wide


def test_a_reused_single_stream_branch_is_its_share_of_proj_out(tiny_diffusers):
    """The attention and MLP branches of a single-stream block are cached as ``branch @ proj_out``'s columns for that
    branch; with both reused the block equals diffusers' with both modules hooked to their last outputs."""
    found = read_folder(tiny_diffusers("flux", "flow"))
    config = found.family.sized_config(found.config, IMAGE_SIZE, found.vae_scale_factor)
    model = found.family.load(found.transformer_dir, config)
    reference = load_pipeline(tiny_diffusers("flux", "flow")).transformer.eval()
    names = found.family.sublayer_names(config)
    rows = np.ones((2, len(names)), dtype=bool)
    rows[1, [names.index("single_transformer_blocks.0.attn"), names.index("single_transformer_blocks.1.proj_mlp")]] \
        = False
    cache: dict[int, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad(), schedule_hooks(reference, names, rows):
        for call, row in enumerate(rows):
            inputs = found.family.dummy_inputs(config, 2, tokens=PROMPT_TOKENS)
            inputs = (torch.randn(inputs[0].shape, generator=generator), torch.tensor([900.0, 300.0][call:] * 2)[:2],
                      torch.randn(inputs[2].shape, generator=generator), torch.randn(inputs[3].shape,
                                                                                     generator=generator), inputs[4])
            text_ids = torch.zeros(PROMPT_TOKENS, 3)
            want = reference(hidden_states=inputs[0], timestep=inputs[1] / 1000, guidance=inputs[4],
                             pooled_projections=inputs[3], encoder_hidden_states=inputs[2], txt_ids=text_ids,
                             img_ids=found.family.image_ids(config), return_dict=False)[0]
            got = model.forward_cached(*inputs, [bool(v) for v in row], cache)
            assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    block = model.transformer.single_transformer_blocks[0]
    share = cache[names.index("single_transformer_blocks.0.attn")]
    assert share.shape == (2, PROMPT_TOKENS + 16, 16) and block.proj_out.in_features == 16 + 64


def test_macs_count_joint_attention_and_the_proj_out_shares(tiny_diffusers):
    """Joint attention attends over image and text tokens together (2 (T + L)^2 D products); a single-stream
    branch's share of proj_out is charged to the branch."""
    found = read_folder(tiny_diffusers("sd3", "flow"))
    macs = dict(zip(found.family.sublayer_names(found.config), found.family.count_macs(found.config).per_sublayer))
    tokens, prompt, dim = 16, 333, 16
    projections = 4 * tokens * dim * dim + 4 * prompt * dim * dim  # q, k, v, out of each stream
    assert macs["transformer_blocks.0.attn"] == projections + 2 * (tokens + prompt) ** 2 * dim
    assert macs["transformer_blocks.2.attn"] == projections - prompt * dim * dim + 2 * (tokens + prompt) ** 2 * dim
    flux = read_folder(tiny_diffusers("flux", "flow"))
    config = flux.family.sized_config(flux.config, IMAGE_SIZE, flux.vae_scale_factor)
    macs = dict(zip(flux.family.sublayer_names(config), flux.family.count_macs(config).per_sublayer))
    joint = 16 + 512
    assert macs["single_transformer_blocks.0.proj_mlp"] == joint * dim * 64 + joint * 64 * dim
    assert macs["single_transformer_blocks.0.attn"] == 3 * joint * dim * dim + 2 * joint * joint * dim + \
        joint * dim * dim


# -- build and run against the pipeline ------------------------------------------------------------------------------
def _schedule(names: tuple[str, ...]) -> Schedule:
    """Odd calls reuse every feed-forward, attn2 and MLP branch; every third call the attentions too."""
    rows = np.ones((STEPS, len(names)), dtype=bool)
    for call in range(1, STEPS):
        for column, name in enumerate(names):
            if call % 2 == 1 and name.endswith((".ff", ".ff_context", ".attn2", ".proj_mlp")):
                rows[call, column] = False
            if call % 3 == 2 and name.endswith(".attn"):
                rows[call, column] = False
    return Schedule(rows, sublayers=names, mode="general", source="parity schedule")


def _request(family: str, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Latents as the pipeline takes them (FLUX: packed (n, T, 4 C)) and the embeddings by its argument names."""
    generator = torch.Generator().manual_seed(seed)
    width = FLUX_CONFIG["joint_attention_dim"] if family == "flux" else SD3_CONFIG["joint_attention_dim"]
    pooled = FLUX_CONFIG["pooled_projection_dim"] if family == "flux" else SD3_CONFIG["pooled_projection_dim"]
    conditioning = {"prompt_embeds": torch.randn(2, PROMPT_TOKENS, width, generator=generator),
                    "pooled_prompt_embeds": torch.randn(2, pooled, generator=generator)}
    if family == "flux":
        return torch.randn(2, 16, FLUX_CONFIG["in_channels"], generator=generator), conditioning
    conditioning.update(negative_prompt_embeds=torch.randn(2, PROMPT_TOKENS, width, generator=generator),
                        negative_pooled_prompt_embeds=torch.randn(2, pooled, generator=generator))
    return torch.randn(2, 4, 8, 8, generator=generator), conditioning


def _pipeline_latents(family: str, folder, latents, conditioning, schedule: Schedule | None) -> np.ndarray:
    pipe = load_pipeline(folder)
    hooks = (schedule_hooks(pipe.transformer, schedule.sublayer_names, schedule.compute) if schedule is not None
             else contextlib.nullcontext([STEPS]))
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE} if family == "flux" else {}
    with torch.no_grad(), hooks as calls:
        out = pipe(prompt=None, latents=latents.clone(), num_inference_steps=STEPS, guidance_scale=CFG_SCALE,
                   output_type="latent", **size, **conditioning).images
    assert calls[0] == STEPS
    return out.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_build_and_run_equal_the_diffusers_pipeline_full_and_with_a_schedule(tiny_diffusers, family, tmp_path):
    """build --diffusers DIR --steps 8 --schedule s.json (FLUX: --image-size 8), then run --noise z.npy
    --conditioning cond.npz --cfg-scale 3 --save-latents: equal to diffusers' pipeline with output_type="latent" on
    the same latents, embeddings and guidance (SD3: classifier-free with the negatives; FLUX: the guidance
    embedding, no negative batch) to 1e-4 of the range, with --full and with the schedule (the pipeline with hooks);
    verify passes every subset."""
    folder = tiny_diffusers(family, "flow")
    found = read_folder(folder)
    size = ["--image-size", str(IMAGE_SIZE)] if family == "flux" else []
    config = found.family.sized_config(found.config, IMAGE_SIZE if size else None, found.vae_scale_factor)
    schedule = _schedule(found.family.sublayer_names(config))
    schedule.save(tmp_path / "s.json")
    latents, conditioning = _request(family)
    np.save(tmp_path / "z.npy", latents.numpy())
    np.savez(tmp_path / "cond.npz", **{name: value.numpy() for name, value in conditioning.items()})
    engines = tmp_path / "E"
    run_cli("build", "--diffusers", str(folder), "--steps", str(STEPS), "--schedule", str(tmp_path / "s.json"),
            *size, "--out", str(engines))
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["sampler"]["kind"] == "diffusers_flow_match_euler"
    assert [(t["role"], t.get("argument"), t.get("kind"), t.get("negative")) for t in manifest["model"]["inputs"]] == [
        ("sample", None, None, None), ("time", None, None, None),
        *[("conditioning", argument, kind, None if family == "flux" else f"negative_{argument}")
          for argument, kind in (("prompt_embeds", "token_embeddings"), ("pooled_prompt_embeds", "pooled"))],
        *([("conditioning", "guidance_scale", "scalar", None)] if family == "flux" else [])]
    assert manifest["guidance"]["rule"] == ("guidance_embedding" if family == "flux" else "classifier_free")
    assert manifest["guidance"]["scale_argument"] == "guidance_scale"
    assert manifest["model"]["latent_layout"] == ("packed_2x2" if family == "flux" else "nchw")
    assert "agree with PyTorch" in run_cli("verify", str(engines)).stdout
    results = {}
    for full in (True, False):
        out = tmp_path / f"{'full' if full else 'l2c'}.npy"
        run_cli("run", str(engines), "--noise", str(tmp_path / "z.npy"), "--conditioning", str(tmp_path / "cond.npz"),
                "--cfg-scale", str(CFG_SCALE), "--save-latents", str(out), *(["--full"] if full else []))
        want = _pipeline_latents(family, folder, latents, conditioning, None if full else schedule)
        got = results[full] = np.load(out)
        assert got.shape == want.shape == tuple(latents.shape)
        assert np.abs(got - want).max() <= 1e-4 * (want.max() - want.min()), (full, np.abs(got - want).max())
    # the schedule reused: its effect is well above the parity tolerance (random tiny models change little per step)
    assert np.abs(results[True] - results[False]).max() > 2e-4 * np.ptp(results[True])


@pytest.mark.slow
def test_flux_guidance_scale_feeds_the_guidance_embedding(tiny_diffusers, tmp_path):
    """--cfg-scale is FluxPipeline's guidance_scale: another scale gives other latents, and negatives are refused
    (no classifier-free batch runs)."""
    from l2c_export.builder.build import BuildRequest, build
    from l2c_export.models.zoo import from_diffusers
    from l2c_export.runtime.conditioning import ConditioningError
    from l2c_export.runtime.pipeline import L2CPipeline

    spec = from_diffusers(tiny_diffusers("flux", "flow"), IMAGE_SIZE)
    build(BuildRequest(spec=spec, schedule=Schedule.full(4, sublayers=spec.sublayer_names), sampler=spec.sampler(None, 4),
                       out_dir=tmp_path / "E"), progress=False)
    pipe = L2CPipeline.from_engine_dir(tmp_path / "E")
    latents, conditioning = _request("flux")
    arrays = {name: value.numpy() for name, value in conditioning.items()}
    low = pipe(conditioning=arrays, noise=latents.numpy(), cfg_scale=1.0).samples
    high = pipe(conditioning=arrays, noise=latents.numpy(), cfg_scale=5.0).samples
    assert np.abs(low - high).max() > 1e-3 * np.ptp(low)
    with pytest.raises(ConditioningError, match="array 'negative_prompt_embeds' is not used: this model is "
                                                "guidance-distilled"):
        pipe(conditioning={**arrays, "negative_prompt_embeds": arrays["prompt_embeds"]}, noise=latents.numpy())


@pytest.fixture(scope="module")
def sd3_build_2(tiny_diffusers, tmp_path_factory):
    """``build --diffusers`` of the tiny SD3, 2 steps (CLI, a real subprocess); tests read it, never change it."""
    engines = tmp_path_factory.mktemp("sd3-2") / "E"
    run_cli("build", "--diffusers", str(tiny_diffusers("sd3", "flow")), "--steps", "2", "--out", str(engines))
    return engines


@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("pooled_prompt_embeds"), "array 'pooled_prompt_embeds' is missing"),
    (lambda c: c.update(negative_pooled_prompt_embeds=c["negative_pooled_prompt_embeds"][:, :4]),
     "array 'negative_pooled_prompt_embeds' has shape (2, 4); expected (2, 6)"),
    (lambda c: c.update(prompt_attention_mask=np.ones((2, 7))), "unknown array 'prompt_attention_mask'"),
    (lambda c: c["pooled_prompt_embeds"].__setitem__((0, 0), np.nan), "array 'pooled_prompt_embeds': 1 of its 12"),
])
def test_sd3_conditioning_that_does_not_fit_is_refused_in_one_line(sd3_build_2, tmp_path, change, message):
    engines = sd3_build_2
    latents, conditioning = _request("sd3")
    arrays = {name: value.numpy() for name, value in conditioning.items()}
    change(arrays)
    np.savez(tmp_path / "cond.npz", **arrays)
    refused = run_cli("run", str(engines), "--conditioning", str(tmp_path / "cond.npz"), "--cfg-scale", "3",
                      check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert message in refused.stderr


@pytest.mark.slow
def test_image_size_is_flux_only_and_checked(tiny_diffusers, tmp_path):
    sd3 = run_cli("build", "--diffusers", str(tiny_diffusers("sd3", "flow")), "--image-size", "16", "--out",
                  str(tmp_path / "A"), check=False)
    assert sd3.returncode == 2 and "runs at its config's sample_size" in sd3.stderr
    flux = run_cli("build", "--diffusers", str(tiny_diffusers("flux", "flow")), "--image-size", "9", "--out",
                   str(tmp_path / "B"), check=False)
    assert flux.returncode == 2 and "--image-size 9: expected a positive multiple of 2" in flux.stderr
    assert not (tmp_path / "A").exists() and not (tmp_path / "B").exists()


@pytest.mark.slow
def test_a_folder_with_another_scheduler_is_refused_by_name(tiny_diffusers, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(tiny_diffusers("sd3", "flow"), folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "_class_name": "DDIMScheduler"}))
    refused = run_cli("build", "--diffusers", str(folder), "--out", str(tmp_path / "E"), check=False)
    assert refused.returncode == 2
    assert "field '_class_name' is 'DDIMScheduler'; StableDiffusion3Pipeline is run here with " \
           "FlowMatchEulerDiscreteScheduler" in refused.stderr
    path.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True}))
    inverted = run_cli("build", "--diffusers", str(folder), "--out", str(tmp_path / "E"), check=False)
    assert inverted.returncode == 2 and "field 'invert_sigmas' is True" in inverted.stderr


@pytest.mark.slow
def test_a_router_learned_on_a_tiny_sd3_decodes_builds_and_runs(tiny_diffusers, tmp_path):
    """learn --diffusers on SD3's own flow-matching trajectories (the teacher is the full model's velocity) over a
    set of prompts with pooled embeddings writes a router over the named sub-layers; it decodes, builds, runs and
    verifies."""
    folder = str(tiny_diffusers("sd3", "flow"))
    latents, conditioning = _request("sd3")
    np.savez(tmp_path / "prompts.npz", **{name: value.numpy() for name, value in conditioning.items()})
    router = tmp_path / "router.safetensors"
    run_cli("learn", "--diffusers", folder, "--steps", "4", "--conditioning-data", str(tmp_path / "prompts.npz"),
            "--trajectories", "2", "--batch-size", "2", "--iterations", "3", "--mode", "general", "--lr", "0.5",
            "--out", str(router))
    from l2c_export.routers import load_router

    learned = load_router(router)
    assert learned.sublayers == list(_names(folder)) and learned.logits.shape == (4, 8)
    assert np.abs(learned.logits[1:]).max() > 0  # the routers moved
    engines = tmp_path / "E"
    run_cli("build", "--diffusers", folder, "--steps", "4", "--router", str(router), "--mode", "general",
            "--target-mac-fraction", "0.8", "--out", str(engines))
    np.save(tmp_path / "z.npy", latents.numpy())
    run_cli("run", str(engines), "--noise", str(tmp_path / "z.npy"), "--conditioning", str(tmp_path / "prompts.npz"),
            "--save-latents", str(tmp_path / "out.npy"))
    assert np.isfinite(np.load(tmp_path / "out.npy")).all()
    assert "agree with PyTorch" in run_cli("verify", str(engines)).stdout



@pytest.mark.slow
def test_a_router_learned_on_a_tiny_flux_decodes_builds_and_runs(tiny_diffusers, tmp_path):
    """learn --diffusers on FLUX.1 (guidance-distilled: --cfg-scale feeds the guidance embedding of the teacher and
    the student, no negative batch) writes a router over the named sub-layers that decodes, builds at --image-size and
    runs; negative prompts are refused by name, not ignored."""
    folder = str(tiny_diffusers("flux", "flow"))
    latents, conditioning = _request("flux")
    np.savez(tmp_path / "prompts.npz", **{name: value.numpy() for name, value in conditioning.items()})
    router = tmp_path / "router.safetensors"
    common = ["learn", "--diffusers", folder, "--image-size", str(IMAGE_SIZE), "--steps", "4", "--trajectories", "2",
              "--batch-size", "2", "--iterations", "3", "--mode", "general", "--lr", "0.5"]
    run_cli(*common, "--conditioning-data", str(tmp_path / "prompts.npz"), "--out", str(router))
    from l2c_export.routers import load_router

    learned = load_router(router)
    names = tuple(learned.sublayers)
    assert any(name.endswith(".proj_mlp") for name in names) and learned.logits.shape == (4, len(names))
    assert np.abs(learned.logits[1:]).max() > 0  # the routers moved
    engines = tmp_path / "E"
    run_cli("build", "--diffusers", folder, "--image-size", str(IMAGE_SIZE), "--steps", "4", "--router", str(router),
            "--mode", "general", "--target-mac-fraction", "0.8", "--out", str(engines))
    np.save(tmp_path / "z.npy", latents.numpy())
    run_cli("run", str(engines), "--noise", str(tmp_path / "z.npy"), "--conditioning", str(tmp_path / "prompts.npz"),
            "--save-latents", str(tmp_path / "out.npy"))
    assert np.isfinite(np.load(tmp_path / "out.npy")).all()
    negatives = {**{name: value.numpy() for name, value in conditioning.items()},
                 "negative_prompt_embeds": conditioning["prompt_embeds"].numpy()}
    np.savez(tmp_path / "negatives.npz", **negatives)
    refused = run_cli(*common, "--conditioning-data", str(tmp_path / "negatives.npz"), "--out",
                      str(tmp_path / "f.safetensors"), check=False)
    assert refused.returncode == 2 and "array 'negative_prompt_embeds' is not used: this model is guidance-distilled" \
        in refused.stderr


@pytest.mark.slow
def test_eval_on_a_tiny_sd3_the_learned_router_beats_fora_at_a_mac_fraction_of_0_7(tiny_diffusers, tmp_path):
    """Issue 21's acceptance, as a test of the machinery (a tiny random model, not image quality): a router learned on
    the tiny SD3 with flow matching (10 steps, general mode) decodes at a MAC fraction of 0.7 into a schedule that
    builds and runs, and at that fraction (no more MACs than FORA's) its samples are closer to full compute (PSNR)
    than FORA-style reuse's (``eval --diffusers``). Measured: 70.5 dB against FORA's 67.0 (random drop 63.7)."""
    folder = str(tiny_diffusers("sd3", "flow"))
    generator = np.random.default_rng(5)
    width, pooled = SD3_CONFIG["joint_attention_dim"], SD3_CONFIG["pooled_projection_dim"]
    np.savez(tmp_path / "prompts.npz", **{
        f"{prefix}{name}": generator.standard_normal(shape).astype(np.float32)
        for prefix in ("", "negative_") for name, shape in (("prompt_embeds", (4, PROMPT_TOKENS, width)),
                                                            ("pooled_prompt_embeds", (4, pooled)))})
    router = tmp_path / "router.safetensors"
    run_cli("learn", "--diffusers", folder, "--steps", "10", "--conditioning-data", str(tmp_path / "prompts.npz"),
            "--trajectories", "2", "--batch-size", "2", "--iterations", "6", "--mode", "general", "--lr", "0.5",
            "--out", str(router))
    run_cli("eval", "--diffusers", folder, "--router", str(router), "--mode", "general", "--budgets", "0.7",
            "--num-samples", "4", "--random-seeds", "1", "--conditioning-data", str(tmp_path / "prompts.npz"),
            "--json", str(tmp_path / "eval.json"))
    rows = {row["method"]: row for row in json.loads((tmp_path / "eval.json").read_text())["results"]
            if row["point"] == "sweep"}
    learned, fora = rows["l2c"], rows["fora"]
    assert abs(learned["mac_fraction"] - 0.7) < 0.05 and abs(fora["mac_fraction"] - 0.7) < 0.05
    assert learned["mac_fraction"] <= fora["mac_fraction"]
    assert learned["psnr"] > fora["psnr"], (learned, fora)
    engines = tmp_path / "E"
    run_cli("build", "--diffusers", folder, "--steps", "10", "--router", str(router), "--mode", "general",
            "--target-mac-fraction", "0.7", "--out", str(engines))
    manifest = json.loads((engines / "manifest.json").read_text())
    assert abs(manifest["macs"]["schedule_fraction"] - learned["mac_fraction"]) < 1e-3
    latents, conditioning = _request("sd3")
    np.save(tmp_path / "z.npy", latents.numpy())
    np.savez(tmp_path / "cond.npz", **{name: value.numpy() for name, value in conditioning.items()})
    run_cli("run", str(engines), "--noise", str(tmp_path / "z.npy"), "--conditioning", str(tmp_path / "cond.npz"),
            "--save-latents", str(tmp_path / "out.npy"))
    assert np.isfinite(np.load(tmp_path / "out.npy")).all()


@pytest.fixture(scope="module")
def flux_build_16(tiny_diffusers, tmp_path_factory):
    """``build --diffusers`` of the tiny FLUX.1 at --image-size 16, 2 steps (CLI, a real subprocess)."""
    engines = tmp_path_factory.mktemp("flux16") / "E"
    run_cli("build", "--diffusers", str(tiny_diffusers("flux", "flow")), "--image-size", "16", "--steps", "2",
            "--out", str(engines))
    return engines


@pytest.mark.slow
def test_verify_diffusers_checks_a_flux_build_at_its_image_size(tiny_diffusers, flux_build_16):
    """verify --diffusers compares a FLUX.1 build with the folder's transformer at the build's --image-size (not
    the pipeline's default size, which would make the folder's config differ), and still refuses another folder."""
    folder = tiny_diffusers("flux", "flow")
    engines = flux_build_16
    assert json.loads((engines / "manifest.json").read_text())["model"]["config"]["latent_size"] == 16
    passed = run_cli("verify", str(engines), "--diffusers", str(folder))
    assert "agree with PyTorch" in passed.stdout
    other = run_cli("verify", str(engines), "--diffusers", str(tiny_diffusers("sd3", "flow")), check=False)
    assert other.returncode == 2 and "the build did not come from that folder" in other.stderr


@pytest.mark.slow  # a FLUX.1 build, shared with the verify test
def test_flux_proj_out_is_stored_as_its_branches_slices_and_read_back_whole(tiny_diffusers, flux_build_16):
    """Each single-stream proj_out is held in weights.bin as its two branches' transposed column slices, which the
    graphs read directly (a runtime folding Transpose(Slice(W)) would copy them into every subset session); the
    PyTorch reference reassembles the folder's weights from them exactly."""
    from l2c_export.core import manifest as manifest_io
    from l2c_export.models.zoo import from_diffusers
    from l2c_export.runtime.backends.torch import model_from_manifest

    folder, engines = tiny_diffusers("flux", "flow"), flux_build_16
    data = manifest_io.load(engines)
    names = {t["name"]: t["shape"] for t in data["weight_tensors"]}
    inner = FLUX_CONFIG["num_attention_heads"] * FLUX_CONFIG["attention_head_dim"]
    for j in range(FLUX_CONFIG["num_single_layers"]):
        stem = f"transformer.single_transformer_blocks.{j}.proj_out.weight"
        assert names[f"{stem}.T[0:{inner}]"] == [inner, inner]
        assert names[f"{stem}.T[{inner}:{5 * inner}]"] == [4 * inner, inner]
        assert stem not in names and f"{stem}.T" not in names
    full = onnx.load(engines / "full.onnx", load_external_data=False)
    single = "transformer.single_transformer_blocks."
    read = {name for node in full.graph.node for name in node.input if name.startswith(single)
            and ".proj_out.weight" in name}
    assert read == {name for name in names if name.startswith(single) and ".proj_out.weight" in name}
    rebuilt = model_from_manifest(data, engines).state_dict()
    spec = from_diffusers(folder, 16)
    for name, tensor in spec.load_model().state_dict().items():
        assert torch.equal(rebuilt[name], tensor), name


@pytest.mark.slow
def test_sd3_position_embedding_crop_is_a_weight_of_its_own(tiny_diffusers, tmp_path):
    """SD3 reads its position-embedding table (pos_embed_max_size on a side) through Reshape, Slice, Slice, Reshape:
    the crop for the build's size. The export folds that parameter-only chain into a weight of its own, so that no
    ONNX Runtime session folds a private copy: the graphs read the crop (by the Add alone), not the table, and no op
    of theirs reads initializers and constants alone; ONNX Runtime's optimised graph (the backend's options, the
    weights shared) holds no float tensor of its own made from the table. The table stays in weights.bin, whole, and the
    PyTorch reference reads it back."""
    import onnxruntime as ort

    from l2c_export.builder.build import BuildRequest, build
    from l2c_export.core import manifest as manifest_io
    from l2c_export.export.onnx import _FOLDABLE
    from l2c_export.models.zoo import from_diffusers
    from l2c_export.runtime.backends import check_graph, graph_path, weight_arrays
    from l2c_export.runtime.backends.onnxruntime import OPTIMIZATION_LEVELS, _set_up_environment
    from l2c_export.runtime.backends.torch import model_from_manifest

    spec = from_diffusers(tiny_diffusers("sd3", "flow"))
    engines = tmp_path / "E"
    build(BuildRequest(spec=spec, schedule=_schedule(spec.sublayer_names), sampler=spec.sampler(None, STEPS),
                       out_dir=engines), progress=False)
    data = manifest_io.load(engines)
    arrays = weight_arrays(data, engines)
    table_name = "transformer.pos_embed.pos_embed"
    (crop_name,) = [name for name in arrays if name.startswith(table_name + "@")]
    side, grid = SD3_CONFIG["pos_embed_max_size"], SD3_CONFIG["sample_size"] // SD3_CONFIG["patch_size"]
    width = SD3_CONFIG["num_attention_heads"] * SD3_CONFIG["attention_head_dim"]
    table = arrays[table_name].reshape(side, side, width)
    top = (side - grid) // 2
    np.testing.assert_array_equal(arrays[crop_name],
                                  table[top:top + grid, top:top + grid].reshape(1, grid * grid, width))
    _set_up_environment(None)
    for record in data["subsets"]:
        graph = onnx.load(graph_path(engines, record), load_external_data=False).graph
        initializers = {tensor.name for tensor in graph.initializer}
        constants = initializers | {node.output[0] for node in graph.node if node.op_type == "Constant"}
        assert table_name not in initializers and crop_name in initializers
        assert [node.op_type for node in graph.node if crop_name in node.input] == ["Add"]
        assert not [node.name for node in graph.node if node.op_type in _FOLDABLE
                    and set(node.input) & initializers and set(node.input) - {""} <= constants]
        options = ort.SessionOptions()
        options.graph_optimization_level = OPTIMIZATION_LEVELS["extended"]
        options.use_per_session_threads = False
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.optimized_model_filepath = str(tmp_path / f"optimized-{record['index']}.onnx")
        shared = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arrays[name]))
                  for name in check_graph(engines, record, data)}
        for name, value in shared.items():
            options.add_initializer(name, value)
        ort.InferenceSession(str(graph_path(engines, record)), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
        own = [tensor.name for tensor in optimized.initializer if tensor.name not in arrays
               and tensor.data_type == onnx.TensorProto.FLOAT]  # not the int64 shape constants
        assert not [name for name in own if "pos_embed" in name], own
    rebuilt = model_from_manifest(data, engines).state_dict()
    assert torch.equal(rebuilt[table_name], spec.load_model().state_dict()[table_name])


@pytest.mark.slow
def test_eval_on_a_tiny_flux_at_its_image_size_without_negatives(tiny_diffusers, tmp_path):
    """eval --diffusers on FLUX.1 (--image-size 8): prompts without negatives (guidance-distilled: --cfg-scale feeds
    the guidance embedding), every method measured against full compute."""
    folder = str(tiny_diffusers("flux", "flow"))
    _, conditioning = _request("flux")
    np.savez(tmp_path / "prompts.npz", **{name: value.numpy() for name, value in conditioning.items()})
    names = _names(folder)
    rows = np.ones((4, len(names)), dtype=bool)
    rows[1::2, 1::2] = False
    Schedule(rows, sublayers=names, mode="general").save(tmp_path / "s.json")
    run_cli("eval", "--diffusers", folder, "--image-size", str(IMAGE_SIZE), "--schedule", str(tmp_path / "s.json"),
            "--budgets", "", "--num-samples", "2", "--random-seeds", "1", "--conditioning-data",
            str(tmp_path / "prompts.npz"), "--json", str(tmp_path / "eval.json"))
    report = json.loads((tmp_path / "eval.json").read_text())
    learned = next(row for row in report["results"] if row["method"] == "l2c")
    assert learned["mac_fraction"] < 1.0 and np.isfinite(learned["psnr"])
    refused = run_cli("eval", "--diffusers", folder, "--image-size", "7", "--schedule", str(tmp_path / "s.json"),
                      "--conditioning-data", str(tmp_path / "prompts.npz"), check=False)
    assert refused.returncode == 2 and "--image-size 7: expected a positive multiple of 2" in refused.stderr


# -- the VAE decoder -------------------------------------------------------------------------------------------------
def test_unpacking_flux_latents_equals_flux_pipelines():
    """unpack_latents (numpy, core's, which the runtime's ImageDecoder uses) equals FluxPipeline._unpack_latents, on
    a non-square size with the pipeline's scale factor; a token count that does not fit the size is refused."""
    from diffusers import FluxPipeline

    from l2c_export.core.latents import packed_2x2_shape, unpack_latents
    from l2c_export.runtime import components

    assert components.unpack_latents is unpack_latents
    packed = torch.randn(2, 2 * 3, 4 * 5, generator=torch.Generator().manual_seed(0))
    want = FluxPipeline._unpack_latents(packed, 4 * 8, 6 * 8, 8).numpy()
    got = unpack_latents(packed.numpy(), 4, 6)
    assert got.shape == want.shape == (2, 5, 4, 6)
    np.testing.assert_array_equal(got, want)
    assert tuple(FluxPipeline._pack_latents(torch.from_numpy(got), 2, 5, 4, 6).shape[1:]) == packed_2x2_shape(5, 4, 6)
    with pytest.raises(ValueError, match=r"packed latents \(2, 6, 20\): expected \(n, 4, 4 C\) for 4 x 4 latents"):
        unpack_latents(packed.numpy(), 4, 4)


@pytest.mark.slow
@pytest.mark.parametrize("family", ("sd3", "flux"))
def test_decoded_images_equal_the_pipelines(tiny_diffusers, family, tmp_path):
    """SD3 and FLUX.1 builds carry the folder's VAE decoder, its record the VAE's scaling and shift factors (FLUX.1:
    its packed latents' layout): L2CPipeline(..., decode=True) equals the pipeline's output_type="np" images on the
    same latents, embeddings and guidance to 1e-4 of the range (the latents scaled, shifted and, for FLUX.1,
    unpacked as the pipelines do), verify's component check passes, and run --out writes the grid."""
    from l2c_export.core.manifest import load
    from l2c_export.runtime.pipeline import L2CPipeline
    from l2c_export.tools.verify import verify_components

    from .diffusers_pipelines import VAE_FACTORS

    folder = tiny_diffusers(family, "flow")
    size = ["--image-size", str(IMAGE_SIZE)] if family == "flux" else []
    latents, conditioning = _request(family)
    np.save(tmp_path / "z.npy", latents.numpy())
    np.savez(tmp_path / "cond.npz", **{name: value.numpy() for name, value in conditioning.items()})
    engines = tmp_path / "E"
    run_cli("build", "--diffusers", str(folder), "--steps", str(STEPS), *size, "--out", str(engines))
    record = load(engines)["components"]["vae_decoder"]
    assert record["scaling_factor"] == pytest.approx(VAE_FACTORS[family]["scaling_factor"])
    assert record["shift_factor"] == pytest.approx(VAE_FACTORS[family]["shift_factor"])
    assert record["latent_layout"] == ("packed_2x2" if family == "flux" else "nchw")
    assert record["inputs"][0]["shape"] == ["batch", 4, 8, 8]
    arrays = {name: value.numpy() for name, value in conditioning.items()}
    result = L2CPipeline.from_engine_dir(engines)(conditioning=arrays, noise=latents.numpy(), cfg_scale=CFG_SCALE,
                                                  full=True, decode=True)
    got = np.clip(result.decoded.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
    pipe = load_pipeline(folder)
    pixels = {"height": IMAGE_SIZE, "width": IMAGE_SIZE} if family == "flux" else {}
    with torch.no_grad():
        want = pipe(prompt=None, latents=latents.clone(), num_inference_steps=STEPS, guidance_scale=CFG_SCALE,
                    output_type="np", **pixels, **conditioning).images
    assert got.shape == want.shape == (2, 8, 8, 3)
    assert np.ptp(want) > 0.1
    assert np.abs(got - want).max() <= 1e-4 * np.ptp(want), (np.abs(got - want).max(), np.ptp(want))
    (check,) = verify_components(engines, folder)
    assert check.passed, check
    run_cli("run", str(engines), "--noise", str(tmp_path / "z.npy"), "--conditioning", str(tmp_path / "cond.npz"),
            "--cfg-scale", str(CFG_SCALE), "--out", str(tmp_path / "grid.png"))
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size[0] > 2 * 8 * 8  # two 8x8 images, enlarged, side by side


def test_manifest_checks_refuse_a_decoder_that_does_not_fit_the_packed_latents(tiny_diffusers, tmp_path):
    """A packed_2x2 record's input must pack into the sample's shape; the spatial layout must be the sample's; a
    shift factor is a number. A rebuild at another --image-size exports the decoder again (not reused)."""
    from l2c_export.builder.build import BuildRequest, build
    from l2c_export.core.manifest import ManifestError, check_consistency, load, validate
    from l2c_export.models.zoo import from_diffusers

    for size in (2 * IMAGE_SIZE, IMAGE_SIZE):
        spec = from_diffusers(tiny_diffusers("flux", "flow"), size)
        report = build(BuildRequest(spec=spec, schedule=Schedule.full(2, sublayers=spec.sublayer_names),
                                    sampler=spec.sampler(None, 2), out_dir=tmp_path / "E"), progress=False)
    assert "vae_decoder.onnx" not in report.reused
    data = load(tmp_path / "E", verify_files=False)
    assert data["components"]["vae_decoder"]["inputs"][0]["shape"] == ["batch", 4, IMAGE_SIZE, IMAGE_SIZE]
    check_consistency(data, "m")
    wide = json.loads(json.dumps(data))
    wide["components"]["vae_decoder"]["inputs"][0]["shape"] = ["batch", 4, 8, 10]
    with pytest.raises(ManifestError, match=r"'components/vae_decoder/inputs' is \[\['batch', 4, 8, 10\]\]; "
                                            r"expected one input \(batch, C, h, w\), h and w even, that packs 2x2"):
        check_consistency(wide, "m")
    spatial = json.loads(json.dumps(data))
    spatial["components"]["vae_decoder"]["latent_layout"] = "nchw"
    with pytest.raises(ManifestError, match="expected one input of the sample's shape"):
        check_consistency(spatial, "m")
    for bad in ("0.1", True, 1e7):
        shifted = json.loads(json.dumps(data))
        shifted["components"]["vae_decoder"]["shift_factor"] = bad
        with pytest.raises(ManifestError, match="shift_factor"):
            validate(shifted, "m")


def test_tensorrt_profiles_range_the_prompt_up_to_max_sequence_length(tiny_diffusers):
    """A TensorRT build's optimisation profile gives every named size a range: the prompt 1 to the pipeline's
    max_sequence_length (SD3: 333), joint attention's cached image + prompt tokens with it; an unranged name is
    refused rather than passed to TensorRT as a string."""
    from l2c_export.builder.engines import BatchRange, profile_shapes
    from l2c_export.models.zoo import from_diffusers

    spec = from_diffusers(tiny_diffusers("sd3", "flow"))
    family, config = spec.family, spec.config
    records = [t.record() for t in family.graph_inputs(config)] + [
        {"name": f"cache_{k}", "shape": ["batch", *shape]} for k, shape in enumerate(family.cached_shapes(config))]
    shapes = profile_shapes(records, BatchRange(1, 2, 4), family.dim_ranges(config, spec.max_prompt_tokens))
    longest, image, width = spec.max_prompt_tokens, family.num_tokens(config), SD3_CONFIG["joint_attention_dim"]
    assert longest == 333
    assert shapes["encoder_hidden_states"] == ((1, 1, width), (2, longest, width), (4, longest, width))
    inner = family.inner_dim(config)
    assert shapes["cache_0"] == ((1, image + 1, inner), (2, image + longest, inner), (4, image + longest, inner))
    assert shapes["cache_1"] == ((1, image, inner), (2, image, inner), (4, image, inner))
    with pytest.raises(ValueError, match="names a size 'prompt_tokens' with no range"):
        profile_shapes(records, BatchRange(1, 2, 4), {})
