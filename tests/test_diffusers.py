"""Diffusers folders as models (issue 19): the folder is read and checked, sub-layers are named module paths, the
cached wrapper around diffusers' own transformer equals diffusers with schedule hooks, and every subset graph equals
it in ONNX Runtime."""

from __future__ import annotations

import contextlib
import json
import re
import shutil

import numpy as np
import pytest
import torch

from l2c_export.core.plan import BuildPlan
from l2c_export.core.schedule import Schedule, ScheduleError
from l2c_export.models.checkpoint import CheckpointError
from l2c_export.models.diffusers import DiffusersFolderError, read_folder

from .conftest import ort_session, run_cli
from .diffusers_pipelines import CAPTION_CHANNELS, schedule_hooks

FAMILIES = ("dit", "pixart")


def _inputs(family: str, batch: int, tokens: int = 7, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random graph inputs of a tiny model: latents, timesteps, and class labels or padded prompt embeddings."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    t = torch.tensor([981.0, 21.0, 500.0][:batch] + [7.0] * max(0, batch - 3))
    if family == "dit":
        return x, t, torch.tensor([207, 1000, 3][:batch] + [1] * max(0, batch - 3))
    embeds = torch.randn(batch, tokens, CAPTION_CHANNELS, generator=generator)
    mask = torch.ones(batch, tokens)
    mask[0, tokens - 2:] = 0  # padded prompts, as a tokenizer pads them
    return x, t, embeds, mask


def _diffusers_call(family: str, transformer, inputs):
    if family == "dit":
        x, t, labels = inputs
        return transformer(x, timestep=t, class_labels=labels, return_dict=False)[0]
    x, t, embeds, mask = inputs
    return transformer(x, encoder_hidden_states=embeds, timestep=t, encoder_attention_mask=mask,
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


def _schedule_rows(width: int, calls: int = 4) -> np.ndarray:
    """Call 0 computes everything; later calls reuse different sub-layers (the last call computes only the first)."""
    rows = np.ones((calls, width), dtype=bool)
    rows[1, 1::2] = False
    rows[2, ::3] = False
    rows[3, 1:] = False
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_sublayers_are_named_module_paths_in_forward_order(tiny_diffusers, family):
    found = read_folder(tiny_diffusers(family))
    per_block = {"dit": ("attn1", "ff"), "pixart": ("attn1", "attn2", "ff")}[family]
    assert found.family.sublayer_names(found.config) == tuple(
        f"transformer_blocks.{i}.{name}" for i in range(2) for name in per_block)
    order = []
    model = found.family.load(found.transformer_dir, found.config)
    handles = [model.transformer.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: order.append(n))
               for name in found.family.sublayer_names(found.config)]
    with torch.no_grad():
        model(*_inputs(family, 2))
    for handle in handles:
        handle.remove()
    assert tuple(order) == found.family.sublayer_names(found.config)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_forward_equals_diffusers_with_schedule_hooks(tiny_diffusers, family):
    """The wrapper around diffusers' modules and diffusers' transformer with hooks that return the last computed
    output at skipped calls agree at every call of a schedule that reuses sub-layers (1e-5)."""
    from diffusers import DiffusionPipeline

    folder = tiny_diffusers(family)
    found = read_folder(folder)
    names = found.family.sublayer_names(found.config)
    rows = _schedule_rows(len(names))
    model = found.family.load(found.transformer_dir, found.config)
    reference = DiffusionPipeline.from_pretrained(str(folder)).transformer.eval()
    cache: dict[int, torch.Tensor] = {}
    worst = 0.0
    with torch.no_grad(), schedule_hooks(reference, names, rows):
        for call, row in enumerate(rows):
            inputs = _inputs(family, 3, seed=call)
            want = _diffusers_call(family, reference, inputs)
            got = model.forward_cached(*inputs, [bool(v) for v in row], cache)
            full = _diffusers_call(family, model.transformer, inputs) if call == len(rows) - 1 else None
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    assert worst < 1e-5
    assert float((full - got).abs().max()) > 1e-3  # the last call really reused: full compute differs


@pytest.mark.parametrize("family", FAMILIES)
def test_every_subset_graph_equals_the_cached_forward_in_onnxruntime(tiny_diffusers, family, tmp_path):
    """One trace, one graph per distinct subset cut by the same surgery as the authors' families; each run in ONNX
    Runtime (batch and prompt length unlike the trace's) equals the PyTorch cached forward, model output and fresh
    values alike."""
    import onnx

    from l2c_export.export.onnx import subset_graph, trace, write_weights

    found = read_folder(tiny_diffusers(family))
    names = found.family.sublayer_names(found.config)
    schedule = Schedule(_schedule_rows(len(names)), sublayers=names)
    plan = BuildPlan.from_schedule(schedule)
    model = found.family.load(found.transformer_dir, found.config)
    universal = trace(model, "fp32", found.family)
    universal.bind_weights(write_weights(universal, tmp_path / "weights.bin"))
    cache: dict[int, torch.Tensor] = {}
    for subset in plan.subsets:
        path = tmp_path / f"{subset.name}.onnx"
        onnx.save_model(subset_graph(universal, subset, subset.name), str(path))
        session = ort_session(path)
        assert [i.name for i in session.get_inputs()][len(_inputs(family, 1)):] == [
            f"cache_{names[k]}" for k in subset.reads]
        inputs = _inputs(family, 3, tokens=9, seed=subset.index)
        previous = {k: v.clone() for k, v in cache.items()}
        with torch.no_grad():
            want = model.forward_cached(*inputs, list(subset.compute), cache).numpy()
        feeds = {i.name: tensor.numpy() for i, tensor in zip(session.get_inputs(), inputs)}
        feeds.update({f"cache_{names[k]}": previous[k].numpy() for k in subset.reads})
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        assert np.abs(outputs["noise_pred"] - want).max() <= 1e-5 * np.abs(want).max()
        assert sorted(outputs) == sorted(["noise_pred", *[f"fresh_{names[k]}" for k in subset.writes]])
        for k in subset.writes:
            fresh = cache[k].numpy()
            assert np.abs(outputs[f"fresh_{names[k]}"] - fresh).max() <= 1e-5 * np.abs(fresh).max()
    assert len(plan.subsets) == 4


def test_weights_keep_diffusers_parameter_names(tiny_diffusers):
    from l2c_export.export.onnx import trace

    found = read_folder(tiny_diffusers("pixart"))
    model = found.family.load(found.transformer_dir, found.config)
    names = {name.removesuffix(".T") for name in trace(model, "fp32", found.family).weights}
    assert {f"transformer.{name}" for name, _ in model.transformer.named_parameters()} <= names


# -- schedules over named sub-layers ----------------------------------------------------------------------------------
def test_a_schedule_names_its_columns_and_round_trips(tmp_path):
    names = ["transformer_blocks.0.attn1", "transformer_blocks.0.ff"]
    schedule = Schedule(np.array([[1, 1], [0, 1]]), sublayers=names, mode="general")
    schedule.save(tmp_path / "s.json")
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["sublayers"] == names and "depth" not in data
    loaded = Schedule.load(tmp_path / "s.json")
    assert loaded.sublayer_names == tuple(names)
    loaded.check_fits(2, names)
    with pytest.raises(ScheduleError, match="field 'sublayers' names 'transformer_blocks.0.ff'"):
        loaded.check_fits(2, ["transformer_blocks.0.attn1", "transformer_blocks.0.attn2"])
    with pytest.raises(ScheduleError, match="field 'depth' describes attn_j/mlp_j columns"):
        Schedule.full(2, depth=1).check_fits(2, names)
    with pytest.raises(ScheduleError, match="names 'a' twice"):
        Schedule(np.ones((1, 2)), sublayers=["a", "a"])


def test_authors_schedules_keep_depth():
    schedule = Schedule.full(3, depth=2)
    assert schedule.to_dict()["depth"] == 2 and "sublayers" not in schedule.to_dict()
    assert schedule.sublayer_names == ("attn_0", "mlp_0", "attn_1", "mlp_1")


# -- the folder is checked --------------------------------------------------------------------------------------------
def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("breakage, message", [
    (lambda f: (f / "model_index.json").unlink(), "model_index.json: missing; expected a diffusers pipeline folder"),
    (lambda f: shutil.rmtree(f / "transformer"), "no transformer/ folder"),
    (lambda f: _edit_json(f / "transformer" / "config.json", _class_name="HunyuanDiT2DModel"),
     "field '_class_name' is 'HunyuanDiT2DModel'; supported transformer classes: DiTTransformer2DModel"),
    (lambda f: _edit_json(f / "transformer" / "config.json", norm_type="ada_norm"),
     "field 'norm_type' is 'ada_norm'; PixArtTransformer2DModel is supported with norm_type = 'ada_norm_single'"),
    (lambda f: _edit_json(f / "transformer" / "config.json", use_additional_conditions=True),
     "field 'use_additional_conditions' is on"),
    (lambda f: _edit_json(f / "transformer" / "config.json", frobnicate=3),
     "field 'frobnicate' is not an option of PixArtTransformer2DModel"),
    (lambda f: _edit_json(f / "transformer" / "config.json", num_layers=0), "field 'num_layers' is 0"),
    (lambda f: _edit_json(f / "transformer" / "config.json", cross_attention_dim=24),
     "field 'cross_attention_dim' is 24; the caption projection makes the prompt 16 wide"),
    (lambda f: _edit_json(f / "model_index.json", _class_name="DiTPipeline"),
     "field '_class_name' is 'DiTPipeline'; a PixArtTransformer2DModel is sampled as PixArtAlphaPipeline or"),
    (lambda f: (f / "transformer" / "diffusion_pytorch_model.safetensors").rename(
        f / "transformer" / "diffusion_pytorch_model.bin"), "is pickled, which is never loaded here"),
])
def test_a_folder_that_cannot_be_used_is_refused_naming_file_and_field(tiny_diffusers, tmp_path, breakage, message):
    folder = _copy(tiny_diffusers("pixart"), tmp_path)
    breakage(folder)
    with pytest.raises(DiffusersFolderError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace(".", r"\.")):
        read_folder(folder)


def test_sharded_weights_load_and_escaping_shards_are_refused(tiny_diffusers, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_diffusers("dit"), tmp_path)
    transformer = folder / "transformer"
    state = load_file(str(transformer / "diffusion_pytorch_model.safetensors"))
    (transformer / "diffusion_pytorch_model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for shard, part in (("a.safetensors", names[:half]), ("b.safetensors", names[half:])):
        save_file({name: state[name] for name in part}, str(transformer / shard))
        weight_map.update({name: shard for name in part})
    index = transformer / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    found = read_folder(folder)
    model = found.family.load(found.transformer_dir, found.config)
    assert torch.equal(model.transformer.state_dict()[names[0]], state[names[0]])
    index.write_text(json.dumps({"weight_map": {names[0]: "../escape.safetensors"}}))
    with pytest.raises(DiffusersFolderError, match="field 'weight_map' names '../escape.safetensors'"):
        read_folder(folder)


def _first_float(state):
    return next(name for name, tensor in state.items() if tensor.ndim == 2)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop(_first_float(s)), "does not fit the model; missing keys (1)"),
    (lambda s: s.update({"extra.weight": torch.zeros(2)}), "unexpected keys (1): extra.weight"),
    (lambda s: s.update({_first_float(s): s[_first_float(s)][:, :1].contiguous()}), "mismatched shapes (1)"),
    (lambda s: s.update({_first_float(s): s[_first_float(s)].to(torch.int8)}), "is int8; expected floating-point"),
    (lambda s: s[_first_float(s)].__setitem__((0, 0), float("nan")), "holds 1 NaN or infinite value(s)"),
])
def test_weights_are_checked_from_the_file_headers_then_copied_in_one_tensor_at_a_time(tiny_diffusers, tmp_path,
                                                                                        change, message):
    """The diffusers loader streams (an 8 GB transformer is never held twice) and still refuses what does not fit
    before copying anything, naming the file; an fp16 file loads cast to fp32."""
    from safetensors.torch import load_file, save_file

    folder = _copy(tiny_diffusers("pixart"), tmp_path)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    save_file({name: tensor.half() for name, tensor in state.items()}, str(weights))
    found = read_folder(folder)
    loaded = found.family.load(found.transformer_dir, found.config).transformer.state_dict()
    for name, tensor in state.items():
        assert loaded[name].dtype == torch.float32 and torch.equal(loaded[name], tensor.half().float()), name
    change(state)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=re.escape(message)) as refusal:
        found.family.load(found.transformer_dir, found.config)
    assert str(folder / "transformer") in str(refusal.value) or str(weights) in str(refusal.value)


