"""The ``l2c-export`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .core.schedule import SCHEDULE_MODES
from .samplers import SAMPLER_KINDS, create_sampler

# Exit codes (documented in the README).
EXIT_CHECK_FAILED = 1  # the command ran and what it checks failed (verify beyond tolerance)
EXIT_BAD_INPUT = 2  # bad flags, files, fields or manifests: one line says which and what was expected
EXIT_BACKEND_UNAVAILABLE = 3  # the backend asked for is not installed or has no device here
EXIT_IO = 4  # the file system refused: disk full, read-only, permission, a parent that is a file
EXIT_INTERRUPTED = 130  # Ctrl-C


class CommandError(click.ClickException):
    """One line on stderr and a documented exit code, never a traceback."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.exit_code = exit_code


class _Group(click.Group):
    """Turns the errors of every command into one clear line and an exit code. Internal errors (bugs) keep their
    traceback."""

    def invoke(self, ctx):
        from .build.engines import BackendUnavailable  # light: no torch, so that serve and run start fast

        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except BackendUnavailable as error:
            raise CommandError(str(error), EXIT_BACKEND_UNAVAILABLE) from None
        # Every input error of the stages is a ValueError: CheckpointError, RouterError, ScheduleError, ManifestError,
        # OutputFolderError.
        except (FileNotFoundError, ValueError) as error:
            raise CommandError(str(error), EXIT_BAD_INPUT) from None
        except OSError as error:
            raise CommandError(_describe_os_error(error), EXIT_IO) from None
        except KeyboardInterrupt:
            raise CommandError("interrupted", EXIT_INTERRUPTED) from None

    def main(self, *args, **kwargs):
        """Click's main, except that every error is one line on stderr (click's usage errors print three)."""
        kwargs.pop("standalone_mode", None)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as error:
            click.echo(f"Error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except click.exceptions.Abort:
            click.echo("Error: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(result if isinstance(result, int) else 0)


def _describe_os_error(error: OSError) -> str:
    where = " -> ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    return f"{where + ': ' if where else ''}{error.strerror or error}"


class Finite(click.ParamType):
    """A float flag that must be finite and in range (click's FloatRange lets NaN and infinity through)."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None, low_open: bool = False):
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value, param, ctx):
        import math

        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        too_low = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        if too_low or (self.high is not None and number > self.high):
            low = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low}"
            high = "" if self.high is None else f"<= {self.high}"
            self.fail(f"{value} is out of range; expected a number {' and '.join(s for s in (low, high) if s)}",
                      param, ctx)
        return number


THRESHOLD = Finite(0.0, 1.0)
MAC_FRACTION = Finite(0.0, 1.0, low_open=True)
CFG_SCALE = Finite(1.0)
POSITIVE = click.IntRange(min=1)
SEED = click.IntRange(min=0, max=2**63 - 1)
STEPS = click.IntRange(min=1, max=1000)


def model_options(function):
    """--checkpoint/--model/--image-size/--num-classes; an embedded model when --checkpoint is absent."""
    options = [
        click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
                     help="Official-layout DiT or U-ViT weights (.pt/.pth state_dict or .safetensors); default: an "
                          "embedded digits model."),
        click.option("--model", "model_name",
                     help="Model of --checkpoint, for example DiT-XL/2 or U-ViT-H/2; without --checkpoint an embedded "
                          "model: dit-digits (default), uvit-digits."),
        click.option("--image-size", type=POSITIVE, help="Image size in pixels of --checkpoint (latents are 1/8)."),
        click.option("--num-classes", type=POSITIVE, default=1000, show_default=True, help="Classes of --checkpoint."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _resolve_model(checkpoint, model_name, image_size, num_classes):
    from .models import zoo

    return zoo.resolve(checkpoint, model_name, image_size, num_classes)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="l2c-export")
def main():
    """Learning-to-Cache for deployed Diffusion Transformers: schedules, export, engines, runtime."""


# ------------------------------------------------------------------------------------------------------------------
@main.command()
@click.option("--router", type=click.Path(dir_okay=False, path_type=Path),
              help="Router file: the authors' .pt or this project's .safetensors.")
@click.option("--schedule", "schedule_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Inspect an existing schedule JSON instead.")
@click.option("--steps", type=STEPS, help="Sampling steps the router was learned for (checked against the file).")
@click.option("--threshold", type=THRESHOLD, default=0.1, show_default=True,
              help="A sub-layer is computed where sigmoid(logit) > threshold.")
@click.option("--mode", type=click.Choice(SCHEDULE_MODES), default="official", show_default=True,
              help="official: every other step computes everything (the authors' sampler); general: any step may reuse.")
@click.option("--model", "model_name", help="Model for MAC counting, e.g. DiT-XL/2 (default: from the router file, "
                                            "else the embedded default).")
@click.option("--image-size", type=POSITIVE, help="Image size in pixels for MAC counting of an official model [256].")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the schedule JSON.")
@click.option("--png", "png_out", type=click.Path(dir_okay=False, path_type=Path), help="Write a heatmap PNG.")
@click.option("--target-mac-fraction", type=MAC_FRACTION,
              help="Instead of --threshold: the lowest threshold whose MAC fraction is at most this.")
def schedule(router, schedule_file, steps, threshold, mode, model_name, image_size, json_out, png_out,
             target_mac_fraction):
    """Decode a router into a schedule, or inspect one: sub-layers per step, subsets, MACs, ideal speedup."""
    from .core.schedule import Schedule
    from .routers import load_router

    if (router is None) == (schedule_file is None):
        raise click.UsageError("give exactly one of --router FILE or --schedule FILE")
    if target_mac_fraction is not None and router is None:
        raise click.UsageError("--target-mac-fraction decodes a --router")
    meta: dict = {}
    if router is not None:
        logits = load_router(router)
        meta = logits.meta
        if steps is not None and steps != logits.num_steps:
            raise CommandError(f"{router}: holds routers for {logits.num_steps} steps; --steps is {steps}")
        timesteps = create_sampler(logits.sampler, logits.num_steps).model_times.tolist()
        result = logits.to_schedule(threshold, mode=mode, timesteps=timesteps)
        if target_mac_fraction is not None:
            from .routers.baselines import schedule_for_mac_fraction

            result = schedule_for_mac_fraction(logits, target_mac_fraction, _macs_for(
                logits.depth, model_name or meta.get("model"), image_size or meta.get("image_size"),
                meta.get("num_classes", 1000)), mode, timesteps)
    else:
        result = Schedule.load(schedule_file)
    macs = _macs_for(result.depth, model_name or meta.get("model"), image_size or meta.get("image_size"),
                     meta.get("num_classes", 1000))
    _print_schedule(result, macs)
    if json_out:
        result.save(json_out)
        click.echo(f"wrote {json_out}")
    if png_out:
        from .tools.plots import schedule_heatmap

        schedule_heatmap(result, png_out, title=str(router or schedule_file), mac_fraction=result.mac_fraction(macs))
        click.echo(f"wrote {png_out}")


def _macs_for(depth, model_name, image_size, num_classes):
    """The MAC count of --model (at --image-size, default 256 px) or of the embedded default, checked to have
    ``depth`` layers."""
    from .models import family_of_model, zoo

    if model_name and model_name not in zoo.EMBEDDED_MODELS:
        family = family_of_model(model_name)
        config = family.preset(model_name, int(image_size or 256), int(num_classes))
    else:
        spec = zoo.embedded_default(model_name or zoo.DEFAULT_NAME)
        family, config = spec.family, spec.config
    if family.num_layers(config) != depth:
        raise CommandError(f"the schedule has {depth} layers but the model for MAC counting "
                           f"({model_name or 'the embedded default'}) has {family.num_layers(config)}; pass "
                           f"--model and --image-size")
    return family.count_macs(config)


def _format_time(t) -> str:
    return f"{t:>4}" if float(t).is_integer() else f"{t:>6.1f}"


def _print_schedule(result, macs) -> None:
    subsets = result.distinct_subsets()
    subset_of_step = result.subset_of_step()
    width = 2 * result.depth
    click.echo(f"schedule: {result.num_steps} model calls x {width} sub-layers ({result.source or 'unnamed'}"
               + (f", threshold {result.threshold}" if result.threshold is not None else "")
               + (f", mode {result.mode}" if result.mode else "") + ")")
    for s, (count, subset) in enumerate(zip(result.computed_per_step(), subset_of_step)):
        t = f" t={_format_time(result.timesteps[s])}" if result.timesteps else ""
        bar = "".join("#" if v else "." for v in result.compute[s])
        click.echo(f"  step {s:>3}{t}  {count:>4}/{width}  subset {subset:>2}  {bar}")
    reused_steps = result.cache_steps()
    if reused_steps:
        computed = int(result.compute[reused_steps].sum())
        click.echo(f"cache calls: {len(reused_steps)}, computing {computed} of {len(reused_steps) * width} sub-layers "
                   f"({100 * (1 - computed / (len(reused_steps) * width)):.2f}% removed)")
    click.echo(f"distinct subsets: {len(subsets)}")
    fraction = result.mac_fraction(macs)
    click.echo(f"MAC fraction: {fraction:.4f}  (full {macs.full / 1e9:.3f} GMAC per sample per step)")
    click.echo(f"ideal speedup: {1 / fraction:.3f}x")


# ------------------------------------------------------------------------------------------------------------------
def schedule_options(function):
    """--schedule, or --router with --threshold/--mode; --steps/--sampler."""
    options = [
        click.option("--schedule", "schedule_file", type=click.Path(dir_okay=False, path_type=Path),
                     help="Schedule JSON (default: the embedded default's own; none for a checkpoint: full only)."),
        click.option("--router", type=click.Path(dir_okay=False, path_type=Path),
                     help="Or a router file (the authors' .pt or a learned .safetensors) to decode."),
        click.option("--threshold", type=THRESHOLD, default=0.1, show_default=True, help="Router threshold."),
        click.option("--target-mac-fraction", type=MAC_FRACTION,
                     help="Or decode the router at the threshold that meets this MAC fraction."),
        click.option("--mode", type=click.Choice(SCHEDULE_MODES), default="official", show_default=True,
                     help="How a router is decoded."),
        click.option("--steps", type=STEPS, help="Model calls (NFE; default: the model's, 20). DPM-Solver-2S makes two "
                                                "per step."),
        click.option("--sampler", "sampler_kind", type=click.Choice(SAMPLER_KINDS),
                     help="Default: the model's (DiT: ddim; U-ViT: dpm_solver_2s)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _resolve_schedule(spec, sampler, schedule_file, router, threshold, target_mac_fraction, mode,
                      use_default: bool):
    from .core.schedule import Schedule

    if schedule_file is not None and router is not None:
        raise click.UsageError("give --schedule or --router, not both")
    if target_mac_fraction is not None and router is None:
        raise click.UsageError("--target-mac-fraction decodes a --router")
    if router is not None and target_mac_fraction is not None:
        from .routers.baselines import schedule_for_mac_fraction

        result = schedule_for_mac_fraction(_router_for(router, sampler), target_mac_fraction,
                                           spec.family.count_macs(spec.config), mode=mode,
                                           timesteps=sampler.model_times.tolist())
    elif router is not None:
        result = _router_for(router, sampler).to_schedule(threshold, mode=mode,
                                                          timesteps=sampler.model_times.tolist())
    elif schedule_file is not None:
        result = Schedule.load(schedule_file)
    elif use_default and spec.default_schedule is not None:
        result = spec.schedule()
    else:
        result = Schedule.full(sampler.num_calls, spec.num_layers, timesteps=sampler.model_times.tolist(),
                               sampler=sampler.kind)
    result.check_fits(sampler.num_calls, spec.num_layers)
    return result


def _router_for(path, sampler):
    """The router file at ``path``, checked to be made for ``sampler``'s kind of model calls."""
    from .routers import RouterError, load_router

    router = load_router(path)
    one_call_per_step = ("ddim", "ddpm")
    if router.sampler != sampler.kind and not {router.sampler, sampler.kind} <= set(one_call_per_step):
        raise RouterError(f"{path}: routes the model calls of {router.sampler}; the sampler is {sampler.kind} "
                          f"(pass --sampler {router.sampler})")
    router.meta["sampler"] = sampler.kind
    return router


@main.command()
@model_options
@schedule_options
@click.option("--full", is_flag=True, help="Ignore any schedule: compute every sub-layer at every step.")
@click.option("--labels", default="0,1,2,3,4,5,6,7,8,9", show_default=True, help="Comma-separated class labels.")
@click.option("--cfg-scale", type=CFG_SCALE, help="Classifier-free guidance scale (1 = none; default: the model's).")
@click.option("--guide-all-channels", is_flag=True, help="Guide every eps channel (DiT guides 3 of 4 latent channels).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("samples.png"), show_default=True)
@click.option("--save-latents", type=click.Path(dir_okay=False, path_type=Path), help="Also save the samples (.npy).")
def sample(checkpoint, model_name, image_size, num_classes, schedule_file, router, threshold, target_mac_fraction,
           mode, steps, sampler_kind, full, labels, cfg_scale, guide_all_channels, seed, out, save_latents):
    """Sample with the PyTorch reference sampler (eager), with or without the L2C schedule."""
    import time

    import torch

    from .samplers.guidance import make_noise
    from .samplers.reference import sample_reference

    spec = _resolve_model(checkpoint, model_name, image_size, num_classes)
    sampler = spec.sampler(sampler_kind, steps)
    plan = None if full else _resolve_schedule(spec, sampler, schedule_file, router, threshold, target_mac_fraction,
                                               mode, use_default=checkpoint is None)
    if plan is not None and plan.compute.all():
        plan = None  # nothing is reused: the plain forward
    label_list = _parse_labels(labels)
    noise = make_noise(seed, (len(label_list), *spec.family.graph_inputs(spec.config)[0].shape))
    model = spec.load_model()
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    samples = sample_reference(model, sampler, label_list, noise, cfg_scale=spec.cfg_scale if cfg_scale is None
                               else cfg_scale, schedule=plan, guide_all_channels=guide_all_channels,
                               step_noise_seed=seed)
    elapsed = time.perf_counter() - start
    what = "full compute" if plan is None else f"L2C schedule ({plan.source})"
    click.echo(f"sampled {len(label_list)} x {sampler.num_calls} {sampler.kind} model calls with {what} in "
               f"{elapsed:.2f} s")
    if save_latents:
        _save_npy(save_latents, samples)
        click.echo(f"wrote {save_latents}")
    if spec.space == "pixel":
        from .core.images import save_grid

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
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: engines/<model>-<backend>-<precision>).")
def build(checkpoint, model_name, image_size, num_classes, schedule_file, router, threshold, target_mac_fraction,
          mode, steps, sampler_kind, backend, precision, quantization, calibration_images, batch_text, cfg_scale,
          guide_all_channels, out):
    """Export one ONNX graph per distinct subset of computed sub-layers, build engines, write manifest.json."""
    import time

    from .build.builder import BuildRequest
    from .build.builder import build as run_build
    from .build.engines import BatchRange

    spec = _resolve_model(checkpoint, model_name, image_size, num_classes)
    sampler = spec.sampler(sampler_kind, steps)
    plan = _resolve_schedule(spec, sampler, schedule_file, router, threshold, target_mac_fraction, mode,
                             use_default=checkpoint is None)
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
        raise CommandError(f"{_describe_os_error(error)} (writing the build into {out}; the previous build there, if "
                           f"any, is unchanged)", EXIT_IO) from None
    subsets = len(plan.distinct_subsets())
    click.echo(f"built {subsets} subset(s) for {backend} ({precision}) in {time.perf_counter() - start:.1f} s: "
               f"{len(report.exported)} exported, {len(report.reused)} file(s) reused"
               + ("" if report.traced else ", model not traced"))
    click.echo(f"wrote {report.manifest_path}")


# ------------------------------------------------------------------------------------------------------------------
def _backend_options(device: str | None, backend: str) -> dict:
    if device is None:
        return {}
    if backend == "onnxruntime":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        return {"providers": providers}
    if backend == "torch":
        return {"device": device}
    raise click.UsageError(f"--device does not apply to --backend {backend}")


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--labels", default="0,1,2,3,4,5,6,7,8,9", show_default=True, help="Comma-separated class labels.")
@click.option("--cfg-scale", type=CFG_SCALE, help="Guidance scale (default: the manifest's).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the initial (and DDPM) noise.")
@click.option("--noise", "noise_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Initial noise .npy of shape (n labels, C, H, W), float32; guidance duplicates it.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt", "torch"]), default="onnxruntime",
              show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="onnxruntime: provider; torch: device.")
