"""``make bench``: the benchmark on the embedded default and on DiT-S/2 at 256 px, onnxruntime and torch, writing
``docs/bench.json``, ``docs/bench.md`` (the table) and ``docs/bench.png`` (achieved against ideal speedup); then the
serving figure, the embedded default through a real Triton server with 1 and 8 concurrent clients
(``docs/bench-serving.json``, ``docs/bench-serving.png``; ``--serving-only`` runs just that).

Each model is built in fp32 and in int8 (dynamic, :mod:`l2c_export.export.quantize`); on onnxruntime both builds are
measured in one interleaved loop, so the int8 rows' speedups against fp32 full compute share the machine's load.
torch runs the fp32 build only.

DiT-S/2 uses random weights in the official layout (timing does not depend on the values) and a fixed synthetic
schedule in the authors' official mode: every other step computes everything; the 10 cache steps in between drop a
share of sub-layers falling from 80% at the first cache step to 10% at the last (the authors' routers reuse most early
on), which gives 11 distinct subsets.

``make bench-large`` (``--large``; not part of ``make test``): diffusers folders at the real sizes, random weights
(:data:`REAL_SIZES`: ``facebook/DiT-XL-2-256``'s transformer, PixArt-α 512's, SD3-medium's at 256 px, FLUX.1's real
width with 2 double and 4 single blocks at 256 px, Sana 1.6B at 1024 px, Qwen-Image's real width with 4 of its
60 blocks at 256 px, and Wan2.1-T2V-1.3B's real width with 2 of its 30 blocks at 17 frames of 256 px; the cuts' rows
also project their whole model per block, and the Wan row Wan2.1-14B and Wan2.2-A14B's two experts too: see
:func:`full_model_projection`), each built over the same kind of synthetic official-mode schedule over its named
sub-layers, verified, benchmarked (speed against the ideal, memory of every subset against the full one alone) and its
exported full compute timed against diffusers' own PyTorch pipeline on the same work (steps, batch, latents,
conditioning, guidance), writing ``docs/bench-large.json`` and ``docs/bench-large.md``. ``large_benchmark(...,
sizes=...)`` runs the same path on other configs under the same names (the test's tiny ones).

Why it ships in the installed package rather than in a scripts folder beside it: it is how a user reproduces the
published figures on their own machine and models (``python -m l2c_export.tools.bench_suite --large --models ...``
against an installed wheel, no clone needed), it stands on the package's public stages only (builder, runtime,
serving, :mod:`l2c_export.tools.bench`), and its schedule and real-size model configurations
(:func:`synthetic_official_schedule`, :func:`real_size_config`) are what the C++ and bench tests build. It imports
nothing at module level beyond numpy, so shipping it costs an installed user nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.extras import import_extra


def synthetic_official_schedule(num_steps: int, depth: int, seed: int = 0, sublayers: tuple[str, ...] | None = None,
                                sampler=None):
    """DDIM's official mode (every other call after the first is a cache call): each cache call drops a random share
    of sub-layers, from 80% at the first to 10% at the last. Over ``depth`` authors'-layout blocks and DiT's DDIM
    timesteps, or over the named ``sublayers`` with ``sampler``'s (a diffusers folder's scheduler)."""
    from ..core.schedule import Schedule
    from ..samplers import official_cache_calls
    from ..samplers.gaussian import GaussianSampler

    rng = np.random.default_rng(seed)
    width = len(sublayers) if sublayers is not None else 2 * depth
    compute = np.ones((num_steps, width), dtype=bool)
    cache_steps = official_cache_calls("ddim", num_steps)
    for position, s in enumerate(cache_steps):
        drop = 0.8 - 0.7 * position / max(1, len(cache_steps) - 1)
        compute[s, rng.choice(width, size=int(round(drop * width)), replace=False)] = False
    timesteps = (GaussianSampler.create("ddim", num_steps).timesteps if sampler is None else sampler.model_times)
    return Schedule(compute, timesteps=timesteps.tolist(), mode="official",
                    sampler="ddim" if sampler is None else sampler.kind,
                    sublayers=sublayers,
                    source=f"synthetic official-mode schedule (seed {seed}), l2c_export.tools.bench_suite")


def dit_s2_checkpoint(path: Path) -> Path:
    import torch

    from ..models.dit.model import DiT, dit_config

    if not path.exists():
        torch.manual_seed(0)
        model = DiT(dit_config("DiT-S/2", input_size=32))
        state = {k: torch.randn_like(v) * 0.02 for k, v in model.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("engines/bench"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--repeats", type=int, help="interleaved runs [5; --large: 2]")
    parser.add_argument("--batch", type=int, help="images per request (the model batch is twice this) [2; --large: 1]")
    parser.add_argument("--serving-only", action="store_true", help="only the serving figure")
    parser.add_argument("--large", action="store_true",
                        help="the real-size diffusers models instead (make bench-large): --steps model calls, "
                             "--batch images (default 1), --repeats (default 2)")
    parser.add_argument("--steps", type=int, default=6, help="--large: num_inference_steps")
    parser.add_argument("--models", default=",".join(REAL_SIZES), help="--large: which of " + ", ".join(REAL_SIZES))
    parser.add_argument("--cfg-scale", type=float, help="--large: the guidance scale [each pipeline's own]")
    args = parser.parse_args(argv)
    if args.serving_only:
        return serving_benchmark(args.work, args.docs)
    if args.large:
        return large_benchmark(args.work, args.docs, [m for m in args.models.split(",") if m], args.steps,
                               args.batch or 1, args.repeats or 2, cfg_scale=args.cfg_scale)
    args.batch, args.repeats = args.batch or 2, args.repeats or 5

    import torch

    from ..builder.build import BuildRequest, build
    from ..models.zoo import embedded_default, official
    from .bench import benchmark_together, machine_description, plot, table, write_results

    torch.set_num_threads(torch.get_num_threads())
    default = embedded_default()
    s2 = official(dit_s2_checkpoint(args.work / "DiT-S-2-256x256.pt"), "DiT-S/2", 256)
    builds = [(default, default.schedule(), args.work / "dit-digits"),
              (s2, synthetic_official_schedule(20, s2.num_layers), args.work / "dit-s2-256")]
    results = []
    for spec, schedule, out in builds:
        int8_out = out.parent / f"{out.name}-int8"
        for folder, precision in ((out, "fp32"), (int8_out, "int8")):
            build(BuildRequest(spec=spec, schedule=schedule, sampler=spec.sampler(num_steps=20), out_dir=folder,
                               precision=precision))
        for backend, folders in (("onnxruntime", [out, int8_out]), ("torch", [out])):
            print(f"benchmarking {spec.name} on {backend} ...", flush=True)
            rows = benchmark_together(folders, backend, batch=args.batch, repeats=args.repeats)
            results += rows
            print(table(rows), flush=True)
    machine = machine_description()
    args.docs.mkdir(parents=True, exist_ok=True)
    write_results(results, args.docs / "bench.json", machine)
    plot(results, args.docs / "bench.png")
    text = table(results)
    exported = {r.model: r for r in results if r.backend == "onnxruntime" and r.precision == "fp32"}
    eager = {r.model: r for r in results if r.backend == "torch"}
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores; onnxruntime {machine['onnxruntime']}, "
             f"torch {machine['torch']} ({machine['torch_threads']} threads). Batch {args.batch} images with "
             f"guidance (model batch {2 * args.batch}), DDIM 20 steps, medians of {args.repeats} interleaved runs.",
             "", "```", text, "```", ""]
    for model, result in exported.items():
        if model in eager:
            lines.append(f"- {model}: exported full compute is {eager[model].full_seconds / result.full_seconds:.2f}x "
                         f"faster than PyTorch eager; the exported schedule "
                         f"{eager[model].schedule_seconds / result.schedule_seconds:.2f}x faster than the eager L2C "
                         f"sampler.")
    for r in results:
        if r.precision == "int8" and r.full_speedup_vs_fp32 is not None:
            lines.append(f"- {r.model}: int8 full compute is {r.full_speedup_vs_fp32:.2f}x faster than fp32 full "
                         f"compute; int8 L2C {r.schedule_speedup_vs_fp32:.2f}x, {r.schedule_of_target:.3f} of (int8 "
                         f"speedup x ideal {r.ideal_speedup:.3f}x); all int8 subsets resident in "
                         f"{r.memory_all_engines_bytes / r.memory_full_engine_bytes:.2f}x the int8 full subset's "
                         f"memory.")
    for r in exported.values():
        if r.cpp_memory_all_engines_bytes:
            lines.append(f"- {r.model}, C++ runtime (cpp/, `l2c-memory-probe`): all {r.num_subsets} subsets loaded "
                         f"{r.cpp_memory_all_engines_bytes / 2 ** 20:.1f} MiB, the full subset alone "
                         f"{r.cpp_memory_full_engine_bytes / 2 ** 20:.1f} MiB: "
                         f"{r.cpp_memory_all_engines_bytes / r.cpp_memory_full_engine_bytes:.3f}x (target <= 1.25x; "
                         f"Python {r.memory_all_engines_bytes / r.memory_full_engine_bytes:.3f}x).")
    from ..core.util import atomic_write_text

    atomic_write_text(args.docs / "bench.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.docs / 'bench.json'}, {args.docs / 'bench.md'}, {args.docs / 'bench.png'}")
    serving_benchmark(args.work, args.docs)


# ---------------------------------------------------------------------------------------------------------------------
# Real sizes (make bench-large).

# The transformers' config.json fields of facebook/DiT-XL-2-256 and PixArt-alpha/PixArt-XL-2-512x512 (the options
# those folders set; the rest are diffusers' defaults, which are theirs), the pipeline that samples each, and its
# scheduler: DDIM for DiT (linear betas, as DiT trained), DPM-Solver++ 2M for PixArt-α (as its pipeline runs it).
DIT_XL_2_256 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                    sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
                    activation_fn="gelu-approximate", attention_bias=True, norm_elementwise_affine=False,
                    norm_num_groups=32, upcast_attention=False, dropout=0.0)
PIXART_ALPHA_512 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                        sample_size=64, patch_size=2, caption_channels=4096, cross_attention_dim=1152,
                        norm_type="ada_norm_single", num_embeds_ada_norm=1000, activation_fn="gelu-approximate",
                        attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-6, norm_num_groups=32,
                        use_additional_conditions=False, attention_type="default", upcast_attention=False,
                        dropout=0.0)
# stabilityai/stable-diffusion-3-medium-diffusers' transformer (2B parameters), with sample_size 32 for 256 px (the
# real 128 is 1024 px; the weights do not depend on it: the position embedding is pos_embed_max_size's, cropped).
SD3_MEDIUM_256 = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                      num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                      pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192)
# black-forest-labs/FLUX.1-dev's transformer (19 double-stream and 38 single-stream blocks: 12B parameters, 48 GB in
# fp32, beyond these machines) and the benchmarked cut of it: the real width, 2 double and 4 single blocks.
FLUX_1_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                  axes_dims_rope=(16, 56, 56))
FLUX_WIDTH_2_4 = dict(FLUX_1_DEV, num_layers=2, num_single_layers=4)
# Efficient-Large-Model/Sana_1600M_1024px_diffusers' transformer (1.6B parameters, 6.4 GB in fp32): 20 blocks of
# 70 linear-attention heads of 32 (width 2240), cross-attention 20 heads of 112 over Gemma-2 2B's 2304-wide hidden
# states, DC-AE f32c32 latents (32 channels, 32 x 32 for 1024 px).
SANA_1600M_1024 = dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                       num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                       caption_channels=2304, mlp_ratio=2.5, dropout=0.0, attention_bias=False, sample_size=32,
                       patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6)
# Qwen/Qwen-Image's transformer (60 blocks of 24 heads of 128, width 3072, over Qwen2.5-VL-7B's 3584-wide hidden
# states: 20.4B parameters, 82 GB in fp32, beyond these machines) and the benchmarked cut of it: the real width, 4
# blocks.
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
QWEN_IMAGE_WIDTH_4 = dict(QWEN_IMAGE, num_layers=4)
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers' transformer (30 blocks of 12 heads of 128, width 1536, FFN 8960, over UMT5-XXL's
# 4096-wide hidden states: 1.4B parameters, 5.7 GB in fp32) as diffusers' scripts/convert_wan_to_diffusers.py writes
# it (the options it sets; the rest, freq_dim 256, rope_max_seq_len 1024, are WanTransformer3DModel's defaults); the
# benchmarked cut of it: the real width, 2 blocks (a block at 17 frames of 256 px is 66 GMAC a clip, so that 30 take
# hours on two cores); and Wan2.1-T2V-14B's (40 blocks of 40 heads of 128, width 5120, FFN 13824), which each of
# Wan2.2-T2V-A14B's two experts (transformer, transformer_2; boundary_ratio 0.875) is.
WAN_2_1_T2V_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
                        added_kv_proj_dim=None)
WAN_1_3B_WIDTH_2 = dict(WAN_2_1_T2V_1_3B, num_layers=2)
WAN_2_1_T2V_14B = dict(WAN_2_1_T2V_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
SCHEDULER_OPTIONS = dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000)
# The schedulers as the real folders configure them: SD3-medium's, FLUX.1-dev's and Qwen-Image's flow matching, and
# Sana_1600M_1024px's DPM-Solver++ 2M on flow sigmas.
SD3_SCHEDULER = dict(shift=3.0)
FLUX_SCHEDULER = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096, shift=3.0)
QWEN_IMAGE_SCHEDULER = dict(use_dynamic_shifting=True, time_shift_type="exponential", shift_terminal=0.02,
                            base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192, shift=1.0)
SANA_SCHEDULER = dict(SCHEDULER_OPTIONS, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                      prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                      final_sigmas_type="zero", lower_order_final=True)
# Wan's folders: UniPC (bh2, order 2) on flow sigmas shifted by 3.0 (480p; the converter's for text to video).
WAN_SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0)


@dataclass(frozen=True)
class WholeModel:
    """A model a cut's row projects (:func:`full_model_projection`): its name, its transformer's ``config.json``
    fields, and its ``experts``: transformers of that config that take turns by timestep (Wan2.2-A14B's two), one
    running per step, the weights of all held."""

    name: str
    config: dict
    experts: int = 1


@dataclass(frozen=True)
class RealSize:
    """One model of ``make bench-large``: its pipeline, transformer and scheduler classes as diffusers names them,
    the transformer's ``config.json`` fields and the scheduler's options as the real folder sets them, and
    ``image_size`` (pixels, ``build --image-size``) for a transformer without ``sample_size``, ``num_frames`` for a
    video model (``build --num-frames``). A cut of a model too large for the machine (its real width, fewer blocks)
    names the whole one, ``full_name`` and ``full_config``, which its row projects per block
    (:func:`full_model_projection`), and ``also_projects`` the larger models of its family projected from it the same
    way."""

    pipeline_class: str
    transformer_class: str
    config: dict
    scheduler_class: str
    scheduler_options: dict = field(default_factory=lambda: dict(SCHEDULER_OPTIONS))
    image_size: int | None = None
    full_name: str | None = None
    full_config: dict | None = None
    num_frames: int | None = None
    also_projects: tuple[WholeModel, ...] = ()

    def whole_models(self) -> list[WholeModel]:
        """The models its row projects: the one it is a cut of, then ``also_projects``."""
        return ([WholeModel(self.full_name, self.full_config)] if self.full_config is not None else []) + list(
            self.also_projects)


REAL_SIZES = {
    "DiT-XL-2-256": RealSize("DiTPipeline", "DiTTransformer2DModel", DIT_XL_2_256, "DDIMScheduler"),
    "PixArt-XL-2-512": RealSize("PixArtAlphaPipeline", "PixArtTransformer2DModel", PIXART_ALPHA_512,
                                "DPMSolverMultistepScheduler"),
    "SD3-medium-256": RealSize("StableDiffusion3Pipeline", "SD3Transformer2DModel", SD3_MEDIUM_256,
                               "FlowMatchEulerDiscreteScheduler", SD3_SCHEDULER),
    "FLUX.1-width-2+4-256": RealSize("FluxPipeline", "FluxTransformer2DModel", FLUX_WIDTH_2_4,
                                     "FlowMatchEulerDiscreteScheduler", FLUX_SCHEDULER, image_size=256,
                                     full_name="FLUX.1-dev", full_config=FLUX_1_DEV),
    "Sana-1600M-1024": RealSize("SanaPipeline", "SanaTransformer2DModel", SANA_1600M_1024,
                                "DPMSolverMultistepScheduler", SANA_SCHEDULER),
    "Qwen-Image-width-4-256": RealSize("QwenImagePipeline", "QwenImageTransformer2DModel", QWEN_IMAGE_WIDTH_4,
                                       "FlowMatchEulerDiscreteScheduler", QWEN_IMAGE_SCHEDULER, image_size=256,
                                       full_name="Qwen-Image", full_config=QWEN_IMAGE),
    "Wan2.1-1.3B-width-2-17x256": RealSize("WanPipeline", "WanTransformer3DModel", WAN_1_3B_WIDTH_2,
                                           "UniPCMultistepScheduler", WAN_SCHEDULER, image_size=256, num_frames=17,
                                           full_name="Wan2.1-T2V-1.3B", full_config=WAN_2_1_T2V_1_3B,
                                           also_projects=(WholeModel("Wan2.1-T2V-14B", WAN_2_1_T2V_14B),
                                                          WholeModel("Wan2.2-T2V-A14B", WAN_2_1_T2V_14B, experts=2))),
}
# What each pipeline is called with besides the shared request (prompt=None, latents, steps, the scale, the arrays):
# PixArt's and Sana's negative prompt left out (their negative embeddings are given) and no resolution binning.
PIPELINE_CALL_OPTIONS = {"PixArtAlphaPipeline": dict(negative_prompt=None, use_resolution_binning=False),
                         "SanaPipeline": dict(negative_prompt=None, use_resolution_binning=False)}


def real_size_config(name: str, sizes: dict[str, RealSize] = REAL_SIZES):
    """(family, :class:`l2c_export.models.diffusers.DiffusersConfig`) of ``name`` (a key of ``sizes``) as its row
    builds it: checked by its family as a folder's config is, at the row's ``image_size`` (the VAE's scale factor 8
    a folder without a VAE has)."""
    size = sizes[name]
    family, config = transformer_config(size.transformer_class, size.config)
    return family, sized(family, config, size)


def sized(family, config, size: RealSize):
    """``config`` at ``size``'s image size and frames (the VAE's scale factor 8 a folder without a VAE has)."""
    if size.image_size is None and size.num_frames is None:
        return config
    return family.sized_config(config, size.image_size, 8, size.num_frames)


def transformer_config(transformer_class: str, config: dict):
    """(family, :class:`l2c_export.models.diffusers.DiffusersConfig`) of a transformer's ``config.json`` fields."""
    from ..models.diffusers import transformer_families

    family = transformer_families()[transformer_class]
    return family, family.config_from_dict({"transformer_class": transformer_class, "transformer": dict(config)})


