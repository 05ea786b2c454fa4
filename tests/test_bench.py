"""The benchmark's output contract (fields and their arithmetic). Speed itself is never asserted in a test."""

from __future__ import annotations

import json

import pytest

from l2c_export.builder.build import BuildRequest, build

from .conftest import REPO, run_cli

FIELDS = {"backend", "batch", "full_seconds", "schedule_seconds", "speedup", "ideal_speedup", "step_overhead_fraction",
          "memory_all_engines_bytes", "memory_full_engine_bytes", "model_weights_bytes", "repeats", "warmup_runs",
          "full_seconds_min", "full_seconds_max", "schedule_seconds_min", "schedule_seconds_max", "speedup_min",
          "speedup_max", "threads"}


@pytest.mark.slow
def test_bench_writes_every_field_and_a_plot(default_build, tmp_path):
    out = default_build
    result = run_cli("bench", str(out), "--repeats", "2", "--batch", "1", "--threads", "1", "--json",
                     str(tmp_path / "b.json"), "--png", str(tmp_path / "b.png"))
    assert "of ideal" in result.stdout and "spread" in result.stdout
    assert "medians of 2 interleaved (full, schedule) pair(s) after 1 warm-up run(s) of each" in result.stdout
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["machine"]["cores"] >= 1
    # --threads reached torch and ONNX Runtime's pool; the machine's load when they were chosen is recorded
    assert {key: data["machine"][key] for key in ("threads", "threads_from", "torch_threads", "onnxruntime_threads",
                                                   "load_average", "busy_cores")} == {
        "threads": 1, "threads_from": "--threads", "torch_threads": 1, "onnxruntime_threads": 1, "load_average": 0.0,
        "busy_cores": 0}
    rows = data["results"]
    assert [r["backend"] for r in rows] == ["onnxruntime", "torch"]
    for row in rows:
        assert FIELDS <= set(row)
        assert (row["repeats"], row["warmup_runs"], row["threads"]) == (2, 1, 1)
        assert row["full_seconds_min"] <= row["full_seconds"] <= row["full_seconds_max"]
        assert row["schedule_seconds_min"] <= row["schedule_seconds"] <= row["schedule_seconds_max"]
        assert row["speedup_min"] <= row["speedup_max"]
        assert row["speedup"] == pytest.approx(row["full_seconds"] / row["schedule_seconds"])
        assert row["ideal_speedup"] == pytest.approx(json.loads((out / "manifest.json").read_text())["macs"]
                                                     ["ideal_speedup"])
        assert 0.0 <= row["step_overhead_fraction"] < 1.0
        assert row["memory_all_engines_bytes"] > 0 and row["memory_full_engine_bytes"] > 0
        assert row["model_weights_bytes"] == (out / "weights.bin").stat().st_size
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_bench_runs_diffusers_builds_with_the_manifests_conditioning(tiny_diffusers, tmp_path):
    """A DiT build (class labels) and a PixArt build (prompt embeddings and masks, the model's only conditioning) of
    tiny diffusers folders, each over a schedule that reuses sub-layers, measured together on both backends."""
    import numpy as np

    from l2c_export.core.schedule import Schedule
    from l2c_export.models.zoo import from_diffusers

    folders = []
    for family in ("dit", "pixart"):
        spec = from_diffusers(tiny_diffusers(family))
        rows = np.ones((4, len(spec.sublayer_names)), dtype=bool)
        rows[1::2, 1:] = False
        out = tmp_path / family
        build(BuildRequest(spec=spec, schedule=Schedule(rows, sublayers=spec.sublayer_names, mode="general"),
                           sampler=spec.sampler(None, 4), out_dir=out), progress=False)
        folders.append(out)
    run_cli("bench", *map(str, folders), "--repeats", "1", "--batch", "1", "--prompt-tokens", "9",
            "--json", str(tmp_path / "b.json"))
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    assert [(r["model"].split()[0], r["backend"]) for r in rows] == [
        ("DiTTransformer2DModel", "onnxruntime"), ("PixArtTransformer2DModel", "onnxruntime"),
        ("DiTTransformer2DModel", "torch"), ("PixArtTransformer2DModel", "torch")]
    assert [r["prompt_tokens"] for r in rows] == [None, 9, None, 9]  # --prompt-tokens over the build's 120
    for row, folder in zip(rows, folders * 2):
        manifest = json.loads((folder / "manifest.json").read_text())
        assert row["ideal_speedup"] == pytest.approx(manifest["macs"]["ideal_speedup"]) and row["ideal_speedup"] > 1
        assert row["num_subsets"] == 2 and row["full_seconds"] > 0 and row["schedule_seconds"] > 0
        assert row["memory_all_engines_bytes"] > 0 and row["memory_full_engine_bytes"] > 0


