"""``l2c-export build``: one graph per subset, engines and the manifest."""

from __future__ import annotations

from pathlib import Path

import click

from . import CFG_SCALE, EXIT_IO, CommandError, describe_os_error, main
from .options import model_options, resolve_model, resolve_schedule, schedule_options, schedule_steps


@main.command()
@model_options
@schedule_options
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16", "int8", "fp8"]), default="fp32",
              show_default=True,
              help="Precision written into the graphs (LayerNorm and softmax stay fp32; int8/fp8: the MatMul/Gemm "
                   "weights per output channel, cache and graph boundary float32; fp8: Q/DQ E4M3 for TensorRT).")
@click.option("--quantization", type=click.Choice(["dynamic", "qdq"]),
              help="int8 form: dynamic (per-call activation scales; onnxruntime's default) or qdq (Q/DQ with "
                   "static scales calibrated on the model's own trajectories; tensorrt's, also runs on onnxruntime).")
@click.option("--calibration-images", type=click.IntRange(1, 1024), default=4, show_default=True,
              help="qdq: images whose full-model sampling trajectories calibrate the activation scales.")
@click.option("--batch", "batch_text", default="1,2,16", show_default=True,
              help="Model batch range MIN,OPT,MAX (guidance doubles the images), or N for 1..N.")
@click.option("--cfg-scale", type=CFG_SCALE, help="Default guidance scale recorded in the manifest.")
@click.option("--guide-all-channels", is_flag=True, help="Guide every eps channel (DiT guides 3 of 4).")
@click.option("--max-sequence-length", type=click.IntRange(1, 512),
              help="A --diffusers text model's max_sequence_length, as its pipeline takes it: the T5 tokens prompts "
                   "are truncated and padded to (default the pipeline's: PixArt-α 120, -Σ 300, SD3 256, FLUX.1 512).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: engines/<model>-<backend>-<precision>).")
def build(diffusers, checkpoint, model_name, image_size, num_frames, num_classes, schedule_file, router, threshold,
          target_mac_fraction, mode, steps, sampler_kind, backend, precision, quantization, calibration_images,
          batch_text, cfg_scale, guide_all_channels, max_sequence_length, out):
    """Export one ONNX graph per distinct subset of computed sub-layers, build engines, write manifest.json."""
    import time

    from ..builder.build import BuildRequest
    from ..builder.build import build as run_build
    from ..builder.engines import BatchRange

    spec = resolve_model(checkpoint, model_name, image_size, num_classes, diffusers, max_sequence_length, num_frames)
    sampler = spec.sampler(sampler_kind, schedule_steps(schedule_file, steps))
    plan = resolve_schedule(spec, sampler, schedule_file, router, threshold, target_mac_fraction, mode,
                             use_default=checkpoint is None and diffusers is None)
    slug = spec.name.replace("/", "-").replace(" ", "-").lower()
    out = out or Path("engines") / f"{slug}-{backend}-{precision}"
    request = BuildRequest(spec=spec, schedule=plan, sampler=sampler, out_dir=out, backend=backend,
                           precision=precision, batch=BatchRange.parse(batch_text), cfg_scale=cfg_scale,
                           guide_all_channels=guide_all_channels, quantization=quantization,
                           calibration_images=calibration_images)
    start = time.perf_counter()
    try:
        report = run_build(request)
    except OSError as error:
        if isinstance(error, FileNotFoundError) and error.filename is None:
            raise
        raise CommandError(f"{describe_os_error(error)} (writing the build into {out}; the previous build there, if "
                           f"any, is unchanged)", EXIT_IO) from None
    click.echo(f"built {report.subsets} subset(s) for {backend} ({precision}) in {time.perf_counter() - start:.1f} s: "
               f"{len(report.exported)} exported, {len(report.reused)} file(s) reused"
               + ("" if report.traced else ", model not traced"))
    click.echo(f"wrote {report.manifest_path}")