def save_random_pipeline(size: RealSize, folder: Path) -> Path:
    """The pipeline of ``size`` with random weights (diffusers' own initialisation, seed 0) in its config, saved
    with ``save_pretrained`` into ``folder`` (transformer/ and scheduler/; every other component, the VAE and the
    text encoders, None); kept if there."""
    import inspect
    import shutil

    if (folder / "model_index.json").is_file():
        return folder
    import torch

    diffusers = import_extra("diffusers", "the large benchmark")

    torch.manual_seed(0)
    transformer = getattr(diffusers, size.transformer_class)(**size.config)
    scheduler = getattr(diffusers, size.scheduler_class)(**size.scheduler_options)
    pipeline_class = getattr(diffusers, size.pipeline_class)
    absent = {name: None for name in inspect.signature(pipeline_class.__init__).parameters
              if name not in ("self", "transformer", "scheduler")}
    pipe = pipeline_class(transformer=transformer, scheduler=scheduler, **absent)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(str(partial))
    del pipe, transformer
    partial.rename(folder)  # whole or not at all
    return folder


def measured_build(folder: Path, schedule, steps: int, out: Path, image_size: int | None,
                   cfg_scale: float | None = None, num_frames: int | None = None) -> tuple[float, int, int]:
    """``l2c-export build --diffusers folder`` over ``schedule`` (``cfg_scale``: its ``--cfg-scale``; default the
    pipeline's; ``num_frames``: a video model's ``--num-frames``) in a child process, as a user runs it: its wall
    seconds, its peak resident set in bytes (the child's own ``ru_maxrss``, which counts the pages of files it maps:
    the safetensors file while its tensors are copied in, pages the kernel can drop) and its peak anonymous memory
    (``RssAnon``, what it cannot give back; sampled every 0.2 s)."""
    import subprocess
    import sys
    import time

    schedule_file = out.with_name(out.name + ".schedule.json")
    schedule.save(schedule_file)
    command = [sys.executable, "-m", "l2c_export.cli", "build", "--diffusers", str(folder), "--steps", str(steps),
               "--schedule", str(schedule_file), "--out", str(out)]
    command += ["--image-size", str(image_size)] if image_size else []
    command += ["--cfg-scale", str(cfg_scale)] if cfg_scale is not None else []
    command += ["--num-frames", str(num_frames)] if num_frames is not None else []
    start = time.perf_counter()
    process = subprocess.Popen(command)
    anonymous = 0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        try:
            fields = Path(f"/proc/{process.pid}/status").read_text().split("RssAnon:")[1].split()
            anonymous = max(anonymous, int(fields[0]) * 1024)  # kB
        except (OSError, IndexError, ValueError):  # exiting
            pass
        time.sleep(0.2)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)}: exit status {process.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024, anonymous


def diffusers_transformer(folder: Path):
    """The pipeline folder's transformer as diffusers has it, its weights copied in one tensor at a time (diffusers'
    own loader holds them twice without accelerate: SD3-medium's 8 GB would not fit beside the exported model)."""
    from ..models.checkpoint import load_safetensors_into
    from ..models.diffusers import weight_files

    diffusers = import_extra("diffusers", "the large benchmark")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    transformer = getattr(diffusers, config["_class_name"]).from_config(config)
    load_safetensors_into(weight_files(folder / "transformer"), transformer, str(folder / "transformer"))
    return transformer.eval()


class _KeepLatents:
    """Stands in for ``DiTPipeline``'s VAE, which it calls unconditionally: keeps the final latents as the pipeline
    has them before the VAE's 1 / scaling_factor (the latents ``l2c-export run`` returns) and decodes nothing, so
    that both sides do the same work."""

    def __init__(self, scaling_factor: float):
        from types import SimpleNamespace

        self.config = SimpleNamespace(scaling_factor=scaling_factor)
        self.latents = None

    def decode(self, latents):
        from types import SimpleNamespace

        self.latents = latents * self.config.scaling_factor
        return SimpleNamespace(sample=latents)


def run_diffusers_pipeline(pipe, request: dict, noise: np.ndarray, steps: int, cfg_scale: float,
                           image_size: int | None = None, scale_argument: str = "guidance_scale",
                           num_frames: int | None = None) -> np.ndarray:
    """diffusers' own pipeline on ``request`` (``labels``, or ``conditioning``: prompt arrays by its argument
    names) from latents ``noise`` (n, C, H, W; FLUX.1 and Qwen-Image: packed (n, T, C) at ``image_size`` pixels;
    Wan: (n, C, F', H', W') of ``num_frames`` frames at ``image_size`` pixels) with the guidance scale ``cfg_scale``
    passed as its ``scale_argument`` (the manifest's ``guidance/scale_argument``: Qwen-Image's ``true_cfg_scale``)
    -> its final latents of that shape, as ``l2c-export run`` returns them. ``DiTPipeline`` draws its latents from
    its generator: ``noise`` must be that draw (seed 0)."""
    import torch

    with torch.no_grad():
        if "labels" in request:
            keep = pipe.vae = _KeepLatents(pipe.vae.config.scaling_factor if pipe.vae is not None else 0.18215)
            pipe(class_labels=list(request["labels"]), guidance_scale=cfg_scale, num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(0), output_type="pt")
            return keep.latents.float().numpy()
        conditioning = {name: torch.from_numpy(np.asarray(value, dtype=np.float32))
                        for name, value in request["conditioning"].items()}
        options = dict(PIPELINE_CALL_OPTIONS.get(type(pipe).__name__, {}))
        if image_size:  # a packed-latent pipeline and Wan take their size in pixels
            options.update(height=image_size, width=image_size)
        if num_frames:
            options.update(num_frames=num_frames)
        out = pipe(prompt=None, latents=torch.from_numpy(noise), num_inference_steps=steps, output_type="latent",
                   **{scale_argument: cfg_scale}, **options, **conditioning)
        return (out.frames if num_frames else out.images).float().numpy()  # WanPipelineOutput's latents: frames


def block_counts(config: dict) -> str:
    """A transformer config's blocks in words: FLUX.1's "19 double and 38 single", another's "60"."""
    if "num_single_layers" in config:
        return f"{config['num_layers']} double and {config['num_single_layers']} single"
    return str(config["num_layers"])


def width(config: dict) -> int:
    """A transformer config's width: its heads times their size."""
    return config["num_attention_heads"] * config["attention_head_dim"]


def full_model_projection(measured: dict, cut: RealSize, image_size: int, prompt_tokens: int,
                          whole: WholeModel | None = None) -> dict:
    """``whole`` (default the model the cut is of, ``cut.full_config``: FLUX.1-dev, Qwen-Image, Wan2.1-T2V-1.3B; or
    one of ``cut.also_projects``) projected from the cut's measurements (``measured``: a report of
    :func:`large_benchmark`): parameters and MACs counted exactly on the meta device (no memory) at ``image_size``
    pixels (and the cut's frames) and the family's MAC prompt length, the times scaled by the MAC ratio (per block:
    each block's MACs are its share of the time; a wider model's blocks by their MACs too), the weights at 4 bytes
    (fp32) and 2 (bf16) a parameter, of every expert (one runs per step, so the MACs and times are one expert's).
    A projection, not a measurement."""
    import torch

    whole = whole or cut.whole_models()[0]
    transformer_class = getattr(import_extra("diffusers", "the large benchmark"), cut.transformer_class)

    def counts(config: dict) -> tuple[int, int]:
        with torch.device("meta"):
            parameters = sum(p.numel() for p in transformer_class(**config).parameters())
        family, checked = transformer_config(cut.transformer_class, config)
        return parameters, family.count_macs(sized(family, checked, cut)).full

    (cut_parameters, cut_macs), (full_parameters, full_macs) = counts(cut.config), counts(whole.config)
    parameters = whole.experts * full_parameters
    scale = full_macs / cut_macs
    bench = measured["bench"]
    return {"model": whole.name, "config": whole.config, "experts": whole.experts, "image_size": image_size,
            **({"num_frames": cut.num_frames} if cut.num_frames else {}),
            "prompt_tokens": prompt_tokens, "parameters": parameters, "measured_parameters": cut_parameters,
            "macs_per_sample": full_macs, "measured_macs_per_sample": cut_macs, "mac_ratio": scale,
            "weights_fp32_bytes": 4 * parameters, "weights_bf16_bytes": 2 * parameters,
            "full_seconds": bench["full_seconds"] * scale, "schedule_seconds": bench["schedule_seconds"] * scale,
            "note": f"projected from the measured cut ({block_counts(cut.config)} blocks of width "
                    f"{width(cut.config)}) by MACs (times) and parameters (weights); not measured"}


def large_benchmark(work: Path, docs: Path, names: list[str], steps: int = 6, batch: int = 1,
                    repeats: int = 2, sizes: dict[str, RealSize] = REAL_SIZES,
                    cfg_scale: float | None = None) -> list[dict]:
    """Per model of ``sizes`` (default the real ones; a test passes tiny configs under the same names), guided at
    ``cfg_scale`` (default each pipeline's own): save the random pipeline, build (fp32, ONNX Runtime), verify every
    subset, benchmark the build (speed against the ideal, memory against the full subset alone) and time its full
    compute against diffusers' own pipeline on the same work (after one warm-up each, ``repeats`` interleaved pairs,
    medians), with their largest difference relative to the pipeline latents' range. Writes docs/bench-large.json
    and .md."""
    import dataclasses
    import gc
    import statistics
    import time

    started_load = os.getloadavg()[0]

    import torch

    from ..core import manifest as manifest_io
    from ..models.zoo import from_diffusers
    from ..runtime.pipeline import L2CPipeline
    from ..tools.verify import verify_build
    from .bench import bench_request, benchmark_together, machine_description, macs_prompt_tokens, table

    DiffusionPipeline = import_extra("diffusers", "the large benchmark").DiffusionPipeline
    randn_tensor = import_extra("diffusers.utils.torch_utils", "the large benchmark").randn_tensor
    unknown = [name for name in names if name not in sizes]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown[0]!r}; expected some of {', '.join(sizes)}")
    reports = []
    for name in names:
        print(f"{name}: random weights in the real config ...", flush=True)
        size = sizes[name]
        folder = save_random_pipeline(size, work / name)
        image_size = size.image_size
        spec = from_diffusers(folder, image_size, num_frames=size.num_frames)
        sampler = spec.sampler(None, steps)
        schedule = synthetic_official_schedule(steps, 0, sublayers=spec.sublayer_names, sampler=sampler)
        out = work / f"{name}-onnxruntime-fp32"
        build_seconds, build_peak, build_anonymous = measured_build(folder, schedule, steps, out, image_size,
                                                                    cfg_scale, size.num_frames)
        print(f"{name}: built in {build_seconds:.0f} s, peak resident set {build_peak / 2 ** 30:.1f} GiB (anonymous "
              f"{build_anonymous / 2 ** 30:.1f} GiB); verifying ...", flush=True)
        checks, _ = verify_build(out, labels=(0,))  # one image (model batch 2): every subset, at half the cost
        gc.collect()
        print(f"{name}: worst subset difference {max(c.worst_value for c in checks):.2e}; benchmarking ...",
              flush=True)
        prompt_tokens = macs_prompt_tokens(manifest_io.load(out, verify_files=False))
        row = benchmark_together([out], "onnxruntime", batch=batch, repeats=repeats, prompt_tokens=prompt_tokens)[0]
        print(table([row]), flush=True)
        gc.collect()

        subsets = manifest_io.load(out, verify_files=False)["subsets"]
        full_subset = next(s["index"] for s in subsets if all(s["compute"]))
        exported = L2CPipeline.from_engine_dir(out, subsets=[full_subset])
        request = bench_request(exported.manifest, batch, prompt_tokens=prompt_tokens)
        cfg_scale = exported.manifest["guidance"]["cfg_scale"]
        scale_argument = exported.manifest["guidance"]["scale_argument"]
        noise = randn_tensor((batch, *exported.sample_shape), generator=torch.Generator().manual_seed(0)).numpy()
        index = json.loads((folder / "model_index.json").read_text())
        absent = {key: None for key, value in index.items() if value == [None, None]}  # saved without VAE/encoder
        reference = DiffusionPipeline.from_pretrained(str(folder), transformer=diffusers_transformer(folder),
                                                      **absent)
        reference.set_progress_bar_config(disable=True)
        exported_seconds, pipeline_seconds = [], []
        for repeat in range(repeats + 1):  # the first pair warms up
            begin = time.perf_counter()
            ours = exported(**request, noise=noise, full=True).samples
            middle = time.perf_counter()
            theirs = run_diffusers_pipeline(reference, request, noise, steps, cfg_scale, image_size, scale_argument,
                                            size.num_frames)
            end = time.perf_counter()
            if repeat:
                exported_seconds.append(middle - begin)
                pipeline_seconds.append(end - middle)
        worst = float(np.abs(ours - theirs).max() / (theirs.max() - theirs.min()))
        del exported, reference
        gc.collect()
        report = {"model": name, "folder": str(folder), "build": str(out), "transformer": size.transformer_class,
                  "config": size.config, "scheduler": size.scheduler_class, "steps": steps, "batch": batch,
                  "cfg_scale": cfg_scale, "repeats": repeats, "build_seconds": build_seconds,
                  "build_peak_rss_bytes": build_peak, "build_peak_anonymous_bytes": build_anonymous,
                  "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "verify_worst": max(c.worst_value for c in checks), "verify_images": 1,
                  "num_subsets": row.num_subsets,
                  "bench": dataclasses.asdict(row),
                  "pipeline_seconds": statistics.median(pipeline_seconds),
                  "exported_full_seconds": statistics.median(exported_seconds),
                  "exported_full_vs_pipeline":
                      statistics.median(pipeline_seconds) / statistics.median(exported_seconds),
                  "exported_full_vs_pipeline_worst_difference": worst,
                  "prompt_tokens": None if "labels" in request else request["conditioning"]["prompt_embeds"].shape[1],
                  "image_size": image_size, **({"num_frames": size.num_frames} if size.num_frames else {})}
        projections = [full_model_projection(report, size, image_size, prompt_tokens, whole)
                       for whole in size.whole_models()]
        if projections:
            report["full_model_projection"] = projections[0]
        if projections[1:]:
            report["also_projected"] = projections[1:]
        print(f"{name}: diffusers pipeline {report['pipeline_seconds']:.2f} s, exported full compute "
              f"{report['exported_full_seconds']:.2f} s ({report['exported_full_vs_pipeline']:.2f}x); latents differ "
              f"by {worst:.1e} of their range", flush=True)
        reports.append(report)
    # the 1-minute load average as the run started: other jobs on the machine raise it (and every timing with it)
    return write_large_docs(reports, {**machine_description(), "load_average_1min": started_load}, docs, sizes)


