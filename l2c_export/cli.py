"""The ``l2c-export`` command line."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from .diffusion import Sampler


def _user_errors(function):
    """Bad input (files, fields, flags) ends in one clear line and exit code 2, not a traceback."""
    from .checkpoint import CheckpointError
    from .routers import RouterError
    from .schedule import ScheduleError

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (CheckpointError, RouterError, ScheduleError, ValueError, FileNotFoundError) as error:
            raise click.ClickException(str(error)) from error

    return wrapper


def model_options(function):
    """--checkpoint/--model/--image-size/--num-classes; the embedded default when --checkpoint is absent."""
    options = [
        click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
                     help="Official-layout DiT weights (.pt state_dict or .safetensors); default: the embedded digits DiT."),
        click.option("--model", "model_name", help="Model of --checkpoint, for example DiT-XL/2."),
        click.option("--image-size", type=int, help="Image size in pixels of --checkpoint (latents are 1/8)."),
        click.option("--num-classes", type=int, default=1000, show_default=True, help="Classes of --checkpoint."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _resolve_model(checkpoint, model_name, image_size, num_classes):
    from . import zoo

    return zoo.resolve(checkpoint, model_name, image_size, num_classes)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="l2c-export")
def main():
    """Learning-to-Cache for deployed Diffusion Transformers: schedules, export, engines, runtime."""


# ------------------------------------------------------------------------------------------------------------------
@main.command()
@click.option("--router", type=click.Path(dir_okay=False, path_type=Path),
              help="Router file: the authors' .pt or this project's .safetensors.")
@click.option("--schedule", "schedule_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Inspect an existing schedule JSON instead.")
@click.option("--steps", type=int, help="Sampling steps the router was learned for (checked against the file).")
@click.option("--threshold", type=float, default=0.1, show_default=True,
              help="A sub-layer is computed where sigmoid(logit) > threshold.")
@click.option("--mode", type=click.Choice(["official", "general"]), default="official", show_default=True,
              help="official: every other step computes everything (the authors' sampler); general: any step may reuse.")
@click.option("--model", "model_name", help="Model for MAC counting, e.g. DiT-XL/2 (default: from the router file, "
                                            "else the embedded default).")
@click.option("--image-size", type=int, help="Image size in pixels for MAC counting of an official model.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the schedule JSON.")
@click.option("--png", "png_out", type=click.Path(dir_okay=False, path_type=Path), help="Write a heatmap PNG.")
@_user_errors
def schedule(router, schedule_file, steps, threshold, mode, model_name, image_size, json_out, png_out):
    """Decode a router into a schedule, or inspect one: sub-layers per step, subsets, MACs, ideal speedup."""
    from .macs import count_macs
    from .routers import load_router
    from .schedule import Schedule

    if (router is None) == (schedule_file is None):
        raise click.UsageError("give exactly one of --router FILE or --schedule FILE")
    meta: dict = {}
    if router is not None:
        logits = load_router(router)
        meta = logits.meta
        if steps is not None and steps != logits.num_steps:
            raise click.ClickException(f"{router}: holds routers for {logits.num_steps} steps; --steps is {steps}")
        timesteps = Sampler.create("ddim", logits.num_steps).timesteps.tolist()
        result = logits.to_schedule(threshold, mode=mode, timesteps=timesteps)
    else:
        result = Schedule.load(schedule_file)
    config = _config_for_macs(result.depth, model_name or meta.get("model"),
                              image_size or meta.get("image_size"), meta.get("num_classes", 1000))
    macs = count_macs(config)
    _print_schedule(result, macs)
    if json_out:
        result.save(json_out)
        click.echo(f"wrote {json_out}")
    if png_out:
        from .plots import schedule_heatmap

        schedule_heatmap(result, png_out, title=str(router or schedule_file), mac_fraction=result.mac_fraction(macs))
        click.echo(f"wrote {png_out}")


def _config_for_macs(depth, model_name, image_size, num_classes):
    from . import zoo
    from .models import dit_config

    if model_name:
        if not image_size:
            raise click.UsageError(f"--model {model_name} needs --image-size (pixels) to count MACs")
        config = dit_config(model_name, input_size=int(image_size) // 8, num_classes=int(num_classes))
    else:
        config = zoo.embedded_default().config
    if config.depth != depth:
        raise click.ClickException(f"the schedule has {depth} blocks but the model for MAC counting "
                                   f"({model_name or 'the embedded default'}) has {config.depth}; pass --model and "
                                   f"--image-size")
    return config


def _print_schedule(result, macs) -> None:
    subsets = result.distinct_subsets()
    subset_of_step = result.subset_of_step()
    width = 2 * result.depth
    click.echo(f"schedule: {result.num_steps} steps x {width} sub-layers ({result.source or 'unnamed'}"
               + (f", threshold {result.threshold}" if result.threshold is not None else "")
               + (f", mode {result.mode}" if result.mode else "") + ")")
    for s, (count, subset) in enumerate(zip(result.computed_per_step(), subset_of_step)):
        t = f" t={result.timesteps[s]:>4}" if result.timesteps else ""
        bar = "".join("#" if v else "." for v in result.compute[s])
        click.echo(f"  step {s:>3}{t}  {count:>4}/{width}  subset {subset:>2}  {bar}")
    reused_steps = result.cache_steps()
    if reused_steps:
        computed = int(result.compute[reused_steps].sum())
        click.echo(f"cache steps: {len(reused_steps)}, computing {computed} of {len(reused_steps) * width} sub-layers "
                   f"({100 * (1 - computed / (len(reused_steps) * width)):.2f}% removed)")
    click.echo(f"distinct subsets: {len(subsets)}")
    fraction = result.mac_fraction(macs)
    click.echo(f"MAC fraction: {fraction:.4f}  (full {macs.full / 1e9:.3f} GMAC per sample per step)")
    click.echo(f"ideal speedup: {1 / fraction:.3f}x")


# ------------------------------------------------------------------------------------------------------------------
@main.command()
@model_options
@click.option("--schedule", "schedule_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Schedule JSON (default: the embedded default's; none for an official checkpoint).")
@click.option("--router", type=click.Path(dir_okay=False, path_type=Path), help="Or a router file to decode.")
@click.option("--threshold", type=float, default=0.1, show_default=True)
@click.option("--full", is_flag=True, help="Ignore any schedule: compute every sub-layer at every step.")
@click.option("--sampler", "sampler_kind", type=click.Choice(["ddim", "ddpm"]), help="Default: the model's (ddim).")
@click.option("--steps", type=int, help="Sampling steps (default: the model's, 20).")
@click.option("--labels", default="0,1,2,3,4,5,6,7,8,9", show_default=True, help="Comma-separated class labels.")
@click.option("--cfg-scale", type=float, help="Classifier-free guidance scale (1 = none; default: the model's).")
@click.option("--guide-all-channels", is_flag=True, help="Guide every eps channel (DiT guides 3 of 4 latent channels).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("samples.png"), show_default=True)
@click.option("--save-latents", type=click.Path(dir_okay=False, path_type=Path), help="Also save the samples (.npy).")
@_user_errors
def sample(checkpoint, model_name, image_size, num_classes, schedule_file, router, threshold, full, sampler_kind,
           steps, labels, cfg_scale, guide_all_channels, seed, out, save_latents):
    """Sample with the PyTorch reference sampler (eager), with or without the L2C schedule."""
    import time

    import numpy as np
    import torch

    from .reference import make_noise, sample_reference
    from .routers import load_router
    from .schedule import Schedule
    from .util import atomic_write_bytes

    spec = _resolve_model(checkpoint, model_name, image_size, num_classes)
    sampler = spec.sampler(sampler_kind, steps)
    if full:
        plan = None
    elif router is not None:
        plan = load_router(router).to_schedule(threshold, timesteps=sampler.timesteps.tolist())
    elif schedule_file is not None:
        plan = Schedule.load(schedule_file)
    else:
        plan = spec.schedule() if checkpoint is None else None
    if plan is not None:
        plan.check_fits(sampler.num_steps, spec.config.depth)
    label_list = _parse_labels(labels)
    config = spec.config
    noise = make_noise(seed, (len(label_list), config.in_channels, config.input_size, config.input_size))
    model = spec.load_model()
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    samples = sample_reference(model, sampler, label_list, noise, cfg_scale=spec.cfg_scale if cfg_scale is None
                               else cfg_scale, schedule=plan, guide_all_channels=guide_all_channels,
                               step_noise_seed=seed)
    elapsed = time.perf_counter() - start
    what = "full compute" if plan is None else f"L2C schedule ({plan.source})"
    click.echo(f"sampled {len(label_list)} x {sampler.num_steps} {sampler.kind} steps with {what} in {elapsed:.2f} s")
    if save_latents:
        import io

        buffer = io.BytesIO()
        np.save(buffer, samples)
        atomic_write_bytes(save_latents, buffer.getvalue())
        click.echo(f"wrote {save_latents}")
    if spec.space == "pixel":
        from .images import save_grid

        save_grid(samples, out, columns=min(len(label_list), 10))
        click.echo(f"wrote {out}")
    else:
        click.echo("latent model: no image written (decode the saved latents with a VAE)")


def _parse_labels(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers; got {text!r}", param_hint="--labels") from None


# ------------------------------------------------------------------------------------------------------------------
EXIT_BACKEND_UNAVAILABLE = 3


def schedule_options(function):
    """--schedule, or --router with --threshold/--mode; --steps/--sampler."""
    options = [
        click.option("--schedule", "schedule_file", type=click.Path(dir_okay=False, path_type=Path),
                     help="Schedule JSON (default: the embedded default's own; none for a checkpoint: full only)."),
        click.option("--router", type=click.Path(dir_okay=False, path_type=Path),
                     help="Or a router file (the authors' .pt or a learned .safetensors) to decode."),
        click.option("--threshold", type=float, default=0.1, show_default=True, help="Router threshold."),
        click.option("--mode", type=click.Choice(["official", "general"]), default="official", show_default=True,
                     help="How a router is decoded."),
        click.option("--steps", type=int, help="Sampling steps (default: the model's, 20)."),
        click.option("--sampler", "sampler_kind", type=click.Choice(["ddim", "ddpm"]),
                     help="Default: the model's (ddim)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _resolve_schedule(spec, sampler, schedule_file, router, threshold, mode, use_default: bool):
    from .routers import load_router
    from .schedule import Schedule

    if schedule_file is not None and router is not None:
        raise click.UsageError("give --schedule or --router, not both")
    if router is not None:
        result = load_router(router).to_schedule(threshold, mode=mode, timesteps=sampler.timesteps.tolist())
    elif schedule_file is not None:
        result = Schedule.load(schedule_file)
    elif use_default and spec.default_schedule is not None:
        result = spec.schedule()
    else:
        result = Schedule.full(sampler.num_steps, spec.config.depth, timesteps=sampler.timesteps.tolist())
    result.check_fits(sampler.num_steps, spec.config.depth)
    return result


@main.command()
@model_options
@schedule_options
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="Precision written into the graphs (LayerNorm and softmax stay fp32).")
@click.option("--batch", "batch_text", default="1,2,16", show_default=True,
              help="Model batch range MIN,OPT,MAX (guidance doubles the images), or N for 1..N.")
@click.option("--cfg-scale", type=float, help="Default guidance scale recorded in the manifest.")
@click.option("--guide-all-channels", is_flag=True, help="Guide every eps channel (DiT guides 3 of 4).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: engines/<model>-<backend>-<precision>).")
@_user_errors
def build(checkpoint, model_name, image_size, num_classes, schedule_file, router, threshold, mode, steps,
          sampler_kind, backend, precision, batch_text, cfg_scale, guide_all_channels, out):
    """Export one ONNX graph per distinct subset of computed sub-layers, build engines, write manifest.json."""
    import time

    from .build import BuildRequest, build as run_build
    from .engines import BackendUnavailable, BatchRange

    spec = _resolve_model(checkpoint, model_name, image_size, num_classes)
    sampler = spec.sampler(sampler_kind, steps)
    plan = _resolve_schedule(spec, sampler, schedule_file, router, threshold, mode, use_default=checkpoint is None)
    slug = spec.name.replace("/", "-").replace(" ", "-").lower()
    out = out or Path("engines") / f"{slug}-{backend}-{precision}"
    request = BuildRequest(spec=spec, schedule=plan, sampler=sampler, out_dir=out, backend=backend,
                           precision=precision, batch=BatchRange.parse(batch_text), cfg_scale=cfg_scale,
                           guide_all_channels=guide_all_channels)
    start = time.perf_counter()
    try:
        report = run_build(request)
    except BackendUnavailable as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(EXIT_BACKEND_UNAVAILABLE)
    subsets = len(plan.distinct_subsets())
    click.echo(f"built {subsets} subset(s) for {backend} ({precision}) in {time.perf_counter() - start:.1f} s: "
               f"{len(report.exported)} exported, {len(report.reused)} file(s) reused"
               + ("" if report.traced else ", model not traced"))
    click.echo(f"wrote {report.manifest_path}")


# ------------------------------------------------------------------------------------------------------------------
@main.command("train-default")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("engines/dit-digits"),
              show_default=True, help="Folder for dit-digits.safetensors.")
@click.option("--steps", type=int, default=4000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def train_default_command(out, steps, seed):
    """Reproduce the embedded default's training on scikit-learn's digits (minutes on two CPU cores)."""
    from .train_default import save_weights, train

    model = train(steps=steps, seed=seed)
    save_weights(model, out / "dit-digits.safetensors")
    click.echo(f"wrote {out / 'dit-digits.safetensors'}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
