"""Prompts in for Sana and Qwen-Image (issue 29, points 2 and 3's text encoders): a build from a folder with the
pipeline's decoder-LLM text encoder (a tiny random ``Gemma2Model``, ``Qwen2_5_VLForConditionalGeneration``) carries it
as a graph of its last hidden state, its tokenizer (read with the ``tokenizers`` library) and the stack's record with
the pipeline's template and token selection (``components/prompt_encoding``); ``run --prompt`` equals
``SanaPipeline`` and ``QwenImagePipeline`` on the same prompts, negative prompt, latents, scale and
``max_sequence_length``, and the decoded images equal theirs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from l2c_export.core.manifest import load
from l2c_export.models.diffusers import DiffusersFolderError, read_folder
from l2c_export.runtime.pipeline import L2CPipeline

from .conftest import run_cli
from .diffusers_pipelines import load_pipeline, sana_instruction

STEPS = 12
MAX_SEQUENCE_LENGTH = 24
CFG_SCALE = {"sana": 4.5, "qwen": 4.0}
NOISE_SHAPES = {"sana": (2, 4, 8, 8), "qwen": (2, 16, 16)}  # Qwen-Image's 8 x 8 latents packed 2x2: 16 tokens
QWEN_PIXELS = 16  # the tiny Qwen VAE's scale factor is 2
PROMPTS = ["A handwritten Seven!", "the digit 7 drawn, blurry"]  # capitals, punctuation, a digit, unknown words
LONG_PROMPT = " ".join(["a", "picture", "of", "the", "seven", "xyz"] * 12)  # past the 24 tokens kept
NEGATIVE = "a blurry picture"


@pytest.fixture(scope="module")
def builds(tiny_diffusers, tmp_path_factory):
    """``builds[family]`` -> (folder, build, noise), each built once on first use: the tiny Sana with Gemma-2, the
    tiny Qwen-Image with Qwen2.5-VL at --image-size 16; 12 steps, --max-sequence-length 24; the noise of 2 images
    (z.npy beside the build)."""
    from diffusers.utils.torch_utils import randn_tensor

    class Builds(dict):
        def __missing__(self, family):
            folder = tiny_diffusers(f"{family}-text", "flow")
            root = tmp_path_factory.mktemp(f"prompts-{family}")
            noise = randn_tensor(NOISE_SHAPES[family], generator=torch.Generator().manual_seed(0)).numpy()
            np.save(root / "z.npy", noise)
            extra = ["--image-size", str(QWEN_PIXELS)] if family == "qwen" else []
            run_cli("build", "--diffusers", str(folder), "--steps", str(STEPS), "--max-sequence-length",
                    str(MAX_SEQUENCE_LENGTH), *extra, "--out", str(root / "E"))
            self[family] = (folder, root / "E", noise)
            return self[family]

    return Builds()


def _pipeline_output(family, folder, prompts, noise, negative_prompt, output_type="latent"):
    """diffusers' own pipeline on the prompts and latents, guided against ``negative_prompt`` (Sana: "" where None;
    Qwen-Image runs true CFG only with one), ``max_sequence_length`` 24."""
    pipe = load_pipeline(folder)
    if family == "sana":
        options = dict(guidance_scale=CFG_SCALE[family], height=32, width=32, use_resolution_binning=False,
                       negative_prompt=negative_prompt or "")
    else:
        options = dict(true_cfg_scale=CFG_SCALE[family], height=QWEN_PIXELS, width=QWEN_PIXELS,
                       negative_prompt=negative_prompt)
    with torch.no_grad():
        images = pipe(prompt=prompts, latents=torch.from_numpy(noise), num_inference_steps=STEPS,
                      max_sequence_length=MAX_SEQUENCE_LENGTH, output_type=output_type, **options).images
    return images.numpy() if output_type == "latent" else images


def test_the_declared_templates_are_the_pipelines_own():
    """Sana's template is SanaPipeline's default complex_human_instruction joined by newlines, then the prompt;
    Qwen-Image's is QwenImagePipeline's prompt_template_encode, 34 of its tokens dropped."""
    from diffusers import QwenImagePipeline

    from l2c_export.models.diffusers.qwenimage import DECLARATION as QWEN
    from l2c_export.models.diffusers.sana import DECLARATION as SANA

    (sana,), (qwen,) = SANA.text_encoders.encoders, QWEN.text_encoders.encoders
    assert sana.template == sana_instruction() + "{}" and not sana.template_negative
    pipe = QwenImagePipeline(None, None, None, None, None)
    assert qwen.template == pipe.prompt_template_encode and qwen.template_negative
    assert (qwen.selection, qwen.selection_count) == ("mask_rows", pipe.prompt_template_encode_start_idx)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sana", "qwen"])
def test_the_build_carries_the_encoder_its_tokenizer_and_the_template(builds, family):
    """The record: Sana's templated prompts tokenized to the instruction's tokens + 24 - 2 (its
    num_chi_prompt_tokens + max_sequence_length - 2), the first token and the last 23 kept, the negative prompt
    as given; Qwen-Image's to 34 + 24, each prompt's tokens after the first 34 kept."""
    folder, engines, _ = builds[family]
    components = load(engines)["components"]
    assert sorted(components) == ["prompt_encoding", "text_encoder", "tokenizer", "vae_decoder"]
    pipe = load_pipeline(folder)
    (entry,) = components["prompt_encoding"]["encoders"]
    if family == "sana":
        template_tokens = len(pipe.tokenizer.encode(sana_instruction()))
        assert entry == {"encoder": "text_encoder", "tokenizer": "tokenizer", "masked": True,
                         "max_length": MAX_SEQUENCE_LENGTH, "template": sana_instruction() + "{}",
                         "template_negative": False,
                         "template_max_length": template_tokens + MAX_SEQUENCE_LENGTH - 2,
                         "selection": "first_and_last", "selection_count": 1}
        assert components["prompt_encoding"]["preprocessing"] == "lower_strip"
    else:
        assert entry == {"encoder": "text_encoder", "tokenizer": "tokenizer", "masked": True,
                         "max_length": MAX_SEQUENCE_LENGTH, "template": pipe.prompt_template_encode,
                         "template_negative": True, "template_max_length": 34 + MAX_SEQUENCE_LENGTH,
                         "selection": "mask_rows", "selection_count": 34}
    assert [t["name"] for t in components["text_encoder"]["inputs"]] == ["input_ids", "attention_mask"]
    assert components["text_encoder"]["outputs"] == [{"name": "last_hidden_state", "dtype": "float32",
                                                      "shape": ["batch", "prompt_tokens", 12]}]


@pytest.mark.slow
@pytest.mark.parametrize("family, case", [("sana", "negative"), ("sana", "long"), ("qwen", "negative-long")])
def test_run_with_prompts_equals_the_diffusers_pipeline(builds, tmp_path, family, case):
    """run E --prompt P1 --prompt P2 [--negative-prompt N] --noise z.npy --cfg-scale S --full --save-latents equals
    the pipeline with the same prompts, negative prompt, latents, scale and max_sequence_length 24,
    output_type="latent", to 1e-4 of the range: Sana with a negative prompt (out of the instruction), Sana with a
    prompt past the 24 tokens kept and its default "" negative; Qwen-Image (true CFG needs a negative prompt) with
    a long and a short prompt, re-padded by the mask, against a negative of another length."""
    folder, engines, noise = builds[family]
    prompts = [LONG_PROMPT, PROMPTS[0]] if "long" in case else PROMPTS
    negative = NEGATIVE if "negative" in case else None
    options = [option for prompt in prompts for option in ("--prompt", prompt)]
    options += ["--negative-prompt", negative] if negative else []
    run_cli("run", str(engines), *options, "--full", "--noise", str(engines.parent / "z.npy"), "--cfg-scale",
            str(CFG_SCALE[family]), "--save-latents", str(tmp_path / "out.npy"))
    got = np.load(tmp_path / "out.npy")
    want = _pipeline_output(family, folder, prompts, noise, negative)
    assert got.shape == want.shape == noise.shape
    assert np.abs(got - want).max() <= 1e-4 * np.ptp(want), (np.abs(got - want).max(), np.ptp(want))
    if family == "sana" and negative:  # the negative prompt changed the result
        plain = _pipeline_output(family, folder, prompts, noise, None)
        assert np.abs(plain - want).max() > 1e-3 * np.ptp(want)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sana", "qwen"])
def test_decoded_images_equal_the_pipelines_output_and_verify_checks_the_encoder(builds, family):
    """L2CPipeline(...)(prompt=[...], negative_prompt=N, decode=True): the images equal the pipeline's
    output_type="np" to 1e-3; verify --diffusers checks the encoder graph against the folder's own model."""
    from l2c_export.tools.verify import verify_components

    folder, engines, noise = builds[family]
    result = L2CPipeline.from_engine_dir(engines)(prompt=PROMPTS, negative_prompt=NEGATIVE, cfg_scale=CFG_SCALE[family],
                                                  noise=noise, full=True, decode=True)
    got = np.clip(result.decoded.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
    want = _pipeline_output(family, folder, PROMPTS, noise, NEGATIVE, output_type="np")
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert np.ptp(want) > 0.1 and np.abs(got - want).max() <= 1e-3, np.abs(got - want).max()
    checks = {check.name: check for check in verify_components(engines, folder)}
    assert sorted(checks) == ["text_encoder", "vae_decoder"] and all(c.passed for c in checks.values()), checks


def _edit(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_text_config(path, **changes):
    data = json.loads(path.read_text())
    data["text_config"].update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("family, breakage, message", [
    ("sana", lambda f: _edit(f / "text_encoder" / "config.json", hidden_size=16),
     "text_encoder/config.json: field 'hidden_size' is 16; the transformer takes prompt_embeds 12 wide"),
    ("sana", lambda f: _edit(f / "text_encoder" / "config.json", num_hidden_layers=10 ** 6),
     "field 'num_hidden_layers' is 1000000; expected an integer in 1..256"),
    ("sana", lambda f: _edit(f / "text_encoder" / "config.json", architectures=["T5EncoderModel"]),
     "field 'architectures' is ['T5EncoderModel']; supported text encoders: Gemma2Model"),
    ("qwen", lambda f: _edit_text_config(f / "text_encoder" / "config.json", hidden_size=16),
     "text_encoder/config.json: field 'hidden_size' is 16; the transformer takes prompt_embeds 12 wide"),
    ("qwen", lambda f: _edit_text_config(f / "text_encoder" / "config.json", vocab_size=1.5),
     "field 'vocab_size' is 1.5; expected an integer"),
    ("sana", lambda f: _edit(f / "text_encoder" / "config.json", eos_token_id=[1, 10 ** 6]),
     "field 'eos_token_id' is [1, 1000000]; expected a token id (or a list of them) below vocab_size"),
    ("qwen", lambda f: (f / "tokenizer" / "tokenizer.json").unlink(),
     "tokenizer.json: missing; expected the tokenizer as a tokenizers library file"),
])
def test_text_encoders_that_cannot_be_used_are_refused_naming_file_and_field(tiny_diffusers, tmp_path, family,
                                                                            breakage, message):
    """The LLM's config sizes are bounded and its width checked against the transformer's prompt input, Qwen2.5-VL's
    read from its nested text_config."""
    folder = tmp_path / "copy"
    shutil.copytree(tiny_diffusers(f"{family}-text", "flow"), folder)
    breakage(folder)
    with pytest.raises(DiffusersFolderError) as info:
        read_folder(folder)
    assert message in str(info.value)


def test_a_qwen_config_with_its_text_fields_at_the_top_reads(tiny_diffusers, tmp_path):
    """A Qwen2.5-VL config as transformers 4 saved it (the text fields at the top level, as Qwen-Image's released
    folder has them) is read from there."""
    folder = tmp_path / "copy"
    shutil.copytree(tiny_diffusers("qwen-text", "flow"), folder)
    path = folder / "text_encoder" / "config.json"
    data = json.loads(path.read_text())
    data.update(data.pop("text_config"), eos_token_id=[0, 1])  # a list, as chat models' configs may have it
    path.write_text(json.dumps(data))
    (found,) = read_folder(folder).components.text_encoders
    assert found.config["hidden_size"] == 12 and found.spec.kind == "qwen2_5_vl"


@pytest.mark.slow
def test_a_served_request_encodes_prompts_as_run_does(builds):
    """The Triton model's request decoding (serving/sampling.py, in process): Qwen-Image's prompts and a negative
    prompt of another length are encoded as run encodes them, each at its own length; a guided request without a
    negative prompt is refused naming it."""
    from l2c_export.serving.sampling import decode_request

    _, engines, _ = builds["qwen"]
    pipe = L2CPipeline.from_engine_dir(engines)
    request = decode_request(pipe, prompt=np.array([[p.encode()] for p in PROMPTS], dtype=object),
                             negative_prompt=np.array([[NEGATIVE.encode()]] * 2, dtype=object),
                             cfg_scale=np.full((2, 1), CFG_SCALE["qwen"], dtype=np.float32))
    want = pipe.prompt_encoder(PROMPTS, NEGATIVE)
    assert sorted(request.conditioning) == sorted(want)
    assert want["prompt_embeds"].shape[1] != want["negative_prompt_embeds"].shape[1]
    for name, value in want.items():
        np.testing.assert_array_equal(request.conditioning[name], value)
    with pytest.raises(ValueError, match="input 'negative_prompt' is missing: this model's pipeline guides only"):
        decode_request(pipe, prompt=np.array([[b"seven"]], dtype=object), cfg_scale=np.full((1, 1), 4.0, np.float32))


@pytest.mark.slow
def test_a_tokenizer_that_pads_on_the_left_is_followed(builds, tmp_path):
    """The runtime pads on the side the pipeline's tokenizer pads (the tokenizer record's padding_side): a Qwen-Image
    build whose record says left pads the short prompt's ids on the left, and its mask_rows selection still finds
    each prompt's tokens by the mask: QwenImagePipeline.encode_prompt with the tokenizer padding on the left.
    Sana's record says right, as its pipeline sets it (GemmaTokenizer's default is left)."""
    folder, engines, _ = builds["qwen"]
    assert load(builds["sana"][1])["components"]["tokenizer"]["padding_side"] == "right"
    assert load(engines)["components"]["tokenizer"]["padding_side"] == "right"
    copy = shutil.copytree(engines, tmp_path / "E")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["components"]["tokenizer"]["padding_side"] = "left"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    prompts = [LONG_PROMPT, PROMPTS[0]]
    encoder = L2CPipeline.from_engine_dir(copy).prompt_encoder
    ids, mask = encoder.tokenize(prompts)
    assert mask[1, 0] == 0 and mask[1, -1] == 1 and ids[1, 0] == manifest["components"]["tokenizer"]["pad_id"]
    got = encoder.embed(prompts)
    pipe = load_pipeline(folder)
    pipe.tokenizer.padding_side = "left"
    with torch.no_grad():
        embeds, want_mask = pipe.encode_prompt(prompts, max_sequence_length=MAX_SEQUENCE_LENGTH)
    np.testing.assert_array_equal(got["prompt_embeds_mask"], want_mask.numpy())
    assert np.abs(got["prompt_embeds"] - embeds.numpy()).max() <= 1e-5 * np.ptp(embeds.numpy())


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (dict(selection_count=30), "keeps the first 30 and the last of 24 tokens; expected selection_count <= "
                               "max_length <= template_max_length"),
    (dict(template="no prompt here"), "components/prompt_encoding/encoders/0/template"),
    (dict(selection="middle"), "components/prompt_encoding/encoders/0/selection"),
])
def test_a_prompt_encoding_record_that_cannot_be_applied_is_refused_in_one_line(builds, tmp_path, change, message):
    _, engines, _ = builds["sana"]
    copy = shutil.copytree(engines, tmp_path / "E")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["components"]["prompt_encoding"]["encoders"][0].update(change)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("run", str(copy), "--prompt", "seven", "--noise", str(engines.parent / "z.npy"), check=False)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr


@pytest.mark.slow
def test_qwen_image_guides_only_against_a_negative_prompt_given(builds, tmp_path):
    """QwenImagePipeline runs true CFG only with a negative prompt: the record says negative_prompt_required, a
    guided run without --negative-prompt is refused in one line, and --cfg-scale 1 equals the pipeline unguided."""
    folder, engines, noise = builds["qwen"]
    assert load(engines)["components"]["prompt_encoding"]["negative_prompt_required"] is True
    assert "negative_prompt_required" not in load(builds["sana"][1])["components"]["prompt_encoding"]
    options = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--noise", str(engines.parent / "z.npy"), "--full"]
    refused = run_cli("run", str(engines), *options, "--cfg-scale", "4", "--save-latents", str(tmp_path / "x.npy"),
                      check=False)
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "--negative-prompt is missing: this model's pipeline guides only against a negative prompt" \
        in refused.stderr and not (tmp_path / "x.npy").exists()
    run_cli("run", str(engines), *options, "--cfg-scale", "1", "--save-latents", str(tmp_path / "out.npy"))
    pipe = load_pipeline(folder)
    with torch.no_grad():
        want = pipe(prompt=PROMPTS, latents=torch.from_numpy(noise), num_inference_steps=STEPS, true_cfg_scale=4.0,
                    max_sequence_length=MAX_SEQUENCE_LENGTH, height=QWEN_PIXELS, width=QWEN_PIXELS,
                    output_type="latent").images.numpy()
    got = np.load(tmp_path / "out.npy")
    assert np.abs(got - want).max() <= 1e-4 * np.ptp(want)



@pytest.mark.parametrize("family", ["sana", "qwen"])
def test_the_pipelines_own_encode_prompt_as_declared_equals_the_builds_encoders(builds, family):
    """What ``learn --prompts`` and ``l2c_export.learn(pipe, prompts=)`` encode with, the pipeline's own
    ``encode_prompt`` called as its family declares (Sana: the call's complex_human_instruction; Qwen-Image: once
    more for the negative prompts), equals the build's encoder graphs on the same prompts (1e-4 of range), every
    array by the pipeline's argument names."""
    from l2c_export.learn.live import encode_prompts, folder_text_pipeline

    folder, engines, _ = builds[family]
    pipe = folder_text_pipeline(folder, "prompts")
    live = encode_prompts(pipe, PROMPTS, True, NEGATIVE, max_sequence_length=MAX_SEQUENCE_LENGTH)
    built = L2CPipeline.from_engine_dir(engines).prompt_encoder(PROMPTS, NEGATIVE)
    assert sorted(live) == sorted(built)
    for name, want in built.items():
        assert live[name].shape == want.shape, name
        assert np.abs(live[name] - want).max() <= 1e-4 * max(np.ptp(want), 1.0), name