def write_large_docs(reports: list[dict], machine: dict, docs: Path,
                     sizes: dict[str, RealSize] = REAL_SIZES) -> list[dict]:
    """docs/bench-large.json and .md: ``reports``, and the rows of other models already there (a run of some
    ``--models`` keeps the others'), in the order of ``sizes``, each cut's projection of its whole model below the
    table. Returns every row."""
    from ..core.util import atomic_write_text, write_json

    path = docs / "bench-large.json"
    names = {r["model"] for r in reports}
    before = json.loads(path.read_text()) if path.is_file() else {"results": []}
    kept = [{"machine": before.get("machine"), **r} for r in before["results"] if r["model"] not in names]
    reports = [{**r, "machine": machine} for r in reports]  # rows of several runs: each says where it ran
    rows = sorted(kept + reports, key=lambda r: list(sizes).index(r["model"]) if r["model"] in sizes else len(sizes))
    docs.mkdir(parents=True, exist_ok=True)
    write_json(path, {"machine": machine, "results": rows})
    load = machine.get("load_average_1min")
    lines = [f"Machine of this run: {machine['cpu']}, {machine['cores']} cores"
             f"{'' if load is None else f', load average {load:.1f} as it started (other jobs raise it)'}; "
             f"onnxruntime {machine['onnxruntime']}, torch {machine['torch']} ({machine['torch_threads']} threads); "
             f"each row names its CPU. Random weights in the real configs, fp32, guidance on (model batch twice the "
             f"images; Qwen-Image's true_cfg_scale likewise; FLUX.1 runs none: its guidance embedding takes the "
             f"scale); medians of the interleaved runs after a warm-up of each.", "",
             "| model | CPU | steps | images | repeats | subsets | full s | L2C s | speedup | ideal | of ideal | "
             "mem all (MiB) | mem full (MiB) | all / full | weights (MiB) | build s | build peak anon / RSS (GiB) | "
             "diffusers pipeline s | exported full s | vs pipeline | latents differ (of range) | verify worst |",
             "| --- " * 22 + "|"]
    for r in rows:
        b = r["bench"]
        cpu = (r.get("machine") or {}).get("cpu", "?")
        anonymous, rss = r.get("build_peak_anonymous_bytes"), r.get("build_peak_rss_bytes")
        peak = f"{anonymous / 2 ** 30:.1f} / {rss / 2 ** 30:.1f}" if anonymous and rss else (
            f"? / {rss / 2 ** 30:.1f}" if rss else "?")
        lines.append(f"| {r['model']} | {cpu} | {r['steps']} | {r['batch']} | {r['repeats']} | {r['num_subsets']} | "
                     f"{b['full_seconds']:.2f} | {b['schedule_seconds']:.2f} | {b['speedup']:.3f}x | "
                     f"{b['ideal_speedup']:.3f}x | {b['speedup_of_ideal']:.3f} | "
                     f"{b['memory_all_engines_bytes'] / 2 ** 20:.0f} | {b['memory_full_engine_bytes'] / 2 ** 20:.0f} | "
                     f"{b['memory_all_engines_bytes'] / b['memory_full_engine_bytes']:.3f}x | "
                     f"{b['model_weights_bytes'] / 2 ** 20:.0f} | {r['build_seconds']:.0f} | {peak} | "
                     f"{r['pipeline_seconds']:.2f} | "
                     f"{r['exported_full_seconds']:.2f} | {r['exported_full_vs_pipeline']:.2f}x | "
                     f"{r['exported_full_vs_pipeline_worst_difference']:.1e} | {r['verify_worst']:.1e} |")
    for r in rows:
        for projection in [r.get("full_model_projection"), *r.get("also_projected", [])]:
            if not projection:
                continue
            whole = projection.get("model") or sizes[r["model"]].full_name  # rows written before "model" was
            experts = projection.get("experts", 1)
            blocks = (f"{experts} experts of {block_counts(projection['config'])} blocks, one a step" if experts > 1
                      else f"{block_counts(projection['config'])} blocks")
            wider = width(projection["config"]) != width(r["config"])
            if wider:
                blocks += f", width {width(projection['config'])}"
            frames = f"{projection['num_frames']} frames of " if projection.get("num_frames") else ""
            lines += ["", f"Projected, not measured: the full {whole} ({blocks}) from the {r['model']} row, per "
                      f"block by MACs: {projection['parameters'] / 1e9:.1f}B "
                      f"parameters ({projection['weights_fp32_bytes'] / 2 ** 30:.0f} GiB fp32, "
                      f"{projection['weights_bf16_bytes'] / 2 ** 30:.0f} GiB bf16; measured cut "
                      f"{projection['measured_parameters'] / 1e9:.2f}B), {projection['mac_ratio']:.1f}x the cut's MACs "
                      f"at {frames}{projection['image_size']} px and {projection['prompt_tokens']} prompt tokens: full "
                      f"compute about {projection['full_seconds']:.0f} s, the same schedule about "
                      f"{projection['schedule_seconds']:.0f} s for {r['steps']} steps, batch {r['batch']}, on that "
                      f"row's machine" + (" (a wider model's larger products may run more efficiently per MAC)."
                                          if wider else ".")]
    atomic_write_text(docs / "bench-large.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {docs / 'bench-large.json'}, {docs / 'bench-large.md'}")
    return rows


