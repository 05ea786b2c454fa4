"""Serving diffusers builds on a real Triton Inference Server (issue 19): the repository declares the build's
conditioning inputs by the pipelines' argument names (PixArt: ``prompt_embeds``, ``prompt_attention_mask`` and their
``negative_`` twins, L variable up to max_sequence_length; DiT: ``labels`` as for every label model; a build with a
text encoder: ``prompt`` and ``negative_prompt`` as text, and ``images`` decoded by its VAE decoder), and what the
server answers equals ``l2c-export run`` on the same latents, conditioning or prompts, to 1e-5 of the range."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from l2c_export.core.schedule import Schedule
from l2c_export.runtime.pipeline import L2CPipeline

from .conftest import run_cli
from .diffusers_pipelines import CAPTION_CHANNELS
from .test_triton import _close_to, _f32, _i64, _typed_inputs, running_server, triton_env  # noqa: F401

STEPS = 6
CFG_SCALE = 3.0
FAMILIES = ("pixart", "dit", "pixart-t5")  # pixart-t5: with a T5 text encoder and tokenizer, served prompts as text


def _schedule(names: tuple[str, ...]) -> Schedule:
    """Every sub-layer at the first two calls; then odd calls reuse every block's ff (and PixArt's attn2)."""
    rows = np.ones((STEPS, len(names)), dtype=bool)
    for call in range(3, STEPS, 2):
        rows[call] = [not name.endswith((".ff", ".attn2")) for name in names]
    return Schedule(rows, sublayers=names, mode="general", source="serving test")


@pytest.fixture(scope="module")
def builds(tiny_diffusers, tmp_path_factory) -> dict:
    """family -> a build of the tiny diffusers folder (DDIM, 6 steps) over a schedule that reuses sub-layers."""
    from l2c_export.models.diffusers import read_folder

    root = tmp_path_factory.mktemp("diffusers-builds")
    out = {}
    for family in FAMILIES:
        found = read_folder(tiny_diffusers(family))
        _schedule(found.family.sublayer_names(found.config)).save(root / f"{family}.json")
        out[family] = root / family
        run_cli("build", "--diffusers", str(tiny_diffusers(family)), "--steps", str(STEPS), "--schedule",
                str(root / f"{family}.json"), "--out", str(out[family]))
    return out


@pytest.fixture(scope="module")
def repository(builds, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton-diffusers") / "repo"
    for family in FAMILIES:
        run_cli("triton", str(builds[family]), "--repo", str(repo), "--name", family, "--max-queue-delay-us",
                "200000")
    return repo


@pytest.fixture(scope="module")
def server(repository, triton_env, tmp_path_factory):  # noqa: F811 - triton_env is test_triton's fixture
    yield from running_server(repository, triton_env, tmp_path_factory)


@pytest.fixture(scope="module")
def pixart(builds) -> L2CPipeline:
    return L2CPipeline.from_engine_dir(builds["pixart"])


def _prompts(n: int, length: int, seed: int, negatives: bool = True) -> dict[str, np.ndarray]:
    """Random prompt embeddings with padded masks (the first prompt's last two tokens, the negatives' all but one)."""
    generator = np.random.default_rng(seed)
    mask = np.ones((n, length), dtype=np.float32)
    mask[0, -2:] = 0
    arrays = {"prompt_embeds": generator.standard_normal((n, length, CAPTION_CHANNELS), dtype=np.float32),
              "prompt_attention_mask": mask}
    if negatives:
        negative_mask = np.zeros((n, length), dtype=np.float32)
        negative_mask[:, 0] = 1
        arrays.update(negative_prompt_embeds=generator.standard_normal((n, length, CAPTION_CHANNELS),
                                                                       dtype=np.float32),
                      negative_prompt_attention_mask=negative_mask)
    return arrays


def _noise(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4, 8, 8), dtype=np.float32)


def _cli_latents(build, tmp_path, noise: np.ndarray, request: list[str], cfg_scale: float) -> np.ndarray:
    """``l2c-export run BUILD --noise z.npy REQUEST --cfg-scale S --save-latents out.npy`` in a subprocess."""
    np.save(tmp_path / "z.npy", noise)
    run_cli("run", str(build), "--noise", str(tmp_path / "z.npy"), *request, "--cfg-scale", str(cfg_scale),
            "--save-latents", str(tmp_path / "out.npy"))
    return np.load(tmp_path / "out.npy")


# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_repository_declares_the_builds_conditioning_by_the_pipelines_names(repository):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    def config(name: str):
        return text_format.Parse((repository / name / "config.pbtxt").read_text(), pb.ModelConfig())

    pixart = config("pixart")
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in pixart.input] == [
        ("prompt_embeds", pb.TYPE_FP32, [-1, CAPTION_CHANNELS], False),
        ("prompt_attention_mask", pb.TYPE_FP32, [-1], False),
        ("negative_prompt_embeds", pb.TYPE_FP32, [-1, CAPTION_CHANNELS], True),
        ("negative_prompt_attention_mask", pb.TYPE_FP32, [-1], True),
        ("noise", pb.TYPE_FP32, [4, 8, 8], True), ("seed", pb.TYPE_INT64, [1], True),
        ("cfg_scale", pb.TYPE_FP32, [1], True)]
    assert [(o.name, list(o.dims)) for o in pixart.output] == [("samples", [4, 8, 8]),  # latents, and the images
                                                               ("images", [8, 8, 3])]  # of the build's VAE decoder
    assert json.loads(pixart.parameters["input_ranges"].string_value) == {
        "prompt_attention_mask": [0, 1], "negative_prompt_attention_mask": [0, 1], "noise": [-1000.0, 1000.0],
        "seed": [0, 2 ** 63 - 1], "cfg_scale": [1.0, 100.0]}
    dit = config("dit")
    assert [(i.name, list(i.dims), i.optional) for i in dit.input][0] == ("labels", [1], False)
    assert [i.name for i in dit.input][1:] == ["noise", "seed", "cfg_scale"]
    assert json.loads(dit.parameters["input_ranges"].string_value)["labels"] == [0, 999]  # DiT's null class 1000


def test_pixart_served_with_guidance_and_padded_masks_equals_the_run_cli(server, builds, pixart, tmp_path):
    """Three requests sent together: two guided prompts of 5 tokens with padded masks, a guided prompt of 7 tokens,
    and an unguided prompt of 7 tokens without negatives. Each equals ``l2c-export run --conditioning cond.npz`` (and
    L2CPipeline) on the same noise, to 1e-5 of the range. (Triton's batcher merges only requests of the same shapes and
    inputs; the model's own batching by scale and prompt length is tested in-process below.)"""
    requests = {"guided": (_prompts(2, 5, seed=1), _noise(2, seed=2), CFG_SCALE),
                "longer": (_prompts(1, 7, seed=3), _noise(1, seed=4), CFG_SCALE),
                "plain": (_prompts(1, 7, seed=5, negatives=False), _noise(1, seed=6), 1.0)}
    answers: dict[str, np.ndarray] = {}

    def send(key: str) -> None:
        arrays, noise, scale = requests[key]
        client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
        try:
            inputs = _typed_inputs(httpclient, **arrays, noise=noise, cfg_scale=_f32(np.full((len(noise), 1), scale)))
            answers[key] = client.infer("pixart", inputs).as_numpy("samples")
        finally:
            client.close()

    threads = [threading.Thread(target=send, args=(key,)) for key in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == sorted(requests)

    guided, guided_noise, _ = requests["guided"]
    np.savez(tmp_path / "cond.npz", **guided)
    want = _cli_latents(builds["pixart"], tmp_path, guided_noise, ["--conditioning", str(tmp_path / "cond.npz")],
                        CFG_SCALE)
    _close_to(answers["guided"], want)
    assert np.abs(want).max() > 0.1  # a real sample, not zeros
    for key in ("longer", "plain"):
        arrays, noise, scale = requests[key]
        _close_to(answers[key], pixart(conditioning=arrays, cfg_scale=scale, noise=noise).samples)
    unguided = pixart(conditioning={k: v for k, v in guided.items() if not k.startswith("negative")}, cfg_scale=1.0,
                      noise=guided_noise).samples
    assert np.abs(unguided - want).max() > 1e-3 * float(want.max() - want.min())  # guidance changed the sample


@pytest.mark.slow
def test_prompts_of_different_lengths_and_scales_are_sampled_in_batches_that_fit(pixart):
    """What the model does with the requests Triton hands over together: images are merged by guidance scale and
    prompt length (a batch holds one length), negatives are passed only where a batch guides, and every image equals
    L2CPipeline's alone."""
    from l2c_export.serving.sampling import decode_request, sample_requests

    sent = [(_prompts(2, 5, seed=11), _noise(2, seed=12), [[CFG_SCALE], [1.0]]),
            (_prompts(1, 7, seed=13), _noise(1, seed=14), [[CFG_SCALE]]),
            (_prompts(1, 5, seed=15, negatives=False), _noise(1, seed=16), [[1.0]])]
    requests = [decode_request(pixart, noise=noise, cfg_scale=_f32(scales), **arrays) for arrays, noise, scales in sent]
    results, batch_sizes = sample_requests(pixart, requests)
    assert sorted(batch_sizes) == [1, 1, 2]  # (3, L 5): 1 image; (3, L 7): 1; (1, L 5): 2 from two requests
    for (arrays, noise, scales), samples in zip(sent, results):
        for i, [scale] in enumerate(scales):
            one = {name: array[i:i + 1] for name, array in arrays.items()}
            _close_to(samples[i], pixart(conditioning=one, cfg_scale=scale, noise=noise[i:i + 1]).samples[0])


def test_dit_diffusers_build_served_with_labels_equals_the_run_cli(server, builds, tmp_path):
    noise = _noise(2, seed=5)
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    try:
        inputs = _typed_inputs(httpclient, labels=_i64([[207], [3]]), noise=noise, cfg_scale=_f32([[CFG_SCALE]] * 2))
        served = client.infer("dit", inputs).as_numpy("samples")
    finally:
        client.close()
    _close_to(served, _cli_latents(builds["dit"], tmp_path, noise, ["--labels", "207,3"], CFG_SCALE))


# Bad text conditioning: Triton checks names, dtypes and the caption width against config.pbtxt; the model checks
# values and lengths (l2c_export/samplers/conditioning.py's check_text_conditioning, as `run --conditioning` does).
def _bad(change) -> dict:
    arrays = _prompts(1, 5, seed=6)
    change(arrays)
    return {**arrays, "cfg_scale": _f32([[CFG_SCALE]])}


BAD_PROMPTS = {
    "a misspelt name": (_bad(lambda a: a.update(prompt_embedz=a.pop("prompt_embeds"))),
                        r"unexpected inference input 'prompt_embedz' for model 'pixart'"),
    "embeddings as FP64": (_bad(lambda a: a.update(prompt_embeds=a["prompt_embeds"].astype(np.float64))),
                           r"input 'prompt_embeds' data-type is 'FP64', but model 'pixart' expects 'FP32'"),
    "embeddings of the wrong width": (_bad(lambda a: a.update(prompt_embeds=a["prompt_embeds"][..., :5])),
                                      rf"unexpected shape for input 'prompt_embeds' .*Expected \[-1,-1,"
                                      rf"{CAPTION_CHANNELS}\], got \[1,5,5\]"),
    "labels to a text model": (_bad(lambda a: a.update(labels=_i64([[3]]))),
                               r"unexpected inference input 'labels' for model 'pixart'"),
    "NaN embeddings": (_bad(lambda a: a["negative_prompt_embeds"].__setitem__((0, 1, 2), np.nan)),
                       r"request: array 'negative_prompt_embeds': 1 of its 60 values are NaN or infinite"),
    "a mask of the wrong length": (_bad(lambda a: a.update(prompt_attention_mask=np.ones((1, 4), np.float32))),
                                   r"request: array 'prompt_attention_mask' has shape \(1, 4\); expected \(1, 5\)"),
    "a mask that is not 0/1": (_bad(lambda a: a["prompt_attention_mask"].__setitem__((0, 0), 0.5)),
                               r"array 'prompt_attention_mask' holds values other than 0 and 1"),
    "guidance without negatives": (_bad(lambda a: a.pop("negative_prompt_embeds")),
                                   r"request: array 'negative_prompt_embeds' is missing \(guidance runs the negative "
                                   r"prompt as the unconditional half\)"),
    "no prompt": (_bad(lambda a: a.pop("prompt_embeds")),
                  r"input 'prompt_embeds' is missing; expected float32 prompt embeddings of shape \(n, L, D\)"),
}


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_bad_text_conditioning_gets_an_error_naming_it_and_the_server_keeps_serving(server, pixart, case):
    inputs, message = BAD_PROMPTS[case]
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    try:
        with pytest.raises(InferenceServerException, match=message):
            client.infer("pixart", _typed_inputs(httpclient, **inputs))
        good, noise = _prompts(1, 3, seed=7), _noise(1, seed=8)
        served = client.infer("pixart", _typed_inputs(httpclient, **good, noise=noise)).as_numpy("samples")
        _close_to(served, pixart(conditioning=good, noise=noise).samples)  # the build's default guidance
    finally:
        client.close()


# -- prompts as text (issue 20): a build with a text encoder, tokenizer and VAE decoder -----------------------------
LONG_PROMPT = " ".join(["seven", "picture", "of", "number"] * 40)  # 160 tokens and </s>: truncated to 120


def _texts(*texts) -> np.ndarray:
    return np.array([[text if isinstance(text, bytes) else text.encode()] for text in texts], dtype=object)


@pytest.fixture(scope="module")
def pixart_t5(builds) -> L2CPipeline:
    return L2CPipeline.from_engine_dir(builds["pixart-t5"])


@pytest.mark.slow
def test_a_build_with_a_text_encoder_is_served_prompts_and_gives_images(repository):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    config = text_format.Parse((repository / "pixart-t5" / "config.pbtxt").read_text(), pb.ModelConfig())
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input][:2] == [
        ("prompt", pb.TYPE_STRING, [1], False), ("negative_prompt", pb.TYPE_STRING, [1], True)]
    assert [i.name for i in config.input][2:] == ["noise", "seed", "cfg_scale"]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("samples", pb.TYPE_FP32, [4, 8, 8]), ("images", pb.TYPE_UINT8, [8, 8, 3])]
    assert "prompt_attention_mask" not in json.loads(config.parameters["input_ranges"].string_value)


