"""Prompts in for SD3 and FLUX.1 (issue 29, point 4): a build from a folder with the pipeline's text encoders carries
one graph per encoder (SD3: CLIP-L, CLIP-G, T5; FLUX.1: CLIP-L, T5), their tokenizers (read with the ``tokenizers``
library) and the stack's record (``components/prompt_encoding``); ``run --prompt`` equals
``StableDiffusion3Pipeline`` and ``FluxPipeline`` on the same prompts, latents, scale and ``max_sequence_length``,
and the decoded images equal theirs."""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch

from l2c_export.core.manifest import load
from l2c_export.models.diffusers import DiffusersFolderError, read_folder
from l2c_export.runtime.pipeline import L2CPipeline

from .conftest import run_cli
from .diffusers_pipelines import load_pipeline, schedule_hooks
from .test_diffusers import _parity_schedule

STEPS = 12
MAX_SEQUENCE_LENGTH = 24  # T5's tokens (the pipelines' max_sequence_length; their defaults are 256 and 512)
CLIP_TOKENS = 77
CFG_SCALE = {"sd3": 3.0, "flux": 3.5}
IMAGE_SIZE = 8  # FLUX: pixels (the tiny VAE has one level: 8 x 8 latents, 16 packed tokens)
PROMPTS = ["A handwritten Seven!", "the digit 7 drawn, blurry"]  # capitals, punctuation, a digit, unknown pieces
LONG_PROMPT = " ".join(["a", "picture", "of", "the", "seven", "xyz"] * 20)  # past CLIP's 77 and T5's 24 tokens
NEGATIVE = "a blurry picture"
STACKS = {"sd3": {"max_sequence_length": MAX_SEQUENCE_LENGTH, "preprocessing": "none",
                  "encoders": [{"encoder": "text_encoder", "tokenizer": "tokenizer", "masked": False,
                                "max_length": CLIP_TOKENS},
                               {"encoder": "text_encoder_2", "tokenizer": "tokenizer_2", "masked": False,
                                "max_length": CLIP_TOKENS},
                               {"encoder": "text_encoder_3", "tokenizer": "tokenizer_3", "masked": False,
                                "max_length": MAX_SEQUENCE_LENGTH}],
                  "arrays": {"prompt_embeds": [["text_encoder/penultimate_hidden_state",
                                                "text_encoder_2/penultimate_hidden_state"],
                                               ["text_encoder_3/last_hidden_state"]],
                             "pooled_prompt_embeds": [["text_encoder/pooled", "text_encoder_2/pooled"]]}},
          "flux": {"max_sequence_length": MAX_SEQUENCE_LENGTH, "preprocessing": "none",
                   "encoders": [{"encoder": "text_encoder", "tokenizer": "tokenizer", "masked": False,
                                 "max_length": CLIP_TOKENS},
                                {"encoder": "text_encoder_2", "tokenizer": "tokenizer_2", "masked": False,
                                 "max_length": MAX_SEQUENCE_LENGTH}],
                   "arrays": {"prompt_embeds": [["text_encoder_2/last_hidden_state"]],
                              "pooled_prompt_embeds": [["text_encoder/pooled"]]}}}


@pytest.fixture(scope="module")
def builds(tiny_diffusers, tmp_path_factory):
    """``builds[family]`` -> (folder, build, schedule or None, noise), each built once on first use: the tiny SD3
    with its three pairs over the parity schedule, the tiny FLUX.1 with its two at --image-size 8 (full compute);
    12 steps, --max-sequence-length 24; the noise of 2 images (z.npy beside the build)."""
    from diffusers.utils.torch_utils import randn_tensor

    class Builds(dict):
        def __missing__(self, family):
            folder = tiny_diffusers(f"{family}-text", "flow")
            root = tmp_path_factory.mktemp(f"prompts-{family}")
            schedule, extra = None, ["--image-size", str(IMAGE_SIZE)]
            if family == "sd3":
                found = read_folder(folder)
                schedule = _parity_schedule(found.family.sublayer_names(found.config))
                schedule.save(root / "s.json")
                extra = ["--schedule", str(root / "s.json")]
            shape = (2, 4, 8, 8) if family == "sd3" else (2, 16, 16)
            noise = randn_tensor(shape, generator=torch.Generator().manual_seed(0)).numpy()
            np.save(root / "z.npy", noise)
            run_cli("build", "--diffusers", str(folder), "--steps", str(STEPS), "--max-sequence-length",
                    str(MAX_SEQUENCE_LENGTH), *extra, "--out", str(root / "E"))
            self[family] = (folder, root / "E", schedule, noise)
            return self[family]

    return Builds()


