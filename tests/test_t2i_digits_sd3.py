"""The second embedded text-to-image model, ``t2i-digits-sd3`` (an SD3 MMDiT with flow matching,
:mod:`l2c_export.demo.t2i_sd3`): diffusers' own ``StableDiffusion3Pipeline`` loads it and draws the digit each prompt
names; its training's collapsed padding tokens are exactly the pipeline's attention; ``train-default`` writes a folder
diffusers loads; ``--model t2i-digits-sd3`` builds, and ``run --prompt`` samples as the pipeline does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from l2c_export.demo import t2i, t2i_sd3

from .conftest import run_cli

SMALL = t2i_sd3.SD3Config(num_layers=2, num_attention_heads=2, attention_head_dim=8, clip_l_width=8, clip_g_width=8,
                          clip_projection=4, t5_width=16)


@pytest.fixture(scope="module")
def sd3_build(tmp_path_factory):
    """``build --model t2i-digits-sd3`` (its shipped learned schedule, with the CLIP-L, CLIP-G and T5 encoder,
    tokenizer and VAE decoder graphs)."""
    engines = tmp_path_factory.mktemp("sd3") / "E"
    run_cli("build", "--model", "t2i-digits-sd3", "--out", str(engines))
    return engines


def test_collapsed_padding_attention_equals_the_transformer_on_every_prompt_token():
    """The training's prompts (T5's identical padding tokens kept as a few slots, each with the log of the tokens it
    stands for added to its attention logits) give the transformer's output on the pipeline's whole encode_prompt
    (16 tokens of CLIP-L and CLIP-G side by side, then T5's 256) to 1e-5, a training caption and the empty prompt
    alike."""
    pipe = t2i_sd3.make_pipeline(SMALL, seed=3)
    collapsed = t2i_sd3.collapsed_captions(pipe)
    digit, form = 4, 2
    texts = [t2i.caption(t2i.TRAIN_FORMS[form], digit), ""]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(texts, None, None, do_classifier_free_guidance=False, device="cpu")
    assert embeds.shape[1] == t2i_sd3.CLIP_TOKENS + t2i_sd3.T5_TOKENS
    assert collapsed["embeds"].shape[2] < 40  # the 256 T5 tokens as a few
    transformer = pipe.transformer.eval()
    latents, timestep = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([700.0, 90.0])
    with torch.no_grad():
        want = transformer(latents, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=timestep,
                           return_dict=False)[0]
        processor = t2i_sd3.CollapsedJointAttention()
        transformer.set_attn_processor(processor)
        rows = (digit, digit), (form, len(t2i.TRAIN_FORMS))  # the empty prompt is the last form of every digit
        bias = collapsed["key_bias"][rows]
        processor.key_bias = torch.cat([torch.zeros(2, 16), bias], dim=1)[:, None, None]
        got = transformer(latents, encoder_hidden_states=collapsed["embeds"][rows],
                          pooled_projections=collapsed["pooled"][rows], timestep=timestep, return_dict=False)[0]
    assert torch.allclose(got, want, atol=1e-5)


def test_context_free_clips_give_a_word_the_same_state_in_a_held_out_caption_form():
    """The shipped CLIPs are context-free (position embeddings and attention outputs zero): the digit's word has the
    same penultimate hidden state (the (n, 16, width) the pipeline reads) in a trained caption form and in a held-out
    one, at another position, and every prompt has the same pooled embedding; a CLIP with its context differs."""
    tokenizer = t2i_sd3.make_clip_tokenizer()
    texts = ["a handwritten seven", "a handwritten digit seven"]  # a trained form, a held-out one
    ids = tokenizer(texts, padding="max_length", max_length=t2i_sd3.CLIP_TOKENS, return_tensors="pt").input_ids
    rows, positions = (ids == tokenizer.convert_tokens_to_ids("seven</w>")).nonzero(as_tuple=True)
    assert rows.tolist() == [0, 1] and positions[0] != positions[1]
    states = {}
    for context_free in (True, False):
        torch.manual_seed(0)
        clip = t2i_sd3.make_clip(tokenizer, width=8, projection=4, context_free=context_free)
        with torch.no_grad():
            out = clip(ids, output_hidden_states=True)
        states[context_free] = out.hidden_states[-2][rows, positions]  # (2, width): "seven" in each caption
        if context_free:
            assert torch.allclose(out.text_embeds[0], out.text_embeds[1], atol=1e-6)
    assert torch.allclose(states[True][0], states[True][1], atol=1e-6)
    assert not torch.allclose(states[False][0], states[False][1], atol=1e-3)


@pytest.mark.slow
def test_train_default_writes_an_sd3_folder_that_diffusers_loads_and_samples(tmp_path):
    """train-default --model t2i-digits-sd3 (a few real steps) writes a StableDiffusion3Pipeline folder (three text
    encoders and tokenizers, no pickles) that StableDiffusion3Pipeline.from_pretrained loads and samples 8x8 images
    from a prompt."""
    out = tmp_path / "sd3"
    result = run_cli("train-default", "--model", "t2i-digits-sd3", "--steps", "3", "--batch-size", "4",
                     "--out", str(out))
    assert "StableDiffusion3Pipeline folder" in result.stdout
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["transformer"][1] == "SD3Transformer2DModel"
    assert index["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    assert index["text_encoder_3"][1] == "T5EncoderModel"
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))
    pipe = t2i_sd3.load_pipeline(out)
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and pipe.tokenizer_max_length == t2i_sd3.CLIP_TOKENS
    with torch.no_grad():
        images = pipe("a handwritten seven", num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 1, 8, 8) and torch.isfinite(images).all()


@pytest.mark.slow
def test_diffusers_sd3_pipeline_draws_the_digit_each_trained_caption_form_names():
    """StableDiffusion3Pipeline.from_pretrained(the shipped folder), its defaults (28 steps, guidance 7.0,
    max_sequence_length 256), 70 samples (every trained caption form with every digit, the first 70 of
    evaluation_prompts): the digits classifier reads at least 90% of them as the prompt's digit (the held-out forms'
    figures, measured by ``python -m l2c_export.demo.t2i_sd3 accuracy``, are in docs/schedules-and-learning.md)."""
    result = t2i_sd3.sample_accuracy(num_samples=10 * len(t2i.TRAIN_FORMS), seed=1)
    assert result["held_out_forms"] is None and result["train_forms"] >= 0.9, result


@pytest.mark.slow
def test_model_t2i_digits_sd3_resolves_to_the_shipped_folder_with_its_router_and_schedule():
    from l2c_export.models import zoo

    spec = zoo.resolve(None, "t2i-digits-sd3", None, None)
    assert spec.name == "t2i-digits-sd3" and spec.weights == t2i_sd3.SD3_DIR / "transformer"
    assert spec.config == zoo.from_diffusers(t2i_sd3.SD3_DIR).config
    assert spec.default_schedule == t2i_sd3.SD3_DIR / "schedule.json" and spec.default_router.is_file()
    spec.schedule().check_fits(spec.sampler().num_calls, spec.sublayer_names)
    assert spec.sampler().num_calls == t2i_sd3.SAMPLE_STEPS and spec.cfg_scale == t2i_sd3.GUIDANCE
    listed = run_cli("schedule", "--model", "t2i-digits-sd3", "--schedule", str(spec.default_schedule)).stdout
    assert "transformer_blocks.0.ff_context" in listed and "ideal speedup" in listed


@pytest.mark.slow
def test_run_prompt_full_equals_diffusers_sd3_pipeline_and_the_learned_schedule_draws_the_digits(sd3_build,
                                                                                                  tmp_path):
    """run --prompt --noise --full --save-latents equals StableDiffusion3Pipeline.from_pretrained(t2i-digits-sd3)
    (prompt, latents, output_type="latent") to 1e-4 of the range (the CLIPs, T5 and tokenizers included); with the
    shipped learned schedule the latents, decoded as the pipeline decodes them, are read as the prompts' digits."""
    from l2c_export.demo.classifier import load_classifier

    manifest = json.loads((sd3_build / "manifest.json").read_text())
    assert len(manifest["subsets"]) > 1  # the learned schedule, not full compute
    digits = [7, 3, 0, 9]
    prompts = [t2i.caption(form, d) for d, form in zip(digits, t2i.HELD_OUT_FORMS + t2i.TRAIN_FORMS)]
    noise = np.random.default_rng(3).standard_normal((4, 4, 4, 4)).astype(np.float32)
    np.save(tmp_path / "z.npy", noise)
    flags = [flag for text in prompts for flag in ("--prompt", text)]
    run_cli("run", str(sd3_build), *flags, "--noise", str(tmp_path / "z.npy"), "--full",
            "--save-latents", str(tmp_path / "full.npy"))
    run_cli("run", str(sd3_build), *flags, "--noise", str(tmp_path / "z.npy"), "--save-latents",
            str(tmp_path / "l2c.npy"))
    pipe = t2i_sd3.load_pipeline()
    with torch.no_grad():
        want = pipe(prompts, latents=torch.from_numpy(noise), num_inference_steps=t2i_sd3.SAMPLE_STEPS,
                    output_type="latent").images.numpy()
        got = np.load(tmp_path / "full.npy")
        assert got.shape == want.shape == (4, 4, 4, 4)
        assert np.abs(got - want).max() <= 1e-4 * (want.max() - want.min())
        images = t2i.decode_latents(pipe, torch.from_numpy(np.load(tmp_path / "l2c.npy")))
        read = load_classifier()(images).argmax(dim=1).tolist()
    assert read == digits
