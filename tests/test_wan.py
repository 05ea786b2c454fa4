"""Wan2.1 from a diffusers folder (issue 30, point 1): ``WanTransformer3DModel`` as ``WanPipeline`` samples it, text
to video: 5-D latents (N, C, F', H', W') end to end, F' = (num_frames - 1) / 4 + 1; sub-layers ``blocks.{i}.attn1``,
``.attn2``, ``.ffn``; classifier-free guidance with ``negative_prompt_embeds`` (no mask), on only above scale 1. A
tiny random transformer and ``AutoencoderKLWan`` saved with ``save_pretrained`` (no text encoder; the VAE's scale
factors 4 in time and in space), flow-matching Euler with Wan's shift; the reference is diffusers' own pipeline on the
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
HEIGHT, WIDTH = 16, 32  # pixels: 4 x 8 latents at the tiny VAE's scale factor 4, 2 x 4 patches of (1, 2, 2)
LATENTS = (WAN_CONFIG["in_channels"], 2, 4, 8)  # (C, F', H', W'): 16 tokens
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
    assert set(family.cached_shapes(config)) == {(16, 24)}
    records = [tensor.record() for tensor in family.graph_inputs(config)]
    assert records[0]["shape"] == ["batch", *LATENTS] and family.graph_output(config).shape == LATENTS
    assert [(r["role"], r.get("argument"), r.get("negative")) for r in records[1:]] == [
        ("time", None, None), ("conditioning", "prompt_embeds", "negative_prompt_embeds")]
    # 17 frames of 48 x 48 (the acceptance size) at Wan's scale factor 8: 5 latent frames of 6 x 6
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
    assert manifest["macs"]["prompt_tokens"] == 512  # the MACs, and so the ideal speedup, at the pipeline's 512
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


@pytest.mark.slow
def test_a_folder_with_wans_own_unipc_scheduler_runs_as_the_pipeline(tiny_diffusers, tmp_path):
    """Wan2.1's folders ship UniPCMultistepScheduler (flow prediction, flow sigmas, flow_shift 3): build --full and
    run with it equal WanPipeline's latents to 1e-4 of the range, guided."""
    folder = tiny_diffusers("wan", "unipc")
    latents, conditioning = _request()
    np.save(tmp_path / "z.npy", latents.numpy())
    np.savez(tmp_path / "cond.npz", **{name: value.numpy() for name, value in conditioning.items()})
    run_cli("build", "--diffusers", str(folder), "--steps", str(STEPS), "--num-frames", str(NUM_FRAMES),
            "--image-size", f"{HEIGHT}x{WIDTH}", "--out", str(tmp_path / "E"))
    assert json.loads((tmp_path / "E" / "manifest.json").read_text())["sampler"]["kind"] == "diffusers_unipc"
    run_cli("run", str(tmp_path / "E"), "--noise", str(tmp_path / "z.npy"), "--conditioning",
            str(tmp_path / "cond.npz"), "--cfg-scale", str(CFG_SCALE), "--full", "--save-latents",
            str(tmp_path / "out.npy"))
    want = _pipeline_latents(folder, latents, conditioning, None, CFG_SCALE)
    got = np.load(tmp_path / "out.npy")
    assert np.abs(got - want).max() <= 1e-4 * np.ptp(want), np.abs(got - want).max()


def test_the_cached_forward_is_diffusers_transformer_with_reused_modules(tiny_diffusers):
    """The family's forward (its traceable rotary product) equals diffusers' transformer called as the pipeline calls
    it on 5-D latents, computing everything and with modules reused from the previous call (diffusers with hooks)."""
    folder = tiny_diffusers("wan", "flow")
    found, config = _sized(folder)
    model = found.family.load(found.transformer_dir, config)
    reference = load_pipeline(folder).transformer.eval()
    names = found.family.sublayer_names(config)
    rows = np.ones((2, len(names)), dtype=bool)
    rows[1, [names.index("blocks.0.attn1"), names.index("blocks.1.ffn")]] = False
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, PROMPT_TOKENS, WAN_CONFIG["text_dim"], generator=generator)
    cache: dict[int, torch.Tensor] = {}
    with torch.no_grad(), schedule_hooks(reference, names, rows):
        for call, row in enumerate(rows):
            latents = torch.randn(2, *LATENTS, generator=generator)
            timestep = torch.tensor([900.0, 600.0][call]).expand(2)
            want = reference(hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds,
                             return_dict=False)[0]
            got = model.forward_cached(latents, timestep, embeds, [bool(v) for v in row], cache)
            assert got.shape == want.shape == (2, *LATENTS)
            assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), call
    assert cache[names.index("blocks.0.attn1")].shape == (2, 16, 24)