def _pipeline_output(family, folder, prompts, noise, negative_prompt=None, schedule=None, output_type="latent"):
    """diffusers' own pipeline on the prompts and latents (SD3 guided against ``negative_prompt``, "" by default),
    ``max_sequence_length`` 24, ``schedule`` applied by hooks."""
    pipe = load_pipeline(folder)
    hooks = (schedule_hooks(pipe.transformer, schedule.sublayer_names, schedule.compute) if schedule is not None
             else contextlib.nullcontext())
    options = {"negative_prompt": negative_prompt} if family == "sd3" else {"height": IMAGE_SIZE,
                                                                           "width": IMAGE_SIZE}
    with torch.no_grad(), hooks:
        images = pipe(prompt=prompts, latents=torch.from_numpy(noise), guidance_scale=CFG_SCALE[family],
                      num_inference_steps=STEPS, max_sequence_length=MAX_SEQUENCE_LENGTH, output_type=output_type,
                      **options).images
    return images.numpy() if output_type == "latent" else images


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_build_carries_every_encoder_its_tokenizer_and_the_stack(builds, family):
    _, engines, _, _ = builds[family]
    manifest = load(engines)
    components = manifest["components"]
    parts = ["text_encoder", "text_encoder_2"] + (["text_encoder_3"] if family == "sd3" else [])
    tokenizers = [part.replace("text_encoder", "tokenizer") for part in parts]
    assert sorted(components) == sorted(["prompt_encoding", "vae_decoder", *parts, *tokenizers])
    assert components["prompt_encoding"] == STACKS[family]
    # SD3: the prompt embeddings are CLIP's 77 tokens and T5's 24; FLUX.1: T5's
    assert manifest["model"]["max_sequence_length"] == (CLIP_TOKENS if family == "sd3" else 0) + MAX_SEQUENCE_LENGTH
    if family == "sd3":
        outputs = {part: [(t["name"], t["shape"]) for t in components[part]["outputs"]] for part in parts}
        assert outputs == {"text_encoder": [("pooled", ["batch", 2]),
                                            ("penultimate_hidden_state", ["batch", CLIP_TOKENS, 4])],
                           "text_encoder_2": [("pooled", ["batch", 4]),
                                              ("penultimate_hidden_state", ["batch", CLIP_TOKENS, 6])],
                           "text_encoder_3": [("last_hidden_state", ["batch", "prompt_tokens", 12])]}
        assert components["tokenizer_2"]["pad_token"] == "!"  # SD3's CLIP-G pads with "!", CLIP-L with its eos
        assert components["tokenizer"]["pad_token"] == "<|endoftext|>"
    assert all([t["name"] for t in components[part]["inputs"]] == ["input_ids"] for part in parts)
    files = {entry["file"] for record in components.values() for entry in record.values()
             if isinstance(entry, dict) and "sha256" in entry}
    assert files == {f"{part}.{ext}" for part in parts for ext in ("onnx", "weights")} \
        | {f"{name}.json" for name in tokenizers} | {"vae_decoder.onnx", "vae_decoder.weights"}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_tokenizing_equals_the_pipelines_tokenizers_truncation_and_padding_included(builds, family):
    """Each tokenizers-library tokenizer of the build gives the ids of the pipeline's transformers tokenizer called
    as encode_prompt calls it: CLIP's padded and truncated to 77, T5's to max_sequence_length."""
    folder, engines, _, _ = builds[family]
    encoder = L2CPipeline.from_engine_dir(engines).prompt_encoder
    pipe = load_pipeline(folder)
    texts = [*PROMPTS, LONG_PROMPT, ""]
    names = ["tokenizer", "tokenizer_2", "tokenizer_3"][:len(encoder.encoders)]
    for index, name in enumerate(names):
        length = MAX_SEQUENCE_LENGTH if index == len(names) - 1 else CLIP_TOKENS
        want = getattr(pipe, name)(texts, padding="max_length", max_length=length, truncation=True,
                                   add_special_tokens=True, return_tensors="np").input_ids
        ids, _ = encoder.tokenize(texts, index)
        np.testing.assert_array_equal(ids, want, err_msg=name)
        assert ids.shape == (4, length)


