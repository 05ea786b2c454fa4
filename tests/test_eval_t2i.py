"""Text to image against the peer: ``eval --model t2i-digits`` (every method from captions, cache-dit's DBCache on
diffusers' own pipeline with its compute counted from the blocks it ran), and the shipped t2i-digits build sampled
from prompts (``run --prompt``) as diffusers' PixArtAlphaPipeline samples it, and by the C++ ``l2c-run`` from prompt
to PNG as ``run`` does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from l2c_export.demo import t2i
from l2c_export.models.zoo import embedded_default

from .conftest import run_cli
from .test_cpp import _prompt_parity, cpp_build  # noqa: F401 (cpp_build: a fixture)

METHODS = ("full", "l2c", "fora", "random", "fewer-steps", "cache-dit")


@pytest.fixture(scope="module")
def t2i_build(t2i_digits_build):
    """``build --model t2i-digits`` (tests/conftest.py's, shared with tests/test_t2i_digits.py)."""
    return t2i_digits_build


def _block_macs(spec) -> tuple[object, list[int]]:
    macs = spec.family.count_macs(spec.config)
    blocks = [sum(macs.sublayer(j) for j, name in enumerate(spec.sublayer_names)
                  if name.startswith(f"transformer_blocks.{i}.")) for i in range(4)]
    return macs, blocks


def test_dbcache_compute_is_counted_from_the_blocks_that_ran():
    """cache-dit's DBCache (F1B0) on diffusers' pipeline: the hooks count the first block at every forward and the
    others at the forwards cache-dit did not serve from its cache (its own cached_steps: the two counts agree); a
    higher threshold caches more and counts less; without cache-dit every sub-layer runs (fraction 1)."""
    from l2c_export.demo import diffusers_caches as caches
    from l2c_export.samplers.guidance import make_noise

    spec = embedded_default("t2i-digits")
    macs, blocks = _block_macs(spec)
    captions = [text for text, _, _ in t2i.evaluation_prompts(4)]
    noise = make_noise(0, (4, 4, 4, 4))
    pipelines = caches.FolderPipelines(t2i.T2I_DIR, 20, 4.5)
    count = dict(macs=macs, sublayers=spec.sublayer_names, batch_size=2)
    full = caches.draw(pipelines.open(None, {}, {}), captions, noise, **count)
    assert full.mac_fraction == 1.0 and full.own is None
    fractions = []
    for threshold in (0.05, 0.3):
        knobs = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "max_warmup_steps": 2,
                 "residual_diff_threshold": threshold}
        drawn = caches.draw(pipelines.open(caches.PEERS["cache-dit"], knobs, {}), captions, noise, **count)
        own = drawn.own
        assert own["images_per_call"] == [2, 2] and own["blocks_skipped_per_cached_step"] == [1, 4]
        cached = sum(own["cached_steps_per_call"])  # per call: each of its 2 images, both guidance halves
        spent = 4 * 20 * 2 * macs.full - cached * 2 * 2 * sum(blocks[1:])
        assert drawn.mac_fraction == pytest.approx(spent / (4 * 20 * 2 * macs.full))
        assert caches.own_mac_fraction(own, macs, spec.sublayer_names, 20) == pytest.approx(drawn.mac_fraction)
        assert drawn.images.shape == (4, 1, 8, 8) and np.abs(drawn.images).max() <= 1.0
        fractions.append(drawn.mac_fraction)
    assert fractions[0] > fractions[1]
    assert np.abs(drawn.images - full.images).max() > 0  # caching changed the images


@pytest.mark.slow
def test_eval_model_t2i_digits_has_every_methods_row_timed_and_the_grid(tmp_path):
    """eval --model t2i-digits (6 captions, one DBCache setting searched): a matched row per method with every
    metric; cache-dit's MAC fraction is the one its block counts give, near the learned schedule's; the grid and
    the plot are written."""
    from l2c_export.demo.eval_plots import plot_fd, plot_t2i_grid
    from l2c_export.demo.evaluate import evaluate

    spec = embedded_default("t2i-digits")
    macs, blocks = _block_macs(spec)
    captions = t2i.evaluation_prompts(6)
    grid = {}
    report = evaluate(spec, spec.schedule(), budgets=(), num_samples=6, random_seeds=(0,), progress=False,
                      captions=captions, batch_size=3, grid=grid, peer_search={"size": "small"})
    rows = {row["method"]: row for row in report["results"]}
    assert tuple(rows) == METHODS
    for row in rows.values():
        for name in ("mac_fraction", "fd_to_full", "fd", "accuracy", "seconds_per_image"):
            assert row[name] is not None and np.isfinite(row[name]), (row["method"], name)
        assert row["seconds_per_image"] > 0
        assert row["method"] == "full" or np.isfinite(row["psnr"])
    assert rows["full"]["fd_to_full"] == 0.0 and rows["full"]["accuracy"] >= 5 / 6
    assert rows["l2c"]["mac_fraction"] == pytest.approx(report["learned_mac_fraction"], abs=1e-6)
    assert report["learned_mac_fraction"] < 0.75
    peer = rows["cache-dit"]
    assert peer["own_counter"]["images_per_call"] == [3, 3] and peer["dbcache"]["Fn_compute_blocks"] == 1
    assert peer["mac_fraction"] == pytest.approx(peer["own_mac_fraction"], abs=1e-6)  # hooks and cache-dit agree
    assert abs(peer["mac_fraction"] - report["learned_mac_fraction"]) < 0.15
    assert len(peer["calibration"]["tried"]) >= 2
    assert report["prompts"]["num_samples"] == 6 and "ONNX Runtime" in report["timing"]["schedules"]
    assert grid["full"].shape == grid["l2c"].shape == grid["cache-dit"].shape == (len(grid["captions"]), 1, 8, 8)
    plot_t2i_grid(grid, tmp_path / "grid.png")
    plot_fd(report, tmp_path / "plot.png")
    assert Image.open(tmp_path / "grid.png").size[0] > 100 and (tmp_path / "plot.png").stat().st_size > 0


