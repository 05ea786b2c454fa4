"""Sana (issue 29, point 2): ``SanaTransformer2DModel`` as ``SanaPipeline`` samples it, from a tiny random folder
saved with ``save_pretrained`` (tests/diffusers_pipelines.py: ReLU linear self-attention, cross-attention, GLUMBConv,
Sana's DPM-Solver++ on flow sigmas, a tiny DC-AE): its sub-layers by name, every subset graph in ONNX Runtime against
the cached forward (Sana 1.0 and 1.5's qk norms), ``build`` + ``run`` against the pipeline's latents full and with a
general schedule (the pipeline with hooks), decoded images against ``output_type="np"``, and bad configs refused by
name."""

from __future__ import annotations

import contextlib
import json
import shutil

import numpy as np
import pytest
import torch

from l2c_export.core.plan import BuildPlan
from l2c_export.core.schedule import Schedule
from l2c_export.models.diffusers import DiffusersFolderError, read_folder
from l2c_export.models.diffusers.sana import DECLARATION
from l2c_export.samplers import SchedulerConfigError

from .conftest import ort_session, run_cli
from .diffusers_pipelines import CAPTION_CHANNELS, SANA_VAE_SCALING, load_pipeline, schedule_hooks

STEPS = 12
CFG_SCALE = 3.0
PIXELS = 32  # SanaPipeline's height and width must be multiples of 32; with latents given they only feed its checks


def _inputs(batch: int, tokens: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Latents (N, 4, 8, 8), timesteps, prompt embeddings (N, L, 12) and masks, the first prompt padded."""
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, tokens, CAPTION_CHANNELS, generator=generator)
    mask = torch.ones(batch, tokens)
    mask[0, tokens - 2:] = 0
    return (torch.randn(batch, 4, 8, 8, generator=generator), torch.tensor([999.0, 500.0, 3.0][:batch]), embeds,
            mask)


def _schedule_rows(names: tuple[str, ...], calls: int) -> np.ndarray:
    """Call 0 computes everything; odd calls reuse every attn2 and ff, every third call block 0's attn1 too."""
    rows = np.ones((calls, len(names)), dtype=bool)
    for call in range(1, calls):
        for column, name in enumerate(names):
            if call % 2 == 1 and name.endswith((".ff", ".attn2")):
                rows[call, column] = False
            if call % 3 == 2 and name == "transformer_blocks.0.attn1":
                rows[call, column] = False
    return rows


def test_a_sana_folder_reads_with_its_named_sublayers_sampler_and_macs(tiny_diffusers):
    """The folder's family, its sub-layers in forward order, Sana's scheduler as the flow DPM-Solver sampler, the
    DC-AE found as the VAE, and linear attention's MACs (no T x T term)."""
    from l2c_export.models.zoo import from_diffusers

    found = read_folder(tiny_diffusers("sana", "flow"))
    assert found.family.name == "diffusers-sana" and found.pipeline_class == "SanaPipeline"
    assert found.family.sublayer_names(found.config) == tuple(
        f"transformer_blocks.{i}.{name}" for i in range(2) for name in ("attn1", "attn2", "ff"))
    assert found.components.vae_class == "AutoencoderDC" and found.components.text_encoders == ()
    assert found.vae_scale_factor == 2
    spec = from_diffusers(found.path)
    sampler = spec.sampler(None, STEPS)
    assert sampler.kind == "diffusers_dpm_multistep" and sampler.options["use_flow_sigmas"]
    assert sampler.timesteps[0] == 999 and sampler.model_times.tolist() == sampler.timesteps.tolist()
    macs = found.family.count_macs(found.config)
    tokens, inner = 64, 8
    linear = 2 * tokens * (4 + 1) * 4 * 2  # two products of (d + 1) x d per token and head
    projections = 4 * tokens * inner * inner  # q, k, v and out
    assert macs.per_sublayer[0] == linear + projections


def test_the_dc_ae_is_estimated_by_its_own_class_and_a_named_gemma_encoder_must_be_there(tiny_diffusers, tmp_path):
    """The declared VAE kind (dc_ae) drives the memory estimate: AutoencoderDC's real parameter count,
    blamed on its decoder levels; a folder whose model_index.json names Sana's Gemma-2 text encoder and tokenizer is
    read for them (they are carried), so one without their folders is refused naming the missing config."""
    from diffusers import AutoencoderDC

    from l2c_export.builder.memory import build_parts
    from l2c_export.models.diffusers import DiffusersFolderError
    from l2c_export.models.zoo import from_diffusers

    folder = shutil.copytree(tiny_diffusers("sana", "flow"), tmp_path / "sana")
    vae = AutoencoderDC.from_pretrained(str(folder / "vae"))
    real = sum(t.numel() for t in vae.parameters()) + sum(t.numel() for t in vae.buffers())
    weights = [part for part in build_parts(from_diffusers(folder)) if part.what.startswith("VAE weights")]
    assert len(weights) == 1 and weights[0].bytes == real * 4 and "'decoder_block_out_channels'" in weights[0].blame
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder=["transformers", "Gemma2Model"], tokenizer=["transformers", "GemmaTokenizerFast"])
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DiffusersFolderError, match="text_encoder/config.json"):
        read_folder(folder)


