"""The embedded text-to-video model t2v-digits: its clips, prompts and judge, real training steps on a tiny config,
the shipped diffusers folder as diffusers' own ``WanPipeline`` loads and samples it (judged frame by frame), and
``--model t2v-digits`` through build and run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from l2c_export.demo import t2v

from .conftest import run_cli

TINY = t2v.T2VConfig(num_layers=1, attention_head_dim=12, ffn_dim=16, text_width=16, text_layers=1, text_heads=2,
                     vae_base_dim=4, latent_channels=4, vae_frame_steps=40, vae_steps=40, vae_batch_size=2, steps=200,
                     batch_size=16, lr=3e-3, ema_decay=0.5)


def _frames(clips: torch.Tensor) -> np.ndarray:
    """(n, 3, F, H, W) in [-1, 1] -> the pipeline's ``output_type="np"`` frames (n, F, H, W, 3) in [0, 1]."""
    return ((clips.permute(0, 2, 3, 4, 1) + 1) / 2).numpy()


def _digits(count: int) -> tuple[torch.Tensor, list[int]]:
    from l2c_export.demo.train import digits_dataset

    images, labels = digits_dataset()
    return torch.from_numpy(images[-count:]), labels[-count:].tolist()  # the classifier's held-out digits


def test_a_clip_carries_the_digit_edge_to_edge_and_the_judge_reads_digit_and_direction():
    """make_clips: frame k holds the 8x8 digit moved 2k pixels along the direction, centred across it; the judge
    passes the true clips (the classifier's held-out digits), and fails them for another direction or digit."""
    assert t2v.digit_positions("right") == [(4, 0), (4, 2), (4, 4), (4, 6), (4, 8)]
    assert t2v.digit_positions("up") == [(8, 4), (6, 4), (4, 4), (2, 4), (0, 4)]
    images, digits = _digits(40)
    directions = [list(t2v.DIRECTIONS)[i % 4] for i in range(40)]
    clips = t2v.make_clips(images, directions)
    assert clips.shape == (40, 3, t2v.NUM_FRAMES, t2v.FRAME, t2v.FRAME)
    assert torch.equal(clips[0, :, 0, 4:12, 8:16], images[0].expand(3, -1, -1))  # "left" starts at the right edge
    assert clips[0, :, 0, :, :8].eq(-1).all()
    verdict = t2v.judge_clips(_frames(clips), digits, directions)
    assert verdict["motion_ok"].all() and verdict["ok"].mean() >= 0.9, verdict["ok"].mean()
    reversed_ = {"left": "right", "right": "left", "up": "down", "down": "up"}
    assert not t2v.judge_clips(_frames(clips), digits, [reversed_[d] for d in directions])["motion_ok"].any()
    turned = {"left": "up", "right": "down", "up": "left", "down": "right"}
    assert not t2v.judge_clips(_frames(clips), digits, [turned[d] for d in directions])["motion_ok"].any()
    assert t2v.judge_clips(_frames(clips), [(d + 1) % 10 for d in digits], directions)["digit_ok"].mean() < 0.1
    from l2c_export.demo.metrics import DigitClips  # eval's judge of decoded clips: (digit, direction) labels

    judge, labels = DigitClips(clips.shape[1:]), np.array([[d, r] for d, r in zip(digits, directions)], dtype=object)
    assert judge.accuracy(clips.numpy(), labels) == verdict["ok"].mean()
    labels[:, 1] = [reversed_[d] for d in directions]
    assert judge.accuracy(clips.numpy(), labels) == 0.0


def test_prompts_have_held_out_forms_of_trained_words_and_the_tokenizer_pads_as_umt5():
    def words(forms):
        return {word for form in forms for digit in range(10) for direction in t2v.DIRECTIONS
                for word in t2v.caption(form, digit, direction).split()}

    assert words(t2v.HELD_OUT_FORMS) <= words(t2v.TRAIN_FORMS) == words(t2v.TRAIN_FORMS + t2v.CONTEXT_FORMS)
    assert not set(t2v.HELD_OUT_FORMS) & set(t2v.TRAIN_FORMS + t2v.CONTEXT_FORMS)
    assert not set(t2v.TRAIN_FORMS) & set(t2v.CONTEXT_FORMS)

    def parts(form):  # (prefix, "{numeral}" or "{word}", verb)
        tokens = form.split()
        at = next(i for i, token in enumerate(tokens) if token in ("{numeral}", "{word}"))
        return " ".join(tokens[:at]), tokens[at], tokens[at + 1]

    trained = {parts(form) for form in t2v.TRAIN_FORMS + t2v.CONTEXT_FORMS}
    for prefix, kind, verb in map(parts, t2v.HELD_OUT_FORMS):  # every pair of its parts trained, never all three
        assert (prefix, kind, verb) not in trained
        assert {(p, k) for p, k, _ in trained} >= {(prefix, kind)}
        assert {(k, v) for _, k, v in trained} >= {(kind, verb)}
        assert {(p, v) for p, _, v in trained} >= {(prefix, verb)}
    assert t2v.caption(t2v.TRAIN_FORMS[0], 3, "left") == "a 3 moving left"
    tokenizer = t2v.make_tokenizer(t2v.caption_vocabulary())
    encoded = tokenizer(["a 3 moving left"], padding="max_length", max_length=t2v.MAX_SEQUENCE_LENGTH)
    assert encoded.input_ids[0][4:7] == [1, 0, 0] and tokenizer.unk_token_id not in encoded.input_ids[0]
    assert len(t2v.learning_prompts()) == 10 * 4 * len(t2v.TRAIN_FORMS)


