"""Prompts in, images out (issues 19 and 20): a build from a diffusers folder with ``text_encoder/``, ``tokenizer/`` and
``vae/`` carries a T5 encoder graph, the tokenizer (read with the ``tokenizers`` library) and a VAE decoder graph,
all hashed in the manifest; ``run --prompt`` equals diffusers' ``PixArtAlphaPipeline`` with the same prompt and
latents, and the decoded images equal the pipeline's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from l2c_export.core.manifest import ManifestError, load
from l2c_export.models.diffusers import DiffusersFolderError, read_folder
from l2c_export.runtime.pipeline import L2CPipeline

from .conftest import made_once, run_cli
from .diffusers_pipelines import CAPTION_CHANNELS, load_pipeline, schedule_hooks
from .test_diffusers import CFG_SCALE, STEPS, _parity_schedule

MAX_TOKENS = 120  # PixArtAlphaPipeline's max_sequence_length
PROMPTS = ["A handwritten Seven ", "the digit 7 drawn in blue"]  # case, spaces and a word outside the vocabulary
LONG_PROMPT = " ".join(["seven", "picture", "of", "number", "xyz"] * 30)  # well over 120 tokens


@pytest.fixture(scope="module")
def text_build(tiny_diffusers, tmp_path_factory):
    """(folder, build, schedule): the tiny PixArt folder with a T5 encoder, tokenizer and VAE, built over the parity
    schedule at 12 DDIM steps, and the noise z.npy (2 latents) beside it; built once for the run (tests/conftest.py's
    made_once: tests/test_hardening_cli.py uses it too), never changed."""
    from diffusers.utils.torch_utils import randn_tensor

    folder = tiny_diffusers("pixart-t5")
    found = read_folder(folder)
    schedule = _parity_schedule(found.family.sublayer_names(found.config))

    def make(root: Path) -> None:
        schedule.save(root / "s.json")
        np.save(root / "z.npy", randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)).numpy())
        run_cli("build", "--diffusers", str(folder), "--steps", str(STEPS), "--schedule", str(root / "s.json"),
                "--out", str(root / "E"))

    return folder, made_once(tmp_path_factory, "text-build", make) / "E", schedule


def _pipeline_output(folder, prompts, noise: np.ndarray, negative_prompt="", schedule=None, output_type="latent"):
    """diffusers' own PixArtAlphaPipeline on the prompts and latents, ``schedule`` applied by hooks."""
    return _pipeline_call(folder, schedule, prompt=prompts, negative_prompt=negative_prompt,
                          latents=torch.from_numpy(noise), guidance_scale=CFG_SCALE, output_type=output_type)


def _pipeline_call(folder, schedule=None, **call):
    """``PixArtAlphaPipeline(**call).images`` of the folder at the build's STEPS (numpy for "latent"), ``schedule``
    applied by hooks."""
    import contextlib

    pipe = load_pipeline(folder)
    hooks = (schedule_hooks(pipe.transformer, schedule.sublayer_names, schedule.compute) if schedule is not None
             else contextlib.nullcontext())
    with torch.no_grad(), hooks:
        images = pipe(num_inference_steps=STEPS, use_resolution_binning=False, **call).images
    return images.numpy() if call.get("output_type") == "latent" else images


def test_the_build_carries_the_text_encoder_tokenizer_and_vae_decoder_with_their_hashes(text_build):
    _, engines, _ = text_build
    manifest = load(engines)
    components = manifest["components"]
    assert sorted(components) == ["prompt_encoding", "text_encoder", "tokenizer", "vae_decoder"]
    assert manifest["model"]["max_sequence_length"] == MAX_TOKENS
    # the stack as data: T5 fed its mask, prompts lower-cased and stripped, the embeddings and the mask the arrays
    assert components["prompt_encoding"] == {
        "max_sequence_length": MAX_TOKENS, "preprocessing": "lower_strip",
        "encoders": [{"encoder": "text_encoder", "tokenizer": "tokenizer", "masked": True, "max_length": MAX_TOKENS}],
        "arrays": {"prompt_embeds": [["text_encoder/last_hidden_state"]],
                   "prompt_attention_mask": [["text_encoder/attention_mask"]]}}
    assert components["text_encoder"]["outputs"][0]["shape"] == ["batch", "prompt_tokens", CAPTION_CHANNELS]
    assert components["vae_decoder"]["inputs"][0]["shape"] == ["batch", 4, 8, 8]
    assert components["vae_decoder"]["scaling_factor"] == pytest.approx(0.18215)
    assert components["tokenizer"]["pad_id"] == 0 and components["tokenizer"]["pad_token"] == "<pad>"
    files = {entry["file"] for c in components.values() for entry in c.values() if isinstance(entry, dict)
             and "sha256" in entry}
    assert files == {"text_encoder.onnx", "text_encoder.weights", "vae_decoder.onnx", "vae_decoder.weights",
                     "tokenizer.json"}
    assert all((engines / file).is_file() for file in files)