@pytest.mark.parametrize("family", ("sana", "sana15"))
def test_every_subset_graph_equals_the_cached_forward_in_onnxruntime(tiny_diffusers, family, tmp_path):
    """Sana's linear attention (ReLU kernel, the padded row of ones, float32 division) and GLUMBConv (cached as
    tokens) trace; each subset graph run in ONNX Runtime at another batch and prompt length than the trace's equals
    the PyTorch cached forward, and that equals diffusers' transformer with schedule hooks."""
    import onnx

    from l2c_export.export.onnx import subset_graph, trace, write_weights

    found = read_folder(tiny_diffusers(family, "flow"))
    names = found.family.sublayer_names(found.config)
    schedule = Schedule(_schedule_rows(names, 4), sublayers=names)
    plan = BuildPlan.from_schedule(schedule)
    model = found.family.load(found.transformer_dir, found.config)
    universal = trace(model, "fp32", found.family)
    universal.bind_weights(write_weights(universal, tmp_path / "weights.bin"))
    cache: dict[int, torch.Tensor] = {}
    for subset in plan.subsets:
        path = tmp_path / f"{subset.name}.onnx"
        onnx.save_model(subset_graph(universal, subset, subset.name), str(path))
        session = ort_session(path)
        inputs = _inputs(3, tokens=9, seed=subset.index)
        previous = {k: v.clone() for k, v in cache.items()}
        with torch.no_grad():
            want = model.forward_cached(*inputs, list(subset.compute), cache).numpy()
        feeds = {i.name: tensor.numpy() for i, tensor in zip(session.get_inputs(), inputs)}
        feeds.update({f"cache_{names[k]}": previous[k].numpy() for k in subset.reads})
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        assert np.abs(outputs["noise_pred"] - want).max() <= 1e-5 * np.abs(want).max()
        for k in subset.writes:
            fresh = cache[k].numpy()
            assert fresh.shape == (3, 64, 8)  # ff's (N, D, h, w) held as tokens like the attentions'
            assert np.abs(outputs[f"fresh_{names[k]}"] - fresh).max() <= 1e-5 * np.abs(fresh).max()
    # the cached forward is diffusers' transformer with its modules' outputs replaced by their last computed ones
    transformer = load_pipeline(found.path).transformer
    inputs = [_inputs(2, tokens=6, seed=call) for call in range(4)]
    with torch.no_grad():
        cache = {}
        ours = [model.forward_cached(*inputs[call], list(schedule.compute[call]), cache) for call in range(4)]
        with schedule_hooks(transformer, names, schedule.compute):
            theirs = [transformer(x, encoder_hidden_states=e, timestep=t, encoder_attention_mask=m,
                                  return_dict=False)[0] for x, t, e, m in inputs]
    for got, want in zip(ours, theirs):
        assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())


# -- build and run against SanaPipeline ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sana_build(tiny_diffusers, tmp_path_factory):
    """One build of the tiny Sana folder at 12 steps over a general schedule (s.json), with its noise (z.npy) and
    conditioning (cond.npz: padded prompts and negative prompts) beside: (folder, engines, work dir, schedule)."""
    from diffusers.utils.torch_utils import randn_tensor

    folder = tiny_diffusers("sana", "flow")
    work = tmp_path_factory.mktemp("sana")
    found = read_folder(folder)
    names = found.family.sublayer_names(found.config)
    schedule = Schedule(_schedule_rows(names, STEPS), sublayers=names, mode="general", source="parity schedule")
    schedule.save(work / "s.json")
    np.save(work / "z.npy", randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)).numpy())
    generator = np.random.default_rng(1)
    shape = (2, 5, CAPTION_CHANNELS)
    np.savez(work / "cond.npz", prompt_embeds=generator.standard_normal(shape).astype(np.float32),
             prompt_attention_mask=np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
             negative_prompt_embeds=generator.standard_normal(shape).astype(np.float32),
             negative_prompt_attention_mask=np.array([[1, 0, 0, 0, 0]] * 2))
    engines = work / "E"
    run_cli("build", "--diffusers", str(folder), "--steps", str(STEPS), "--schedule", str(work / "s.json"),
            "--out", str(engines))
    return folder, engines, work, schedule


