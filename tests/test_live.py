"""A learned schedule on a live diffusers pipeline in PyTorch (issue 31): ``l2c_export.enable(pipe, schedule)`` equals
``sample --diffusers`` with the same schedule and diffusers with the paper's hooks (``schedule_hooks``), for every
family; ``disable`` gives diffusers' own output back; ``l2c_export.learn(pipe, prompts=...)`` and ``learn --prompts``
learn the same router from the folder's own text encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import l2c_export
from l2c_export.core.schedule import Schedule
from l2c_export.learn.live import HOOK_NAME, live_model

from .conftest import run_cli
from .diffusers_pipelines import CAPTION_CHANNELS, load_pipeline, schedule_hooks
from .test_diffusers import CFG_SCALE, STEPS, _parity_request
from .test_mmdit import IMAGE_SIZE, STEPS as MMDIT_STEPS, _request as _mmdit_request, _schedule as _mmdit_schedule

FAMILIES = ("dit", "pixart", "sd3", "flux", "sana", "qwen", "wan")
SCHEDULERS = {"dit": "dpm", "pixart": "dpm", "sd3": "flow", "flux": "flow", "sana": "flow", "qwen": "flow",
              "wan": "flow"}
WAN_STEPS, WAN_FRAMES, WAN_PIXELS = 4, 5, 48  # 2 x 12 x 12 latents (the tiny VAE's factors: 4 in time and space)


def _wan_folder(tmp_path):
    """The tiny Wan2.1 folder with rope_max_seq_len 64: enable names the sub-layers at the pipeline's default clip
    (81 frames of 480 x 832: 52 patches on its widest axis), which the tests' folder (32 positions) cannot size."""
    from diffusers import WanPipeline, WanTransformer3DModel

    from .diffusers_pipelines import WAN_CONFIG, _scheduler, tiny_wan_vae

    torch.manual_seed(0)
    pipe = WanPipeline(transformer=WanTransformer3DModel(**dict(WAN_CONFIG, rope_max_seq_len=64)),
                       vae=tiny_wan_vae(), scheduler=_scheduler("flow", "wan"), text_encoder=None, tokenizer=None)
    pipe.save_pretrained(tmp_path / "wan")
    return tmp_path / "wan"


def _hooked_modules(pipe) -> list[str]:
    """The transformer's modules that hold a diffusers hook (any registry with a hook in it)."""
    return [name for name, module in pipe.transformer.named_modules()
            if getattr(module, "_diffusers_hook", None) is not None and module._diffusers_hook.hooks]