@pytest.mark.slow
def test_training_steps_lower_the_vaes_and_the_transformers_losses(tmp_path):
    """A few real steps of each on a tiny config (the transformer on 64 clips' latents); the pipeline of the parts
    saves as a WanPipeline folder that diffusers loads."""
    images, _ = _digits(16)
    clips = t2v.make_clips(images, [list(t2v.DIRECTIONS)[i % 4] for i in range(16)])
    torch.manual_seed(0)
    untrained_vae = t2v.make_vae(TINY)
    vae = t2v.train_vae(TINY, progress=False).requires_grad_(False)

    def reconstruction_error(model):
        with torch.no_grad():
            return float(((model.decode(model.encode(clips).latent_dist.mean).sample - clips) ** 2).mean())

    assert reconstruction_error(vae) < 0.5 * reconstruction_error(untrained_vae)
    images, directions, digits = _clip_set(64)
    with torch.no_grad():
        posterior = vae.encode(t2v.make_clips(images, directions)).latent_dist
    assert posterior.mean.shape == (64, 4, 2, 4, 4)  # Wan's factors: 4 in time (5 -> 2 frames), 4 in space
    mean, std = t2v.latent_statistics(posterior.mean)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    pipe = t2v.make_pipeline(TINY, vae=vae)
    embeds = t2v.training_captions(pipe)
    assert embeds.shape == (10, 4, len(t2v.TRAIN_FORMS) + 1, t2v.MAX_SEQUENCE_LENGTH, TINY.text_width)
    assert embeds[0, 0, -1, 1:].eq(0).all()  # the empty prompt: </s> alone, the rows past it zeroed
    # the latent means alone (std 0): the tiny VAE's posterior noise is far wider than its means' spread
    dataset = (posterior.mean, torch.zeros_like(posterior.std), torch.tensor(digits), torch.arange(64) % 4)
    torch.manual_seed(0)  # the weights train_transformer starts from (it seeds 0, then makes the transformer)
    untrained = t2v.make_transformer(TINY)
    trained = t2v.train_transformer(TINY, vae, embeds, progress=False, dataset=dataset)
    assert _flow_loss(trained, vae, embeds, dataset) < 0.9 * _flow_loss(untrained, vae, embeds, dataset)
    # the context rounds: from the trained weights, on TRAIN_FORMS + CONTEXT_FORMS (20 steps: fit's shortest warm-up)
    assert t2v.train_context_rounds(dataclasses.replace(TINY, context_rounds=0), pipe, trained, 3) is trained
    continued = t2v.train_context_rounds(dataclasses.replace(TINY, context_rounds=1, steps=20), pipe, trained, 3,
                                         progress=False, dataset=dataset)
    assert continued is not trained and _flow_loss(continued, vae, embeds, dataset) < 0.9 * _flow_loss(
        untrained, vae, embeds, dataset)
    pipe.transformer = trained
    pipe.register_modules(transformer=trained)
    t2v.save_t2v(pipe, tmp_path / "t2v", TINY)
    index = json.loads((tmp_path / "t2v" / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["transformer"][1] == "WanTransformer3DModel"
    assert index["text_encoder"][1] == "UMT5EncoderModel" and index["vae"][1] == "AutoencoderKLWan"
    loaded = t2v.load_pipeline(tmp_path / "t2v")
    assert loaded.vae.config.latents_std == std and loaded.vae_scale_factor_temporal == 4


def _clip_set(count: int) -> tuple[torch.Tensor, list[str], list[int]]:
    images, digits = _digits(count)
    return images, [list(t2v.DIRECTIONS)[i % 4] for i in range(count)], digits


def _flow_loss(transformer, vae, embeds, dataset) -> float:
    """The flow-matching loss on the dataset's latent means at fixed sigmas and noise, prompts of the first form."""
    means, _, digits, directions = dataset
    shape = (1, -1, 1, 1, 1)
    x0 = (means - torch.tensor(vae.config.latents_mean).view(shape)) / torch.tensor(vae.config.latents_std).view(shape)
    generator = torch.Generator().manual_seed(123)
    noise = torch.randn(x0.shape, generator=generator)
    sigma = torch.rand(len(x0), generator=generator).view(-1, 1, 1, 1, 1)
    with torch.no_grad():
        velocity = transformer((1 - sigma) * x0 + sigma * noise, timestep=sigma.flatten() * 1000,
                               encoder_hidden_states=embeds[digits, directions, 0], return_dict=False)[0]
    return float(((velocity - (noise - x0)) ** 2).mean())


def test_train_default_refuses_an_occupied_folder_untouched(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    refused = run_cli("train-default", "--model", "t2v-digits", "--steps", "1", "--out", str(occupied), check=False)
    assert refused.returncode == 2 and "a previous t2v-digits folder" in refused.stderr
    assert (occupied / "notes.txt").read_text() == "mine"


# -- the shipped folder ----------------------------------------------------------------------------------------------
def test_the_shipped_folder_is_a_small_standard_wan_folder_with_its_router_beside():
    folder = t2v.T2V_DIR
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 4 * 2 ** 20
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    from safetensors import safe_open

    for weights in folder.rglob("*.safetensors"):
        with safe_open(str(weights), "pt") as file:
            assert {str(file.get_slice(name).get_dtype()) for name in file.keys()} == {"F32"}, weights
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "UniPCMultistepScheduler" and scheduler["use_flow_sigmas"]
    assert scheduler["prediction_type"] == "flow_prediction" and scheduler["flow_shift"] == t2v.FLOW_SHIFT
    captions = json.loads((folder / "captions.json").read_text())
    assert (captions["num_frames"], captions["height"], captions["max_sequence_length"]) == (
        t2v.NUM_FRAMES, t2v.FRAME, t2v.MAX_SEQUENCE_LENGTH)
    schedule = json.loads((folder / "schedule.json").read_text())
    assert schedule["num_steps"] == t2v.SAMPLE_STEPS and schedule["sublayers"][:3] == [
        "blocks.0.attn1", "blocks.0.attn2", "blocks.0.ffn"]


def test_the_shipped_schedule_is_decoded_from_the_router_learned_on_the_models_own_clips():
    from l2c_export.models.zoo import embedded_default
    from l2c_export.routers import load_router

    spec = embedded_default("t2v-digits")
    assert spec.family.latent_shape(spec.config) == (2, 4, 4) and spec.max_sequence_length == t2v.MAX_SEQUENCE_LENGTH
    schedule, router = spec.schedule(), load_router(spec.default_router)
    assert router.sublayers == list(spec.sublayer_names) and router.logits.shape == (t2v.SAMPLE_STEPS, 12)
    assert router.sampler == spec.sampler().kind == schedule.sampler
    decoded = router.to_schedule(schedule.threshold, schedule.mode, spec.sampler().model_times.tolist())
    assert decoded.compute.tolist() == schedule.compute.tolist()
    assert router.meta["learned_by"] == "l2c-export learn" and "trajectories" in router.meta["data"]
    # counted at the 16 prompt tokens the model reads: it reuses cross-attention, which is cheap at 16 tokens
    assert spec.config.prompt_tokens == t2v.MAX_SEQUENCE_LENGTH
    assert schedule.mac_fraction(spec.family.count_macs(spec.config)) < 0.9


@pytest.mark.slow
def test_wan_pipeline_draws_the_prompted_digit_moving_as_asked():
    """WanPipeline.from_pretrained(the folder; it ignores the router, schedule and captions beside), 20 steps, its
    default guidance 5: at least 90% of 24 clips (every direction, held-out forms among them) show the prompt's
    digit in 2/3 of their frames and move it as asked (the docs' figure is the 240-clip run of python -m
    l2c_export.demo.t2v accuracy)."""
    result = t2v.sample_accuracy(num_samples=24, seed=1, batch_size=24)
    assert result["accuracy"] >= 0.9, result


@pytest.mark.slow
def test_build_model_t2v_digits_full_equals_wan_pipeline_and_its_schedule_draws_the_clips(tmp_path):
    """build --model t2v-digits (the shipped schedule; the clip and prompt length from captions.json), run
    --conditioning with prompts the folder's UMT5 encoded: with --full it equals diffusers' own WanPipeline on the
    same latents to 1e-4 of the range; with the learned schedule, the clips the build's VAE decoder draws are
    judged right."""
    engines = tmp_path / "E"
    run_cli("build", "--model", "t2v-digits", "--out", str(engines))
    manifest = json.loads((engines / "manifest.json").read_text())
    assert len(manifest["subsets"]) > 1  # the learned schedule, not full compute
    pipe = t2v.load_pipeline()
    prompts = t2v.demo_prompts()[5:9]  # held-out forms among them, every direction
    conditioning = t2v.prompt_conditioning(pipe, [text for text, _, _ in prompts])
    np.savez(tmp_path / "cond.npz", **conditioning)
    noise = torch.randn((4, 8, 2, 4, 4), generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "z.npy", noise.numpy())
    latents = {}
    for name, flags in (("full", ["--full"]), ("learned", [])):
        run_cli("run", str(engines), "--conditioning", str(tmp_path / "cond.npz"), "--noise", str(tmp_path / "z.npy"),
                "--save-latents", str(tmp_path / f"{name}.npy"), *flags)
        latents[name] = np.load(tmp_path / f"{name}.npy")
    with torch.no_grad():
        reference = pipe(prompt=None, latents=noise.clone(), output_type="latent", **t2v.sample_kwargs(),
                         **{name: torch.from_numpy(value) for name, value in conditioning.items()}).frames.numpy()
    scale = float(reference.max() - reference.min())
    assert np.abs(latents["full"] - reference).max() <= 1e-4 * scale
    run_cli("run", str(engines), "--conditioning", str(tmp_path / "cond.npz"), "--noise", str(tmp_path / "z.npy"),
            "--out", str(tmp_path / "clips.gif"))
    from PIL import Image

    with Image.open(tmp_path / "clips.gif") as gif:
        assert gif.n_frames == t2v.NUM_FRAMES
    clips = t2v.decode_latents(pipe.vae, latents["learned"])
    verdict = t2v.judge_clips((clips.transpose(0, 2, 3, 4, 1) + 1) / 2, [d for _, d, _ in prompts],
                              [r for _, _, r in prompts])
    assert verdict["ok"].all(), (prompts, verdict)


@pytest.mark.slow
def test_eval_model_t2v_digits_judges_every_methods_decoded_clips_frame_by_frame(tmp_path):
    """eval --model t2v-digits (3 of its prompts, one random seed, the small search): full compute, the learned
    schedule, FORA, random, fewer steps (builds on ONNX Runtime, each reusing the last build's text encoder and VAE
    graphs) and cache-dit's DBCache on diffusers' WanPipeline, from the same noise, each timed; PSNR and FD to full
    compute over the decoded frames, accuracy the clip judge's; cache-dit's compute counted by hooks equals its own
    count with the guidance passes called apart; the grid is an animated image of a row of clips per method."""
    out = tmp_path / "eval.json"
    result = run_cli("eval", "--model", "t2v-digits", "--num-samples", "3", "--batch-size", "3", "--random-seeds", "1",
                     "--search", "small", "--json", str(out), "--grid", str(tmp_path / "grid.gif"))
    report = json.loads(out.read_text())
    rows = {row["method"]: row for row in report["results"]}
    assert tuple(rows) == ("full", "l2c", "fora", "random", "fewer-steps", "cache-dit")
    assert "decoded frames (3x16x16)" in report["features"] and "judge_clips" in report["features"]
    assert report["prompts"]["num_samples"] == 3 and "t2v.evaluation_prompts" in report["prompts"]["source"]
    for method, row in rows.items():
        assert row["fd"] is None and row["seconds_per_image"] > 0, method
        assert np.isfinite(row["fd_to_full"]) and row["accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0), method
        assert method == "full" or np.isfinite(row["psnr"]), method
        if method != "cache-dit":  # the engines' own record of the subsets they ran
            assert row["engines_mac_fraction"] == pytest.approx(row["mac_fraction"], abs=1e-6), method
    assert rows["full"]["fd_to_full"] == 0.0 and rows["full"]["accuracy"] >= 2 / 3
    assert rows["l2c"]["mac_fraction"] == pytest.approx(report["learned_mac_fraction"])
    assert report["learned_mac_fraction"] < 0.9
    assert rows["l2c"]["psnr"] > 30
    peer = rows["cache-dit"]
    assert peer["own_counter"]["block_list"] == "blocks" and "cfg_cached_steps_per_call" in peer["own_counter"]
    assert peer["own_mac_fraction"] == pytest.approx(peer["mac_fraction"], abs=1e-6)
    assert "| l2c | matched |" in result.stdout
    from PIL import Image

    with Image.open(tmp_path / "grid.gif") as grid:  # 3 methods of clips, one per digit of the 3 prompts
        assert grid.n_frames == t2v.NUM_FRAMES and grid.size[1] > 3 * t2v.FRAME * 8