@click.option("--full", is_flag=True, help="Run the full-compute engine at every step instead of the schedule.")
@click.option("--compare-full", is_flag=True, help="Also time full compute on the same request and print both.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="PNG grid (pixel models, or with --vae).")
@click.option("--save-latents", type=click.Path(dir_okay=False, path_type=Path), help="Save the samples (.npy).")
@click.option("--vae", type=click.Path(file_okay=False, path_type=Path),
              help="Local diffusers AutoencoderKL folder to decode latents (scale 0.18215).")
def run(engine_dir, labels, cfg_scale, seed, noise_file, backend, device, full, compare_full, out, save_latents, vae):
    """Sample from a build: each step runs on its subset engine, cached activations fed between them."""
    from .runtime.pipeline import L2CPipeline

    label_list = _parse_labels(labels)
    noise = None if noise_file is None else _load_noise(noise_file)
    pipe = L2CPipeline.from_engine_dir(engine_dir, backend=backend, **_backend_options(device, backend))
    click.echo(f"{engine_dir}: {pipe.manifest['name']}, {len(pipe.manifest['subsets'])} subset engine(s), "
               f"{pipe.sampler.num_calls} {pipe.sampler.kind} model calls, backend {backend} on {', '.join(pipe.providers)}")
    if pipe.manifest["model"]["space"] == "latent" and out is not None and vae is None:
        raise click.UsageError("--out needs --vae for a latent model (or use --save-latents)")
    result = pipe(label_list, cfg_scale=cfg_scale, seed=seed, noise=noise, full=full, progress=True)
    what = "full compute" if full else "L2C schedule"
    click.echo(f"{what}: {result.seconds:.3f} s for {len(label_list)} sample(s) "
               f"({100 * result.overhead_fraction:.1f}% outside the engines)")
    if compare_full and not full:
        reference = pipe(label_list, cfg_scale=cfg_scale, seed=seed, noise=noise, full=True, progress=True)
        again = pipe(label_list, cfg_scale=cfg_scale, seed=seed, noise=noise, progress=True)  # warm, like full
        click.echo(f"full compute: {reference.seconds:.3f} s; L2C schedule (warm): {again.seconds:.3f} s; "
                   f"speedup {reference.seconds / again.seconds:.2f}x "
                   f"(ideal {pipe.manifest['macs']['ideal_speedup']:.2f}x)")
    if save_latents:
        _save_npy(save_latents, result.samples)
        click.echo(f"wrote {save_latents}")
    if out is not None:
        from .core.images import save_grid

        samples = result.samples
        if pipe.manifest["model"]["space"] == "latent":
            from .models.vae import decode_latents

            samples = decode_latents(vae, samples, pipe.manifest["model"]["latent_scale"])
        save_grid(samples, out, columns=min(len(label_list), 10))
        click.echo(f"wrote {out}")


def _load_noise(path: Path):
    """``--noise``: a finite float .npy array (never unpickled)."""
    import numpy as np

    try:
        noise = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CommandError(f"--noise {path}: no such file") from None
    except (OSError, ValueError, EOFError) as error:
        raise CommandError(f"--noise {path}: not a readable .npy array ({error})") from None
    if not np.issubdtype(noise.dtype, np.floating):
        raise CommandError(f"--noise {path}: holds {noise.dtype} values; expected float32")
    bad = int(np.size(noise) - np.count_nonzero(np.isfinite(noise)))
    if bad:
        raise CommandError(f"--noise {path}: {bad} of its {noise.size} values are NaN or infinite; expected finite "
                           f"noise")
    return noise.astype(np.float32)


def _save_npy(path: Path, array) -> None:
    import io

    import numpy as np

    from .core.util import atomic_write_bytes

    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt", "torch"]), default="onnxruntime",
              show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="onnxruntime: provider; torch: device.")