def test_the_real_size_configs_are_accepted_and_their_macs_counted_per_sublayer():
    """make bench-large's models (DiT-XL/2 256 and PixArt-α 512, 28 blocks of 16 heads of 72) pass their family's
    config checks, and their MACs are counted per named sub-layer on the meta device (no memory): DiT-XL/2's attention
    and MLP equal the authors' DiT-XL/2 count; PixArt's self-attention over 1024 tokens, cross-attention over 120
    prompt tokens projected from 4096 channels, and its MLP are the formulas'."""
    from l2c_export.models import family_of_model
    from l2c_export.tools.bench_suite import real_size_config

    family, config = real_size_config("DiT-XL-2-256")
    macs = family.count_macs(config)
    authors = family_of_model("DiT-XL/2")
    authors_macs = authors.count_macs(authors.preset("DiT-XL/2", 256, 1000))
    assert family.sublayer_names(config)[-2:] == ("transformer_blocks.27.attn1", "transformer_blocks.27.ff")
    assert macs.per_sublayer == (authors_macs.attn, authors_macs.mlp) * 28
    assert macs.full == pytest.approx(authors_macs.full, rel=1e-3)  # ~118.6 GMAC; the always-run parts differ a little

    family, config = real_size_config("PixArt-XL-2-512")
    macs = family.count_macs(config)
    tokens, dim, prompt = 1024, 1152, 120
    attn1 = 4 * tokens * dim * dim + 2 * tokens * tokens * dim
    attn2 = 2 * tokens * dim * dim + 2 * prompt * dim * dim + 2 * tokens * prompt * dim
    ff = 2 * tokens * dim * 4 * dim
    assert len(family.sublayer_names(config)) == 84 and macs.per_sublayer == (attn1, attn2, ff) * 28
    # the caption projection, the patch embedding and the adaLN-single run always
    assert macs.always > prompt * 4096 * dim