def test_tokenizing_equals_the_pipelines_tokenizer_truncation_and_padding_included(text_build):
    """The tokenizers-library mirror of encode_prompt: the same ids and mask as the pipeline's transformers
    tokenizer called as encode_prompt calls it, for short, out-of-vocabulary and over-long prompts."""
    folder, engines, _ = text_build
    encoder = L2CPipeline.from_engine_dir(engines).prompt_encoder
    pipe = load_pipeline(folder)
    texts = [*PROMPTS, LONG_PROMPT, ""]
    ids, mask = encoder.tokenize(texts)
    want = pipe.tokenizer(pipe._text_preprocessing(texts), padding="max_length", max_length=MAX_TOKENS,
                          truncation=True, add_special_tokens=True, return_tensors="np")
    np.testing.assert_array_equal(ids, want.input_ids)
    np.testing.assert_array_equal(mask, want.attention_mask)
    assert ids.shape == (4, MAX_TOKENS) and mask[2].all() and ids[2, -1] == 1  # truncated, ending in </s>
    assert mask[3].tolist() == [1] + [0] * (MAX_TOKENS - 1)  # the empty negative prompt: </s> alone


@pytest.mark.slow
def test_a_word_level_tokenizer_tokenizes_as_the_pipelines(tiny_diffusers, tmp_path):
    """A caption vocabulary shipped as a WordLevel tokenizer.json (transformers' generic fast tokenizer): the build
    tokenizes as the pipeline does, unknown words, truncation and padding included."""
    folder = tiny_diffusers("pixart-t5-words")
    run_cli("build", "--diffusers", str(folder), "--steps", "2", "--out", str(tmp_path / "E"))
    texts = [*PROMPTS, LONG_PROMPT, ""]
    ids, mask = L2CPipeline.from_engine_dir(tmp_path / "E").prompt_encoder.tokenize(texts)
    pipe = load_pipeline(folder)
    want = pipe.tokenizer(pipe._text_preprocessing(texts), padding="max_length", max_length=MAX_TOKENS,
                          truncation=True, add_special_tokens=True, return_tensors="np")
    np.testing.assert_array_equal(ids, want.input_ids)
    np.testing.assert_array_equal(mask, want.attention_mask)
    assert 2 in ids[1] and ids[2, -1] == 1  # "7" and "blue" are unknown words; the long prompt ends in </s>


@pytest.mark.slow
@pytest.mark.parametrize("case", ["full", "schedule-negative", "long-prompt"])
def test_run_with_prompts_equals_the_diffusers_pipeline(text_build, tmp_path, case):
    """run E --prompt ... --noise z.npy (--full) --save-latents equals PixArtAlphaPipeline with the same prompts and
    latents, output_type="latent", to 1e-4 of the range: full compute; the schedule (the pipeline with hooks) with a
    negative prompt; a prompt longer than max_sequence_length (truncated as diffusers truncates it)."""
    folder, engines, schedule = text_build
    noise = np.load(engines.parent / "z.npy")
    prompts, negative, reference = PROMPTS, "", None
    if case == "schedule-negative":
        negative, reference = "a blurry picture", schedule
    elif case == "long-prompt":
        prompts = [LONG_PROMPT, PROMPTS[0]]
    options = [option for prompt in prompts for option in ("--prompt", prompt)]
    options += ["--negative-prompt", negative] if negative else []
    run_cli("run", str(engines), *options, "--noise", str(engines.parent / "z.npy"), "--cfg-scale", str(CFG_SCALE),
            "--save-latents", str(tmp_path / "out.npy"), *(["--full"] if reference is None else []))
    got = np.load(tmp_path / "out.npy")
    want = _pipeline_output(folder, prompts, noise, negative, reference)
    assert got.shape == want.shape == (2, 4, 8, 8)
    assert np.abs(got - want).max() <= 1e-4 * (want.max() - want.min())
    if case == "schedule-negative":  # the negative prompt and the schedule both changed the result
        plain = _pipeline_output(folder, prompts, noise, "", reference)
        assert np.abs(plain - want).max() > 1e-3 * (want.max() - want.min())



