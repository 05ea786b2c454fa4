"""Qwen-Image from a diffusers folder (issue 29): ``QwenImageTransformer2DModel`` as ``QwenImagePipeline`` samples
it, flow matching with dynamic exponential shifting and ``shift_terminal``, true CFG rescaled per token to the
conditional norm, prompt and negative prompt of different lengths. A tiny random transformer and VAE saved with
``save_pretrained`` (no text encoder); the reference is diffusers' own pipeline on the same latents and embeddings,
with forward hooks that make the named sub-modules return their last computed output (one cache per pass: the
pipeline calls the transformer for the prompt, then for the negative prompt)."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from l2c_export.core.schedule import Schedule
from l2c_export.models.diffusers import read_folder

from .conftest import run_cli
from .diffusers_pipelines import QWEN_CONFIG, load_pipeline, schedule_hooks

STEPS = 12
CFG_SCALE = 3.0
IMAGE_SIZE = 16  # pixels; the tiny VAE's scale factor is 2, so 8 x 8 latents, 16 packed tokens
PROMPT_TOKENS, NEGATIVE_TOKENS = 7, 4  # neither the traced length (5): the prompt axis is dynamic


def _sized(folder):
    found = read_folder(folder)
    return found, found.family.sized_config(found.config, IMAGE_SIZE, found.vae_scale_factor)


def test_sublayers_cached_shapes_and_the_vae_scale_factor(tiny_diffusers):
    """attn (joint: image + text tokens), img_mlp, txt_mlp per block, in forward order; the scale factor is the
    pipeline's 2 ** len(temperal_downsample) of its AutoencoderKLQwenImage."""
    found, config = _sized(tiny_diffusers("qwen", "flow"))
    assert found.vae_scale_factor == 2 and found.family.num_tokens(config) == 16
    names = found.family.sublayer_names(config)
    assert names == tuple(f"transformer_blocks.{i}.{s}" for i in range(2) for s in ("attn", "img_mlp", "txt_mlp"))
    shapes = dict(zip(names, found.family.cached_shapes(config)))
    assert shapes["transformer_blocks.1.attn"] == ("joint_tokens", 16)
    assert shapes["transformer_blocks.1.img_mlp"] == (16, 16)
    assert shapes["transformer_blocks.1.txt_mlp"] == ("prompt_tokens", 16)


def test_the_cached_forward_is_diffusers_transformer_with_reused_modules(tiny_diffusers):
    """The family's forward (real-arithmetic rotary, the text positions gathered by the prompt's length, a padded
    mask) equals diffusers' transformer called as the pipeline calls it, computing everything and with modules
    reused from the previous call (diffusers with hooks)."""
    found, config = _sized(tiny_diffusers("qwen", "flow"))
    model = found.family.load(found.transformer_dir, config)
    reference = load_pipeline(tiny_diffusers("qwen", "flow")).transformer.eval()
    names = found.family.sublayer_names(config)
    rows = np.ones((2, len(names)), dtype=bool)
    rows[1, [names.index("transformer_blocks.0.attn"), names.index("transformer_blocks.1.txt_mlp")]] = False
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, PROMPT_TOKENS, QWEN_CONFIG["joint_attention_dim"], generator=generator)
    mask = torch.ones(2, PROMPT_TOKENS)
    mask[1, 5:] = 0
    cache: dict[int, torch.Tensor] = {}
    with torch.no_grad(), schedule_hooks(reference, names, rows):
        for call, row in enumerate(rows):
            latents = torch.randn(2, 16, QWEN_CONFIG["in_channels"], generator=generator)
            timestep = torch.tensor([900.0, 600.0][call]).expand(2)
            want = reference(hidden_states=latents, timestep=timestep / 1000, encoder_hidden_states=embeds,
                             encoder_hidden_states_mask=mask, img_shapes=[[(1, 4, 4)]] * 2, return_dict=False)[0]
            got = model.forward_cached(latents, timestep, embeds, mask, [bool(v) for v in row], cache)
            assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), call
    assert cache[names.index("transformer_blocks.0.attn")].shape == (2, 16 + PROMPT_TOKENS, 16)


# -- build and run against the pipeline ------------------------------------------------------------------------------
def _schedule(names: tuple[str, ...]) -> Schedule:
    """Odd steps reuse both MLPs; every third step the joint attentions too."""
    rows = np.ones((STEPS, len(names)), dtype=bool)
    for step in range(1, STEPS):
        for column, name in enumerate(names):
            if (step % 2 == 1 and name.endswith("_mlp")) or (step % 3 == 2 and name.endswith(".attn")):
                rows[step, column] = False
    return Schedule(rows, sublayers=names, mode="general", source="parity schedule")