class _Request:
    """One family's request as the pipeline and ``sample --diffusers`` take it: the schedule (saved as s.json), the
    latents (z.npy), the conditioning (cond.npz) and the CLI flags."""

    def __init__(self, family: str, folder, tmp_path):
        self.family, self.folder = family, folder
        self.passes = 2 if family in ("qwen", "wan") else 1  # transformer calls a step: these call cond, uncond apart
        if family in ("qwen", "wan"):
            from l2c_export.models.diffusers import read_folder

            from .test_qwenimage import IMAGE_SIZE as QWEN_PIXELS, STEPS as QWEN_STEPS, _request as qwen_request
            from .test_qwenimage import _schedule as qwen_schedule

            found = read_folder(folder)
            sized = {"qwen": (QWEN_PIXELS,), "wan": ((WAN_PIXELS, WAN_PIXELS), WAN_FRAMES)}[family]
            config = found.family.sized_config(found.config, sized[0], found.vae_scale_factor, *sized[1:])
            names = found.family.sublayer_names(config)
            if family == "qwen":
                self.schedule, self.steps = qwen_schedule(names), QWEN_STEPS
                self.noise, self.conditioning = qwen_request()
                size_flags = ["--image-size", str(QWEN_PIXELS)]
            else:  # every other step reuses alternate sub-layers
                rows = np.ones((WAN_STEPS, len(names)), dtype=bool)
                rows[2, ::2] = rows[3, 1::2] = False
                self.schedule, self.steps = Schedule(rows, sublayers=names, mode="general"), WAN_STEPS
                generator = torch.Generator().manual_seed(0)
                self.noise = torch.randn(2, 4, 2, 12, 12, generator=generator)
                self.conditioning = {name: torch.randn(2, 5, CAPTION_CHANNELS, generator=generator)
                                     for name in ("prompt_embeds", "negative_prompt_embeds")}
                size_flags = ["--image-size", f"{WAN_PIXELS}x{WAN_PIXELS}", "--num-frames", str(WAN_FRAMES)]
            self.schedule.save(tmp_path / "s.json")
            np.save(tmp_path / "z.npy", self.noise.numpy())
            np.savez(tmp_path / "cond.npz", **{name: value.numpy() for name, value in self.conditioning.items()})
            self.flags = ["--conditioning", str(tmp_path / "cond.npz"), "--steps", str(self.steps), *size_flags]
        elif family in ("dit", "pixart"):
            self.schedule, self.noise, conditioning, self.flags = _parity_request(family, folder, tmp_path)
            self.conditioning = {name: torch.from_numpy(value) for name, value in (conditioning or {}).items()}
            self.flags += ["--steps", str(STEPS)]
            self.steps = STEPS
        elif family == "sana":  # test_sana's request: padded prompts and negative prompts, its general schedule
            from l2c_export.models.diffusers import read_folder

            from .test_sana import STEPS as SANA_STEPS, _schedule_rows

            found = read_folder(folder)
            names = found.family.sublayer_names(found.config)
            self.schedule = Schedule(_schedule_rows(names, SANA_STEPS), sublayers=names, mode="general")
            self.schedule.save(tmp_path / "s.json")
            generator = torch.Generator().manual_seed(0)
            self.noise = torch.randn(2, 4, 8, 8, generator=generator)
            shape = (2, 5, CAPTION_CHANNELS)
            self.conditioning = {"prompt_embeds": torch.randn(shape, generator=generator),
                                 "prompt_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
                                 "negative_prompt_embeds": torch.randn(shape, generator=generator),
                                 "negative_prompt_attention_mask": torch.tensor([[1, 0, 0, 0, 0]] * 2)}
            np.save(tmp_path / "z.npy", self.noise.numpy())
            np.savez(tmp_path / "cond.npz", **{name: value.numpy() for name, value in self.conditioning.items()})
            self.flags = ["--conditioning", str(tmp_path / "cond.npz"), "--steps", str(SANA_STEPS)]
            self.steps = SANA_STEPS
        else:
            from l2c_export.models.diffusers import read_folder

            found = read_folder(folder)
            config = found.family.sized_config(found.config, IMAGE_SIZE if family == "flux" else None,
                                               found.vae_scale_factor)
            self.schedule = _mmdit_schedule(found.family.sublayer_names(config))
            self.schedule.save(tmp_path / "s.json")
            self.noise, self.conditioning = _mmdit_request(family)
            np.save(tmp_path / "z.npy", self.noise.numpy())
            np.savez(tmp_path / "cond.npz", **{name: value.numpy() for name, value in self.conditioning.items()})
            self.flags = ["--conditioning", str(tmp_path / "cond.npz"), "--steps", str(MMDIT_STEPS),
                          *(["--image-size", str(IMAGE_SIZE)] if family == "flux" else [])]
            self.steps = MMDIT_STEPS
        self.flags += ["--noise", str(tmp_path / "z.npy"), "--cfg-scale", str(CFG_SCALE)]

    def latents(self, pipe, **options) -> np.ndarray:
        """The pipeline's latents for this request (DiT: the scheduler's latents, before the VAE's 1 / scaling
        factor, captured at the VAE: DiTPipeline draws them from the generator, whose draw is the noise)."""
        with torch.no_grad():
            if self.family == "dit":
                captured = []
                decode = type(pipe.vae).decode.__get__(pipe.vae)
                pipe.vae.decode = lambda latents, *a, **k: (captured.append(latents * pipe.vae.config.scaling_factor),
                                                            decode(latents, *a, **k))[1]
                pipe(**{"class_labels": [207, 3], "guidance_scale": CFG_SCALE, "num_inference_steps": self.steps,
                        "generator": torch.Generator().manual_seed(0), "output_type": "np", **options})
                del pipe.vae.decode
                return captured[0].numpy()
            extra = {"use_resolution_binning": False, "negative_prompt": None} if self.family == "pixart" else {}
            if self.family == "flux":
                extra = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
            if self.family == "sana":  # SanaPipeline's sizes must be multiples of 32; the latents set the size
                extra = {"height": 32, "width": 32, "use_resolution_binning": False, "negative_prompt": None}
            if self.family == "qwen":  # true CFG against the negative embeddings; packed latents need the size
                from .test_qwenimage import IMAGE_SIZE as QWEN_PIXELS

                return pipe(prompt=None, latents=self.noise.clone(), true_cfg_scale=CFG_SCALE, height=QWEN_PIXELS,
                            width=QWEN_PIXELS, num_inference_steps=self.steps, output_type="latent",
                            **self.conditioning, **options).images.numpy()
            if self.family == "wan":
                return pipe(prompt=None, latents=self.noise.clone(), guidance_scale=CFG_SCALE, height=WAN_PIXELS,
                            width=WAN_PIXELS, num_frames=WAN_FRAMES, num_inference_steps=self.steps,
                            output_type="latent", **self.conditioning, **options).frames.numpy()
            return pipe(**{"prompt": None, "latents": self.noise.clone(), "guidance_scale": CFG_SCALE,
                           "num_inference_steps": self.steps, "output_type": "latent", **self.conditioning, **extra,
                           **options}).images.numpy()