@pytest.mark.slow
def test_run_with_a_seed_equals_the_diffusers_pipeline_with_that_generator(text_build, tmp_path):
    """run E --prompt ... --seed S --full --save-latents equals PixArtAlphaPipeline given no latents but
    generator=torch.Generator().manual_seed(S), output_type="latent", to 1e-4 of the range: the runtime draws the
    noise diffusers draws for that seed (l2c_export.samplers.torch_noise), without torch."""
    folder, engines, _ = text_build
    seed = 2 ** 32 + 5
    options = [option for prompt in PROMPTS for option in ("--prompt", prompt)]
    run_cli("run", str(engines), *options, "--seed", str(seed), "--cfg-scale", str(CFG_SCALE), "--full",
            "--save-latents", str(tmp_path / "out.npy"))
    got = np.load(tmp_path / "out.npy")
    with torch.no_grad():
        want = load_pipeline(folder)(prompt=PROMPTS, negative_prompt="", guidance_scale=CFG_SCALE,
                                     generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS,
                                     output_type="latent", use_resolution_binning=False).images.numpy()
    assert got.shape == want.shape == (2, 4, 8, 8)
    assert np.abs(got - want).max() <= 1e-4 * (want.max() - want.min())
    other = np.load(engines.parent / "z.npy")  # seed 0's noise: another seed, another result
    assert np.abs(_pipeline_output(folder, PROMPTS, other) - want).max() > 1e-2 * (want.max() - want.min())

def test_decoded_images_equal_the_pipelines_postprocessed_output(text_build):
    """L2CPipeline(prompt=..., decode=True): the VAE decoder graph's images, postprocessed, equal the pipeline's
    output_type="np" (to 1e-3) and "pil" (to one level of 255)."""
    folder, engines, _ = text_build
    noise = np.load(engines.parent / "z.npy")
    pipe = L2CPipeline.from_engine_dir(engines)
    result = pipe(prompt=PROMPTS, cfg_scale=CFG_SCALE, noise=noise, full=True, decode=True)
    assert result.decoded.shape == (2, 3, 8, 8)
    got = np.clip(result.decoded.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
    want = _pipeline_output(folder, PROMPTS, noise, output_type="np")
    assert np.abs(got - want).max() <= 1e-3
    pictures = _pipeline_output(folder, PROMPTS, noise, output_type="pil")
    for ours, theirs in zip(result.images, pictures):
        difference = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
        assert ours.size == theirs.size and difference.max() <= 1


@pytest.fixture(scope="module")
def text_pipe(text_build):
    return L2CPipeline.from_pretrained(text_build[1])


def test_from_pretrained_called_as_the_diffusers_pipeline_gives_its_latents(text_build, text_pipe):
    """L2CPipeline.from_pretrained(E)(prompts, generator=torch.Generator().manual_seed(s), output_type="latent")
    equals PixArtAlphaPipeline with that generator and the build's schedule (hooks) to 1e-4 of the range, at both
    pipelines' defaults (guidance_scale: PixArt's 4.5, recorded in the manifest; the build's steps); seed=s with the
    defaults spelled out is the same call."""
    import inspect

    from diffusers import PixArtAlphaPipeline

    folder, _, schedule = text_build
    seed = 7
    assert text_pipe.default_guidance_scale == inspect.signature(PixArtAlphaPipeline.__call__).parameters[
        "guidance_scale"].default
    assert text_pipe.num_inference_steps == STEPS
    got = text_pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), output_type="latent").images
    want = _pipeline_call(folder, schedule, prompt=PROMPTS, generator=torch.Generator().manual_seed(seed),
                          output_type="latent")
    assert got.shape == want.shape == (2, 4, 8, 8)
    assert np.abs(got - want).max() <= 1e-4 * (want.max() - want.min())
    spelled_out = text_pipe(prompt=PROMPTS, negative_prompt="", seed=seed,
                            guidance_scale=text_pipe.default_guidance_scale, num_inference_steps=STEPS,
                            output_type="latent")
    np.testing.assert_array_equal(spelled_out.images, got)