@pytest.mark.parametrize("prompt, negative", [("A handwritten Seven", None), (LONG_PROMPT, "a blurry picture")])
def test_a_served_prompt_equals_the_run_cli_with_the_same_seed(server, builds, pixart_t5, tmp_path, prompt, negative):
    """prompt (and negative_prompt) with a seed: the samples equal ``l2c-export run --prompt P [--negative-prompt N]
    --seed S --save-latents`` to 1e-5 of the range, a prompt longer than max_sequence_length included (truncated as
    diffusers truncates it); the images are those L2CPipeline decodes with the build's VAE decoder."""
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    texts = {"prompt": _texts(prompt)} | ({"negative_prompt": _texts(negative)} if negative else {})
    try:
        answer = client.infer("pixart-t5", _typed_inputs(httpclient, **texts, seed=_i64([[11]]),
                                                         cfg_scale=_f32([[CFG_SCALE]])))
    finally:
        client.close()
    run_cli("run", str(builds["pixart-t5"]), "--prompt", prompt, *(["--negative-prompt", negative] if negative else []),
            "--seed", "11", "--cfg-scale", str(CFG_SCALE), "--save-latents", str(tmp_path / "out.npy"))
    want = np.load(tmp_path / "out.npy")
    _close_to(answer.as_numpy("samples"), want)
    local = pixart_t5(prompt=[prompt], negative_prompt=negative or "", seed=11, cfg_scale=CFG_SCALE, decode=True)
    images = answer.as_numpy("images")
    assert images.shape == (1, 8, 8, 3) and images.dtype == np.uint8
    assert np.abs(images.astype(int) - np.asarray(local.images[0], dtype=int)).max() <= 1
    other = pixart_t5(prompt=["the digit 3"], seed=11, cfg_scale=CFG_SCALE).samples
    assert np.abs(other - want).max() > 1e-3 * float(want.max() - want.min())  # the prompt mattered