@pytest.mark.parametrize("family", [pytest.param(family, marks=[pytest.mark.slow] if family in ("sana", "qwen", "wan")
                                                 else []) for family in FAMILIES])  # Sana's: about 25 s loaded
def test_enable_equals_sample_and_the_papers_hooks_and_disable_restores_diffusers(tiny_diffusers, family, tmp_path):
    """enable(pipe, "s.json") on diffusers' own pipeline loaded from the tiny folder: equal to `sample --diffusers
    --schedule s.json` on the same latents and conditioning (1e-6 of the range) and to the pipeline with
    schedule_hooks; a second run (the step count starts again) gives the same; disable removes every hook and
    gives the full-compute output exactly."""
    folder = _wan_folder(tmp_path) if family == "wan" else tiny_diffusers(family, SCHEDULERS[family])
    request = _Request(family, folder, tmp_path)
    pipe = load_pipeline(folder)
    full = request.latents(pipe)
    with schedule_hooks(pipe.transformer, request.schedule.sublayer_names, request.schedule.compute,
                        request.passes) as calls:
        hooked = request.latents(pipe)
    assert calls[0] == request.steps * request.passes

    applied = l2c_export.enable(pipe, tmp_path / "s.json")
    assert isinstance(applied, Schedule) and np.array_equal(applied.compute, request.schedule.compute)
    enabled, again = request.latents(pipe), request.latents(pipe)
    state = pipe.transformer._diffusers_hook.get_hook(HOOK_NAME).state
    assert state.caches and not any(state.caches)  # after a run's last step no cached tensor is held
    l2c_export.disable(pipe)
    assert _hooked_modules(pipe) == []
    restored = request.latents(pipe)

    run_cli("sample", "--diffusers", str(folder), *request.flags, "--schedule", str(tmp_path / "s.json"),
            "--save-latents", str(tmp_path / "sampled.npy"))
    sampled = np.load(tmp_path / "sampled.npy")
    scale = np.ptp(full)
    assert np.array_equal(enabled, hooked) and np.array_equal(again, enabled)
    assert np.array_equal(restored, full)
    assert sampled.shape == enabled.shape
    assert np.abs(enabled - sampled).max() <= 1e-6 * scale, np.abs(enabled - sampled).max() / scale
    assert np.abs(enabled - full).max() > 1e-4 * scale  # the schedule reused something