@click.option("--tolerance", type=Finite(0.0, low_open=True), help="Largest relative difference allowed (default by precision: "
                                              "fp32 1e-4, fp16 3e-2, bf16 6e-2, int8 0.1, int8 qdq 0.25, fp8 0.3).")
@click.option("--reference", type=click.Path(file_okay=False, path_type=Path),
              help="An fp32 build of the same checkpoint: compare with its weights (default: this build's own, "
                   "dequantized for int8).")
def verify(engine_dir, backend, device, tolerance, reference):
    """Check every subset engine against the PyTorch cached forward on the same inputs."""
    from .core.manifest import load as load_manifest
    from .tools.verify import verify_build

    checks, providers = verify_build(engine_dir, backend=backend, tolerance=tolerance, reference=reference,
                                     **_backend_options(device, backend))
    weights = (f"the fp32 weights of {reference}" if reference else "its weights dequantized"
               if "quantization" in load_manifest(engine_dir, verify_files=False) else "its weights")
    click.echo(f"{engine_dir}: {backend} on {', '.join(providers)} against PyTorch (fp32, {weights})")
    for check in checks:
        worst_output = max(check.worst, key=check.worst.get)
        click.echo(f"  {'ok  ' if check.passed else 'FAIL'} {check.name:<24} step {check.step:>3}  worst "
                   f"{check.worst_value:.2e} ({worst_output})  tolerance {check.tolerance:.0e}")
    failed = [c.name for c in checks if not c.passed]
    if failed:
        raise CommandError(f"{len(failed)} subset(s) differ from PyTorch beyond tolerance: {', '.join(failed)}",
                           EXIT_CHECK_FAILED)
    click.echo(f"all {len(checks)} subset engine(s) agree with PyTorch")