@pytest.mark.slow
@pytest.mark.parametrize("family, case", [("sd3", "full-negative"), ("sd3", "schedule-long"), ("flux", "full")])
def test_run_with_prompts_equals_the_diffusers_pipeline(builds, tmp_path, family, case):
    """run E --prompt P1 --prompt P2 [--negative-prompt N] --noise z.npy --cfg-scale S --save-latents equals the
    pipeline with the same prompts, negative prompt, latents, scale and max_sequence_length 24, output_type="latent",
    to 1e-4 of the range: SD3 with --full and a negative prompt, SD3 with its schedule (the pipeline with hooks) and
    a prompt past CLIP's 77 and T5's 24 tokens; FLUX.1 with --full."""
    folder, engines, schedule, noise = builds[family]
    prompts = [LONG_PROMPT, PROMPTS[0]] if case == "schedule-long" else PROMPTS
    negative = NEGATIVE if case == "full-negative" else None
    options = [option for prompt in prompts for option in ("--prompt", prompt)]
    options += ["--negative-prompt", negative] if negative else []
    options += [] if case == "schedule-long" else ["--full"]
    run_cli("run", str(engines), *options, "--noise", str(engines.parent / "z.npy"), "--cfg-scale",
            str(CFG_SCALE[family]), "--save-latents", str(tmp_path / "out.npy"))
    got = np.load(tmp_path / "out.npy")
    want = _pipeline_output(family, folder, prompts, noise, negative,
                            schedule if case == "schedule-long" else None)
    assert got.shape == want.shape == noise.shape
    assert np.abs(got - want).max() <= 1e-4 * np.ptp(want), (np.abs(got - want).max(), np.ptp(want))
    if case == "full-negative":  # the negative prompt changed the result
        plain = _pipeline_output(family, folder, prompts, noise)
        assert np.abs(plain - want).max() > 1e-3 * np.ptp(want)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_decoded_images_equal_the_pipelines_output(builds, family):
    """L2CPipeline(...)(prompt=[...], decode=True): the images equal the pipeline's output_type="np" to 1e-3."""
    folder, engines, _, noise = builds[family]
    result = L2CPipeline.from_engine_dir(engines)(prompt=PROMPTS, cfg_scale=CFG_SCALE[family], noise=noise, full=True,
                                                  decode=True)
    got = np.clip(result.decoded.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
    want = _pipeline_output(family, folder, PROMPTS, noise, output_type="np")
    assert got.shape == want.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.ptp(want) > 0.1 and np.abs(got - want).max() <= 1e-3


@pytest.mark.slow
def test_verify_checks_each_encoder_against_the_folders_own(builds):
    from l2c_export.tools.verify import verify_components

    folder, engines, _, _ = builds["sd3"]
    checks = {check.name: check for check in verify_components(engines, folder)}
    assert sorted(checks) == ["text_encoder", "text_encoder_2", "text_encoder_3", "vae_decoder"]
    assert all(check.passed for check in checks.values()), checks
    assert sorted(checks["text_encoder"].worst) == ["penultimate_hidden_state", "pooled"]


@pytest.mark.slow
def test_served_requests_take_prompts_and_flux_takes_no_negative_prompt(builds):
    """The Triton model's request decoding (serving/sampling.py, run here without a server: the test Triton server
    imports the main checkout's code): a prompt is encoded as run encodes it; FLUX.1 serves no negative_prompt and
    refuses one by name."""
    from l2c_export.serving.sampling import decode_request, served_inputs

    for family in ("sd3", "flux"):
        _, engines, _, _ = builds[family]
        pipe = L2CPipeline.from_engine_dir(engines)
        names = [name for name, *_ in served_inputs(pipe.manifest)]
        assert names[:2] == (["prompt", "negative_prompt"] if family == "sd3" else ["prompt", "noise"])
        request = decode_request(pipe, prompt=np.array([[p.encode()] for p in PROMPTS], dtype=object),
                                 cfg_scale=np.full((2, 1), CFG_SCALE[family], dtype=np.float32))
        want = pipe.prompt_encoder(PROMPTS, "", guiding=family == "sd3")
        assert sorted(request.conditioning) == sorted(want)
        for name, value in want.items():
            np.testing.assert_array_equal(request.conditioning[name], value)
    with pytest.raises(ValueError, match="input 'negative_prompt' is not used"):
        decode_request(pipe, prompt=np.array([[b"seven"]], dtype=object),
                       negative_prompt=np.array([[b"blurry"]], dtype=object))


@pytest.mark.slow
def test_a_negative_prompt_to_flux_is_refused_in_one_line(builds):
    _, engines, _, _ = builds["flux"]
    result = run_cli("run", str(engines), "--prompt", "seven", "--negative-prompt", "blurry", "--noise",
                     str(engines.parent / "z.npy"), check=False)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "--negative-prompt is not used" in result.stderr


@pytest.mark.parametrize("arguments, message", [
    (["--max-sequence-length", "0"], "Invalid value for '--max-sequence-length': 0 is not in the range 1<=x<=512"),
    (["--max-sequence-length", "513"], "513 is not in the range 1<=x<=512"),
])
def test_a_max_sequence_length_out_of_range_is_refused_by_name(tiny_diffusers, tmp_path, arguments, message):
    result = run_cli("build", "--diffusers", str(tiny_diffusers("sd3-text", "flow")), *arguments, "--out",
                     str(tmp_path / "E"), check=False)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert not (tmp_path / "E").exists()


def test_a_max_sequence_length_for_a_model_without_prompts_is_refused(tiny_diffusers, tmp_path):
    result = run_cli("build", "--diffusers", str(tiny_diffusers("dit")), "--max-sequence-length", "24", "--out",
                     str(tmp_path / "E"), check=False)
    assert result.returncode == 2 and "--max-sequence-length: a DiTTransformer2DModel takes no prompts" \
        in result.stderr
    assert not (tmp_path / "E").exists()


def test_a_folder_with_only_some_of_the_stack_takes_embeddings(tiny_diffusers, tmp_path):
    """SD3 without its T5 (text_encoder_3 and tokenizer_3 saved as null): no encoder is carried, the build takes
    prompt embeddings as before; the prompt bound is the pipeline's, 77 + 256."""
    from l2c_export.models.zoo import from_diffusers

    folder = tmp_path / "copy"
    shutil.copytree(tiny_diffusers("sd3-text", "flow"), folder)
    _edit(folder / "model_index.json", text_encoder_3=[None, None], tokenizer_3=[None, None])
    spec = from_diffusers(folder)
    assert spec.components.text_encoders == () and spec.max_prompt_tokens == CLIP_TOKENS + 256
    assert spec.max_sequence_length == 256


def _edit(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("breakage, message", [
    (lambda f: _edit(f / "text_encoder_3" / "config.json", d_model=16),
     "text_encoder_3/config.json: field 'd_model' is 16; the transformer takes prompt_embeds 12 wide (made of "
     "text_encoder/penultimate_hidden_state 4 + text_encoder_2/penultimate_hidden_state 6 + "
     "text_encoder_3/last_hidden_state 16, 16)"),
    (lambda f: _edit(f / "text_encoder_2" / "config.json", projection_dim=5),
     "text_encoder_2/config.json: field 'projection_dim' is 5; the transformer takes pooled_prompt_embeds 6 wide"),
    (lambda f: _edit(f / "text_encoder" / "config.json", architectures=["T5EncoderModel"]),
     "field 'architectures' is ['T5EncoderModel']; supported text encoders: CLIPTextModelWithProjection, "
     "CLIPTextModel"),
    (lambda f: _edit(f / "model_index.json", tokenizer_2=[None, None]), "field 'tokenizer_2' is missing"),
    (lambda f: _edit(f / "tokenizer" / "tokenizer_config.json", model_max_length=100),
     "field 'model_max_length' is 100; text_encoder has 77 positions"),
    (lambda f: (f / "tokenizer_2" / "tokenizer.json").unlink(),
     "tokenizer.json: missing; expected the tokenizer as a tokenizers library file"),
])
def test_text_encoders_that_cannot_be_used_are_refused_naming_file_and_field(tiny_diffusers, tmp_path, breakage,
                                                                            message):
    folder = tmp_path / "copy"
    shutil.copytree(tiny_diffusers("sd3-text", "flow"), folder)
    breakage(folder)
    with pytest.raises(DiffusersFolderError) as info:
        read_folder(folder)
    assert message in str(info.value)


def test_a_clip_tokenizer_of_vocab_and_merges_alone_is_written_as_transformers_makes_it(tiny_diffusers, tmp_path):
    """A CLIP tokenizer saved the slow way (vocab.json and merges.txt, no tokenizer.json, as SD3's released folders
    ship CLIP-L and CLIP-G): the folder is accepted, and the tokenizer.json the build writes for it, read with the
    tokenizers library, gives the ids of the pipeline's own tokenizer."""
    from tokenizers import Tokenizer

    from l2c_export.builder.components import check_components, export_component
    from l2c_export.models.zoo import from_diffusers

    folder = tmp_path / "copy"
    shutil.copytree(tiny_diffusers("sd3-text", "flow"), folder)
    model = json.loads((folder / "tokenizer_2" / "tokenizer.json").read_text())["model"]
    (folder / "tokenizer_2" / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    (folder / "tokenizer_2" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_2" / "tokenizer.json").unlink()
    spec = from_diffusers(folder, max_sequence_length=MAX_SEQUENCE_LENGTH)
    check_components(spec)
    record = export_component("tokenizer_2", folder / "tokenizer_2", spec, tmp_path)
    assert record == {"pad_token": "!", "pad_id": load_pipeline(folder).tokenizer_2.pad_token_id,
                      "padding_side": "right"}
    backend = Tokenizer.from_file(str(tmp_path / "tokenizer_2.json"))
    backend.enable_truncation(max_length=CLIP_TOKENS)
    backend.enable_padding(pad_id=record["pad_id"], pad_token=record["pad_token"], length=CLIP_TOKENS)
    texts = [*PROMPTS, LONG_PROMPT, ""]
    got = [encoding.ids for encoding in backend.encode_batch(texts)]
    want = load_pipeline(folder).tokenizer_2(texts, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                                             return_tensors="np").input_ids
    np.testing.assert_array_equal(np.array(got), want)