def test_np_and_pil_images_and_num_images_per_prompt_are_the_diffusers_pipelines(text_build, text_pipe):
    """output_type="np": (n, H, W, 3) float32 in [0, 1] equal to PixArtAlphaPipeline's output_type="np" to 1e-3,
    num_images_per_prompt=2 and a negative prompt included (4 images, each prompt's two side by side); the default
    output_type gives PIL images of the VAE's size, those of the "np" images (one level of 255)."""
    folder, _, schedule = text_build
    call = dict(negative_prompt="blurry", guidance_scale=CFG_SCALE, num_images_per_prompt=2)
    got = text_pipe(PROMPTS, seed=3, output_type="np", **call).images
    want = _pipeline_call(folder, schedule, prompt=PROMPTS, generator=torch.Generator().manual_seed(3),
                          output_type="np", **call)
    assert got.shape == want.shape == (4, 8, 8, 3) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-3
    pictures = text_pipe(PROMPTS, seed=3, **call).images
    assert [(picture.mode, picture.size) for picture in pictures] == [("RGB", (8, 8))] * 4
    levels = np.stack([np.asarray(picture, dtype=np.int16) for picture in pictures])
    assert np.abs(levels - np.round(want * 255)).max() <= 1


def test_prompt_embeds_by_their_argument_names_give_the_prompts_images(text_build, text_pipe):
    """The arrays PixArtAlphaPipeline.encode_prompt makes, given as prompt_embeds=, prompt_attention_mask=,
    negative_prompt_embeds=, negative_prompt_attention_mask=, sample as the prompts do (to 1e-4 of the range)."""
    folder, _, _ = text_build
    with torch.no_grad():
        encoded = load_pipeline(folder).encode_prompt(PROMPTS, negative_prompt="", max_sequence_length=MAX_TOKENS)
    names = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
    arrays = {name: array.numpy() for name, array in zip(names, encoded)}
    got = text_pipe(**arrays, seed=1, guidance_scale=CFG_SCALE, output_type="latent").images
    want = text_pipe(PROMPTS, seed=1, guidance_scale=CFG_SCALE, output_type="latent").images
    assert np.abs(got - want).max() <= 1e-4 * (want.max() - want.min())


def test_the_python_call_is_refused_naming_its_arguments_and_the_fix(text_build, text_pipe):
    """Each refusal names the Python argument (never a CLI flag) and what to do; output_type "pil"/"np" on a build
    without a VAE decoder is refused, "latent" runs."""
    _, engines, _ = text_build
    embeds = np.zeros((2, 5, CAPTION_CHANNELS), np.float32)
    mask = np.ones((2, 5), np.float32)
    cases = [
        (dict(num_inference_steps=20), ValueError, r"^num_inference_steps is 20; this build samples 12 steps .*"
                                                   r"leave num_inference_steps out, or build again .*--steps 20"),
        (dict(output_type="pt"), ValueError, r"^output_type is 'pt'; expected one of 'pil', 'np', 'latent'"),
        (dict(guidance_scale=0.5), ValueError, r"^guidance_scale is 0.5; expected a number at least 1"),
        (dict(clean_caption=False), TypeError, r"unexpected keyword argument 'clean_caption'; .*prompt_embeds"),
        (dict(prompt_embeds=embeds), ValueError, r"^give prompt or prompt_embeds, not both"),
        (dict(latents=np.zeros((3, 4, 8, 8))), ValueError,
         r"^latents has shape \(3, 4, 8, 8\); expected \(2, 4, 8, 8\)"),
        (dict(generator=torch.Generator().manual_seed(2), seed=2), ValueError, r"^give seed or generator, not both"),
    ]
    for arguments, error, message in cases:
        with pytest.raises(error, match=message):
            text_pipe(PROMPTS, **arguments)
    no_prompt = [
        (dict(prompt_embeds=embeds[..., :7], prompt_attention_mask=mask, guidance_scale=1),
         r"^prompt_embeds has shape \(2, 5, 7\); expected \(n, L, 12\)"),
        (dict(prompt_embeds=embeds, prompt_attention_mask=mask), r"^negative_prompt_embeds is missing \(guidance "),
        (dict(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt="x"),
         r"^negative_prompt is not used with prompt_embeds, prompt_attention_mask"),
        ({}, r"^prompt: none given; expected prompt"),
    ]
    for arguments, message in no_prompt:
        with pytest.raises(ValueError, match=message):
            text_pipe(**arguments)
    latents_only = json.loads(json.dumps(text_pipe.manifest))
    del latents_only["components"]["vae_decoder"]
    without_vae = L2CPipeline(latents_only, engines, text_pipe.backend)
    for output_type in ("pil", "np"):
        with pytest.raises(ValueError, match=rf"^output_type is '{output_type}', but the build .* has no VAE decoder .*"
                                             r"pass output_type=\"latent\""):
            without_vae(PROMPTS, output_type=output_type)
    assert without_vae(PROMPTS, output_type="latent").images.shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"^output_type: the samples are latents and the build has no VAE decoder"):
        without_vae(PROMPTS).images


