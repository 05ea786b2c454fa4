"""U-ViT: the official parameter layout, checkpoint loading, the L2C cached forward, DPM-Solver-2S, the authors' dpm20
router, and the whole toolchain (build, verify, run) on a U-ViT checkpoint."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from l2c_export.core import manifest as manifest_io
from l2c_export.models import family_of_model, get_family
from l2c_export.models.checkpoint import CheckpointError
from l2c_export.models.uvit.model import UViT, UViTConfig, uvit_config
from l2c_export.routers import load_router
from l2c_export.samplers import create_sampler, denoise
from l2c_export.samplers.dpm_solver import DPMSolver2S
from l2c_export.samplers.guidance import make_noise
from l2c_export.models.reference import sample_reference

from .conftest import SHARED, run_cli

UVIT = get_family("uvit")
TINY_UVIT = UViTConfig(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=4, num_heads=2, num_classes=11)
DPM20_ROUTER = SHARED / "data" / "official-l2c" / "dpm20_router.pth"

# One block's keys and the other keys of the official U-ViT libs/uvit.py (conv=False, qkv_bias=False,
# mlp_time_embed=False), written out so that a renamed parameter fails here.
OFFICIAL_TOP_KEYS = {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "label_emb.weight",
                     "norm.weight", "norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
OFFICIAL_BLOCK_KEYS = {"norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
                       "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"}


def official_keys(depth: int) -> set[str]:
    blocks = [f"in_blocks.{i}" for i in range(depth // 2)] + ["mid_block"] + [f"out_blocks.{i}"
                                                                              for i in range(depth // 2)]
    skip = {f"out_blocks.{i}.skip_linear.{p}" for i in range(depth // 2) for p in ("weight", "bias")}
    return OFFICIAL_TOP_KEYS | skip | {f"{block}.{key}" for block in blocks for key in OFFICIAL_BLOCK_KEYS}


def test_state_dict_has_exactly_the_official_layout():
    config = uvit_config("U-ViT-H/2", img_size=32, num_classes=1001)
    state = UViT(config).state_dict()
    assert set(state) == official_keys(28)
    # U-ViT-H/2 on ImageNet 256 latents: 1152 wide, 16 x 16 patches + label and time tokens, 1001 labels (null 1000).
    assert state["pos_embed"].shape == (1, 258, 1152)
    assert state["patch_embed.proj.weight"].shape == (1152, 4, 2, 2)
    assert state["label_emb.weight"].shape == (1001, 1152)
    assert state["out_blocks.0.skip_linear.weight"].shape == (1152, 2 * 1152)
    assert state["decoder_pred.weight"].shape == (2 * 2 * 4, 1152)
    conv = UViT(UViTConfig(**{**TINY_UVIT.to_dict(), "conv": True})).state_dict()
    assert conv["final_layer.weight"].shape == (4, 4, 3, 3)


@pytest.mark.parametrize("name,embed_dim,depth,heads", [("U-ViT-S/2", 512, 12, 8), ("U-ViT-M/2", 768, 16, 12),
                                                        ("U-ViT-L/2", 1024, 20, 16), ("U-ViT-H/2", 1152, 28, 16)])
def test_presets(name, embed_dim, depth, heads):
    family = family_of_model(name)
    config = family.preset(name, 256, 1001)
    assert family.name == "uvit" and family.default_sampler == "dpm_solver_2s"
    assert (config.embed_dim, config.depth, config.num_heads, config.img_size) == (embed_dim, depth, heads, 32)
    assert (config.mlp_ratio, config.patch_size, config.qkv_bias, config.mlp_time_embed) == (4, 2, False, False)
    assert family.num_layers(config) == depth + 1 and family.null_class(config) == 1000


def _random_state(config: UViTConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: torch.randn_like(v) * 0.2 for k, v in UViT(config).state_dict().items()}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_loads_an_official_checkpoint(tmp_path, suffix):
    state = _random_state(TINY_UVIT)
    path = tmp_path / f"nnet_ema{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, str(path))
    model = UVIT.load(path, TINY_UVIT)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_checkpoint_that_does_not_fit_names_keys_and_shapes(tmp_path):
    state = _random_state(TINY_UVIT)
    del state["mid_block.attn.qkv.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["label_emb.weight"] = torch.zeros(5, 32)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        UVIT.load(path, TINY_UVIT)
    message = str(error.value)
    assert str(path) in message and "mid_block.attn.qkv.weight" in message and "extra.weight" in message
    assert "label_emb.weight: file (5, 32), model (11, 32)" in message


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_checkpoint_is_never_unpickled_without_restriction(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"x": _Payload()}, f)
    with pytest.raises(CheckpointError, match="without unrestricted unpickling"):
        UVIT.load(path, TINY_UVIT)


# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_uvit() -> UViT:
    model = UViT(TINY_UVIT).eval()
    model.load_state_dict(_random_state(TINY_UVIT, seed=2))
    return model


def _inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    return x, torch.tensor([951.84, 11.4])[:batch], torch.tensor([3, 10])[:batch]


def _official_tokens(model: UViT, x, t, y):
    """The official forward's embedding, transcribed: [label, time, patches] + pos_embed, sinusoidal time token."""
    half = model.config.embed_dim // 2
    freqs = torch.exp(-np.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    time_token = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).unsqueeze(1)
    patches = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    return torch.cat([model.label_emb(y).unsqueeze(1), time_token, patches], dim=1) + model.pos_embed