@pytest.mark.slow
def test_eval_t2i_refuses_what_does_not_apply(tmp_path):
    np.savez(tmp_path / "p.npz", prompt_embeds=np.zeros((1, 4, 64), np.float32))
    refused = run_cli("eval", "--model", "t2i-digits", "--conditioning-data", str(tmp_path / "p.npz"), check=False)
    assert refused.returncode == 2 and "--conditioning-data" in refused.stderr
    refused = run_cli("eval", "--model", "dit-digits", "--grid", str(tmp_path / "g.png"), check=False)
    assert refused.returncode == 2 and "--grid" in refused.stderr and not (tmp_path / "g.png").exists()


def _read_digits_png(path, count: int) -> np.ndarray:
    """run --out's grid (one row, 8x-upscaled 8x8 images, 2-pixel borders) back to (count, 1, 8, 8) in [-1, 1]."""
    picture = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    images = []
    for i in range(count):
        left = 2 + i * (64 + 2)
        tile = Image.fromarray(picture[2:66, left:left + 64]).resize((8, 8), Image.Resampling.BOX)
        images.append(np.asarray(tile, dtype=np.float32) / 127.5 - 1.0)
    return np.stack(images)[:, None]


@pytest.mark.slow
def test_run_prompt_on_the_t2i_digits_build_draws_the_digit_named(t2i_build, tmp_path):
    """run E --prompt "a handwritten seven" --seed 0 --out x.png writes a seven (the digits classifier reads the
    PNG); several prompts, a held-out caption form among them, read as theirs."""
    from l2c_export.demo.classifier import load_classifier

    classifier = load_classifier()
    run_cli("run", str(t2i_build), "--prompt", "a handwritten seven", "--seed", "0", "--out", str(tmp_path / "x.png"))
    seven = _read_digits_png(tmp_path / "x.png", 1)
    assert classifier(torch.from_numpy(seven)).argmax(dim=1).tolist() == [7]
    prompts = ["the number 3", "a handwritten digit zero", "number nine"]
    options = [option for prompt in prompts for option in ("--prompt", prompt)]
    run_cli("run", str(t2i_build), *options, "--seed", "1", "--out", str(tmp_path / "three.png"))
    read = classifier(torch.from_numpy(_read_digits_png(tmp_path / "three.png", 3))).argmax(dim=1).tolist()
    assert read == [3, 0, 9]


@pytest.mark.slow
def test_run_prompt_full_equals_diffusers_pixart_pipeline_on_t2i_digits(t2i_build, tmp_path):
    """run --prompt --noise --full --save-latents equals PixArtAlphaPipeline.from_pretrained(t2i-digits)(prompt,
    latents, output_type="latent") to 1e-4 of the range (tokenizer and T5 included); the decoded images
    (L2CPipeline(prompt=..., decode=True)) equal the pipeline's output_type="np" to 1e-3."""
    from l2c_export.runtime.pipeline import L2CPipeline

    prompts = ["a handwritten seven", "the number 4"]
    noise = np.random.default_rng(3).standard_normal((2, 4, 4, 4)).astype(np.float32)
    np.save(tmp_path / "z.npy", noise)
    run_cli("run", str(t2i_build), "--prompt", prompts[0], "--prompt", prompts[1], "--noise", str(tmp_path / "z.npy"),
            "--full", "--save-latents", str(tmp_path / "out.npy"))
    got = np.load(tmp_path / "out.npy")
    pipe = t2i.load_pipeline()

    def reference(output_type):
        with torch.no_grad():
            return pipe(prompts, latents=torch.from_numpy(noise), num_inference_steps=t2i.SAMPLE_STEPS,
                        output_type=output_type, use_resolution_binning=False, clean_caption=False).images

    want = reference("latent").numpy()
    assert got.shape == want.shape == (2, 4, 4, 4)
    assert np.abs(got - want).max() <= 1e-4 * (want.max() - want.min())
    decoded = L2CPipeline.from_engine_dir(t2i_build)(prompt=prompts, noise=noise, full=True, decode=True).decoded
    images = np.clip(decoded.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
    assert np.abs(images - reference("np")).max() <= 1e-3


def test_l2c_run_turns_prompts_into_the_png_run_writes_on_the_t2i_digits_demo(cpp_build, t2i_build, tmp_path):
    """The shipped t2i-digits build (PixArt-α, its tiny T5 with a WordLevel tokenizer, which the runtime reads itself,
    and its learned schedule): --prompt (a caption, and one with capitals, an unknown word and punctuation) --seed
    --png equals l2c-export run --prompt --seed --out: the latents to 1e-5 of their range, the PNG pixel for pixel."""
    pixels = _prompt_parity(t2i_build, tmp_path, "--prompt", "a handwritten seven", "--prompt",
                            "The Digit 3, drawn!", "--seed", "4", tolerance=1e-5)
    assert pixels.shape[0] > 8 and pixels.std() > 0