def _request(seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Packed latents (2, 16, 16) and embeddings by the pipeline's argument names: a prompt of 7 tokens (the second
    padded after 5) and a negative prompt of 4 (the first padded after 3)."""
    generator = torch.Generator().manual_seed(seed)
    width = QWEN_CONFIG["joint_attention_dim"]
    mask, negative_mask = torch.ones(2, PROMPT_TOKENS), torch.ones(2, NEGATIVE_TOKENS)
    mask[1, 5:] = 0
    negative_mask[0, 3:] = 0
    conditioning = {"prompt_embeds": torch.randn(2, PROMPT_TOKENS, width, generator=generator),
                    "prompt_embeds_mask": mask,
                    "negative_prompt_embeds": torch.randn(2, NEGATIVE_TOKENS, width, generator=generator),
                    "negative_prompt_embeds_mask": negative_mask}
    return torch.randn(2, 16, QWEN_CONFIG["in_channels"], generator=generator), conditioning


def _pipeline_latents(folder, latents, conditioning, schedule: Schedule | None, cfg_scale: float) -> np.ndarray:
    pipe = load_pipeline(folder)
    passes = 2 if cfg_scale > 1 else 1
    hooks = (schedule_hooks(pipe.transformer, schedule.sublayer_names, schedule.compute, passes)
             if schedule is not None else contextlib.nullcontext([STEPS * passes]))
    with torch.no_grad(), hooks as calls:
        out = pipe(prompt=None, latents=latents.clone(), num_inference_steps=STEPS, true_cfg_scale=cfg_scale,
                   height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="latent", **conditioning).images
    assert calls[0] == STEPS * passes
    return out.numpy()


@pytest.fixture(scope="module")
def qwen_build(tiny_diffusers, tmp_path_factory):
    """``build --diffusers DIR --steps 12 --image-size 16 --schedule s.json`` of the tiny Qwen-Image (CLI, a real
    subprocess), its request files beside; tests read it, never change it."""
    root = tmp_path_factory.mktemp("qwen-build")
    folder = tiny_diffusers("qwen", "flow")
    found, config = _sized(folder)
    schedule = _schedule(found.family.sublayer_names(config))
    schedule.save(root / "s.json")
    latents, conditioning = _request()
    np.save(root / "z.npy", latents.numpy())
    np.savez(root / "cond.npz", **{name: value.numpy() for name, value in conditioning.items()})
    run_cli("build", "--diffusers", str(folder), "--steps", str(STEPS), "--image-size", str(IMAGE_SIZE),
            "--schedule", str(root / "s.json"), "--out", str(root / "E"))
    return root, folder, schedule, latents, conditioning


@pytest.mark.slow
def test_build_and_run_equal_the_pipeline_full_and_with_a_schedule(qwen_build):
    """run --noise z.npy --conditioning cond.npz --cfg-scale 3 --save-latents equals QwenImagePipeline
    (output_type="latent", true_cfg_scale 3, the same latents and embeddings; the negative prompt shorter than the
    prompt) to 1e-4 of the range, with --full and with the schedule (the pipeline with hooks, one cache per pass);
    without guidance (scale 1) the negatives are not run, as the pipeline's."""
    root, folder, schedule, latents, conditioning = qwen_build
    manifest = json.loads((root / "E" / "manifest.json").read_text())
    assert [(t["role"], t.get("kind")) for t in manifest["model"]["inputs"]] == [
        ("sample", None), ("time", None), ("conditioning", "token_embeddings"), ("conditioning", "token_mask")]
    assert manifest["model"]["latent_layout"] == "packed_2x2"
    assert manifest["guidance"]["rule"] == "true_cfg" and manifest["sampler"]["options"]["shift_terminal"] == 0.02
    assert manifest["model"]["max_sequence_length"] == 512
    results = {}
    for full, cfg_scale in ((True, CFG_SCALE), (False, CFG_SCALE), (True, 1.0)):
        out = root / f"out-{full}-{cfg_scale}.npy"
        run_cli("run", str(root / "E"), "--noise", str(root / "z.npy"), "--conditioning", str(root / "cond.npz"),
                "--cfg-scale", str(cfg_scale), "--save-latents", str(out), *(["--full"] if full else []))
        want = _pipeline_latents(folder, latents, conditioning, None if full else schedule, cfg_scale)
        got = results[full, cfg_scale] = np.load(out)
        assert got.shape == want.shape == tuple(latents.shape)
        assert np.abs(got - want).max() <= 1e-4 * np.ptp(want), (full, cfg_scale, np.abs(got - want).max())
    # the schedule's reuse and the guidance each change the latents well beyond the tolerance
    assert np.abs(results[True, CFG_SCALE] - results[False, CFG_SCALE]).max() > 2e-4 * np.ptp(results[True, CFG_SCALE])
    assert np.abs(results[True, CFG_SCALE] - results[True, 1.0]).max() > 1e-2 * np.ptp(results[True, CFG_SCALE])