# ------------------------------------------------------------------------------------------------------------------
@main.command()
@model_options
@click.option("--model-config", type=click.Path(dir_okay=False, path_type=Path),
              help="A DiT config JSON (the fields of DiTConfig) for a --checkpoint .safetensors of any architecture.")
@click.option("--data", "data_arg",
              help="A folder of images (class subfolders), a .npy of latents (n, C, H, W), 'digits' or 'none' "
                   "(trajectories sampled from the model: the teacher needs no data). Default: digits for the "
                   "embedded default, none for a checkpoint.")
@click.option("--data-labels", type=click.Path(dir_okay=False, path_type=Path),
              help="Labels (n,) .npy for --data latents; default: random classes.")
@click.option("--trajectories", type=POSITIVE, default=256, show_default=True,
              help="With --data none: trajectories sampled from the model to learn on.")
@click.option("--mode", type=click.Choice(SCHEDULE_MODES), default="official", show_default=True,
              help="official: every other step computes everything (the authors'); general: any step may reuse.")
@click.option("--sampler", "sampler_kind", type=click.Choice(SAMPLER_KINDS),
              help="Default: the model's (DiT: ddim, U-ViT: dpm_solver_2s).")
@click.option("--steps", type=STEPS,
              help="Model calls (NFE; default: the model's, 20). DPM-Solver-2S makes two a step.")