@pytest.mark.slow
def test_verify_passes_every_subset(wan_build):
    """Every subset graph in ONNX Runtime equals the cached PyTorch forward, the build's own and the folder's
    transformer at the build's clip shape (``verify --diffusers``, which also checks the VAE decoder)."""
    root, folder = wan_build[:2]
    assert "agree with PyTorch" in run_cli("verify", str(root / "E")).stdout
    assert "agree with PyTorch" in run_cli("verify", str(root / "E"), "--diffusers", str(folder)).stdout


@pytest.mark.slow
def test_a_seed_draws_the_5d_latents_the_pipeline_draws(wan_build, tmp_path):
    """run --seed S starts from torch's randn of the whole (n, C, F', H', W') batch, as WanPipeline.prepare_latents
    draws it for generator=torch.Generator().manual_seed(S): the same latents out (guided, full compute)."""
    root, folder, _, _, conditioning = wan_build
    run_cli("run", str(root / "E"), "--seed", "7", "--conditioning", str(root / "cond.npz"), "--cfg-scale",
            str(CFG_SCALE), "--full", "--save-latents", str(tmp_path / "out.npy"))
    with torch.no_grad():
        want = load_pipeline(folder)(prompt=None, generator=torch.Generator().manual_seed(7),
                                     num_inference_steps=STEPS, guidance_scale=CFG_SCALE, num_frames=NUM_FRAMES,
                                     height=HEIGHT, width=WIDTH, output_type="latent", **conditioning).frames.numpy()
    got = np.load(tmp_path / "out.npy")
    assert got.shape == want.shape == (2, *LATENTS)
    assert np.abs(got - want).max() <= 1e-4 * np.ptp(want)