def test_a_pipeline_calling_cond_and_uncond_apart_keeps_a_cache_per_pass(tiny_diffusers, tmp_path):
    """FluxPipeline with true_cfg_scale and negative embeddings calls the transformer twice a step: enable counts
    steps, not calls, and each pass reuses its own outputs (schedule_hooks with passes=2)."""
    folder = tiny_diffusers("flux", "flow")
    request = _Request("flux", folder, tmp_path)
    negatives = {"negative_prompt_embeds": request.conditioning["prompt_embeds"].flip(0),
                 "negative_pooled_prompt_embeds": request.conditioning["pooled_prompt_embeds"].flip(0),
                 "true_cfg_scale": 2.0}
    pipe = load_pipeline(folder)
    names, compute = request.schedule.sublayer_names, request.schedule.compute
    with schedule_hooks(pipe.transformer, names, compute, passes=2) as calls:
        hooked = request.latents(pipe, **negatives)
    assert calls[0] == 2 * request.steps
    l2c_export.enable(pipe, request.schedule)
    assert np.array_equal(request.latents(pipe, **negatives), hooked)


def test_a_schedule_that_does_not_fit_is_refused_in_one_line(tiny_diffusers, tmp_path):
    """A schedule naming a sub-layer the transformer lacks is refused at enable (the pipeline left as it was); one of
    another step count at the pipeline call, naming num_inference_steps; a router without a threshold by name."""
    folder = tiny_diffusers("pixart", "dpm")
    request = _Request("pixart", folder, tmp_path)
    pipe = load_pipeline(folder)
    names = list(request.schedule.sublayer_names)
    names[1] = "transformer_blocks.0.attn9"
    with pytest.raises(ValueError, match=r"field 'sublayers' names 'transformer_blocks.0.attn9'") as unknown:
        l2c_export.enable(pipe, Schedule(request.schedule.compute, sublayers=names))
    assert "\n" not in str(unknown.value) and _hooked_modules(pipe) == []

    l2c_export.enable(pipe, request.schedule)
    with pytest.raises(ValueError, match=rf"has {STEPS} steps .*num_inference_steps=7.*num_inference_steps={STEPS}") \
            as steps:
        request.latents(pipe, num_inference_steps=7)
    assert "\n" not in str(steps.value)

    from l2c_export.routers import RouterLogits

    logits = RouterLogits(np.zeros((STEPS, len(names)), np.float32), "r", {"sublayers": request.schedule.sublayers})
    with pytest.raises(ValueError, match="give threshold= or target_mac_fraction="):
        l2c_export.enable(pipe, logits)
    decoded = l2c_export.enable(pipe, logits, threshold=0.6, mode="general")  # sigmoid(0) = 0.5: reuse all after 0
    assert decoded.compute[0].all() and not decoded.compute[1:].any()


@pytest.mark.slow
def test_learn_with_prompts_from_the_folder_and_from_the_live_pipeline(tiny_diffusers, tmp_path):
    """learn --diffusers DIR --prompts prompts.txt (a tiny PixArt with a T5 encoder) learns a router whose columns
    are the sub-layers; l2c_export.learn(pipe, prompts=...) on the same folder's pipeline learns the same one; eval
    --prompts evaluates it; it builds (with the folder's text encoder) and runs from a prompt, and enable applies it
    to the pipe."""
    folder = tiny_diffusers("pixart-t5", "dpm")
    (tmp_path / "prompts.txt").write_text("a handwritten seven\n\nthe digit three\nnumber one\n")
    options = dict(steps=6, trajectories=4, batch_size=2, iterations=4, mode="general", lr=0.5)
    router_file = tmp_path / "router.safetensors"
    run_cli("learn", "--diffusers", str(folder), "--prompts", str(tmp_path / "prompts.txt"),
            *[arg for key, value in options.items() for arg in (f"--{key.replace('_', '-')}", str(value))],
            "--out", str(router_file))
    learned = l2c_export.load_router(router_file)
    pipe = load_pipeline(folder)
    options["num_inference_steps"] = options.pop("steps")
    live = l2c_export.learn(pipe, prompts=["a handwritten seven", "the digit three", "number one"], progress=False,
                            **options)
    assert live.sublayers == learned.sublayers and len(learned.sublayers) == 6
    assert np.abs(learned.logits[1:]).max() > 0  # the routers moved
    np.testing.assert_allclose(live.logits, learned.logits, atol=1e-5)
    live.save(tmp_path / "live.safetensors")
    assert l2c_export.load_router(tmp_path / "live.safetensors").sublayers == learned.sublayers

    run_cli("eval", "--diffusers", str(folder), "--router", str(router_file), "--mode", "general", "--prompts",
            str(tmp_path / "prompts.txt"), "--num-samples", "4", "--budgets", "", "--random-seeds", "1", "--json",
            str(tmp_path / "eval.json"))
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["num_samples"] == 4 and any(row["method"] == "l2c" for row in report["results"])

    engines = tmp_path / "E"
    run_cli("build", "--diffusers", str(folder), "--steps", "6", "--router", str(router_file), "--mode", "general",
            "--target-mac-fraction", "0.8", "--out", str(engines))
    run_cli("run", str(engines), "--prompt", "a handwritten seven", "--save-latents", str(tmp_path / "out.npy"))
    assert np.isfinite(np.load(tmp_path / "out.npy")).all()
    schedule = l2c_export.enable(pipe, router_file, target_mac_fraction=0.8, mode="general")
    assert not schedule.compute.all()
    with torch.no_grad():
        latents = pipe("a handwritten seven", num_inference_steps=6, output_type="latent", clean_caption=False,
                       use_resolution_binning=False).images
    assert torch.isfinite(latents).all()