def serving_benchmark(work: Path, docs: Path, clients: int = 8) -> dict:
    """The embedded default's build served by the bundled tritonserver (from ``.venv-triton``): images per second
    with one client and with ``clients`` concurrent clients, interleaved in one run."""
    from ..builder.build import BuildRequest, build
    from ..core.util import write_json
    from ..models.zoo import embedded_default
    from ..runtime.pipeline import L2CPipeline
    from ..serving import throughput
    from ..serving.triton import TritonServer, free_port, write_repository
    from .bench import machine_description

    default = embedded_default()
    out = work / "dit-digits"
    build(BuildRequest(spec=default, schedule=default.schedule(), sampler=default.sampler(),
                       out_dir=out))
    write_repository(out, work / "triton")
    print(f"serving {out} on Triton: 1 client against {clients} concurrent clients ...", flush=True)
    with TritonServer(work / "triton", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                      log=work / "tritonserver.log") as server:
        load = os.getloadavg()[0]
        result = throughput.compare(server, "l2c", clients=clients, pipeline=L2CPipeline.from_engine_dir(out))
    result["machine"] = machine_description()
    result["load_average_1min"] = [load, os.getloadavg()[0]]  # before and after: other work on the machine
    docs.mkdir(parents=True, exist_ok=True)
    write_json(docs / "bench-serving.json", result)
    throughput.plot(result, docs / "bench-serving.png")
    one, many = result["one_client"], result["concurrent"]
    print(f"in-process: {result['in_process']['images_per_second']:.1f} images/s; "
          f"1 client: {one['images_per_second']:.1f} images/s (p50 {one['latency_ms_median']:.1f} ms); "
          f"{clients} clients: {many['images_per_second']:.1f} images/s (p50 {many['latency_ms_median']:.1f} ms, "
          f"{many['images_per_sampling_batch']:.2f} images per sampling batch): {result['speedup']:.2f}x")
    print(f"wrote {docs / 'bench-serving.json'}, {docs / 'bench-serving.png'}")
    return result


if __name__ == "__main__":
    main()