def _official_decode(model: UViT, tokens):
    out = model.decoder_pred(model.norm(tokens))[:, 2:, :]  # B (h w) (p1 p2 C) -> B C (h p1) (w p2)
    b, h, p, c = out.shape[0], 4, 2, 4
    return out.reshape(b, h, h, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, h * p)


def test_cached_forward_with_everything_computed_is_the_official_forward(tiny_uvit):
    x, t, y = _inputs()
    with torch.no_grad():
        tokens = _official_tokens(tiny_uvit, x, t, y)
        skips = []
        for block in tiny_uvit.in_blocks:
            tokens = tokens + block.attn(block.norm1(tokens))
            tokens = tokens + block.mlp(block.norm2(tokens))
            skips.append(tokens)
        block = tiny_uvit.mid_block
        tokens = tokens + block.attn(block.norm1(tokens))
        tokens = tokens + block.mlp(block.norm2(tokens))
        for block in tiny_uvit.out_blocks:
            tokens = block.skip_linear(torch.cat([tokens, skips.pop()], dim=-1))
            tokens = tokens + block.attn(block.norm1(tokens))
            tokens = tokens + block.mlp(block.norm2(tokens))
        want = _official_decode(tiny_uvit, tokens)
        cache: dict[int, torch.Tensor] = {}
        got = tiny_uvit.forward_cached(x, t, y, [True] * 10, cache)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sorted(cache) == list(range(10)) and cache[0].shape == (2, 18, 32)
    assert tiny_uvit.mid_block.mlp.act.approximate == "none"  # timm's Mlp: exact GELU


def test_reused_values_are_added_to_the_residual_stream_and_skip_linear_always_runs(tiny_uvit):
    """Every sub-layer reused: each block adds its two cached values; out_blocks still merge their long skip."""
    x, t, y = _inputs()
    generator = torch.Generator().manual_seed(4)
    cache = {k: torch.randn(2, 18, 32, generator=generator) for k in range(10)}
    with torch.no_grad():
        tokens = _official_tokens(tiny_uvit, x, t, y)
        skips = []
        for layer in range(2):
            tokens = tokens + cache[2 * layer] + cache[2 * layer + 1]
            skips.append(tokens)
        tokens = tokens + cache[4] + cache[5]
        for offset, block in enumerate(tiny_uvit.out_blocks):
            layer = 3 + offset
            tokens = block.skip_linear(torch.cat([tokens, skips.pop()], dim=-1)) + cache[2 * layer]
            tokens = tokens + cache[2 * layer + 1]
        want = _official_decode(tiny_uvit, tokens)
        got = tiny_uvit.forward_cached(x, t, y, [False] * 10, dict(cache))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_reused_mlp_reads_the_stream_after_the_fresh_attention(tiny_uvit):
    x, t, y = _inputs()
    with torch.no_grad():
        cache: dict[int, torch.Tensor] = {}
        tiny_uvit.forward_cached(x, t, y, [True] * 10, cache)
        first = {k: v.clone() for k, v in cache.items()}
        compute = [True] * 10
        compute[5] = False  # mid_block's MLP reused
        tiny_uvit.forward_cached(x, t + 100, y, compute, cache)
    assert torch.equal(cache[5], first[5])  # not recomputed
    assert not torch.equal(cache[4], first[4])  # the attention before it was