@click.option("--iterations", type=POSITIVE, default=300, show_default=True)
@click.option("--batch-size", type=POSITIVE, default=16, show_default=True,
              help="Images per learned step and iteration, over all processes (guidance doubles the model's batch).")
@click.option("--lr", type=Finite(0.0, low_open=True), default=0.05, show_default=True,
              help="AdamW learning rate of the logits (the authors' DiT-XL/2: 1e-3 over many more iterations).")
@click.option("--l1", "--lambda", "l1", type=Finite(0.0), default=2e-4, show_default=True,
              help="lambda of the loss MSE + lambda * sum(w): larger removes more (the authors' DiT-XL/2 at 20 steps: "
                   "5e-6).")
@click.option("--cfg-scale", type=CFG_SCALE, help="Guidance of the trajectories and training batch (default: the model's).")
@click.option("--window", type=POSITIVE, help="General mode: unroll this many steps back (default: from the first step).")
@click.option("--steps-per-iteration", type=click.IntRange(min=0), default=0, show_default=True,
              help="Learned steps per iteration, drawn at random (the authors': 1 per process); 0: all of them.")
@click.option("--init-std", type=Finite(0.0), default=0.0, show_default=True,
              help="Learned logits start at init_std * N(0, 1) (the authors': 1).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Router file to write (.safetensors: tensor 'logits' (model calls, sub-layers), sampling order).")