def _pipeline(folder, work, schedule=None, output_type="latent") -> np.ndarray:
    """SanaPipeline's result on the request's latents and embeddings, ``schedule`` applied by forward hooks."""
    pipe = load_pipeline(folder)
    conditioning = {name: torch.from_numpy(value) for name, value in np.load(work / "cond.npz").items()}
    hooks = (schedule_hooks(pipe.transformer, schedule.sublayer_names, schedule.compute) if schedule is not None
             else contextlib.nullcontext([STEPS]))
    with torch.no_grad(), hooks as calls:
        result = pipe(prompt=None, negative_prompt=None, latents=torch.from_numpy(np.load(work / "z.npy")),
                      guidance_scale=CFG_SCALE, num_inference_steps=STEPS, output_type=output_type,
                      use_resolution_binning=False, height=PIXELS, width=PIXELS, **conditioning).images
    assert calls[0] == STEPS
    return result.numpy() if torch.is_tensor(result) else result


@pytest.mark.slow
def test_build_and_run_equal_the_sana_pipeline_full_and_with_a_schedule(sana_build):
    """build --diffusers DIR --steps 12 --schedule s.json, then run --noise z.npy --conditioning cond.npz --cfg-scale
    3 --save-latents: equal to SanaPipeline(output_type="latent") on the same latents and embeddings (padded masks,
    negative prompts) to 1e-4 of the range, with --full and with the general schedule (the pipeline with hooks);
    verify passes every subset; the manifest records Sana's flow sampler."""
    folder, engines, work, schedule = sana_build
    manifest = json.loads((engines / "manifest.json").read_text())
    assert manifest["sampler"]["kind"] == "diffusers_dpm_multistep"
    assert manifest["sampler"]["options"]["prediction_type"] == "flow_prediction"
    # the manifest records the declared conditioning (argument, kind, negative partner), guidance rule and layout
    assert [(t["name"], t["role"], t["argument"], t["kind"], t.get("negative"))
            for t in manifest["model"]["inputs"][2:]] == [
        (c.input, "conditioning", c.argument, c.kind, c.negative) for c in DECLARATION.conditioning]
    assert manifest["guidance"]["rule"] == "classifier_free" and manifest["model"]["latent_layout"] == "nchw"
    assert "agree with PyTorch" in run_cli("verify", str(engines)).stdout
    results = {}
    for full, reference in ((True, None), (False, schedule)):
        out = work / f"{'full' if full else 'l2c'}.npy"
        run_cli("run", str(engines), "--noise", str(work / "z.npy"), "--conditioning", str(work / "cond.npz"),
                "--cfg-scale", str(CFG_SCALE), "--save-latents", str(out), *(["--full"] if full else []))
        want, got = _pipeline(folder, work, reference), np.load(out)
        assert got.shape == want.shape == (2, 4, 8, 8)
        assert np.abs(got - want).max() <= 1e-4 * (want.max() - want.min()), (full, np.abs(got - want).max())
        results[full] = got
    assert np.abs(results[True] - results[False]).max() > 1e-3 * (want.max() - want.min())  # the schedule reused