def test_learn_and_eval_prompts_refused_in_one_line(tiny_diffusers, tmp_path):
    """learn and eval --prompts on a folder without a text encoder, on a label model, with --conditioning-data, or a
    missing file: one line, exit 2, nothing written."""
    out = tmp_path / "r.safetensors"
    (tmp_path / "prompts.txt").write_text("a handwritten seven\n")
    np.savez(tmp_path / "cond.npz", prompt_embeds=np.zeros((1, 3, 12), np.float32))
    cases = [(tiny_diffusers("pixart", "dpm"), ["--prompts", str(tmp_path / "prompts.txt")], "has no text encoder"),
             (tiny_diffusers("dit", "dpm"), ["--prompts", str(tmp_path / "prompts.txt")],
              "conditioned on class labels"),
             (tiny_diffusers("pixart", "dpm"), ["--prompts", str(tmp_path / "prompts.txt"), "--conditioning-data",
                                                str(tmp_path / "cond.npz")], "not both"),
             (tiny_diffusers("pixart", "dpm"), ["--prompts", str(tmp_path / "missing.txt")], "no such file")]
    for folder, flags, message in cases:
        refused = run_cli("learn", "--diffusers", str(folder), "--steps", "4", *flags, "--out", str(out), check=False)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert refused.stderr.strip().count("\n") == 0 and not out.exists()
    Schedule.full(4, depth=2).save(tmp_path / "s.json")  # eval --prompts refuses the same, before the schedule
    for folder, flags, message in cases:
        refused = run_cli("eval", "--diffusers", str(folder), "--schedule", str(tmp_path / "s.json"), *flags,
                          "--json", str(tmp_path / "eval.json"), check=False)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert refused.stderr.strip().count("\n") == 0 and not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_learn_on_prompt_embeddings_of_a_pipeline_without_text_encoders(tiny_diffusers, family):
    """l2c_export.learn(pipe, conditioning={...}) on SD3 (guided: the negatives too) and FLUX.1 (guidance-distilled)
    pipelines loaded without their text encoders: a router over the named sub-layers that enable applies; prompts=
    are refused naming the missing encoders."""
    pipe = load_pipeline(tiny_diffusers(family, "flow"))
    _, conditioning = _mmdit_request(family)
    size = {"image_size": IMAGE_SIZE} if family == "flux" else {}
    router = l2c_export.learn(pipe, conditioning=conditioning, num_inference_steps=4, trajectories=2, batch_size=2,
                              iterations=2, mode="general", progress=False, **size)
    model_family, config = live_model(pipe)
    assert router.sublayers == list(model_family.sublayer_names(config))
    assert router.logits.shape == (4, len(router.sublayers))
    schedule = l2c_export.enable(pipe, router, threshold=0.5, mode="general")  # logits near 0: most reused
    assert not schedule.compute[1:].all()
    with pytest.raises(ValueError, match="has no tokenizer and no text_encoder to encode prompts with"):
        l2c_export.learn(pipe, prompts=["a handwritten seven"], num_inference_steps=4, **size)