def test_build_refuses_a_bad_folder_in_one_line_with_exit_2(tiny_diffusers, tmp_path):
    folder = _copy(tiny_diffusers("dit"), tmp_path)
    (folder / "model_index.json").unlink()
    result = run_cli("build", "--diffusers", str(folder), "--out", str(tmp_path / "E"), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "model_index.json: missing" in result.stderr
    assert not (tmp_path / "E").exists()


# -- schedule --diffusers ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_schedule_cli_lists_the_sublayers_by_name_and_refuses_unknown_ones(tiny_diffusers, tmp_path):
    folder = tiny_diffusers("pixart")
    listing = run_cli("schedule", "--diffusers", str(folder)).stdout
    assert "6 sub-layers in forward order" in listing
    assert all(f"transformer_blocks.{i}.{name}" in listing for i in range(2) for name in ("attn1", "attn2", "ff"))
    names = read_folder(folder).family.sublayer_names(read_folder(folder).config)
    good = Schedule(_schedule_rows(len(names)), sublayers=names, mode="general")
    good.save(tmp_path / "good.json")
    shown = run_cli("schedule", "--diffusers", str(folder), "--schedule", str(tmp_path / "good.json"),
                    "--png", str(tmp_path / "s.png")).stdout
    assert "distinct subsets: 4" in shown and (tmp_path / "s.png").stat().st_size > 0
    data = good.to_dict()
    data["sublayers"] = [name.replace("blocks.1.attn2", "blocks.1.attn3") for name in data["sublayers"]]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    refused = run_cli("schedule", "--diffusers", str(folder), "--schedule", str(tmp_path / "bad.json"), check=False)
    assert refused.returncode == 2
    assert "field 'sublayers' names 'transformer_blocks.1.attn3', which is not a sub-layer" in refused.stderr


# -- builds: every subset verified, the runtime fed from the manifest ------------------------------------------------
@pytest.fixture(scope="module")
def diffusers_builds(tiny_diffusers, tmp_path_factory):
    """family -> a build of the tiny folder over a general schedule of its named sub-layers (6 DDIM calls)."""
    from l2c_export.builder.build import BuildRequest, build
    from l2c_export.models.zoo import from_diffusers

    builds = {}
    for family in FAMILIES:
        spec = from_diffusers(tiny_diffusers(family))
        rows = np.ones((6, len(spec.sublayer_names)), dtype=bool)
        rows[2:] = _schedule_rows(len(spec.sublayer_names))[:4]
        rows[2:, 0] = False  # a slot live across several calls
        out = tmp_path_factory.mktemp(family) / "E"
        build(BuildRequest(spec=spec, schedule=Schedule(rows, sublayers=spec.sublayer_names, mode="general"),
                           sampler=spec.sampler(None, 6), out_dir=out), progress=False)
        builds[family] = out
    return builds


@pytest.mark.parametrize("family", FAMILIES)
def test_a_diffusers_build_records_its_interface_and_verifies_every_subset(diffusers_builds, family):
    from l2c_export.core.manifest import load
    from l2c_export.tools.verify import verify_build

    manifest = load(diffusers_builds[family])
    inputs = [(t["name"], t["role"], t.get("argument"), t.get("kind"), t.get("negative"), t["dtype"], t["shape"])
              for t in manifest["model"]["inputs"]]
    assert [role for _, role, *_ in inputs] == ["sample", "time", *["conditioning"] * (len(inputs) - 2)]
    if family == "dit":
        assert inputs[2:] == [("class_labels", "conditioning", "class_labels", "label", None, "int64", ["batch"])]
        assert manifest["guidance"]["null_class"] == 1000
    else:  # each fed from the pipeline's argument, guided against its negative_ partner
        assert inputs[2:] == [("encoder_hidden_states", "conditioning", "prompt_embeds", "token_embeddings",
                               "negative_prompt_embeds", "float32", ["batch", "prompt_tokens", CAPTION_CHANNELS]),
                              ("encoder_attention_mask", "conditioning", "prompt_attention_mask", "token_mask",
                               "negative_prompt_attention_mask", "float32", ["batch", "prompt_tokens"])]
        assert "null_class" not in manifest["guidance"]
    assert manifest["guidance"]["rule"] == "classifier_free" and manifest["model"]["latent_layout"] == "nchw"
    assert manifest["guidance"]["sampler_channels"] == 4 and manifest["guidance"]["guided_channels"] == 4
    assert manifest["model"]["sublayers"][1] == ("transformer_blocks.0.ff" if family == "dit"
                                                 else "transformer_blocks.0.attn2")
    assert {s["name"] for s in manifest["cache_slots"]} <= set(manifest["model"]["sublayers"])
    checks, _ = verify_build(diffusers_builds[family])
    assert len(checks) == len(manifest["subsets"]) == 5
    assert all(check.worst_value < 1e-5 for check in checks)


@pytest.mark.parametrize("family", FAMILIES)
def test_onnxruntime_and_torch_backends_agree_on_a_diffusers_build(diffusers_builds, family):
    from l2c_export.runtime.conditioning import example_conditioning
    from l2c_export.runtime.pipeline import L2CPipeline

    onnx_pipe = L2CPipeline.from_engine_dir(diffusers_builds[family])
    torch_pipe = L2CPipeline.from_engine_dir(diffusers_builds[family], backend="torch")
    request = example_conditioning(onnx_pipe.manifest, 2, seed=3)
    result = onnx_pipe(**request, seed=1)
    got, want = result.samples, torch_pipe(**request, seed=1).samples
    assert got.shape == (2, 4, 8, 8)
    assert np.abs(got - want).max() <= 1e-4 * (want.max() - want.min())
    assert result.step_subsets == [0, 0, 1, 2, 3, 4]
    assert not np.array_equal(onnx_pipe(**request, seed=1, full=True).samples, got)  # the schedule reused something


def _conditioning(n=2, length=5, width=CAPTION_CHANNELS):
    generator = np.random.default_rng(0)
    return {"prompt_embeds": generator.standard_normal((n, length, width)).astype(np.float32),
            "prompt_attention_mask": np.ones((n, length), dtype=np.int64),
            "negative_prompt_embeds": generator.standard_normal((n, length, width)).astype(np.float32),
            "negative_prompt_attention_mask": np.ones((n, length), dtype=np.int64)}


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(prompt_embedz=c.pop("prompt_embeds")), "unknown array 'prompt_embedz'"),
    (lambda c: c.pop("negative_prompt_embeds"), "array 'negative_prompt_embeds' is missing"),
    (lambda c: c.update(prompt_embeds=c["prompt_embeds"][..., :5]), "array 'prompt_embeds' has shape (2, 5, 5); "
                                                                     "expected (n, L, 12)"),
    (lambda c: c.update(prompt_embeds=c["prompt_embeds"].astype(np.int32)), "holds int32 values"),
    (lambda c: c["negative_prompt_embeds"].__setitem__((0, 0, 0), np.nan), "1 of its 120 values are NaN"),
    (lambda c: c.update(prompt_attention_mask=np.ones((2, 4))), "array 'prompt_attention_mask' has shape (2, 4); "
                                                                "expected (2, 5)"),
    (lambda c: c.update(prompt_attention_mask=np.full((2, 5), 2)), "values other than 0 and 1"),
])
def test_conditioning_that_does_not_fit_is_refused_naming_the_array(diffusers_builds, change, message):
    from l2c_export.core.manifest import load
    from l2c_export.runtime.conditioning import ConditioningError, model_batch_conditioning

    manifest = load(diffusers_builds["pixart"], verify_files=False)
    conditioning = _conditioning()
    n, feeds = model_batch_conditioning(manifest, True, None, conditioning)
    assert n == 2 and feeds["encoder_hidden_states"].shape == (4, 5, CAPTION_CHANNELS)
    change(conditioning)
    with pytest.raises(ConditioningError) as info:
        model_batch_conditioning(manifest, True, None, conditioning, where="--conditioning c.npz")
    assert message in str(info.value) and str(info.value).startswith("--conditioning c.npz: ")