@pytest.mark.slow
def test_verify_passes_every_subset(qwen_build):
    root = qwen_build[0]
    assert "agree with PyTorch" in run_cli("verify", str(root / "E")).stdout


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (lambda c: c.pop("negative_prompt_embeds_mask"), "array 'negative_prompt_embeds_mask' is missing"),
    (lambda c: c.update(prompt_embeds_mask=c["prompt_embeds_mask"][:, :5]),
     "array 'prompt_embeds_mask' has shape (2, 5); expected (2, 7)"),
    (lambda c: c.update(negative_prompt_embeds=c["negative_prompt_embeds"][:1]),
     "array 'negative_prompt_embeds' has shape (1, 4, 12); expected (2, L, 12)"),
    (lambda c: c.update(prompt_attention_mask=c["prompt_embeds_mask"]), "unknown array 'prompt_attention_mask'"),
])
def test_conditioning_that_does_not_fit_is_refused_in_one_line(qwen_build, tmp_path, change, message):
    root = qwen_build[0]
    arrays = {name: value.numpy() for name, value in qwen_build[4].items()}
    change(arrays)
    np.savez(tmp_path / "cond.npz", **arrays)
    refused = run_cli("run", str(root / "E"), "--noise", str(root / "z.npy"), "--conditioning",
                      str(tmp_path / "cond.npz"), "--cfg-scale", "3", "--save-latents", str(tmp_path / "o.npy"),
                      check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert message in refused.stderr and not (tmp_path / "o.npy").exists()


def test_true_cfg_rescales_each_token_to_the_conditional_norm():
    """The guidance rule on numpy and torch alike: QwenImagePipeline's comb * (||c|| / ||comb||) per token."""
    from l2c_export.core.interface import TRUE_CFG
    from l2c_export.samplers.guidance import apply_guidance

    generator = np.random.default_rng(0)
    out = generator.standard_normal((4, 16, 8)).astype(np.float32)
    cond, uncond = torch.from_numpy(out[:2]), torch.from_numpy(out[2:])
    comb = uncond + 3.0 * (cond - uncond)
    want = (comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))).numpy()
    for guided in (apply_guidance(out, 3.0, 16, TRUE_CFG),
                   apply_guidance(torch.from_numpy(out), 3.0, 16, TRUE_CFG).numpy()):
        assert np.abs(guided[:2] - want).max() <= 1e-6 and np.abs(guided[2:] - want).max() <= 1e-6
    assert np.abs(apply_guidance(out, 3.0, 16)[:2] - comb.numpy()).max() <= 1e-6


@pytest.mark.slow
def test_decoded_images_equal_the_pipelines(qwen_build, tmp_path):
    """The build carries the folder's AutoencoderKLQwenImage decoder (one frame; the per-channel latents_mean and
    latents_std inside the graph, its record's scaling_factor 1, the packed latents unpacked first):
    L2CPipeline called as QwenImagePipeline (its arrays by their argument names, latents=, true_cfg_scale=,
    output_type="np") equals its output_type="np" images to 1e-3 of the range, guidance_scale being refused naming
    true_cfg_scale; verify's component check passes, and run --out writes the grid."""
    from PIL import Image

    from l2c_export.runtime.pipeline import L2CPipeline
    from l2c_export.tools.verify import verify_components

    root, folder, _, latents, conditioning = qwen_build
    record = json.loads((root / "E" / "manifest.json").read_text())["components"]["vae_decoder"]
    assert record["latent_layout"] == "packed_2x2" and record["scaling_factor"] == 1.0
    assert record["inputs"][0]["shape"] == ["batch", 4, 8, 8] and record["outputs"][0]["shape"] == ["batch", 3, 16, 16]
    arrays = {name: value.numpy() for name, value in conditioning.items()}
    pipe = L2CPipeline.from_pretrained(root / "E")
    got = pipe(**arrays, latents=latents.numpy(), true_cfg_scale=CFG_SCALE, full=True, output_type="np").images
    with pytest.raises(ValueError, match="^guidance_scale: this model's guidance scale is its pipeline's "
                                         "true_cfg_scale .*; pass true_cfg_scale= instead"):
        pipe(**arrays, guidance_scale=CFG_SCALE)
    with torch.no_grad():
        want = load_pipeline(folder)(prompt=None, latents=latents.clone(), num_inference_steps=STEPS,
                                     true_cfg_scale=CFG_SCALE, height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="np",
                                     **conditioning).images
    assert got.shape == want.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and np.ptp(want) > 0.1
    assert np.abs(got - want).max() <= 1e-3 * np.ptp(want), (np.abs(got - want).max(), np.ptp(want))
    (check,) = verify_components(root / "E", folder)
    assert check.passed, check
    run_cli("run", str(root / "E"), "--noise", str(root / "z.npy"), "--conditioning", str(root / "cond.npz"),
            "--cfg-scale", str(CFG_SCALE), "--out", str(tmp_path / "grid.png"))
    assert Image.open(tmp_path / "grid.png").size[0] > 2 * IMAGE_SIZE