def test_sana_and_the_qwen_image_cut_at_real_size_are_accepted_and_their_macs_counted_per_sublayer():
    """make bench-large's Sana 1.6B at 1024 px (20 blocks of 70 linear-attention heads of 32, width 2240; 32 x 32
    DC-AE latents; 300 Gemma-2 tokens of 2304) and Qwen-Image's cut (4 blocks at its width 3072, 256 px: 16 x 16
    packed tokens; 512 prompt tokens of 3584) pass their families' checks, and each block's MACs are the formulas':
    Sana's linear self-attention, cross-attention and GLUMBConv; Qwen-Image's joint attention and its two MLPs. The
    whole Qwen-Image the cut's row projects is the 20B model: 60 blocks, 20.4B parameters (on the meta device)."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from l2c_export.tools.bench_suite import REAL_SIZES, real_size_config

    family, config = real_size_config("Sana-1600M-1024")
    tokens, width, head, heads, prompt, hidden = 32 * 32, 2240, 32, 70, 300, int(2.5 * 2240)
    attn1 = 4 * tokens * width ** 2 + 2 * tokens * (head + 1) * head * heads  # (d + 1) x d per head, not T x T
    attn2 = 2 * tokens * width ** 2 + 2 * prompt * width ** 2 + 2 * tokens * prompt * width
    ff = 2 * tokens * width * hidden + 9 * tokens * 2 * hidden + tokens * hidden * width  # 1x1, depthwise 3x3, 1x1
    assert family.sublayer_names(config)[-3:] == ("transformer_blocks.19.attn1", "transformer_blocks.19.attn2",
                                                  "transformer_blocks.19.ff")
    assert family.count_macs(config).per_sublayer == (attn1, attn2, ff) * 20

    family, config = real_size_config("Qwen-Image-width-4-256")
    tokens, width, prompt = 16 * 16, 3072, 512
    attn = 4 * (tokens + prompt) * width ** 2 + 2 * (tokens + prompt) ** 2 * width
    macs = family.count_macs(config)
    assert macs.per_sublayer == (attn, 8 * tokens * width ** 2, 8 * prompt * width ** 2) * 4
    with torch.device("meta"):  # no memory
        whole = QwenImageTransformer2DModel(**REAL_SIZES["Qwen-Image-width-4-256"].full_config)
    assert whole.config.num_layers == 60 and 20.3e9 < sum(p.numel() for p in whole.parameters()) < 20.5e9


def test_the_wan_cut_at_real_size_is_accepted_its_macs_counted_per_sublayer_and_its_whole_models_projected():
    """make bench-large's Wan2.1 row: Wan2.1-T2V-1.3B's width (12 heads of 128, FFN 8960, UMT5's 4096-wide states) with
    2 of its 30 blocks, 17 frames at 256 px: latents (5, 32, 32), 1280 tokens; each block's self-attention, its
    cross-attention to the 512 prompt tokens (the keys the prompt's, which WanTransformerBlock hands attn2 by
    position) and its FFN are the formulas'. Its projections: the whole 1.3B (1.42B parameters), Wan2.1-T2V-14B
    (14.29B) and Wan2.2-T2V-A14B (two 14B experts: twice the weights, one expert's MACs a step), on the meta device."""
    from l2c_export.tools.bench_suite import REAL_SIZES, full_model_projection, real_size_config

    name = "Wan2.1-1.3B-width-2-17x256"
    family, config = real_size_config(name)
    tokens, width, prompt, hidden = 5 * 16 * 16, 1536, 512, 8960
    assert config.latent_shape == (5, 32, 32) and family.num_tokens(config) == tokens
    attn1 = 4 * tokens * width ** 2 + 2 * tokens * tokens * width
    attn2 = 2 * tokens * width ** 2 + 2 * prompt * width ** 2 + 2 * tokens * prompt * width
    macs = family.count_macs(config)
    assert macs.per_sublayer == (attn1, attn2, 2 * tokens * width * hidden) * 2
    measured = {"bench": {"full_seconds": 10.0, "schedule_seconds": 8.0}}
    whole, large, experts = (full_model_projection(measured, REAL_SIZES[name], 256, prompt, model)
                             for model in REAL_SIZES[name].whole_models())
    assert [p["model"] for p in (whole, large, experts)] == ["Wan2.1-T2V-1.3B", "Wan2.1-T2V-14B", "Wan2.2-T2V-A14B"]
    assert 1.41e9 < whole["parameters"] < 1.43e9 and 14.2e9 < large["parameters"] < 14.4e9
    assert experts["parameters"] == 2 * large["parameters"] and experts["experts"] == 2
    assert experts["macs_per_sample"] == large["macs_per_sample"] and experts["full_seconds"] == large["full_seconds"]
    assert whole["mac_ratio"] == pytest.approx((macs.always + 15 * sum(macs.per_sublayer)) / macs.full, rel=1e-9)
    assert whole["full_seconds"] == pytest.approx(10.0 * whole["mac_ratio"]) and whole["num_frames"] == 17


@pytest.mark.slow
def test_bench_large_rows_of_sana_the_qwen_image_cut_and_the_wan_cut_at_a_tiny_size(tmp_path):
    """make bench-large's path for its Sana, Qwen-Image and Wan2.1 rows, end to end on tiny configs under the rows'
    names (``large_benchmark(..., sizes=...)``; the real schedulers' options, Wan's UniPC): random pipelines saved by
    ``save_pretrained`` without VAE or text encoder, built in a child ``l2c-export build`` (time and peak memory),
    verified, benchmarked (speed against the MAC-counted ideal, memory of all subsets against the full one) and their
    exported full compute run beside ``SanaPipeline`` / ``QwenImagePipeline`` / ``WanPipeline`` (prompt embeddings,
    masks where the model takes them, with their negatives, 300 and 512 tokens; guidance 3, Qwen-Image's as
    ``true_cfg_scale``; its latents packed at 32 px; Wan's 5-D latents of 5 frames at 32 px) to 1e-4 of the latents'
    range. The Qwen-Image and Wan cuts (2 blocks) project their whole models (here 6 blocks) by MACs, Wan's also a
    wider model and two experts of it; the rows already in docs/bench-large.json are kept as they were, in REAL_SIZES
    order, and FLUX.1's projection is still printed."""
    import dataclasses
    import shutil

    import torch
    from diffusers import QwenImageTransformer2DModel

    from l2c_export.tools.bench_suite import REAL_SIZES, WholeModel, large_benchmark, real_size_config

    from .diffusers_pipelines import QWEN_CONFIG, SANA_CONFIG, WAN_CONFIG

    sana, qwen, wan = "Sana-1600M-1024", "Qwen-Image-width-4-256", "Wan2.1-1.3B-width-2-17x256"
    wider = dict(WAN_CONFIG, num_attention_heads=4, num_layers=8)
    sizes = {**REAL_SIZES, sana: dataclasses.replace(REAL_SIZES[sana], config=SANA_CONFIG),
             qwen: dataclasses.replace(REAL_SIZES[qwen], config=QWEN_CONFIG, image_size=32,
                                       full_config=dict(QWEN_CONFIG, num_layers=6)),
             wan: dataclasses.replace(REAL_SIZES[wan], config=WAN_CONFIG, image_size=32, num_frames=5,
                                      full_config=dict(WAN_CONFIG, num_layers=6),
                                      also_projects=(WholeModel("wider", wider), WholeModel("two", wider, 2)))}
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(REPO / "docs" / "bench-large.json", docs)
    before = json.loads((docs / "bench-large.json").read_text())["results"]
    large_benchmark(tmp_path / "work", docs, [sana, qwen, wan], steps=4, batch=1, repeats=1, sizes=sizes,
                    cfg_scale=3.0)

    rows = json.loads((docs / "bench-large.json").read_text())["results"]
    kept = [r for r in before if r["model"] not in (sana, qwen, wan)]  # the rows of other models, as they were
    assert [r["model"] for r in rows] == [r["model"] for r in kept] + [sana, qwen, wan]
    assert rows[:len(kept)] == kept
    rows, wan_row = rows[:-1], rows[-1]
    for row, transformer_class, tokens in ((rows[-2], "SanaTransformer2DModel", 300),
                                           (rows[-1], "QwenImageTransformer2DModel", 512),
                                           (wan_row, "WanTransformer3DModel", 512)):
        manifest = json.loads((tmp_path / "work" / f"{row['model']}-onnxruntime-fp32" / "manifest.json").read_text())
        assert (row["transformer"], row["config"], row["prompt_tokens"]) == (
            transformer_class, json.loads(json.dumps(sizes[row["model"]].config)), tokens)  # tuples as lists
        assert row["num_subsets"] == len(manifest["subsets"]) >= 2
        assert row["bench"]["ideal_speedup"] == pytest.approx(manifest["macs"]["ideal_speedup"])
        assert row["bench"]["ideal_speedup"] > 1
        assert row["build_seconds"] > 0 and row["build_peak_anonymous_bytes"] > 0 and row["build_peak_rss_bytes"] > 0
        assert row["bench"]["memory_all_engines_bytes"] > 0 and row["bench"]["memory_full_engine_bytes"] > 0
        assert row["pipeline_seconds"] > 0 and row["exported_full_seconds"] > 0
        assert row["exported_full_vs_pipeline_worst_difference"] < 1e-4 and row["verify_worst"] < 1e-4
    # not the pipelines' defaults (4.5, 4.0): the parity above proves the scale reached each by its own name
    assert rows[-2]["cfg_scale"] == rows[-1]["cfg_scale"] == 3.0
    assert "full_model_projection" not in rows[-2] and rows[-1]["image_size"] == 32

    projection = rows[-1]["full_model_projection"]
    cut_family, cut = real_size_config(qwen, sizes)
    with torch.device("meta"):
        whole = QwenImageTransformer2DModel(**sizes[qwen].full_config)
    assert projection["model"] == "Qwen-Image" and projection["parameters"] == sum(p.numel() for p in
                                                                                    whole.parameters())
    assert projection["measured_macs_per_sample"] == cut_family.count_macs(cut).full
    assert projection["mac_ratio"] == pytest.approx(projection["macs_per_sample"] / cut_family.count_macs(cut).full)
    assert projection["full_seconds"] == pytest.approx(rows[-1]["bench"]["full_seconds"] * projection["mac_ratio"])

    table = (docs / "bench-large.md").read_text()
    assert all(f"| {r['model']} | " in table for r in (*rows, wan_row))
    assert "the full Qwen-Image (6 blocks) from the Qwen-Image-width-4-256 row" in table
    assert "the full FLUX.1-dev (19 double and 38 single blocks) from the FLUX.1-width-2+4-256 row" in table

    # the Wan row: 5-D latents of 5 frames at 32 px, its cut projected to 6 blocks, a wider model, and two experts
    assert wan_row["num_frames"] == 5 and wan_row["cfg_scale"] == 3.0
    whole, (wide, experts) = wan_row["full_model_projection"], wan_row["also_projected"]
    assert (whole["model"], wide["model"], experts["model"]) == ("Wan2.1-T2V-1.3B", "wider", "two")
    assert experts["parameters"] == 2 * wide["parameters"] and experts["macs_per_sample"] == wide["macs_per_sample"]
    assert whole["num_frames"] == 5 and whole["mac_ratio"] > 2 and wide["mac_ratio"] > whole["mac_ratio"]
    assert "the full Wan2.1-T2V-1.3B (6 blocks) from the Wan2.1-1.3B-width-2-17x256 row" in table
    assert "the full two (2 experts of 8 blocks, one a step, width 48) from the Wan2.1-1.3B-width-2-17x256" in table
    assert "at 5 frames of 32 px and 512 prompt tokens" in table