@click.option("--save-every", type=POSITIVE, default=50, show_default=True,
              help="Write the learning state (OUT with .state.safetensors) every N iterations.")
@click.option("--resume", is_flag=True, help="Continue from the learning state beside --out.")
@click.option("--threshold", type=THRESHOLD, help="Also decode the router at this threshold (see --json).")
@click.option("--target-mac-fraction", type=MAC_FRACTION, help="Or at the threshold that meets this MAC fraction.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the decoded schedule JSON (needs --threshold or --target-mac-fraction).")
def learn(checkpoint, model_name, image_size, num_classes, model_config, data_arg, data_labels, trajectories, mode,
          sampler_kind, steps, iterations, batch_size, lr, l1, cfg_scale, window, steps_per_iteration, init_std, seed,
          out, save_every, resume, threshold, target_mac_fraction, json_out):
    """Learn router logits (L2C): teacher = full model, student = soft-routed cache, loss = MSE + lambda * sum(w).

    Runs under torchrun for data-parallel learning (gloo on CPU):
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m l2c_export.cli learn ...
    """
    from .learn.learner import (
        LearnSettings,
        NoisedData,
        init_distributed,
        learn_router,
        load_image_folder,
        load_latents,
        router_metadata,
        sample_trajectories,
        with_random_labels,
        write_router,
    )

    if out.suffix != ".safetensors":
        raise click.BadParameter(f"{out}: the router is written as .safetensors", param_hint="--out")
    if json_out and threshold is None and target_mac_fraction is None:
        raise click.UsageError("--json needs --threshold or --target-mac-fraction")
    spec = _learn_model_spec(checkpoint, model_name, image_size, num_classes, model_config)
    sampler = spec.sampler(sampler_kind, steps)
    settings = LearnSettings(mode=mode, iterations=iterations, batch_size=batch_size, lr=lr, l1=l1,
                             cfg_scale=spec.cfg_scale if cfg_scale is None else cfg_scale, window=window,
                             steps_per_iteration=steps_per_iteration, init_std=init_std, seed=seed)
    dist_info = init_distributed()
    echo = click.echo if dist_info.is_main else (lambda *args, **kwargs: None)
    model = spec.load_model()
    config, family = spec.config, spec.family
    sample_shape = next(tensor.shape for tensor in family.graph_inputs(config) if tensor.role == "sample")
    num_labels = family.null_class(config)
    data_arg = data_arg or ("digits" if checkpoint is None else "none")
    if data_arg == "none":
        source = sample_trajectories(model, sampler, trajectories, settings.cfg_scale, seed,
                                     progress=dist_info.is_main)
    elif data_arg == "digits":
        from .demo.train import digits_dataset

        if (tuple(sample_shape), num_labels) != ((1, 8, 8), 10):
            raise click.BadParameter("the digits are 8x8 one-channel images of 10 classes; this model is not",
                                     param_hint="--data")
        images, labels = digits_dataset()
        source = NoisedData(images, labels, sampler, "scikit-learn digits")
    else:
        path = Path(data_arg)
        if path.is_dir():
            if spec.space == "latent":
                raise click.BadParameter(f"{path}: a latent model learns on latents (.npy), not images (no VAE "
                                         f"here)", param_hint="--data")
            images, labels, _ = load_image_folder(path, sample_shape[-1], sample_shape[0])
        elif path.suffix == ".npy":
            images, labels = load_latents(path, data_labels, tuple(sample_shape))
        else:
            raise click.BadParameter(f"{path}: expected a folder of images, a .npy of latents, 'digits' or 'none'",
                                     param_hint="--data")
        source = NoisedData(images, with_random_labels(labels, num_labels, seed), sampler, str(path))
    echo(f"learning {config.num_sublayers} x {sampler.num_calls} router logits ({mode} mode, {sampler.kind}) on "
         f"{source.description}, {dist_info.world_size} process(es)")
    state_path = out.with_name(out.name[: -len(".safetensors")] + ".state.safetensors")
    result = learn_router(model, sampler, source, settings, state_path=state_path, resume=resume,
                          save_every=save_every, progress=dist_info.is_main, source_name=source.description)
    if dist_info.world_size > 1:
        import torch.distributed

        torch.distributed.destroy_process_group()
    if not dist_info.is_main:
        return
    official_model = model_name if checkpoint is not None and model_config is None else None
    write_router(result.router, out, router_metadata(spec.name, sampler, settings, source.description,
                                                     result.seconds, official_model, image_size,
                                                     num_classes if official_model else None))
    last = result.history[-1] if result.history else {}
    echo(f"learned in {result.seconds:.1f} s" + (f" (last mse {last['mse']:.3g})" if last else ""))
    echo(f"wrote {out}")
    if threshold is not None or target_mac_fraction is not None:
        from .routers.baselines import schedule_for_mac_fraction

        logits = result.router
        logits.source = str(out)
        macs = family.count_macs(config)
        timesteps = sampler.timesteps.tolist()
        if target_mac_fraction is not None:
            decoded = schedule_for_mac_fraction(logits, target_mac_fraction, macs, mode, timesteps)
        else:
            decoded = logits.to_schedule(threshold, mode=mode, timesteps=timesteps)
        echo(f"threshold {decoded.threshold:.6g}: MAC fraction {decoded.mac_fraction(macs):.4f}, ideal speedup "
             f"{1 / decoded.mac_fraction(macs):.3f}x")
        if json_out:
            decoded.save(json_out)
            echo(f"wrote {json_out}")