# ---------------------------------------------------------------------------------------------------------------------
def _authors_dpm_solver_2s(model_fn, x: torch.Tensor, nfe: int) -> torch.Tensor:
    """Their dpm_solver_pp.py, transcribed for this test in float64: NoiseScheduleVP('discrete') over the
    stable-diffusion betas, predict_x0, singlestep order 2, time_uniform from T = 1 to eps = 1e-3."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    log_alphas = 0.5 * torch.log(1 - betas).cumsum(0)
    t_knots = torch.linspace(1 / 1000, 1.0, 1000, dtype=torch.float64)

    def interp(v, xp, fp):  # piecewise linear, extended at the ends (their interpolate_fn)
        i = int(torch.clamp(torch.searchsorted(xp, v.reshape(1)) - 1, 0, len(xp) - 2))
        return fp[i] + (v - xp[i]) * (fp[i + 1] - fp[i]) / (xp[i + 1] - xp[i])

    def log_alpha(t):
        return interp(t, t_knots, log_alphas)

    def sigma(t):
        return torch.sqrt(1 - torch.exp(2 * log_alpha(t)))

    def lam(t):
        return log_alpha(t) - 0.5 * torch.log(1 - torch.exp(2 * log_alpha(t)))

    def inverse_lambda(value):
        la = -0.5 * torch.logaddexp(torch.zeros((), dtype=torch.float64), -2 * value)
        return interp(la, log_alphas.flip(0), t_knots.flip(0))

    def data_prediction(x, t):
        eps = model_fn(x, t * 1000)
        return (x - sigma(t) * eps) / torch.exp(log_alpha(t))

    times = torch.linspace(1.0, 1e-3, nfe // 2 + 1, dtype=torch.float64)
    for k in range(nfe // 2):
        s, t = times[k], times[k + 1]
        h = lam(t) - lam(s)
        s1 = inverse_lambda(lam(s) + 0.5 * h)
        x0_s = data_prediction(x, s)
        x_s1 = (sigma(s1) / sigma(s)) * x - torch.exp(log_alpha(s1)) * torch.expm1(-0.5 * h) * x0_s
        x0_s1 = data_prediction(x_s1, s1)
        phi = torch.expm1(-h)
        x = (sigma(t) / sigma(s)) * x - torch.exp(log_alpha(t)) * phi * x0_s \
            - (0.5 / 0.5) * torch.exp(log_alpha(t)) * phi * (x0_s1 - x0_s)
    return x


def _toy_eps(x, t):
    return 0.3 * torch.tanh(x) + 1e-3 * t * torch.cos(x)


def test_dpm_solver_2s_is_the_authors_singlestep_order_2():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sampler = create_sampler("dpm_solver_2s", 20)
    seen = []

    def model(call):
        seen.append((call.index, call.t))
        return _toy_eps(call.x, torch.tensor(call.t, dtype=torch.float64))

    got = denoise(sampler, x.clone(), model)
    want = _authors_dpm_solver_2s(_toy_eps, x.clone(), 20)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert [index for index, _ in seen] == list(range(20))
    starts = np.array([t for index, t in seen if index % 2 == 0])
    np.testing.assert_allclose(starts, np.linspace(1, 1e-3, 11)[:-1] * 1000)  # the model sees t * 1000


def test_dpm_solver_2s_survives_the_manifest_and_refuses_odd_nfe():
    import json

    sampler = create_sampler("dpm_solver_2s", 8)
    again = DPMSolver2S.from_dict(json.loads(json.dumps(sampler.to_dict())))
    x = np.random.default_rng(0).standard_normal((1, 4, 2, 2))
    numpy_model = lambda call: 0.3 * np.tanh(call.x) + 1e-3 * call.t * np.cos(call.x)  # noqa: E731
    np.testing.assert_array_equal(denoise(again, x, numpy_model), denoise(sampler, x, numpy_model))
    assert sampler.official_cache_calls() == [2, 4, 6]
    with pytest.raises(ValueError, match="must be even"):
        create_sampler("dpm_solver_2s", 7)


# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def dpm20_router() -> Path:
    if not DPM20_ROUTER.is_file():
        pytest.skip(f"the authors' U-ViT router is not here ({DPM20_ROUTER}): ../shared is absent")
    return DPM20_ROUTER


def test_the_authors_dpm20_router_decodes_to_189_of_522(dpm20_router):
    router = load_router(dpm20_router)
    assert router.sampler == "dpm_solver_2s" and router.logits.shape == (20, 58)
    schedule = router.to_schedule(0.9)
    cache_calls = schedule.cache_steps()
    assert cache_calls == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert int(schedule.compute[cache_calls].sum()) == 189
    others = [c for c in range(20) if c not in cache_calls]
    assert schedule.compute[others].all()  # step 0 and every midpoint call compute everything
    # Their load_ranking: router k serves solver step k.
    raw = torch.load(dpm20_router, map_location="cpu", weights_only=True)
    for k in range(1, 10):
        np.testing.assert_array_equal(schedule.compute[2 * k], torch.sigmoid(raw[f"{k}.prob"]).numpy() > 0.9)
    result = run_cli("schedule", "--router", str(dpm20_router), "--model", "U-ViT-H/2", "--threshold", "0.9")
    assert "computing 189 of 522 sub-layers (63.79% removed)" in result.stdout


# ---------------------------------------------------------------------------------------------------------------------
def _authors_format_router(path: Path, nfe: int, num_layers: int, seed: int = 0) -> Path:
    """A router in the authors' U-ViT format: a bare OrderedDict of '{i}.prob' logits, one per model call."""
    generator = torch.Generator().manual_seed(seed)
    torch.save(OrderedDict((f"{i}.prob", torch.randn(2 * num_layers, generator=generator) * 2)
                           for i in range(nfe)), path)
    return path


