"""Seeds that match (issue 31, point 3): ``make_noise(seed, shape)`` (numpy, no torch) is the initial latents
diffusers draws with ``generator=torch.Generator("cpu").manual_seed(seed)``, bit for bit, for every family's latent
shape (``randn_tensor``; FLUX.1's packed latents drawn unpacked and packed, as ``FluxPipeline.prepare_latents``); a
batch handed out in parts is the rows of the whole draw."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from types import SimpleNamespace

from l2c_export.samplers.guidance import InitialNoiseRows, make_noise, step_noise
from l2c_export.samplers.torch_noise import torch_randn

from .conftest import REPO

SEEDS = [0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 63 - 1, 2 ** 64 - 1, -1, -(2 ** 63)]
SHAPES = {  # torch_randn's; make_noise's but the packed ones
    "one value": (1,),
    "under 16": (3, 5),
    "4-D DiT/PixArt/SD3 latents": (2, 4, 8, 8),
    "4-D, numel % 16 != 0": (3, 3, 5, 7),
    "packed FLUX (N, T, C*4)": (2, 16, 64),
    "packed, numel % 16 != 0": (1, 9, 12),
    "5-D video (N, C, F, H, W)": (2, 16, 3, 4, 6),
    "5-D, numel % 16 != 0": (1, 4, 3, 5, 5),
}
AVX2 = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX2",
                          reason="torch_randn's default kernel is torch's AVX2 one; this CPU runs another")


def _diffusers_noise(seed: int, shape) -> np.ndarray:
    return randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), device=torch.device("cpu"),
                        dtype=torch.float32).numpy()


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a.view(np.uint32),
                                                                                       b.view(np.uint32))


@AVX2
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_torch_randn_equals_diffusers_randn_tensor_bit_for_bit(shape):
    for seed in SEEDS:
        assert _same_bits(torch_randn(seed, shape), _diffusers_noise(seed, shape)), (seed, shape)
        if len(shape) != 3:  # make_noise draws the shape as it is but for FLUX.1's packed latents (below)
            assert _same_bits(make_noise(seed, shape), _diffusers_noise(seed, shape)), (seed, shape)


@AVX2
@pytest.mark.parametrize("batch,channels,pixels", [(2, 16, 64), (1, 4, 48)])
def test_make_noise_of_packed_latents_equals_flux_pipelines_prepare_latents(batch, channels, pixels):
    """FluxPipeline.prepare_latents (diffusers' own code, on a stand-in for the pipeline's VAE scale factor) draws
    (n, C, h, w) and packs it into (n, T, 4 C); make_noise of that packed shape is the same, bit for bit."""
    from diffusers import FluxPipeline

    stand_in = SimpleNamespace(vae_scale_factor=8, _pack_latents=FluxPipeline._pack_latents,
                               _prepare_latent_image_ids=FluxPipeline._prepare_latent_image_ids)
    for seed in SEEDS:
        want, _ = FluxPipeline.prepare_latents(stand_in, batch, channels, pixels, pixels, torch.float32,
                                               torch.device("cpu"), torch.Generator().manual_seed(seed))
        assert _same_bits(make_noise(seed, tuple(want.shape)), want.numpy()), (seed, tuple(want.shape))


@AVX2
def test_torch_randn_equals_torch_on_many_sizes_and_seeds():
    """Every count 1..80 (each remainder mod 16, the numel < 16 path), and random counts and seeds."""
    rng = np.random.default_rng(0)
    cases = [(7, n) for n in range(1, 81)] + [(int(rng.integers(0, 2 ** 63)), int(rng.integers(1, 3000)))
                                             for _ in range(60)]
    for seed, count in cases:
        want = torch.randn(count, generator=torch.Generator().manual_seed(seed)).numpy()
        assert _same_bits(torch_randn(seed, (count,)), want), (seed, count)


def test_the_scalar_kernel_equals_torch_under_the_default_cpu_capability(tmp_path):
    """kernel="scalar" (torch's AVX512, DEFAULT and aarch64 kernel) equals a torch started with
    ATEN_CPU_CAPABILITY=default, bit for bit, on every family's latent shape."""
    script = (f"import sys, numpy as np, torch\n"
              f"assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'\n"
              f"np.savez(sys.argv[1], *[torch.randn(shape, generator=torch.Generator().manual_seed(seed)).numpy() "
              f"for seed in {SEEDS[:4]!r} for shape in {list(SHAPES.values())!r}])\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "want.npz")], check=True, cwd=REPO,
                   env={"ATEN_CPU_CAPABILITY": "default", "PATH": "/usr/bin:/bin"}, timeout=120)
    want = np.load(tmp_path / "want.npz")
    cases = [(seed, shape) for seed in SEEDS[:4] for shape in SHAPES.values()]
    for index, (seed, shape) in enumerate(cases):
        assert _same_bits(torch_randn(seed, shape, kernel="scalar"), want[f"arr_{index}"]), (seed, shape)
    assert not _same_bits(torch_randn(0, (2, 4, 8, 8), kernel="scalar"), torch_randn(0, (2, 4, 8, 8)))
    with pytest.raises(ValueError, match="kernel 'sse'; expected one of avx2, scalar"):
        torch_randn(0, (4,), kernel="sse")


@pytest.mark.parametrize("seed", [2 ** 64, -(2 ** 63) - 1, 1.5, True, "3"])
def test_a_seed_torch_would_refuse_is_refused_naming_seed(seed):
    with pytest.raises(ValueError, match=r"^seed .*expected an integer"):
        make_noise(seed, (1, 4, 8, 8))


def test_rows_drawn_in_parts_are_the_rows_of_the_whole_draw():
    """(5, 3, 5, 5): 375 values, so torch redraws the last 16, which straddle rows 3 and 4: parts of 2, 2 and 1 rows
    still give the rows of diffusers' one draw of 5."""
    rows = InitialNoiseRows(11, (3, 5, 5), 5)
    parts = np.concatenate([rows.draw(2), rows.draw(2), rows.draw(1)])
    assert _same_bits(parts, _diffusers_noise(11, (5, 3, 5, 5)))
    assert not np.array_equal(parts[:2], make_noise(11, (2, 3, 5, 5)))  # why the whole draw is made once
    with pytest.raises(ValueError, match="draw has 5"):
        rows.draw(1)


def test_ddpm_step_noise_stays_numpy_and_seeded_apart():
    """DDPM's step noise is numpy's default_rng(seed + step + 1) stream (so a (2n, ...) draw starts with the (n, ...)
    one), not the initial noise's."""
    assert np.array_equal(step_noise(3, 0, (2, 4, 4)),
                          np.random.default_rng(4).standard_normal((2, 4, 4), dtype=np.float32))
    assert np.array_equal(step_noise(3, 1, (4, 4, 4))[:2], step_noise(3, 1, (2, 4, 4)))
    assert not np.array_equal(step_noise(3, 0, (2, 4, 4)), make_noise(3, (2, 4, 4)))