def _learn_model_spec(checkpoint, model_name, image_size, num_classes, model_config):
    from .models import zoo
    from .models.dit.model import DiTConfig

    if model_config is None:
        return _resolve_model(checkpoint, model_name, image_size, num_classes)
    if checkpoint is None:
        raise click.UsageError("--model-config describes a --checkpoint; give both")
    from .core.util import read_json

    try:
        config = DiTConfig.from_dict(read_json(Path(model_config), ValueError))
    except (ValueError, TypeError, KeyError) as error:
        raise click.BadParameter(f"{model_config}: {error}", param_hint="--model-config") from None
    return zoo.ModelSpec(name=Path(checkpoint).stem, config=config, weights=Path(checkpoint),
                         space="pixel" if config.in_channels in (1, 3) else "latent", cfg_scale=1.0)


@main.command("eval")
@click.option("--model", "model_name", type=click.Choice(["dit-digits", "uvit-digits"]), default="dit-digits",
              show_default=True, help="The embedded model: the digits DiT (DDIM) or U-ViT (DPM-Solver-2S).")
@click.option("--router", type=click.Path(dir_okay=False, path_type=Path),
              help="Router for the l2c sweep (default: the embedded model's).")
@click.option("--schedule", "schedule_file", type=click.Path(dir_okay=False, path_type=Path),
              help="The learned schedule to compare (default: the embedded model's).")
@click.option("--mode", type=click.Choice(SCHEDULE_MODES), help="How the router is decoded for the sweep "
                                                                          "(default: the schedule's).")
@click.option("--budgets", default=",".join(str(b) for b in (0.6, 0.7, 0.8, 0.9)), show_default=True,
              help="MAC fractions of the sweep, comma-separated ('' for none).")
@click.option("--num-samples", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Samples per method (labels 0-9 in turn).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Noise seed, the same for every method.")
@click.option("--random-seeds", type=POSITIVE, default=2, show_default=True,
              help="Random-drop schedules averaged per budget.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the results JSON.")
@click.option("--png", "png_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the plot of FD against MAC fraction.")
@click.option("--int8/--no-int8", default=True, show_default=True,
              help="Add the int8 build's rows (ONNX Runtime): full compute and the learned schedule.")
def eval_command(model_name, router, schedule_file, mode, budgets, num_samples, seed, random_seeds, json_out, png_out,
                 int8):
    """Full compute, the learned schedule and the baselines (FORA, random drop, fewer steps) at equal MACs on an
    embedded digits model: Frechet distance (digits classifier features), class accuracy, PSNR against full."""
    from .core.schedule import Schedule
    from .demo.evaluate import evaluate, format_table, plot_fd, write_json
    from .models import zoo
    from .routers import load_router

    spec = zoo.embedded_default(model_name)
    learned = Schedule.load(schedule_file) if schedule_file else spec.schedule()
    if learned is None:
        raise click.UsageError(f"{model_name} ships no schedule; pass --schedule")
    router_path = router or spec.default_router
    logits = load_router(router_path) if router_path else None
    try:
        budget_list = [MAC_FRACTION.convert(part, None, None) for part in budgets.split(",") if part.strip()]
    except click.BadParameter as error:
        raise click.BadParameter(error.message, param_hint="--budgets") from None
    if num_samples < 2:
        raise click.BadParameter("at least 2 samples are needed for a Frechet distance", param_hint="--num-samples")
    report = evaluate(learned, logits, mode or learned.mode or "official", budget_list, num_samples, seed,
                      random_seeds=tuple(range(random_seeds)), int8=int8, model_name=model_name)
    click.echo(format_table(report))
    if json_out:
        write_json(report, json_out)
        click.echo(f"wrote {json_out}")
    if png_out:
        plot_fd(report, png_out)
        click.echo(f"wrote {png_out}")


@main.command()
@click.argument("engine_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--batch", type=POSITIVE, default=2, show_default=True, help="Images per request (x2 with guidance).")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["onnxruntime", "tensorrt", "torch"]),
              help="Backends to measure (repeatable; default: onnxruntime and torch).")