@pytest.mark.parametrize("part, changes, message", [
    ("transformer", {"zero_cond_t": True},
     "field 'zero_cond_t' is True; QwenImageTransformer2DModel is supported with zero_cond_t = False only"),
    ("transformer", {"axes_dims_rope": [2, 2, 2]},
     "field 'axes_dims_rope' is [2, 2, 2]; expected three even sizes summing to attention_head_dim 8"),
    ("transformer", {"num_layers": 100000}, "field 'num_layers' is 100000; expected an integer in 1..128"),
    ("vae", {"latents_std": [1.0, 0.0, 1.0, 1.0]}, "field 'latents_std' is [1.0, 0.0, 1.0, 1.0]; expected 4 finite"),
    ("vae", {"z_dim": 8}, "field 'z_dim' is 8; the transformer samples 4 latent channels"),
    ("vae", {"temperal_downsample": [False, True]}, "expected one flag per level after the first (1, dim_mult has 2)"),
    ("scheduler", {"shift_terminal": 1.5}, "field 'shift_terminal' is 1.5; expected null or a finite number in [0, 1)"),
])
def test_a_folder_it_does_not_run_is_refused_by_name(tiny_diffusers, tmp_path, part, changes, message):
    """An option of the transformer, VAE or scheduler this family does not run, or a size out of bounds: one line
    naming the file and field, exit 2, nothing written."""
    import shutil

    folder = shutil.copytree(tiny_diffusers("qwen", "flow"), tmp_path / "copy")
    path = folder / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    refused = run_cli("build", "--diffusers", str(folder), "--image-size", str(IMAGE_SIZE), "--steps", "2", "--out",
                      str(tmp_path / "E"), check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert str(path) in refused.stderr and message in refused.stderr
    assert not (tmp_path / "E").exists()


@pytest.mark.slow
def test_served_requests_are_batched_by_both_lengths_in_process(qwen_build):
    """What the Triton model does with requests it is handed together (no server): the masks are 0/1 inputs of the
    served model, images are merged by guidance scale and by both prompt lengths (a negative prompt of another
    length is another batch), and each image equals L2CPipeline's alone."""
    from l2c_export.runtime.pipeline import L2CPipeline
    from l2c_export.serving.sampling import decode_request, input_ranges, sample_requests, served_inputs

    root, _, _, latents, conditioning = qwen_build
    pipe = L2CPipeline.from_engine_dir(root / "E")
    assert [name for name, *_ in served_inputs(pipe.manifest)][:4] == [
        "prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds", "negative_prompt_embeds_mask"]
    assert input_ranges(pipe.manifest)["negative_prompt_embeds_mask"] == [0, 1]
    arrays = {name: value.numpy() for name, value in conditioning.items()}
    generator = np.random.default_rng(5)
    longer = {**arrays, "negative_prompt_embeds": generator.standard_normal((2, 6, 12)).astype(np.float32),
              "negative_prompt_embeds_mask": np.ones((2, 6), np.float32)}
    sent = [(arrays, latents.numpy()), (longer, latents.numpy()[::-1].copy()), (arrays, latents.numpy() * 0.5)]
    scales = np.full((2, 1), CFG_SCALE, np.float32)
    requests = [decode_request(pipe, noise=noise, cfg_scale=scales, **request) for request, noise in sent]
    results, batch_sizes = sample_requests(pipe, requests)
    assert sum(batch_sizes) == 6 and len(batch_sizes) >= 2  # the 6-token negatives never share a batch with the 4
    for (request, noise), samples in zip(sent, results):
        for i in range(2):
            alone = pipe(conditioning={name: array[i:i + 1] for name, array in request.items()}, cfg_scale=CFG_SCALE,
                         noise=noise[i:i + 1]).samples[0]
            assert np.abs(samples[i] - alone).max() <= 1e-5 * np.ptp(alone)