def test_run_cli_reads_conditioning_and_refuses_a_bad_archive_in_one_line(diffusers_builds, tmp_path):
    conditioning = _conditioning()
    np.savez(tmp_path / "cond.npz", **conditioning)
    result = run_cli("run", str(diffusers_builds["pixart"]), "--conditioning", str(tmp_path / "cond.npz"),
                     "--cfg-scale", "3", "--save-latents", str(tmp_path / "out.npy"))
    assert np.load(tmp_path / "out.npy").shape == (2, 4, 8, 8)
    conditioning["prompt_attention_mask"] = np.ones((2, 7))
    np.savez(tmp_path / "bad.npz", **conditioning)
    refused = run_cli("run", str(diffusers_builds["pixart"]), "--conditioning", str(tmp_path / "bad.npz"),
                      check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert f"--conditioning {tmp_path / 'bad.npz'}: array 'prompt_attention_mask' has shape (2, 7)" in refused.stderr
    labels = run_cli("run", str(diffusers_builds["pixart"]), "--labels", "1,2", check=False)
    assert labels.returncode == 2 and "conditioned on prompt embeddings" in labels.stderr
    assert result.returncode == 0


# -- sampling as diffusers' own pipelines do --------------------------------------------------------------------------
CFG_SCALE = 3.0
STEPS = 12


def _parity_schedule(names: tuple[str, ...]) -> Schedule:
    """A general schedule over the named sub-layers: odd calls reuse every block's ff (and PixArt's attn2), every
    third call block 0's attn1 too."""
    rows = np.ones((STEPS, len(names)), dtype=bool)
    for call in range(1, STEPS):
        for column, name in enumerate(names):
            if call % 2 == 1 and name.endswith((".ff", ".attn2")):
                rows[call, column] = False
            if call % 3 == 2 and name == "transformer_blocks.0.attn1":
                rows[call, column] = False
    return Schedule(rows, sublayers=names, mode="general", source="parity schedule")


def _pipeline_latents(family: str, folder, noise: torch.Tensor, conditioning: dict | None, schedule=None):
    """The latents diffusers' own pipeline returns (DiT: the scheduler's latents before the VAE's 1 / scaling
    factor), with ``schedule`` applied by forward hooks on the named sub-modules."""
    from .diffusers_pipelines import load_pipeline

    pipe = load_pipeline(folder)
    hooks = (schedule_hooks(pipe.transformer, schedule.sublayer_names, schedule.compute) if schedule is not None
             else contextlib.nullcontext([STEPS]))
    with torch.no_grad(), hooks as calls:
        if family == "dit":
            captured = []
            decode = pipe.vae.decode

            def capture(latents, *args, **kwargs):
                captured.append(latents * pipe.vae.config.scaling_factor)
                return decode(latents, *args, **kwargs)

            pipe.vae.decode = capture  # DiTPipeline draws the latents from the generator: the noise is its draw
            pipe(class_labels=[207, 3], guidance_scale=CFG_SCALE, num_inference_steps=STEPS,
                 generator=torch.Generator().manual_seed(0), output_type="np")
            latents = captured[0]
        else:
            latents = pipe(prompt=None, negative_prompt=None, latents=noise.clone(), guidance_scale=CFG_SCALE,
                           num_inference_steps=STEPS, output_type="latent", use_resolution_binning=False,
                           **{name: torch.from_numpy(value) for name, value in conditioning.items()}).images
    assert calls[0] == STEPS
    return latents.numpy()


def _parity_request(family: str, folder, tmp_path):
    """The parity schedule (saved as s.json), the pipeline's latents (saved as z.npy), and the request: DiT labels
    207,3, or PixArt prompt embeddings with padded masks (saved as cond.npz). -> (schedule, noise, conditioning or
    None, CLI flags)."""
    from diffusers.utils.torch_utils import randn_tensor

    found = read_folder(folder)
    schedule = _parity_schedule(found.family.sublayer_names(found.config))
    schedule.save(tmp_path / "s.json")
    noise = randn_tensor((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "z.npy", noise.numpy())
    if family == "dit":
        return schedule, noise, None, ["--labels", "207,3"]
    generator = np.random.default_rng(1)
    shape = (2, 5, CAPTION_CHANNELS)
    conditioning = {"prompt_embeds": generator.standard_normal(shape).astype(np.float32),
                    "prompt_attention_mask": np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
                    "negative_prompt_embeds": generator.standard_normal(shape).astype(np.float32),
                    "negative_prompt_attention_mask": np.array([[1, 0, 0, 0, 0]] * 2)}
    np.savez(tmp_path / "cond.npz", **conditioning)
    return schedule, noise, conditioning, ["--conditioning", str(tmp_path / "cond.npz")]


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["ddim", "dpm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_build_and_run_equal_the_diffusers_pipeline_full_and_with_a_schedule(tiny_diffusers, family, scheduler,
                                                                              tmp_path):
    """build --diffusers DIR --schedule s.json --steps 12, then run --noise z.npy (--labels 207,3 | --conditioning
    cond.npz) --cfg-scale 3 --save-latents: equal to diffusers' pipeline on the same latents and conditioning (padded
    masks included) to 1e-4 of the range, with --full and with the schedule (the pipeline with hooks); verify passes
    every subset."""
    folder = tiny_diffusers(family, scheduler)
    schedule, noise, conditioning, request = _parity_request(family, folder, tmp_path)
    engines = tmp_path / "E"
    run_cli("build", "--diffusers", str(folder), "--steps", str(STEPS), "--schedule", str(tmp_path / "s.json"),
            "--out", str(engines))
    if scheduler == "ddim":  # verify does not depend on the scheduler; once per family keeps the test short
        assert "all 4 subset engine(s) agree with PyTorch" in run_cli("verify", str(engines)).stdout
    _assert_equal_to_the_pipeline(family, folder, noise, conditioning, schedule, tmp_path, lambda full, out: run_cli(
        "run", str(engines), "--noise", str(tmp_path / "z.npy"), *request, "--cfg-scale", str(CFG_SCALE),
        "--save-latents", str(out), *(["--full"] if full else [])))


@pytest.mark.slow
def test_a_pixart_folder_with_a_unipc_scheduler_runs_as_the_pipeline(tiny_diffusers, tmp_path):
    """A PixArt-alpha folder whose scheduler is UniPCMultistepScheduler (order 3: predictor, corrector, their solved
    weights): build samples with diffusers_unipc, and run equals PixArtAlphaPipeline with that scheduler
    (output_type="latent") to 1e-4 of the range (full compute: a schedule does not depend on the sampler)."""
    folder = tiny_diffusers("pixart", "unipc")
    _, noise, conditioning, request = _parity_request("pixart", folder, tmp_path)
    engines = tmp_path / "E"
    run_cli("build", "--diffusers", str(folder), "--steps", str(STEPS), "--out", str(engines))
    sampler = json.loads((engines / "manifest.json").read_text())["sampler"]
    assert sampler["kind"] == "diffusers_unipc" and max(sampler["orders"]) == 3
    run_cli("run", str(engines), "--noise", str(tmp_path / "z.npy"), *request, "--cfg-scale", str(CFG_SCALE),
            "--save-latents", str(tmp_path / "out.npy"), "--full")
    want = _pipeline_latents("pixart", folder, noise, conditioning)
    got = np.load(tmp_path / "out.npy")
    assert got.shape == want.shape == (2, 4, 8, 8)
    assert np.abs(got - want).max() <= 1e-4 * (want.max() - want.min()), np.abs(got - want).max()
    assert np.abs(got - noise.numpy()).max() > 0.1  # it did sample


@pytest.mark.slow
def test_a_unipc_option_not_implemented_is_refused_by_build_in_one_line(tiny_diffusers, tmp_path):
    """A folder's UniPC config with an option the sampler does not implement: build exits 2 with one line naming
    scheduler_config.json and the field, and writes nothing."""
    folder = _copy(tiny_diffusers("pixart", "unipc"), tmp_path)
    _edit_json(folder / "scheduler" / "scheduler_config.json", thresholding=True)
    refused = run_cli("build", "--diffusers", str(folder), "--steps", "4", "--out", str(tmp_path / "E"), check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "scheduler_config.json: field 'thresholding' is True; supported: False" in refused.stderr
    assert not (tmp_path / "E").exists()


def _assert_equal_to_the_pipeline(family, folder, noise, conditioning, schedule, tmp_path, sample_to) -> None:
    """``sample_to(full, out)`` writes latents to ``out`` (full compute, then the schedule): each equal to diffusers'
    pipeline (with hooks for the schedule) to 1e-4 of the range, and the schedule's differing from full compute's."""
    for full, reference in ((True, None), (False, schedule)):
        out = tmp_path / f"{'full' if full else 'l2c'}.npy"
        sample_to(full, out)
        want = _pipeline_latents(family, folder, noise, conditioning, reference)
        got = np.load(out)
        assert got.shape == want.shape == (2, 4, 8, 8)
        assert np.abs(got - want).max() <= 1e-4 * (want.max() - want.min()), (full, np.abs(got - want).max())
        if full:
            full_latents = got
    assert np.abs(full_latents - got).max() > 1e-3 * (want.max() - want.min())  # the schedule changed the result


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_sample_equals_the_diffusers_pipeline_full_and_with_a_schedule(tiny_diffusers, family, tmp_path):
    """sample --diffusers DIR (the PyTorch reference sampler) --steps 12 --noise z.npy (--labels | --conditioning)
    --cfg-scale 3 --save-latents: equal to diffusers' pipeline on the same latents to 1e-4 of the range, with --full
    and with --schedule (the pipeline with hooks)."""
    folder = tiny_diffusers(family, "dpm")
    schedule, noise, conditioning, request = _parity_request(family, folder, tmp_path)
    _assert_equal_to_the_pipeline(family, folder, noise, conditioning, schedule, tmp_path, lambda full, out: run_cli(
        "sample", "--diffusers", str(folder), "--steps", str(STEPS), "--noise", str(tmp_path / "z.npy"), *request,
        "--cfg-scale", str(CFG_SCALE), "--save-latents", str(out),
        *(["--full"] if full else ["--schedule", str(tmp_path / "s.json")])))


@pytest.mark.slow
def test_sample_refuses_conditioning_that_does_not_fit_in_one_line(tiny_diffusers, tmp_path):
    pixart, dit = str(tiny_diffusers("pixart")), str(tiny_diffusers("dit"))
    missing = run_cli("sample", "--diffusers", pixart, "--steps", "2", check=False)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "--conditioning: array 'prompt_embeds' is missing" in missing.stderr
    np.savez(tmp_path / "cond.npz", **_conditioning(length=5))
    labels = run_cli("sample", "--diffusers", pixart, "--steps", "2", "--labels", "1", check=False)
    assert labels.returncode == 2 and "conditioned on prompt embeddings" in labels.stderr
    prompts = run_cli("sample", "--diffusers", dit, "--steps", "2", "--conditioning", str(tmp_path / "cond.npz"),
                      check=False)
    assert prompts.returncode == 2 and "conditioned on class labels" in prompts.stderr
    np.save(tmp_path / "z.npy", np.zeros((3, 4, 8, 8), dtype=np.float32))
    noise = run_cli("sample", "--diffusers", pixart, "--steps", "2", "--conditioning", str(tmp_path / "cond.npz"),
                    "--noise", str(tmp_path / "z.npy"), check=False)
    assert noise.returncode == 2 and "noise has shape (3, 4, 8, 8); expected (2, 4, 8, 8)" in noise.stderr


@pytest.mark.slow
def test_verify_against_the_diffusers_folder_refuses_another_folder(diffusers_builds, tiny_diffusers, tmp_path):
    engines = str(diffusers_builds["dit"])
    passed = run_cli("verify", engines, "--diffusers", str(tiny_diffusers("dit")))
    assert "all 5 subset engine(s) agree" in passed.stdout and "the transformer of" in passed.stdout
    other = run_cli("verify", engines, "--diffusers", str(tiny_diffusers("pixart")), check=False)
    assert other.returncode == 2 and "field 'model/config' differs" in other.stderr
    changed = _copy(tiny_diffusers("dit"), tmp_path)
    weights = changed / "transformer" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    name = sorted(state)[0]
    state[name] = state[name] + 1
    save_file(state, str(weights))
    retrained = run_cli("verify", engines, "--diffusers", str(changed), check=False)
    assert retrained.returncode == 2 and "field 'model/weights_sha256' differs" in retrained.stderr


@pytest.mark.slow
def test_a_diffusers_folder_samples_with_its_own_scheduler(tiny_diffusers, tmp_path):
    refused = run_cli("build", "--diffusers", str(tiny_diffusers("dit")), "--sampler", "ddim", "--out",
                      str(tmp_path / "E"), check=False)
    assert refused.returncode == 2 and "a diffusers folder samples with its own scheduler" in refused.stderr
    folder = _copy(tiny_diffusers("dit"), tmp_path)
    _edit_json(folder / "scheduler" / "scheduler_config.json", _class_name="EulerDiscreteScheduler")
    unsupported = run_cli("build", "--diffusers", str(folder), "--out", str(tmp_path / "E"), check=False)
    assert unsupported.returncode == 2 and "field '_class_name' is 'EulerDiscreteScheduler'" in unsupported.stderr
    assert not (tmp_path / "E").exists()


def test_macs_are_counted_per_named_sublayer(tiny_diffusers):
    """Linear layers by their shapes and attention's two products, each charged to its sub-layer: T = 16 tokens,
    D = 16, cross-attention over PixArt-α's 120 prompt tokens (projected from 12 to 16 channels)."""
    found = read_folder(tiny_diffusers("pixart"))
    macs = found.family.count_macs(found.config)
    tokens, dim, prompt = 16, 16, 120
    attn1 = 4 * tokens * dim * dim + 2 * tokens * tokens * dim
    attn2 = 2 * tokens * dim * dim + 2 * prompt * dim * dim + 2 * tokens * prompt * dim
    ff = 2 * tokens * dim * 4 * dim
    assert macs.per_sublayer == (attn1, attn2, ff) * 2
    assert macs.full == macs.always + 2 * (attn1 + attn2 + ff) and macs.always > prompt * 12 * dim


# -- learning routers over named sub-layers ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_the_soft_routed_forward_at_zero_and_one_is_the_cached_forward(tiny_diffusers, family):
    """L2C's student on diffusers' modules: with weights 0 or 1 every sub-layer contributes its fresh or its cached
    value, exactly as forward_cached with compute = weights; fresh receives every sub-layer's output."""
    found = read_folder(tiny_diffusers(family))
    model = found.family.load(found.transformer_dir, found.config)
    width = len(found.family.sublayer_names(found.config))
    cache: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        model.forward_cached(*_inputs(family, 2, seed=1), [True] * width, cache)
        weights = torch.tensor([float(k % 2) for k in range(width)])
        fresh: dict[int, torch.Tensor] = {}
        soft = model.forward_soft(*_inputs(family, 2, seed=2), weights, cache, fresh)
        hard = model.forward_cached(*_inputs(family, 2, seed=2), [bool(w) for w in weights], dict(cache))
        half = model.forward_soft(*_inputs(family, 2, seed=2), torch.full((width,), 0.5), cache, None)
    assert torch.allclose(soft, hard, atol=1e-6) and sorted(fresh) == list(range(width))
    assert not torch.allclose(half, hard, atol=1e-4)


@pytest.mark.slow
def test_a_router_learned_on_a_tiny_pixart_decodes_builds_and_runs(tiny_diffusers, tmp_path):
    """learn --diffusers DIR --conditioning-data prompts.npz writes a router whose columns are the sub-layers' names;
    schedule --diffusers decodes it, build --router builds it, run and verify run it."""
    folder = str(tiny_diffusers("pixart"))
    prompts = _conditioning(n=3)
    np.savez(tmp_path / "prompts.npz", **prompts)
    router = tmp_path / "router.safetensors"
    run_cli("learn", "--diffusers", folder, "--steps", "6", "--conditioning-data", str(tmp_path / "prompts.npz"),
            "--trajectories", "4", "--batch-size", "2", "--iterations", "5", "--mode", "general", "--lr", "0.5",
            "--out", str(router))
    from l2c_export.routers import load_router

    names = list(read_folder(folder).family.sublayer_names(read_folder(folder).config))
    learned = load_router(router)
    assert learned.sublayers == names and learned.logits.shape == (6, 6)
    assert np.abs(learned.logits[1:]).max() > 0  # the routers moved
    decoded = run_cli("schedule", "--diffusers", folder, "--router", str(router), "--mode", "general",
                      "--target-mac-fraction", "0.8", "--json", str(tmp_path / "s.json")).stdout
    assert "ideal speedup" in decoded and json.loads((tmp_path / "s.json").read_text())["sublayers"] == names
    engines = tmp_path / "E"
    run_cli("build", "--diffusers", folder, "--steps", "6", "--router", str(router), "--mode", "general",
            "--target-mac-fraction", "0.8", "--out", str(engines))
    np.savez(tmp_path / "cond.npz", **_conditioning())
    run_cli("run", str(engines), "--conditioning", str(tmp_path / "cond.npz"), "--save-latents",
            str(tmp_path / "out.npy"))
    assert np.isfinite(np.load(tmp_path / "out.npy")).all()
    assert "agree with PyTorch" in run_cli("verify", str(engines)).stdout


@pytest.mark.slow
def test_learn_asks_a_text_model_for_prompts_and_refuses_them_for_a_label_model(tiny_diffusers, tmp_path):
    np.savez(tmp_path / "prompts.npz", **_conditioning())
    missing = run_cli("learn", "--diffusers", str(tiny_diffusers("pixart")), "--steps", "4", "--out",
                      str(tmp_path / "r.safetensors"), check=False)
    assert missing.returncode == 2 and "give --conditioning-data prompts.npz" in missing.stderr
    labels = run_cli("learn", "--diffusers", str(tiny_diffusers("dit")), "--steps", "4", "--conditioning-data",
                     str(tmp_path / "prompts.npz"), "--out", str(tmp_path / "r.safetensors"), check=False)
    assert labels.returncode == 2 and "conditioned on class labels" in labels.stderr
    np.savez(tmp_path / "long.npz", **_conditioning(length=121))  # PixArt-α encodes at most 120 tokens
    long = run_cli("learn", "--diffusers", str(tiny_diffusers("pixart")), "--steps", "4", "--conditioning-data",
                   str(tmp_path / "long.npz"), "--out", str(tmp_path / "r.safetensors"), check=False)
    assert long.returncode == 2 and "121 prompt tokens; expected at most the model's max_sequence_length 120" \
        in long.stderr and not (tmp_path / "r.safetensors").exists()


def test_concurrent_requests_on_the_torch_backend_give_the_serial_results(diffusers_builds):
    """The wrapped sub-modules read their call's compute and cache per thread: four requests at once through one
    torch model equal the same requests one by one."""
    from concurrent.futures import ThreadPoolExecutor

    from l2c_export.runtime.conditioning import example_conditioning
    from l2c_export.runtime.pipeline import L2CPipeline

    pipe = L2CPipeline.from_engine_dir(diffusers_builds["pixart"], backend="torch")
    requests = [example_conditioning(pipe.manifest, 2, seed=seed) for seed in range(4)]
    serial = [pipe(**request, seed=seed).samples for seed, request in enumerate(requests)]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda item: pipe(**item[1], seed=item[0]).samples, enumerate(requests)))
    for one, other in zip(serial, concurrent):
        np.testing.assert_array_equal(one, other)
