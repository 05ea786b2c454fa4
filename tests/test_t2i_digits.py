"""The embedded text-to-image model t2i-digits: its captions and tokenizer, real training steps on a tiny config, the
shipped diffusers folder as diffusers' own pipeline loads and samples it (read by the digits classifier), and
``--model t2i-digits`` through build and run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from l2c_export.demo import t2i
from l2c_export.demo.train import DiffusionLoss

from .conftest import run_cli

TINY = t2i.T2IConfig(num_layers=1, num_attention_heads=2, attention_head_dim=8, text_width=16, text_layers=1,
                     text_heads=2, vae_channels=(8, 16), vae_steps=40, steps=60, batch_size=32, lr=3e-3,
                     ema_decay=0.5)


def test_captions_have_held_out_forms_made_of_trained_words_and_the_tokenizer_pads_as_t5():
    trained_words = {word for form in t2i.TRAIN_FORMS for d in range(10) for word in t2i.caption(form, d).split()}
    held_out_words = {word for form in t2i.HELD_OUT_FORMS for d in range(10) for word in t2i.caption(form, d).split()}
    assert held_out_words <= trained_words and not set(t2i.HELD_OUT_FORMS) & set(t2i.TRAIN_FORMS)
    assert t2i.caption("a handwritten {word}", 7) == "a handwritten seven"
    tokenizer = t2i.make_tokenizer()
    encoded = tokenizer(["A handwritten SEVEN", "the digit 7 please"], padding="max_length", max_length=8)
    ids = encoded.input_ids
    assert ids[0][3:] == [1, 0, 0, 0, 0] and ids[0][0] != tokenizer.unk_token_id  # </s> then <pad>, as T5
    assert encoded.attention_mask[0] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert ids[1][3] == tokenizer.unk_token_id  # an unknown word
    assert tokenizer([""], padding="max_length", max_length=3).input_ids == [[1, 0, 0]]  # the negative prompt


def _transformer_loss(transformer, vae, embeds, mask) -> float:
    """DiT's loss of ``transformer`` on 128 fixed digits' latents, captions of the first form, fixed noise."""
    from l2c_export.demo.train import digits_dataset

    images, labels = (torch.from_numpy(a[:128]) for a in digits_dataset())
    torch.manual_seed(123)
    with torch.no_grad():
        x0 = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        t = torch.randint(1000, (len(x0),))

        def predict(xt, timestep, digit):
            return transformer(xt, encoder_hidden_states=embeds[digit, 0], encoder_attention_mask=mask[digit, 0],
                               timestep=timestep, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                               return_dict=False)[0]

        return DiffusionLoss()(predict, x0, labels, t).item()


def test_training_steps_lower_the_vaes_and_the_transformers_losses():
    from l2c_export.demo.train import digits_dataset

    images = torch.from_numpy(digits_dataset()[0][:256])
    torch.manual_seed(0)
    untrained_vae = t2i.make_vae(TINY)
    vae = t2i.train_vae(TINY, progress=False).requires_grad_(False)
    with torch.no_grad():
        def reconstruction_error(model):
            return float(((model.decode(model.encode(images).latent_dist.mean).sample - images) ** 2).mean())

        assert reconstruction_error(vae) < 0.5 * reconstruction_error(untrained_vae)
        latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    assert latents.shape == (256, 4, 4, 4) and 0.7 < float(latents.std()) < 1.3  # scaling_factor: unit variance
    pipe = t2i.make_pipeline(TINY, vae=vae)
    embeds, mask = t2i.training_captions(pipe)
    assert embeds.shape == (10, len(t2i.TRAIN_FORMS) + 1, t2i.TRAIN_CAPTION_TOKENS, TINY.text_width)
    assert mask[:, -1].sum(dim=-1).eq(1).all()  # the empty prompt: </s> alone
    torch.manual_seed(0)
    untrained = _transformer_loss(t2i.make_transformer(TINY), vae, embeds, mask)
    trained = t2i.train_transformer(TINY, vae, embeds, mask, progress=False)
    assert _transformer_loss(trained, vae, embeds, mask) < 0.8 * untrained


@pytest.mark.slow
def test_train_default_writes_a_pixart_folder_that_diffusers_loads(tmp_path):
    """train-default --model t2i-digits (a few real steps) writes a PixArtAlphaPipeline folder with tokenizer.json;
    an occupied folder that is not one is refused, untouched."""
    out = tmp_path / "t2i"
    result = run_cli("train-default", "--model", "t2i-digits", "--steps", "3", "--batch-size", "4", "--out", str(out))
    assert "PixArtAlphaPipeline folder" in result.stdout
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtAlphaPipeline" and index["transformer"][1] == "PixArtTransformer2DModel"
    assert index["scheduler"][1] == "DPMSolverMultistepScheduler" and index["text_encoder"][1] == "T5EncoderModel"
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # no pickles
    pipe = t2i.load_pipeline(out)
    assert pipe.vae.config.latent_channels == pipe.transformer.config.in_channels == 4
    assert json.loads((out / "captions.json").read_text())["held_out_forms"] == list(t2i.HELD_OUT_FORMS)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    refused = run_cli("train-default", "--model", "t2i-digits", "--steps", "1", "--out", str(occupied), check=False)
    assert refused.returncode == 2 and "is not a diffusers folder" in refused.stderr
    assert (occupied / "notes.txt").read_text() == "mine"


# -- the shipped folder ----------------------------------------------------------------------------------------------
def test_the_shipped_folder_is_a_small_standard_pixart_folder_with_its_router_beside():
    folder = t2i.T2I_DIR
    sizes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert sizes < 8 * 2 ** 20
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    from safetensors import safe_open

    for weights in folder.rglob("*.safetensors"):
        with safe_open(str(weights), "pt") as file:
            assert {str(file.get_slice(name).get_dtype()) for name in file.keys()} == {"F32"}, weights
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer" / "tokenizer.json"))  # no transformers needed
    assert tokenizer.encode("a handwritten seven").ids[-1] == 1
    schedule = json.loads((folder / "schedule.json").read_text())
    assert schedule["num_steps"] == t2i.SAMPLE_STEPS and schedule["sublayers"][:3] == [
        "transformer_blocks.0.attn1", "transformer_blocks.0.attn2", "transformer_blocks.0.ff"]


def test_the_shipped_schedule_is_decoded_from_the_router_learned_on_the_models_own_prompts():
    from l2c_export.models.zoo import embedded_default
    from l2c_export.routers import load_router

    spec = embedded_default("t2i-digits")
    schedule, router = spec.schedule(), load_router(spec.default_router)
    assert router.sublayers == list(spec.sublayer_names) and router.logits.shape == (t2i.SAMPLE_STEPS, 12)
    assert router.sampler == spec.sampler().kind == schedule.sampler
    decoded = router.to_schedule(schedule.threshold, schedule.mode, spec.sampler().model_times.tolist())
    assert decoded.compute.tolist() == schedule.compute.tolist()
    assert router.meta["learned_by"] == "l2c-export learn" and "trajectories" in router.meta["data"]
    assert schedule.mac_fraction(spec.family.count_macs(spec.config)) < 0.75


def test_the_shipped_general_router_is_learned_as_the_official_one_and_reaches_the_low_budgets():
    """router-general.safetensors (the budget curve's l2c-general): the same sub-layers, sampler, trajectories and
    settings as router.safetensors but general mode; decoded in general mode it meets every budget from 0.3 to 0.9
    within 0.01, where official mode stops at 0.547."""
    from l2c_export.models.zoo import embedded_default
    from l2c_export.routers import load_router
    from l2c_export.routers.baselines import schedule_for_mac_fraction

    spec = embedded_default("t2i-digits")
    official, general = load_router(spec.default_router), load_router(spec.general_router)
    assert general.sublayers == official.sublayers and general.logits.shape == official.logits.shape
    assert general.sampler == official.sampler and general.meta["data"] == official.meta["data"]
    settings = {name: json.loads(router.meta["settings"]) for name, router in (("official", official),
                                                                                ("general", general))}
    assert settings["general"] == {**settings["official"], "mode": "general"}
    macs, timesteps = spec.family.count_macs(spec.config), spec.sampler().model_times.tolist()
    for budget in (0.3, 0.35, 0.5, 0.7, 0.85, 0.9):
        decoded = schedule_for_mac_fraction(general, budget, macs, "general", timesteps)
        assert budget - 0.01 <= decoded.mac_fraction(macs) <= budget, budget
    with pytest.raises(ValueError, match="below the least"):
        schedule_for_mac_fraction(official, 0.5, macs, "official", timesteps)


@pytest.mark.slow
def test_diffusers_pipeline_draws_the_digit_each_prompt_names_including_held_out_caption_forms():
    """PixArtAlphaPipeline.from_pretrained(the folder; it ignores the router, schedule and captions beside), 20
    steps, its default guidance: the digits classifier reads at least 90% of 100 samples (every caption form with
    every digit) as the prompt's digit, on the held-out forms too (the README's figure is the 500-sample run of
    python -m l2c_export.demo.t2i accuracy)."""
    result = t2i.sample_accuracy(num_samples=100, seed=1)
    assert result["accuracy"] >= 0.9, result
    assert result["held_out_forms"] >= 0.9, result


@pytest.mark.slow
def test_model_t2i_digits_resolves_to_the_shipped_folder_with_its_router_and_schedule():
    from l2c_export.models import zoo

    spec = zoo.resolve(None, "t2i-digits", None, None)
    assert spec.name == "t2i-digits" and spec.weights == t2i.T2I_DIR / "transformer"
    assert spec.config == zoo.from_diffusers(t2i.T2I_DIR).config
    assert spec.default_schedule == t2i.T2I_DIR / "schedule.json" and spec.default_router.is_file()
    assert spec.sampler().kind == zoo.from_diffusers(t2i.T2I_DIR).sampler().kind
    spec.schedule().check_fits(spec.sampler().num_calls, spec.sublayer_names)
    listed = run_cli("schedule", "--model", "t2i-digits", "--schedule", str(spec.default_schedule)).stdout
    assert "transformer_blocks.0.attn2" in listed and "ideal speedup" in listed
    refused = run_cli("sample", "--model", "t2i-digits", check=False)  # a text model samples prompt embeddings
    assert refused.returncode == 2 and "array 'prompt_embeds' is missing" in refused.stderr


@pytest.mark.slow
def test_build_model_t2i_digits_runs_its_learned_schedule_on_prompts_from_its_own_t5(t2i_digits_build, tmp_path):
    """build --model t2i-digits (the shipped schedule), run --conditioning with prompts the folder's T5 encoded: with
    --full it equals diffusers' own pipeline on the same latents to 1e-4 of the range; with the learned schedule the
    latents, decoded by the folder's VAE, are read by the classifier as the prompts' digits."""
    from l2c_export.demo.classifier import load_classifier

    engines = t2i_digits_build  # build --model t2i-digits (tests/conftest.py)
    manifest = json.loads((engines / "manifest.json").read_text())
    assert len(manifest["subsets"]) > 1  # the learned schedule, not full compute
    pipe = t2i.load_pipeline()
    digits = [7, 3, 0, 9]
    captions = [t2i.caption(form, d) for d, form in zip(digits, t2i.HELD_OUT_FORMS + t2i.TRAIN_FORMS)]
    conditioning = t2i.prompt_conditioning(pipe, captions)
    np.savez(tmp_path / "cond.npz", **conditioning)
    noise = torch.randn((4, 4, 4, 4), generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "z.npy", noise.numpy())
    latents = {}
    for name, flags in (("full", ["--full"]), ("learned", [])):
        run_cli("run", str(engines), "--conditioning", str(tmp_path / "cond.npz"), "--noise", str(tmp_path / "z.npy"),
                "--save-latents", str(tmp_path / f"{name}.npy"), *flags)
        latents[name] = np.load(tmp_path / f"{name}.npy")
    with torch.no_grad():
        reference = pipe(prompt=None, negative_prompt=None, latents=noise.clone(), num_inference_steps=t2i.SAMPLE_STEPS,
                         output_type="latent", use_resolution_binning=False,
                         **{name: torch.from_numpy(value) for name, value in conditioning.items()}).images.numpy()
    scale = float(reference.max() - reference.min())
    assert np.abs(latents["full"] - reference).max() <= 1e-4 * scale
    with torch.no_grad():
        decoded = pipe.vae.decode(torch.from_numpy(latents["learned"]) / pipe.vae.config.scaling_factor).sample
        predicted = load_classifier()(decoded.clamp(-1, 1)).argmax(dim=1).tolist()
    assert predicted == digits, (captions, predicted)