@pytest.mark.slow
def test_build_verify_run_on_a_uvit_checkpoint_with_an_authors_router(tmp_path):
    config = uvit_config("U-ViT-S/2", img_size=8, num_classes=1001)
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.05 for k, v in UViT(config).state_dict().items()}
    checkpoint = tmp_path / "uvit-s2.pth"
    torch.save(state, checkpoint)
    router = _authors_format_router(tmp_path / "dpm8_router.pth", 8, config.num_layers)
    out = tmp_path / "engines"
    run_cli("build", "--checkpoint", str(checkpoint), "--model", "U-ViT-S/2", "--image-size", "64",
            "--num-classes", "1001", "--router", str(router), "--threshold", "0.5", "--steps", "8", "--out", str(out))
    data = manifest_io.load(out)
    assert data["model"]["family"] == "uvit" and data["sampler"]["kind"] == "dpm_solver_2s"
    assert data["sampler"]["num_calls"] == 8 and data["guidance"]["null_class"] == 1000
    schedule = load_router(router).to_schedule(0.5)
    assert not schedule.compute.all() and len(data["subsets"]) == len(schedule.distinct_subsets())
    # Liveness: a subset reads exactly what it does not compute; weights stored once for every graph.
    for subset in data["subsets"]:
        reads = {t["slot"] for t in subset["inputs"] if t["role"] == "cache"}
        assert reads == {f"{'attn' if k % 2 == 0 else 'mlp'}_{k // 2}" for k, c in enumerate(subset["compute"])
                         if not c}
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".bin") == ["weights.bin"]
    verified = run_cli("verify", str(out))
    assert "FAIL" not in verified.stdout and verified.stdout.count("ok  ") == len(data["subsets"])

    noise = make_noise(7, (2, 4, 8, 8))
    np.save(tmp_path / "z.npy", noise)
    run_cli("run", str(out), "--labels", "207,992", "--cfg-scale", "1.4", "--noise", str(tmp_path / "z.npy"),
            "--save-latents", str(tmp_path / "out.npy"))
    samples = np.load(tmp_path / "out.npy")
    reference = sample_reference(UVIT.load(checkpoint, config), create_sampler("dpm_solver_2s", 8), [207, 992],
                                 noise, cfg_scale=1.4, schedule=schedule, progress=False)
    assert np.abs(samples - reference).max() <= 1e-4 * (reference.max() - reference.min())
