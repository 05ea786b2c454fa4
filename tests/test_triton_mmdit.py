"""Serving SD3 and FLUX.1 builds (issue 21), and Sana and Qwen-Image builds (issue 29), on one real Triton Inference
Server: the repository declares their conditioning by the pipelines' argument names, from the manifest
(``prompt_embeds``, ``pooled_prompt_embeds``, SD3's ``negative_`` twins; FLUX.1 none, its ``cfg_scale`` feeding the
guidance embedding, its latents packed; Sana's and Qwen-Image's token masks and negatives, Qwen-Image's negative prompt
of another length and ``cfg_scale`` its ``true_cfg_scale``), and the server's answers equal ``l2c-export run`` on the
same latents and conditioning, to 1e-5 of the range, full compute and with a general schedule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from l2c_export.core.images import to_uint8
from l2c_export.core.schedule import Schedule
from l2c_export.runtime.pipeline import L2CPipeline

from .conftest import run_cli
from .diffusers_pipelines import FLUX_CONFIG, SD3_CONFIG, WAN_CONFIG
from .test_qwenimage import IMAGE_SIZE as QWEN_IMAGE_SIZE
from .test_qwenimage import STEPS as QWEN_STEPS
from .test_qwenimage import qwen_build  # noqa: F401 - the module's build of the tiny Qwen-Image, over a schedule
from .test_sana import STEPS as SANA_STEPS
from .test_sana import sana_build  # noqa: F401 - the module's build of the tiny Sana, over a schedule
from .test_wan import wan_build  # noqa: F401 - the module's build of the tiny Wan2.1, over a schedule
from .test_wan_prompts import CFG_SCALE as WAN_TEXT_CFG_SCALE
from .test_wan_prompts import NEGATIVE as WAN_TEXT_NEGATIVE
from .test_wan_prompts import PROMPTS as WAN_TEXT_PROMPTS
from .test_wan_prompts import wan_text_build  # noqa: F401 - the tiny Wan2.1 with its UMT5 and tokenizer
from .test_triton import _close_to, _f32, _typed_inputs, running_server, triton_env  # noqa: F401

STEPS = 4
CFG_SCALE = 3.0
FAMILIES = ("sd3", "flux")
WIDTH = {"sd3": SD3_CONFIG["joint_attention_dim"], "flux": FLUX_CONFIG["joint_attention_dim"]}
POOLED = {"sd3": SD3_CONFIG["pooled_projection_dim"], "flux": FLUX_CONFIG["pooled_projection_dim"]}
SAMPLE = {"sd3": (4, 8, 8), "flux": (16, FLUX_CONFIG["in_channels"])}  # FLUX.1: packed (T, 4 C) at 8 px


@pytest.fixture(scope="module")
def builds(tiny_diffusers, tmp_path_factory) -> dict:
    """family -> a build of the tiny folder (4 steps) whose odd calls reuse the feed-forwards and MLP branches."""
    from l2c_export.models.zoo import from_diffusers

    root = tmp_path_factory.mktemp("mmdit-builds")
    out = {}
    for family in FAMILIES:
        size = ["--image-size", "8"] if family == "flux" else []
        names = from_diffusers(tiny_diffusers(family, "flow"), 8 if size else None).sublayer_names
        rows = np.ones((STEPS, len(names)), dtype=bool)
        rows[1::2] = [not name.endswith((".ff", ".ff_context", ".proj_mlp")) for name in names]
        Schedule(rows, sublayers=names, mode="general").save(root / f"{family}.json")
        out[family] = root / family
        run_cli("build", "--diffusers", str(tiny_diffusers(family, "flow")), "--steps", str(STEPS), *size,
                "--schedule", str(root / f"{family}.json"), "--out", str(out[family]))
    return out


@pytest.fixture(scope="module")
def flow_builds(sana_build, qwen_build, tiny_diffusers, tmp_path_factory) -> dict:  # noqa: F811
    """Sana and Qwen-Image: family -> (request: noise (2, ...) and conditioning by argument name, as test_sana.py and
    test_qwenimage.py save them beside their builds; model name -> build): ``sana`` / ``qwen``, those modules'
    builds over a general schedule (12 steps), and ``sana-full`` / ``qwen-full``, builds of the same folders
    computing every sub-layer at every call."""
    _, sana_engines, sana_work, _ = sana_build
    qwen_root = qwen_build[0]
    root = tmp_path_factory.mktemp("flow-builds")
    out = {}
    for family, engines, work, options in (
            ("sana", sana_engines, sana_work, ["--steps", str(SANA_STEPS)]),
            ("qwen", qwen_root / "E", qwen_root, ["--steps", str(QWEN_STEPS), "--image-size", str(QWEN_IMAGE_SIZE)])):
        run_cli("build", "--diffusers", str(tiny_diffusers(family, "flow")), *options, "--out", str(root / family))
        request = (np.load(work / "z.npy"), dict(np.load(work / "cond.npz")))
        out[family] = request, {family: engines, f"{family}-full": root / family}
    return out


@pytest.fixture(scope="module")
def wan22_serving_build(wan22_two_experts_build) -> Path:
    """The tiny two-expert Wan2.2 folder (no VAE) at 8 steps, 5 frames of 16 x 32 px (latents (4, 2, 2, 4)), over a
    schedule that reuses in both experts (tests/conftest.py's, shared with tests/test_cpp.py)."""
    return wan22_two_experts_build


@pytest.fixture(scope="module")
def server(builds, flow_builds, wan_build, wan22_serving_build, wan_text_build, triton_env,  # noqa: F811
           tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton-mmdit") / "repo"
    served = {**builds, **{name: build for _, models in flow_builds.values() for name, build in models.items()},
              "wan": wan_build[0] / "E", "wan22": wan22_serving_build, "wan-text": wan_text_build[0] / "E"}
    for name, build in served.items():
        run_cli("triton", str(build), "--repo", str(repo), "--name", name)
    yield from running_server(repo, triton_env, tmp_path_factory)


def _request(family: str, n: int, length: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    generator = np.random.default_rng(seed)
    arrays = {"prompt_embeds": generator.standard_normal((n, length, WIDTH[family]), dtype=np.float32),
              "pooled_prompt_embeds": generator.standard_normal((n, POOLED[family]), dtype=np.float32)}
    if family == "sd3":
        arrays.update(negative_prompt_embeds=generator.standard_normal((n, length, WIDTH[family]), dtype=np.float32),
                      negative_pooled_prompt_embeds=generator.standard_normal((n, POOLED[family]), dtype=np.float32))
    return arrays, generator.standard_normal((n, *SAMPLE[family]), dtype=np.float32)


@pytest.mark.slow
def test_the_repository_declares_the_mmdit_conditioning(builds, tmp_path):
    from l2c_export.core.manifest import load
    from l2c_export.serving.sampling import served_inputs

    sd3 = served_inputs(load(builds["sd3"], verify_files=False))
    assert [(name, dims, optional) for name, _, dims, optional in sd3][:4] == [
        ("prompt_embeds", [-1, WIDTH["sd3"]], False), ("pooled_prompt_embeds", [POOLED["sd3"]], False),
        ("negative_prompt_embeds", [-1, WIDTH["sd3"]], True), ("negative_pooled_prompt_embeds", [POOLED["sd3"]], True)]
    flux = served_inputs(load(builds["flux"], verify_files=False))
    assert [name for name, *_ in flux] == ["prompt_embeds", "pooled_prompt_embeds", "noise", "seed", "cfg_scale"]
    assert flux[2][2] == list(SAMPLE["flux"])


def _served_equals_run(server, model: str, build, arrays: dict[str, np.ndarray], noise: np.ndarray,
                       cfg_scale: float, tmp_path, cfg_scale_2: float | None = None) -> np.ndarray:
    """Sends ``model`` the conditioning ``arrays`` (named and typed as the request's inputs), ``noise`` (n, ...) and
    ``cfg_scale`` (and a two-expert build's ``cfg_scale_2``, where given) for every image; checks the served latents
    equal ``l2c-export run BUILD --noise z.npy --conditioning cond.npz --cfg-scale S [--cfg-scale-2 S2]
    --save-latents`` to 1e-5 of the range, and the served images are those latents decoded by the build's VAE decoder
    (scaled, shifted, unpacked); returns the served latents."""
    second = {} if cfg_scale_2 is None else {"cfg_scale_2": _f32(np.full((len(noise), 1), cfg_scale_2))}
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    try:
        inputs = _typed_inputs(httpclient, **arrays, noise=noise, cfg_scale=_f32(np.full((len(noise), 1), cfg_scale)),
                               **second)
        answer = client.infer(model, inputs)
    finally:
        client.close()
    served = answer.as_numpy("samples")
    np.savez(tmp_path / "cond.npz", **arrays)
    np.save(tmp_path / "z.npy", noise)
    run_cli("run", str(build), "--noise", str(tmp_path / "z.npy"), "--conditioning", str(tmp_path / "cond.npz"),
            "--cfg-scale", str(cfg_scale), *(["--cfg-scale-2", str(cfg_scale_2)] if second else []),
            "--save-latents", str(tmp_path / "out.npy"))
    want = np.load(tmp_path / "out.npy")
    assert served.shape == want.shape == noise.shape
    _close_to(served, want)
    decoder = L2CPipeline.from_engine_dir(build).decoder
    if decoder is None:  # a build without a VAE decoder answers the latents alone
        assert answer.as_numpy("frames" if noise.ndim == 5 else "images") is None
        return served
    decoded = to_uint8(decoder(want))  # a clip's: (n, F, H, W, 3)
    pictures = answer.as_numpy("frames" if noise.ndim == 5 else "images")
    assert pictures.shape == decoded.shape and np.abs(pictures.astype(int) - decoded.astype(int)).max() <= 1
    return served


@pytest.mark.parametrize("family", FAMILIES)
def test_mmdit_served_equals_the_run_cli(server, builds, family, tmp_path):
    """SD3 guided with its negatives, FLUX.1 with its guidance embedding: the server's latents equal
    ``l2c-export run --conditioning cond.npz --cfg-scale 3`` on the same latents to 1e-5 of the range, and its images
    are theirs decoded by the build's VAE decoder."""
    arrays, noise = _request(family, 2, 6, seed=1)
    _served_equals_run(server, family, builds[family], arrays, noise, CFG_SCALE, tmp_path)


def test_a_flux_request_with_negatives_is_refused_and_the_server_keeps_serving(server, builds):
    arrays, noise = _request("flux", 1, 4, seed=2)
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    try:
        with pytest.raises(InferenceServerException, match="unexpected inference input 'negative_prompt_embeds'"):
            client.infer("flux", _typed_inputs(httpclient, **arrays, negative_prompt_embeds=arrays["prompt_embeds"],
                                               noise=noise))
        served = client.infer("flux", _typed_inputs(httpclient, **arrays, noise=noise)).as_numpy("samples")
    finally:
        client.close()
    _close_to(served, L2CPipeline.from_engine_dir(builds["flux"])(conditioning=arrays, noise=noise).samples)


@pytest.mark.slow
def test_mmdit_requests_are_batched_by_scale_and_length_in_process(builds):
    """What the model does with requests Triton hands over together (no server): SD3 images merged by guidance
    scale and prompt length, negatives only where a batch guides; FLUX.1 images of different scales in separate
    batches (the scale is an input of the model, not a mix of two halves); each equals L2CPipeline's alone; a FLUX.1
    request sending negatives is refused naming them."""
    from l2c_export.serving.sampling import decode_request, sample_requests

    for family in FAMILIES:
        pipe = L2CPipeline.from_engine_dir(builds[family])
        sent = [(*_request(family, 2, 5, seed=11), [[CFG_SCALE], [1.0]]), (*_request(family, 1, 5, seed=13), [[1.0]])]
        requests = [decode_request(pipe, noise=noise, cfg_scale=_f32(scales), **arrays)
                    for arrays, noise, scales in sent]
        results, batch_sizes = sample_requests(pipe, requests)
        assert sorted(batch_sizes) == [1, 2]
        for (arrays, noise, scales), samples in zip(sent, results):
            for i, [scale] in enumerate(scales):
                one = {name: array[i:i + 1] for name, array in arrays.items()
                       if scale > 1 or not name.startswith("negative_")}
                _close_to(samples[i], pipe(conditioning=one, cfg_scale=scale, noise=noise[i:i + 1]).samples[0])
    arrays, noise = _request("flux", 1, 5, seed=3)
    with pytest.raises(ValueError, match="input 'negative_prompt_embeds' is not one of this model's; expected "
                                         "prompt_embeds, pooled_prompt_embeds"):
        decode_request(L2CPipeline.from_engine_dir(builds["flux"]), noise=noise,
                       negative_prompt_embeds=arrays["prompt_embeds"], **arrays)


def _served_conditioning(build, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` (a ``run --conditioning`` file's) as a Triton request sends them: each named as the served model's
    input of that name, in its dtype (a 0/1 mask saved as int64 goes as FP32), read from the build's manifest."""
    from l2c_export.core.manifest import load
    from l2c_export.serving.sampling import served_inputs

    dtypes = {name: dtype for name, dtype, _, _ in served_inputs(load(build, verify_files=False))}
    assert set(arrays) <= set(dtypes), (sorted(arrays), sorted(dtypes))
    return {name: array.astype(dtypes[name]) for name, array in arrays.items()}


@pytest.mark.parametrize("family", ("sana", "qwen"))
def test_sana_and_qwen_image_served_equal_the_run_cli_full_and_scheduled(server, flow_builds, family, tmp_path):
    """Sana (prompts and negatives of 5 tokens, padded masks; latents (2, 4, 8, 8)) and Qwen-Image (a prompt of 7
    tokens and a negative prompt of 4, padded masks, true CFG; packed latents (2, 16, 16)): the latents the server
    answers equal ``l2c-export run --noise z.npy --conditioning cond.npz --cfg-scale S --save-latents`` on the same
    build, to 1e-5 of the range, guided (3) on the build over a general schedule and on the full-compute build, and
    unguided (1, no negatives sent) on the scheduled one; the images are the latents decoded by the build's VAE
    decoder (DC-AE; Qwen-Image's, unpacked)."""
    (noise, conditioning), models = flow_builds[family]
    positives = {name: array for name, array in conditioning.items() if not name.startswith("negative_")}
    assert len(positives) == 2 and len(conditioning) == 4  # embeddings and mask, and their negative partners
    lengths = conditioning["prompt_embeds"].shape[1], conditioning["negative_prompt_embeds"].shape[1]
    assert lengths == {"sana": (5, 5), "qwen": (7, 4)}[family]
    results = {}
    for model, cfg_scale, arrays in ((family, CFG_SCALE, conditioning), (f"{family}-full", CFG_SCALE, conditioning),
                                     (family, 1.0, positives)):
        request = _served_conditioning(models[model], arrays)
        results[model, cfg_scale] = _served_equals_run(server, model, models[model], request, noise, cfg_scale,
                                                       tmp_path)
    guided = results[family, CFG_SCALE]
    span = float(guided.max() - guided.min())
    assert np.abs(guided - results[f"{family}-full", CFG_SCALE]).max() > 1e-4 * span  # the schedule reused
    assert np.abs(guided - results[family, 1.0]).max() > 1e-3 * span  # the negatives and the scale were used


def test_a_wan_clip_served_equals_the_run_cli(server, wan_build, tmp_path):  # noqa: F811
    """Wan2.1 (5-D latents (2, 4, 2, 4, 8), prompt embeddings guided against negative ones, no mask; a general
    schedule): the server's latents equal ``l2c-export run`` on the same build to 1e-5 of the range, guided (4) and
    not (no negatives sent), and its ``frames`` (n, F, H, W, 3) are those latents decoded by the build's VAE decoder."""
    root, _, _, latents, conditioning = wan_build
    arrays = {name: value.numpy() for name, value in conditioning.items()}
    noise = latents.numpy()
    guided = _served_equals_run(server, "wan", root / "E", arrays, noise, 4.0, tmp_path)
    unguided = _served_equals_run(server, "wan", root / "E", {"prompt_embeds": arrays["prompt_embeds"]}, noise, 1.0,
                                  tmp_path)
    assert np.abs(guided - unguided).max() > 1e-3 * float(guided.max() - guided.min())


def test_a_two_expert_wan22_clip_served_equals_the_run_cli(server, wan22_serving_build, wan_build,  # noqa: F811
                                                           tmp_path):
    """Wan2.2's two experts (a schedule reusing in both): the repository declares ``cfg_scale_2`` (the second expert's
    scale), and the server's latents equal ``l2c-export run --cfg-scale 4 --cfg-scale-2 2`` to 1e-5 of the range (no
    frames: the folder has no VAE); without ``cfg_scale_2``, ``run`` without it (the second expert at cfg_scale 4),
    another result. A build of one transformer declares no ``cfg_scale_2``: the server refuses it and keeps serving."""
    from l2c_export.core.manifest import load
    from l2c_export.serving.sampling import decode_request, served_inputs

    assert [name for name, *_ in served_inputs(load(wan22_serving_build, verify_files=False))][-2:] == \
        ["cfg_scale", "cfg_scale_2"]
    generator = np.random.default_rng(8)
    arrays = {name: generator.standard_normal((2, 5, WAN_CONFIG["text_dim"]), dtype=np.float32)
              for name in ("prompt_embeds", "negative_prompt_embeds")}
    noise = generator.standard_normal((2, *L2CPipeline.from_engine_dir(wan22_serving_build).sample_shape),
                                      dtype=np.float32)
    both = _served_equals_run(server, "wan22", wan22_serving_build, arrays, noise, 4.0, tmp_path, cfg_scale_2=2.0)
    first = _served_equals_run(server, "wan22", wan22_serving_build, arrays, noise, 4.0, tmp_path)
    assert np.abs(both - first).max() > 1e-4 * float(both.max() - both.min())  # cfg_scale_2 reached the second expert
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    try:
        with pytest.raises(InferenceServerException, match="unexpected inference input 'cfg_scale_2'"):
            client.infer("wan", _typed_inputs(httpclient, **arrays, noise=noise, cfg_scale_2=_f32([[2.0], [2.0]])))
        assert client.infer("wan22", _typed_inputs(httpclient, **arrays, noise=noise)).as_numpy("samples").shape == \
            noise.shape
    finally:
        client.close()
    with pytest.raises(ValueError, match="input 'cfg_scale_2': this build has one transformer"):
        decode_request(L2CPipeline.from_engine_dir(wan_build[0] / "E"), noise=noise, cfg_scale_2=_f32([[2.0], [2.0]]),
                       **arrays)


def test_a_wan_build_with_umt5_served_takes_the_prompt_as_text_as_run_does(server, wan_text_build,  # noqa: F811
                                                                            tmp_path):
    """The tiny Wan2.1 built with its UMT5 and tokenizer (tests/test_wan_prompts.py): ``prompt`` and
    ``negative_prompt`` sent as UTF-8 text (n, 1) with noise and cfg_scale; the served latents equal ``l2c-export run
    --prompt P1 --prompt P2 --negative-prompt N --noise z.npy --cfg-scale S --save-latents`` to 1e-5 of the range."""
    root, _, noise = wan_text_build
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    try:
        texts = np.array([[text.encode()] for text in WAN_TEXT_PROMPTS], dtype=object)
        negative = np.array([[WAN_TEXT_NEGATIVE.encode()]] * len(texts), dtype=object)
        answer = client.infer("wan-text", _typed_inputs(httpclient, prompt=texts, negative_prompt=negative,
                                                        noise=noise,
                                                        cfg_scale=_f32(np.full((len(texts), 1), WAN_TEXT_CFG_SCALE))))
    finally:
        client.close()
    run_cli("run", str(root / "E"), "--prompt", WAN_TEXT_PROMPTS[0], "--prompt", WAN_TEXT_PROMPTS[1],
            "--negative-prompt", WAN_TEXT_NEGATIVE, "--noise", str(root / "z.npy"), "--cfg-scale",
            str(WAN_TEXT_CFG_SCALE), "--save-latents", str(tmp_path / "out.npy"))
    _close_to(answer.as_numpy("samples"), np.load(tmp_path / "out.npy"))