def _refused(*args: str, where) -> str:
    refused = run_cli(*args, check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert not where.exists()
    return refused.stderr


@pytest.mark.parametrize("flags, message", [
    (["--num-frames", "6"], "--num-frames 6: expected 4k + 1 frames in 1..1025"),
    (["--num-frames", "5", "--image-size", "20x32"], "--image-size: the height 20 is not a positive multiple of 8"),
    (["--num-frames", "5", "--image-size", "16x"], "expected a positive number of pixels or HEIGHTxWIDTH"),
    (["--num-frames", "129", "--image-size", "16"], "33 patches on an axis; the transformer's rotary embedding has "
                                                     "32 positions (rope_max_seq_len)"),
])
def test_a_clip_shape_it_cannot_sample_is_refused_by_name(tiny_diffusers, tmp_path, flags, message):
    """A frame count not 4k + 1, frames not a multiple of the VAE's factor times the patch, a size that does not
    parse, more positions than the rotary table has: one line naming the flag, exit 2, nothing written."""
    stderr = _refused("build", "--diffusers", str(tiny_diffusers("wan", "flow")), "--steps", "2", *flags, "--out",
                      str(tmp_path / "E"), where=tmp_path / "E")
    assert message in stderr, stderr


def test_an_image_model_refuses_a_clip_shape(tiny_diffusers, tmp_path):
    stderr = _refused("build", "--diffusers", str(tiny_diffusers("dit", "ddim")), "--steps", "2", "--num-frames",
                      "5", "--out", str(tmp_path / "E"), where=tmp_path / "E")
    assert "--num-frames 5: a DiTTransformer2DModel samples images, not clips; leave --num-frames out" in stderr


@pytest.mark.slow
def test_noise_of_the_wrong_rank_is_refused(wan_build, tmp_path):
    """Latents of 4 axes where the build samples (n, C, F', H', W'): one line, exit 2, nothing written."""
    root = wan_build[0]
    np.save(tmp_path / "z.npy", np.zeros((2, 4, 4, 8), np.float32))
    stderr = _refused("run", str(root / "E"), "--noise", str(tmp_path / "z.npy"), "--conditioning",
                      str(root / "cond.npz"), "--save-latents", str(tmp_path / "o.npy"), where=tmp_path / "o.npy")
    assert "has shape (2, 4, 4, 8); expected (2, 4, 2, 4, 8)" in stderr, stderr


@pytest.mark.parametrize("changes, message", [
    ({"image_dim": 1280}, "field 'image_dim' is 1280; WanTransformer3DModel is supported with image_dim = None only"),
    ({"patch_size": [1, 2]}, "field 'patch_size' is [1, 2]; expected a list of 3 to 3 integers in 1..16"),
    ({"attention_head_dim": 11}, "field 'attention_head_dim' is 11; expected an even size"),
    ({"num_layers": 1000}, "field 'num_layers' is 1000; expected an integer in 1..128"),
])
def test_a_folder_it_does_not_run_is_refused_by_name(tiny_diffusers, tmp_path, changes, message):
    """An option of the transformer this family does not run (image to video's image embedding), a bad patch or head
    size, a size out of bounds: one line naming the file and field, exit 2, nothing written."""
    import shutil

    folder = shutil.copytree(tiny_diffusers("wan", "flow"), tmp_path / "copy")
    path = folder / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    stderr = _refused("build", "--diffusers", str(folder), "--num-frames", "5", "--image-size", "16", "--steps", "2",
                      "--out", str(tmp_path / "E"), where=tmp_path / "E")
    assert str(path) in stderr and message in stderr, stderr


@pytest.mark.slow
def test_served_requests_are_batched_and_equal_the_pipeline_alone_in_process(wan_build):
    """What the Triton model does with requests it is handed together (no server): the inputs are the manifest's
    (prompt_embeds, negative_prompt_embeds, 5-D noise), images of one scale and prompt length are merged, and each
    equals L2CPipeline's alone."""
    from l2c_export.runtime.pipeline import L2CPipeline
    from l2c_export.serving.sampling import decode_request, sample_requests, served_inputs

    root, _, _, latents, conditioning = wan_build
    pipe = L2CPipeline.from_engine_dir(root / "E")
    inputs = {name: dims for name, _, dims, _ in served_inputs(pipe.manifest)}
    assert list(inputs)[:2] == ["prompt_embeds", "negative_prompt_embeds"] and inputs["noise"] == list(LATENTS)
    arrays = {name: value.numpy() for name, value in conditioning.items()}
    sent = [(arrays, latents.numpy()), (arrays, latents.numpy()[::-1].copy())]
    scales = np.full((2, 1), CFG_SCALE, np.float32)
    requests = [decode_request(pipe, noise=noise, cfg_scale=scales, **request) for request, noise in sent]
    results, batch_sizes = sample_requests(pipe, requests)
    assert sum(batch_sizes) == 4
    for (request, noise), samples in zip(sent, results):
        assert samples.shape == (2, *LATENTS)
        for i in range(2):
            alone = pipe(conditioning={name: array[i:i + 1] for name, array in request.items()}, cfg_scale=CFG_SCALE,
                         noise=noise[i:i + 1]).samples[0]
            assert np.abs(samples[i] - alone).max() <= 1e-5 * np.ptp(alone)


@pytest.mark.slow
def test_decoded_clips_equal_the_pipelines(wan_build, tmp_path):
    """The build carries the folder's AutoencoderKLWan decoder of every frame (the per-channel latents_mean and
    latents_std inside the graph, the record's scaling_factor 1): L2CPipeline(..., decode=True) decodes (n, 3, F, H,
    W), its frames equal to WanPipeline's output_type="np" frames to 1e-3 of the range, verify's component check passes, and run
    --out writes an animated GIF of F frames. ``result.frames`` is the pipeline's (n, F, H, W, 3) in [0, 1]."""
    from PIL import Image

    from l2c_export.runtime.pipeline import L2CPipeline
    from l2c_export.tools.verify import verify_components

    root, folder, _, latents, conditioning = wan_build
    record = json.loads((root / "E" / "manifest.json").read_text())["components"]["vae_decoder"]
    assert record["latent_layout"] == "ncfhw" and record["scaling_factor"] == 1.0
    assert record["outputs"][0]["shape"] == ["batch", 3, NUM_FRAMES, HEIGHT, WIDTH]
    arrays = {name: value.numpy() for name, value in conditioning.items()}
    result = L2CPipeline.from_engine_dir(root / "E")(conditioning=arrays, noise=latents.numpy(), cfg_scale=CFG_SCALE,
                                                     full=True, decode=True)
    assert result.decoded.shape == (2, 3, NUM_FRAMES, HEIGHT, WIDTH)
    got = result.frames
    with torch.no_grad():
        want = load_pipeline(folder)(prompt=None, latents=latents.clone(), num_inference_steps=STEPS,
                                     guidance_scale=CFG_SCALE, num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH,
                                     output_type="np", **conditioning).frames
    assert got.shape == want.shape == (2, NUM_FRAMES, HEIGHT, WIDTH, 3) and np.ptp(want) > 0.01
    assert np.abs(got - want).max() <= 1e-3 * np.ptp(want), (np.abs(got - want).max(), np.ptp(want))
    (check,) = verify_components(root / "E", folder)
    assert check.passed, check
    common = ["run", str(root / "E"), "--noise", str(root / "z.npy"), "--conditioning", str(root / "cond.npz"),
              "--cfg-scale", str(CFG_SCALE)]
    run_cli(*common, "--out", str(tmp_path / "clip.gif"))
    with Image.open(tmp_path / "clip.gif") as clip:
        assert clip.n_frames == NUM_FRAMES and clip.is_animated


@pytest.mark.slow
@pytest.mark.parametrize("flags, written, message", [
    (["--prompt", "a seven"], "o.npy", "the build has no text encoder and tokenizer (field "
                                       "'components/text_encoder'); give the prompt's arrays (prompt_embeds)"),
    (["--out", "clip.png"], "clip.png", "a clip is written as .gif, .webp, .mp4"),
    (["--out", "clip.avi"], "clip.avi", "a clip is written as .gif, .webp, .mp4"),
])
def test_a_prompt_without_a_text_encoder_and_a_clip_file_it_cannot_write_are_refused(wan_build, tmp_path, flags,
                                                                                    written, message):
    """A prompt to a build without UMT5, a clip to a picture's (.png) or an unknown extension: one line naming it,
    exit 2, nothing written (refused before sampling)."""
    root = wan_build[0]
    request = ["--noise", str(root / "z.npy")] + (["--conditioning", str(root / "cond.npz")]
                                                  if "--prompt" not in flags else [])
    flags = [str(tmp_path / flag) if flag == written else flag for flag in flags]
    stderr = _refused("run", str(root / "E"), *request, *flags, "--save-latents", str(tmp_path / "o.npy"),
                      where=tmp_path / written)
    assert message in stderr, stderr
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.slow
def test_the_triton_repository_serves_5d_latents_and_frames(wan_build, tmp_path):
    """``l2c-export triton`` on a Wan build: the model takes 5-D noise and answers 5-D samples and, through the build's
    VAE decoder, ``frames`` UINT8 (F, H, W, 3) per clip (what the Triton model returns: to_uint8 of the decoded clips,
    frames last)."""
    from l2c_export.core.images import to_uint8

    root = wan_build[0]
    run_cli("triton", str(root / "E"), "--repo", str(tmp_path / "repo"), "--name", "wan")
    config = (tmp_path / "repo" / "wan" / "config.pbtxt").read_text()
    compact = " ".join(config.split())
    assert f'name: "noise" data_type: TYPE_FP32 dims: {" dims: ".join(map(str, LATENTS))}' in compact, config
    assert f'name: "samples" data_type: TYPE_FP32 dims: {" dims: ".join(map(str, LATENTS))}' in compact, config
    assert f'name: "frames" data_type: TYPE_UINT8 dims: {NUM_FRAMES} dims: {HEIGHT} dims: {WIDTH} dims: 3' in compact
    clips = np.linspace(-1, 1, 2 * 3 * NUM_FRAMES * HEIGHT * WIDTH, dtype=np.float32).reshape(
        2, 3, NUM_FRAMES, HEIGHT, WIDTH)
    assert np.array_equal(to_uint8(clips)[1, 4, 7, 9], to_uint8(clips[:, :, 4])[1, 7, 9])
    assert to_uint8(clips).shape == (2, NUM_FRAMES, HEIGHT, WIDTH, 3)


@pytest.mark.slow
def test_a_router_learned_on_wan_trajectories_decodes_builds_and_runs(tiny_diffusers, tmp_path):
    """learn --diffusers on the tiny Wan2.1 (its own 5-D trajectories from prompt and negative embeddings, guided)
    writes a router over the named sub-layers that decodes, builds at the clip's shape and runs."""
    from l2c_export.routers import load_router

    folder = str(tiny_diffusers("wan", "flow"))
    latents, conditioning = _request()
    np.savez(tmp_path / "prompts.npz", **{name: value.numpy() for name, value in conditioning.items()})
    shape = ["--num-frames", str(NUM_FRAMES), "--image-size", f"{HEIGHT}x{WIDTH}", "--steps", "4"]
    router = tmp_path / "router.safetensors"
    run_cli("learn", "--diffusers", folder, *shape, "--conditioning-data", str(tmp_path / "prompts.npz"),
            "--trajectories", "2", "--batch-size", "2", "--iterations", "3", "--mode", "general", "--lr", "0.5",
            "--cfg-scale", str(CFG_SCALE), "--out", str(router))
    learned = load_router(router)
    assert learned.sublayers == [f"blocks.{i}.{s}" for i in range(2) for s in ("attn1", "attn2", "ffn")]
    assert learned.logits.shape == (4, 6) and np.abs(learned.logits[1:]).max() > 0  # the routers moved
    shown = run_cli("schedule", "--diffusers", folder, "--num-frames", str(NUM_FRAMES), "--image-size",
                    f"{HEIGHT}x{WIDTH}", "--router", str(router), "--target-mac-fraction", "0.8").stdout
    assert "blocks.1.ffn" in shown and "MAC fraction" in shown, shown
    run_cli("build", "--diffusers", folder, *shape, "--router", str(router), "--mode", "general",
            "--target-mac-fraction", "0.8", "--out", str(tmp_path / "E"))
    np.save(tmp_path / "z.npy", latents.numpy())
    run_cli("run", str(tmp_path / "E"), "--noise", str(tmp_path / "z.npy"), "--conditioning",
            str(tmp_path / "prompts.npz"), "--cfg-scale", str(CFG_SCALE), "--save-latents", str(tmp_path / "out.npy"))
    out = np.load(tmp_path / "out.npy")
    assert out.shape == (2, *LATENTS) and np.isfinite(out).all()


@pytest.mark.slow
def test_bench_measures_a_clip_build_against_its_ideal_and_its_memory(wan_build, tmp_path):
    """bench on the Wan build (ONNX Runtime): full compute and the schedule on 5-D latents, interleaved, against the
    ideal speedup of the manifest's MACs, whose prompt length (512, the pipeline's) its requests have by default; the
    memory of every subset loaded against the full one alone."""
    root = wan_build[0]
    run_cli("bench", str(root / "E"), "--backend", "onnxruntime", "--repeats", "1", "--batch", "1", "--threads", "1",
            "--json", str(tmp_path / "b.json"))
    manifest = json.loads((root / "E" / "manifest.json").read_text())
    (row,) = json.loads((tmp_path / "b.json").read_text())["results"]
    assert row["ideal_speedup"] == pytest.approx(manifest["macs"]["ideal_speedup"]) and row["ideal_speedup"] > 1
    assert row["prompt_tokens"] == 512 and row["num_subsets"] == len(manifest["subsets"])
    assert row["full_seconds"] > 0 and row["schedule_seconds"] > 0
    assert row["memory_all_engines_bytes"] > 0 and row["memory_full_engine_bytes"] > 0


@pytest.mark.slow
def test_eval_compares_the_schedule_and_the_baselines_on_clips(wan_build, tmp_path):
    """eval --diffusers at the clip's shape: full compute, the schedule and the baselines from the same 5-D noise, PSNR
    and FD to full compute frame by frame (:func:`l2c_export.demo.metrics.frame_psnr`, tested in test_eval.py): each
    of the clip's 2 latent frames (4 x 4 x 8) as an image, in the same table and JSON as the image families'."""
    root, folder = wan_build[:2]
    shown = run_cli("eval", "--diffusers", str(folder), "--num-frames", str(NUM_FRAMES), "--image-size",
                    f"{HEIGHT}x{WIDTH}", "--schedule", str(root / "s.json"), "--conditioning-data",
                    str(root / "cond.npz"), "--num-samples", "2", "--budgets", "0.8", "--random-seeds", "1",
                    "--cfg-scale", str(CFG_SCALE), "--no-int8",
                    "--json", str(tmp_path / "e.json")).stdout
    assert "| l2c | matched |" in shown and "each of the 2 latent frames (4x4x8) of every clip" in shown, shown
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["features"].startswith("frame by frame")
    full, *others = report["results"]
    assert full["method"] == "full" and full["psnr"] is None and full["fd_to_full"] == pytest.approx(0, abs=1e-6)
    assert all(row["psnr"] > 0 and row["fd_to_full"] >= 0 for row in others if row["mac_fraction"] < 1)