@click.option("--repeats", type=POSITIVE, default=5, show_default=True, help="Interleaved (full, schedule) pairs.")
@click.option("--no-memory", is_flag=True, help="Skip the memory measurements (subprocesses).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the results.")
@click.option("--png", "png_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Plot achieved against ideal speedup.")
def bench(engine_dirs, batch, backends, repeats, no_memory, json_out, png_out):
    """Full compute against the schedule, interleaved: speedup vs ideal, step overhead, memory.

    All ENGINE_DIRS are measured in one interleaved loop per backend: `bench DIR_FP32 DIR_INT8` gives the int8 rows'
    speedups against the fp32 full compute of the same run. The torch backend skips int8 builds (it would run their
    dequantized weights in fp32)."""
    from .core.manifest import load as load_manifest
    from .tools.bench import benchmark_together, machine_description, plot, table, write_results

    results = []
    for backend in backends or ("onnxruntime", "torch"):
        folders = [f for f in engine_dirs
                   if backend != "torch" or load_manifest(f, verify_files=False)["precision"] != "int8"]
        if folders:
            click.echo(f"benchmarking {', '.join(map(str, folders))} on {backend} ...")
            results += benchmark_together(folders, backend, batch=batch, repeats=repeats,
                                          measure_memory=not no_memory)
    click.echo(table(results))
    if json_out:
        write_results(results, json_out, machine_description())
        click.echo(f"wrote {json_out}")
    if png_out:
        plot(results, png_out)
        click.echo(f"wrote {png_out}")


# ------------------------------------------------------------------------------------------------------------------
@main.command("train-default")
@click.option("--family", "family_name", type=click.Choice(["dit", "uvit"]), default="dit", show_default=True,
              help="dit: the embedded default DiT; uvit: the digits U-ViT (DPM-Solver-2S).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the weights [engines/dit-digits or engines/uvit-digits].")
@click.option("--steps", type=POSITIVE, help="Training steps [6000].")
@click.option("--batch-size", type=POSITIVE, help="Images per step [dit: 128, uvit: 64].")
@click.option("--seed", type=SEED, default=0, show_default=True)
def train_default_command(family_name, out, steps, batch_size, seed):
    """Reproduce an embedded default's training on scikit-learn's digits (minutes on two CPU cores)."""
    from .demo.train import DEFAULT_CONFIG, UVIT_CONFIG, UVIT_TRAINING, save_weights, train

    if family_name == "uvit":
        config, name, defaults = UVIT_CONFIG, "uvit-digits", UVIT_TRAINING
    else:
        config, name, defaults = DEFAULT_CONFIG, "dit-digits", {"steps": 6000, "batch_size": 128}
    out = out or Path("engines") / name
    model = train(config, steps=steps or defaults["steps"], batch_size=batch_size or defaults["batch_size"], seed=seed)
    save_weights(model, out / f"{name}.safetensors")
    click.echo(f"wrote {out / f'{name}.safetensors'}")


# ------------------------------------------------------------------------------------------------------------------
# Serving on Triton Inference Server: the logic is in l2c_export/serving.
@main.command()
@click.argument("build_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--repo", required=True, type=click.Path(file_okay=False, path_type=Path), help="Model repository.")
@click.option("--name", default="l2c", show_default=True, help="Model name in the repository.")
@click.option("--instances", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Model instances (each its own process with its own engines).")
@click.option("--max-batch-size", type=click.IntRange(1, 4096),
              help="Images per Triton batch (default: the build's model batch limit / 2).")
@click.option("--max-queue-delay-us", type=click.IntRange(0, 10_000_000), default=2000, show_default=True,
              help="How long the dynamic batcher waits for more requests.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Instance kind (default: cuda for TensorRT).")
@click.option("--threads", type=click.IntRange(0, 1024), default=0, show_default=True,
              help="ONNX Runtime intra-op threads per instance (0: one per core).")
def triton(build_dir, repo, name, instances, max_batch_size, max_queue_delay_us, device, threads):
    """Write a Triton model repository serving BUILD_DIR (Python backend running L2CPipeline in-process)."""
    from .serving.triton import write_repository

    model = write_repository(build_dir, repo, name=name, instances=instances, max_batch_size=max_batch_size,
                             max_queue_delay_us=max_queue_delay_us, device=device, threads=threads)
    click.echo(f"wrote {model} (config.pbtxt, 1/model.py, 1/build); serve it with: l2c-export serve {repo}")


@main.command()
@click.argument("repo", type=click.Path(file_okay=False, path_type=Path))
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--env", type=click.Path(file_okay=False, path_type=Path),
              help="The server's Python environment (default: $L2C_TRITON_ENV, else .venv-triton).")
def serve(repo, http_port, grpc_port, metrics_port, env):
    """Run the bundled tritonserver on REPO on 127.0.0.1 until Ctrl-C or SIGTERM."""
    from .serving.triton import ServerUnavailable, ServingError, serve_forever

    try:
        sys.exit(serve_forever(repo, env=env, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                               echo=click.echo))
    except ServerUnavailable as error:
        raise CommandError(str(error), EXIT_BACKEND_UNAVAILABLE) from None
    except ServingError as error:
        raise CommandError(str(error), EXIT_BAD_INPUT) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