@pytest.mark.slow
def test_run_out_writes_the_decoded_grid_and_a_prompts_file_is_one_batch(text_build, tmp_path):
    _, engines, _ = text_build
    (tmp_path / "prompts.txt").write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n", encoding="utf-8")
    run_cli("run", str(engines), "--prompts", str(tmp_path / "prompts.txt"), "--noise",
            str(engines.parent / "z.npy"), "--out", str(tmp_path / "x.png"), "--save-latents", str(tmp_path / "a.npy"))
    run_cli("run", str(engines), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--noise",
            str(engines.parent / "z.npy"), "--save-latents", str(tmp_path / "b.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    from PIL import Image

    assert Image.open(tmp_path / "x.png").size[0] > 2 * 8 * 8  # two 8x8 images, enlarged 8 times, side by side


@pytest.mark.parametrize("arguments, message", [
    (["--prompt", ""], "--prompt '': empty prompt; expected some text"),
    (["--prompt", "   "], "empty prompt"),
    (["--prompts", "{bad}"], "line 2: not UTF-8 text (byte 0: 0xff)"),
    (["--prompt", "seven \udcff"], "not UTF-8 text (character 6 cannot be encoded)"),  # the byte 0xff in argv
    (["--prompts", "{blank}"], "no prompts; expected one a line"),
    (["--prompt", "seven", "--conditioning", "c.npz"], "give one of --labels, --conditioning, --prompt and --prompts"),
])
def test_a_bad_prompt_is_refused_in_one_line(text_build, tmp_path, arguments, message):
    _, engines, _ = text_build
    (tmp_path / "bad.txt").write_bytes("seven\n\xff\xfeseven\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    arguments = [a.format(bad=tmp_path / "bad.txt", blank=tmp_path / "blank.txt") for a in arguments]
    result = run_cli("run", str(engines), *arguments, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr


@pytest.mark.slow
def test_prompts_on_a_build_without_a_text_encoder_are_refused(tiny_diffusers, tmp_path):
    run_cli("build", "--diffusers", str(tiny_diffusers("pixart")), "--steps", "2", "--out", str(tmp_path / "E"))
    assert sorted(load(tmp_path / "E")["components"]) == ["vae_decoder"]
    result = run_cli("run", str(tmp_path / "E"), "--prompt", "seven", check=False)
    assert result.returncode == 2 and "the build has no text encoder and tokenizer" in result.stderr


def test_the_prompt_length_is_bounded_by_max_sequence_length(text_build, tmp_path):
    """--conditioning with more tokens than the model's max_sequence_length is refused; exactly that many runs."""
    _, engines, _ = text_build
    generator = np.random.default_rng(0)
    for length, code in ((MAX_TOKENS + 1, 2), (MAX_TOKENS, 0)):
        arrays = {"prompt_embeds": generator.standard_normal((1, length, CAPTION_CHANNELS)).astype(np.float32),
                  "prompt_attention_mask": np.ones((1, length), dtype=np.float32)}
        np.savez(tmp_path / "c.npz", **arrays)
        result = run_cli("run", str(engines), "--conditioning", str(tmp_path / "c.npz"), "--cfg-scale", "1",
                         "--save-latents", str(tmp_path / "o.npy"), check=False)
        assert result.returncode == code, result.stderr
    assert "121 prompt tokens; expected at most the model's max_sequence_length 120" in result.stderr or code == 0


def test_component_files_are_hashed_and_stay_inside_the_build(text_build, tmp_path):
    """A changed tokenizer.json or component weights file is refused by its sha256; a component graph that reads its
    weights from another file (hashes fixed up) is refused by the runtime before ONNX Runtime opens it."""
    import onnx

    from l2c_export.core.manifest import sha256_of, write

    _, engines, _ = text_build
    for file in ("tokenizer.json", "vae_decoder.weights"):
        copy = tmp_path / file.replace(".", "-")
        shutil.copytree(engines, copy)
        with open(copy / file, "ab") as handle:
            handle.write(b" ")
        with pytest.raises(ManifestError, match=f"{file}: sha256 cannot match"):
            load(copy)
    copy = tmp_path / "escape"
    shutil.copytree(engines, copy)
    graph = onnx.load(str(copy / "text_encoder.onnx"), load_external_data=False)
    for initializer in graph.graph.initializer:
        for entry in initializer.external_data:
            if entry.key == "location":
                entry.value = "weights.bin"
    onnx.save_model(graph, str(copy / "text_encoder.onnx"))
    data = json.loads((copy / "manifest.json").read_text())
    entry = data["components"]["text_encoder"]["graph"]
    entry["sha256"], entry["bytes"] = sha256_of(copy / "text_encoder.onnx"), (copy / "text_encoder.onnx").stat().st_size
    write(copy, data)
    with pytest.raises(ManifestError, match="reads 'weights.bin'; the manifest's 'components/text_encoder/weights'"):
        L2CPipeline.from_engine_dir(copy)


def test_manifest_checks_refuse_components_that_do_not_fit_the_model(text_build):
    from l2c_export.core.manifest import check_consistency, validate

    _, engines, _ = text_build
    data = load(engines, verify_files=False)
    encoder = json.loads(json.dumps(data))
    encoder["components"]["text_encoder"]["outputs"][0]["shape"][-1] = 7
    with pytest.raises(ManifestError, match="'components/prompt_encoding/arrays/prompt_embeds' makes 7 channels; "
                                            "'model/inputs' prompt_embeds takes 12"):
        check_consistency(encoder, "m")
    recipe = json.loads(json.dumps(data))
    del recipe["components"]["prompt_encoding"]
    with pytest.raises(ManifestError, match="'components/prompt_encoding' is missing beside 'components/text_encoder'"):
        check_consistency(recipe, "m")
    unmasked = json.loads(json.dumps(data))
    unmasked["components"]["prompt_encoding"]["encoders"][0]["masked"] = False
    with pytest.raises(ManifestError, match="'components/text_encoder/inputs' is .*; expected \\['input_ids'\\]"):
        check_consistency(unmasked, "m")
    unbounded = json.loads(json.dumps(data))
    del unbounded["model"]["max_sequence_length"]
    with pytest.raises(ManifestError, match="'model/max_sequence_length' is missing; a text model states"):
        check_consistency(unbounded, "m")
    shared = json.loads(json.dumps(data))
    shared["components"]["tokenizer"]["file"]["file"] = "weights.bin"
    with pytest.raises(ManifestError, match="'components/tokenizer/file' names weights.bin, which another record"):
        check_consistency(shared, "m")
    alone = json.loads(json.dumps(data))
    del alone["components"]["tokenizer"]
    with pytest.raises(ManifestError, match="components"):
        validate(alone, "m")


def test_a_rebuild_reuses_the_component_files(text_build, tmp_path):
    from l2c_export.builder.build import BuildRequest, build
    from l2c_export.core.schedule import Schedule
    from l2c_export.models.zoo import from_diffusers

    folder, _, _ = text_build
    spec = from_diffusers(folder)
    request = BuildRequest(spec=spec, schedule=Schedule.full(2, sublayers=spec.sublayer_names),
                           sampler=spec.sampler(None, 2), out_dir=tmp_path / "E")
    build(request, progress=False)
    again = build(request, progress=False)
    assert {"text_encoder.onnx", "text_encoder.weights", "vae_decoder.onnx", "tokenizer.json"} <= set(again.reused)
    assert not again.traced


@pytest.mark.parametrize("breakage, message", [
    (lambda f: _edit(f / "vae" / "config.json", _class_name="AutoencoderTiny"),
     "field '_class_name' is 'AutoencoderTiny'; supported VAE classes: AutoencoderKL"),
    (lambda f: _edit(f / "vae" / "config.json", latent_channels=8),
     "field 'latent_channels' is 8; the transformer samples 4 latent channels"),
    (lambda f: _edit(f / "vae" / "config.json", shift_factor="0.1"),
     "field 'shift_factor' is '0.1'; expected a finite number or null"),
    (lambda f: _edit(f / "text_encoder" / "config.json", architectures=["CLIPTextModel"]),
     "field 'architectures' is ['CLIPTextModel']; supported text encoders: T5EncoderModel"),
    (lambda f: _edit(f / "text_encoder" / "config.json", d_model=16),
     "field 'd_model' is 16; the transformer takes prompt_embeds 12 wide"),
    (lambda f: (f / "tokenizer" / "tokenizer.json").unlink(), "tokenizer.json: missing"),
    (lambda f: (f / "text_encoder" / "model.safetensors").rename(f / "text_encoder" / "pytorch_model.bin"),
     "pytorch_model.bin is pickled, which is never loaded here"),
])
def test_components_that_cannot_be_used_are_refused_naming_file_and_field(tiny_diffusers, tmp_path, breakage,
                                                                         message):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_diffusers("pixart-t5"), folder)
    breakage(folder)
    with pytest.raises(DiffusersFolderError) as info:
        read_folder(folder)
    assert message in str(info.value)


def _edit(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.slow
def test_a_dit_build_decodes_its_latents_as_dit_pipeline_does(tiny_diffusers, tmp_path):
    """DiTPipeline's folder has a VAE too: the build called as DiTPipeline (class_labels=, the same generator,
    output_type="np") gives its images (to 1e-3), and run --out needs no --vae."""
    from diffusers.utils.torch_utils import randn_tensor

    folder = tiny_diffusers("dit")
    run_cli("build", "--diffusers", str(folder), "--steps", str(STEPS), "--out", str(tmp_path / "E"))
    assert sorted(load(tmp_path / "E")["components"]) == ["vae_decoder"]
    got = L2CPipeline.from_pretrained(tmp_path / "E")(class_labels=[207, 3], guidance_scale=CFG_SCALE,
                                                      generator=torch.Generator().manual_seed(0),
                                                      output_type="np").images
    pipe = load_pipeline(folder)
    with torch.no_grad():
        want = pipe(class_labels=[207, 3], guidance_scale=CFG_SCALE, num_inference_steps=STEPS,
                    generator=torch.Generator().manual_seed(0), output_type="np").images
    assert got.shape == want.shape == (2, 8, 8, 3)
    assert np.abs(got - want).max() <= 1e-3
    np.save(tmp_path / "z.npy", randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)).numpy())
    run_cli("run", str(tmp_path / "E"), "--labels", "207,3", "--noise", str(tmp_path / "z.npy"), "--out",
            str(tmp_path / "x.png"))
    assert (tmp_path / "x.png").stat().st_size > 0


@pytest.mark.slow
def test_verify_checks_the_component_graphs_against_the_folders_modules(text_build, tmp_path):
    """verify --diffusers DIR: the text encoder and VAE decoder graphs equal transformers' T5 and diffusers'
    AutoencoderKL of the folder (1e-4); a weights file changed after the build (hashes fixed up) fails (exit 1); a
    folder whose vae/ is not the build's is refused (exit 2)."""
    import onnx

    from l2c_export.core.manifest import sha256_of, write

    folder, engines, _ = text_build
    passed = run_cli("verify", str(engines), "--diffusers", str(folder))
    assert "component(s) text_encoder, vae_decoder agree with the folder's" in passed.stdout
    changed = tmp_path / "changed"
    shutil.copytree(engines, changed)
    graph = onnx.load(str(changed / "text_encoder.onnx"), load_external_data=False)
    bias = next(t for t in graph.graph.initializer if "relative_attention_bias" in t.name)
    offset = int({e.key: e.value for e in bias.external_data}.get("offset", 0))
    weights = bytearray((changed / "text_encoder.weights").read_bytes())
    weights[offset: offset + 4] = np.float32(30.0).tobytes()  # one relative position bias
    (changed / "text_encoder.weights").write_bytes(bytes(weights))
    data = json.loads((changed / "manifest.json").read_text())
    data["components"]["text_encoder"]["weights"]["sha256"] = sha256_of(changed / "text_encoder.weights")
    write(changed, data)
    failed = run_cli("verify", str(changed), "--diffusers", str(folder), check=False)
    assert failed.returncode == 1 and "FAIL text_encoder" in failed.stdout
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    _edit(other / "vae" / "config.json", scaling_factor=0.5)
    refused = run_cli("verify", str(engines), "--diffusers", str(other), check=False)
    assert refused.returncode == 2
    assert "field 'components/vae_decoder/source_sha256' differs from" in refused.stderr
