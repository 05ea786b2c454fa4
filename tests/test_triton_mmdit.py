"""Serving SD3 and FLUX.1 builds (issue 21) on a real Triton Inference Server: the repository declares their
conditioning by the pipelines' argument names (``prompt_embeds``, ``pooled_prompt_embeds``, SD3's ``negative_``
twins; FLUX.1 none, its ``cfg_scale`` feeding the guidance embedding, its latents packed), and the server's answers
equal ``l2c-export run`` on the same latents and conditioning, to 1e-5 of the range."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from l2c_export.core.images import to_uint8
from l2c_export.core.schedule import Schedule
from l2c_export.runtime.pipeline import L2CPipeline

from .conftest import run_cli
from .diffusers_pipelines import FLUX_CONFIG, SD3_CONFIG
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
def server(builds, triton_env, tmp_path_factory):  # noqa: F811 - triton_env is test_triton's fixture
    repo = tmp_path_factory.mktemp("triton-mmdit") / "repo"
    for family in FAMILIES:
        run_cli("triton", str(builds[family]), "--repo", str(repo), "--name", family)
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


@pytest.mark.parametrize("family", FAMILIES)
def test_mmdit_served_equals_the_run_cli(server, builds, family, tmp_path):
    """SD3 guided with its negatives, FLUX.1 with its guidance embedding: the server's latents equal
    ``l2c-export run --conditioning cond.npz --cfg-scale 3`` on the same latents to 1e-5 of the range, and its images
    are theirs decoded by the build's VAE decoder."""
    arrays, noise = _request(family, 2, 6, seed=1)
    client = httpclient.InferenceServerClient(server.http_url, network_timeout=120)
    try:
        inputs = _typed_inputs(httpclient, **arrays, noise=noise, cfg_scale=_f32(np.full((2, 1), CFG_SCALE)))
        answer = client.infer(family, inputs)
    finally:
        client.close()
    served = answer.as_numpy("samples")
    np.savez(tmp_path / "cond.npz", **arrays)
    np.save(tmp_path / "z.npy", noise)
    run_cli("run", str(builds[family]), "--noise", str(tmp_path / "z.npy"), "--conditioning", str(tmp_path / "cond.npz"),
            "--cfg-scale", str(CFG_SCALE), "--save-latents", str(tmp_path / "out.npy"))
    want = np.load(tmp_path / "out.npy")
    assert served.shape == want.shape == noise.shape
    _close_to(served, want)
    decoded = to_uint8(L2CPipeline.from_engine_dir(builds[family]).decoder(want))  # scaled, shifted, FLUX.1 unpacked
    assert np.abs(answer.as_numpy("images").astype(int) - decoded.astype(int)).max() <= 1


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