BAD_TEXTS = {
    "an empty prompt": ({"prompt": _texts("  ")}, r"input 'prompt': empty prompt; expected some text"),
    "a prompt that is not UTF-8": ({"prompt": _texts(b"seven \xff\xfe")},
                                   r"input 'prompt': not UTF-8 text \(byte 6: 0xff\)"),
    "a negative prompt that is not UTF-8": ({"prompt": _texts("seven"), "negative_prompt": _texts(b"\xc3")},
                                            r"input 'negative_prompt': not UTF-8 text"),
    "embeddings to a build that encodes prompts": (
        {"prompt": _texts("seven"), "prompt_embeds": np.zeros((1, 3, CAPTION_CHANNELS), np.float32)},
        r"unexpected inference input 'prompt_embeds' for model 'pixart-t5'"),
    "no prompt": ({"seed": _i64([[1]])}, r"input 'prompt' is missing; expected UTF-8 prompts of shape \(n, 1\)"),
}


@pytest.mark.parametrize("case", list(BAD_TEXTS))
def test_a_bad_prompt_gets_an_error_naming_it_and_the_server_keeps_serving(server, pixart_t5, case):
    inputs, message = BAD_TEXTS[case]
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    try:
        with pytest.raises(InferenceServerException, match=message):
            client.infer("pixart-t5", _typed_inputs(httpclient, **inputs))
        served = client.infer("pixart-t5", _typed_inputs(httpclient, prompt=_texts("seven"), seed=_i64([[2]])))
        _close_to(served.as_numpy("samples"), pixart_t5(prompt=["seven"], seed=2).samples)
    finally:
        client.close()


@pytest.mark.slow
def test_prompt_embeddings_longer_than_max_sequence_length_are_refused(pixart):
    """The prompt axis L is bounded by the manifest's max_sequence_length (PixArt-alpha's 120) when serving
    embeddings too (checked in the model, as run --conditioning checks it)."""
    from l2c_export.serving.sampling import decode_request

    assert pixart.manifest["model"]["max_sequence_length"] == 120
    decode_request(pixart, **_prompts(1, 120, seed=1))
    with pytest.raises(ValueError, match=r"121 prompt tokens; expected at most the model's max_sequence_length 120"):
        decode_request(pixart, **_prompts(1, 121, seed=1))