@pytest.mark.slow
def test_decoded_images_equal_the_sana_pipeline(sana_build, tmp_path):
    """The build carries the DC-AE decoder (scaling factor recorded, 8 x 8 latents -> 16 x 16 pixels): L2CPipeline(...,
    decode=True) equals SanaPipeline(output_type="np") to 1e-3, verify --diffusers checks the decoder, run --out
    writes the grid."""
    from l2c_export.core.manifest import load
    from l2c_export.runtime.pipeline import L2CPipeline
    from l2c_export.tools.verify import verify_components

    folder, engines, work, _ = sana_build
    record = load(engines)["components"]["vae_decoder"]
    assert record["scaling_factor"] == pytest.approx(SANA_VAE_SCALING) and "shift_factor" not in record
    assert record["inputs"][0]["shape"] == ["batch", 4, 8, 8] and record["outputs"][0]["shape"] == ["batch", 3, 16, 16]
    arrays = dict(np.load(work / "cond.npz"))
    result = L2CPipeline.from_engine_dir(engines)(conditioning=arrays, noise=np.load(work / "z.npy"),
                                                  cfg_scale=CFG_SCALE, full=True, decode=True)
    got = np.clip(result.decoded.transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
    want = _pipeline(folder, work, output_type="np")
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert np.abs(got - want).max() <= 1e-3, np.abs(got - want).max()
    (check,) = verify_components(engines, folder)
    assert check.name == "vae_decoder" and check.passed, check
    run_cli("run", str(engines), "--noise", str(work / "z.npy"), "--conditioning", str(work / "cond.npz"),
            "--cfg-scale", str(CFG_SCALE), "--out", str(tmp_path / "grid.png"))
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size[0] > 2 * 16  # two 16 x 16 images, side by side


# -- what is refused -------------------------------------------------------------------------------------------------
def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("part, changes, message", [
    ("transformer", dict(guidance_embeds=True), "field 'guidance_embeds' is True; SanaTransformer2DModel is supported "
                                                "with guidance_embeds = False only"),
    ("transformer", dict(qk_norm="layer_norm"), "field 'qk_norm' is 'layer_norm'; supported: null or "
                                                "'rms_norm_across_heads'"),
    ("transformer", dict(cross_attention_dim=6), "field 'cross_attention_dim' is 6; the caption projection makes the "
                                                 "prompt 8 wide"),
    ("transformer", dict(mlp_ratio=-1), "field 'mlp_ratio' is -1; expected a number in (0, 16]"),
    ("transformer", dict(num_cross_attention_heads=0), "field 'num_cross_attention_heads' is 0; expected an integer"),
    ("transformer", dict(sample_size=4096), "field 'sample_size' is 4096; expected an integer in 1..1024"),
    ("vae", dict(decoder_block_types=["ResBlock", "Swin"]), "field 'decoder_block_types' is ['ResBlock', 'Swin']; "
                                                            "expected one of ResBlock, EfficientViTBlock"),
    ("vae", dict(decoder_layers_per_block=[1]), "field 'decoder_layers_per_block' is [1]; expected a list of 2 to 2"),
    ("vae", dict(decoder_block_out_channels=[8, 9]), "field 'decoder_block_out_channels' has 9 at an "
                                                     "EfficientViTBlock level; expected a multiple of "
                                                     "attention_head_dim 2"),
    ("vae", dict(latent_channels=32), "field 'latent_channels' is 32; the transformer samples 4 latent channels"),
    ("scheduler", dict(use_karras_sigmas=True), "field 'use_karras_sigmas' is true with use_flow_sigmas"),
    ("scheduler", dict(prediction_type="epsilon"), "field 'use_flow_sigmas' is true with prediction_type 'epsilon'"),
])
def test_a_bad_sana_folder_is_refused_naming_file_and_field(tiny_diffusers, tmp_path, part, changes, message):
    from l2c_export.models.zoo import from_diffusers

    folder = shutil.copytree(tiny_diffusers("sana", "flow"), tmp_path / "copy")
    config = folder / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
    _edit_json(config, **changes)
    with pytest.raises((DiffusersFolderError, SchedulerConfigError)) as refusal:
        from_diffusers(folder).sampler(None, STEPS)  # reads the folder, then makes the sampler of its scheduler
    assert str(refusal.value).startswith(f"{config}: ") and message in str(refusal.value), str(refusal.value)


def test_build_refuses_a_bad_sana_config_in_one_line_with_exit_2(tiny_diffusers, tmp_path):
    folder = shutil.copytree(tiny_diffusers("sana", "flow"), tmp_path / "copy")
    _edit_json(folder / "transformer" / "config.json", guidance_embeds=True)
    result = run_cli("build", "--diffusers", str(folder), "--steps", "4", "--out", str(tmp_path / "E"), check=False)
    assert result.returncode == 2 and not (tmp_path / "E").exists()
    assert result.stderr.strip().count("\n") == 0 and "field 'guidance_embeds' is True" in result.stderr


def test_a_cached_value_the_exporter_routes_around_is_refused_not_recomputed(tiny_diffusers, monkeypatch):
    """Unpacked by the transpose that undoes the pack's, GLUMBConv's cached tokens vanish from the traced graph (the
    exporter cancels the pair and the block reads the convolution directly): a subset reusing ff would silently
    recompute it. subset_graph refuses that, naming the sub-layer."""
    from l2c_export.export.onnx import subset_graph, trace
    from l2c_export.models.diffusers.sana import GridPacking

    def cancelling_unpack(self, value, args, kwargs):
        return value.transpose(1, 2).unflatten(2, tuple(args[0].shape[2:]))

    monkeypatch.setattr(GridPacking, "unpack", cancelling_unpack)
    found = read_folder(tiny_diffusers("sana", "flow"))
    names = found.family.sublayer_names(found.config)
    universal = trace(found.family.load(found.transformer_dir, found.config), "fp32", found.family)
    rows = np.ones((2, len(names)), dtype=bool)
    rows[1, names.index("transformer_blocks.1.ff")] = False
    reusing = BuildPlan.from_schedule(Schedule(rows, sublayers=names)).subsets[1]
    with pytest.raises(ValueError, match=r"sub-layer transformer_blocks\.1\.ff: no node of the traced graph reads"):
        subset_graph(universal, reusing, "reusing")
