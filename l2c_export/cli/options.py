"""Options and resolvers that several commands share: which model, which schedule, labels, noise, threads."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ..core.schedule import SCHEDULE_MODES
from ..core.util import short_repr
from ..samplers import SAMPLER_KINDS
from . import IMAGE_SIZE, MAC_FRACTION, POSITIVE, STEPS, THRESHOLD, CommandError

# How messages call a request's parts on the command line: the runtime, the reference sampler and learning name the
# Python arguments (l2c_export.samplers.conditioning.ARGUMENT_NAMES) unless given these.
FLAG_NAMES = {"labels": "--labels", "conditioning": "--conditioning", "cfg_scale": "--cfg-scale",
              "cfg_scale_2": "--cfg-scale-2",
              "prompt": "--prompt/--prompts", "negative_prompt": "--negative-prompt"}


def model_options(function):
    """--diffusers or --checkpoint/--model/--image-size/--num-classes; an embedded model when neither is given."""
    options = [
        click.option("--diffusers", type=click.Path(file_okay=False, path_type=Path),
                     help="A diffusers pipeline folder (what save_pretrained writes: model_index.json, transformer/, "
                          "scheduler/; vae/ and text encoders where it has them): DiTPipeline, "
                          "PixArtAlphaPipeline/PixArtSigmaPipeline, StableDiffusion3Pipeline, FluxPipeline, "
                          "SanaPipeline, QwenImagePipeline or WanPipeline."),
        click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
                     help="Official-layout DiT or U-ViT weights (.pt/.pth state_dict or .safetensors); default: an "
                          "embedded digits model."),
        click.option("--model", "model_name",
                     help="Model of --checkpoint, for example DiT-XL/2 or U-ViT-H/2; without --checkpoint an embedded "
                          "model: dit-digits (default), uvit-digits, t2i-digits, t2i-digits-sd3 or t2v-digits (the "
                          "diffusers folders l2c_export/demo/t2i-digits*, t2v-digits: PixArt-α, SD3, Wan)."),
        click.option("--image-size", type=IMAGE_SIZE,
                     help="Image size in pixels of --checkpoint (latents are 1/8), or of a --diffusers folder whose "
                          "transformer has no sample_size (FLUX.1; latents are pixels over the VAE's scale factor); "
                          "HxW: a video model's frame height and width (Wan)."),
        click.option("--num-frames", type=POSITIVE, help="A --diffusers video model's frames per clip (Wan: 4k + 1, "
                     "the pipeline's num_frames; default its 81)."),
        click.option("--num-classes", type=POSITIVE, default=1000, show_default=True, help="Classes of --checkpoint."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def resolve_model(checkpoint, model_name, image_size, num_classes, diffusers=None, max_sequence_length=None,
                  num_frames=None):
    from ..models import zoo

    return zoo.resolve(checkpoint, model_name, image_size, num_classes, diffusers, max_sequence_length, num_frames)


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
        click.option("--steps", type=STEPS,
                     help="Model calls (NFE; DPM-Solver-2S makes two per step). Default: the --schedule's "
                          "num_steps; else the model's: a diffusers folder's pipeline's num_inference_steps (DiT 50, "
                          "PixArt 20, SD3 and FLUX.1 28), the embedded models' 20."),
        click.option("--sampler", "sampler_kind", type=click.Choice(SAMPLER_KINDS),
                     help="Default: the model's (DiT: ddim; U-ViT: dpm_solver_2s)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def schedule_steps(schedule_file: Path | None, steps: int | None) -> int | None:
    """The model calls to sample with: ``--steps``, or where only ``--schedule`` gives the count, the schedule's
    ``num_steps`` (None: the model's default). A ``--steps`` the schedule was not made for is refused naming both."""
    if schedule_file is None:
        return steps
    from ..core.schedule import Schedule

    made_for = Schedule.load(schedule_file).num_steps
    if steps is not None and steps != made_for:
        raise click.BadParameter(f"{steps}, but --schedule {short_repr(str(schedule_file))} is for {made_for} model "
                                 f"calls (its field 'num_steps'); drop --steps to sample with the schedule's "
                                 f"{made_for}, or give a schedule made for {steps}", param_hint="--steps")
    return made_for


def resolve_schedule(spec, sampler, schedule_file, router, threshold, target_mac_fraction, mode,
                      use_default: bool):
    from ..core.schedule import Schedule

    if schedule_file is not None and router is not None:
        raise click.UsageError("give --schedule or --router, not both")
    if target_mac_fraction is not None and router is None:
        raise click.UsageError("--target-mac-fraction decodes a --router")
    if router is not None and target_mac_fraction is not None:
        from ..routers.baselines import schedule_for_mac_fraction

        result = schedule_for_mac_fraction(router_for(router, sampler), target_mac_fraction,
                                           spec.family.count_macs(spec.config), mode=mode,
                                           timesteps=sampler.model_times.tolist())
    elif router is not None:
        result = router_for(router, sampler).to_schedule(threshold, mode=mode,
                                                          timesteps=sampler.model_times.tolist())
    elif schedule_file is not None:
        result = Schedule.load(schedule_file)
    elif use_default and spec.default_schedule is not None:
        result = spec.schedule()
    else:
        result = Schedule.full(sampler.num_calls, sublayers=spec.sublayer_names,
                               timesteps=sampler.model_times.tolist(), sampler=sampler.kind)
    result.check_fits(sampler.num_calls, spec.sublayer_names)
    if spec.experts is not None:  # each expert's cache starts empty
        result.check_expert_starts(spec.experts.step_expert(sampler), [m.name for m in spec.experts.models])
    return result


def router_for(path, sampler):
    """The router file at ``path``, checked to be made for ``sampler``'s kind of model calls."""
    from ..routers import RouterError, load_router

    router = load_router(path)
    one_call_per_step = ("ddim", "ddpm")
    if router.sampler != sampler.kind and not {router.sampler, sampler.kind} <= set(one_call_per_step):
        raise RouterError(f"{path}: routes the model calls of {router.sampler}; the sampler is {sampler.kind} "
                          f"(pass --sampler {router.sampler})")
    router.meta["sampler"] = sampler.kind
    return router


def macs_for(depth, model_name, image_size, num_classes):
    """The MAC count of --model (at --image-size, default 256 px) or of the embedded default, checked to have
    ``depth`` layers."""
    from ..models import family_of_model, zoo

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


def parse_labels(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers; got {text!r}", param_hint="--labels") from None


def load_noise(path: Path):
    """``--noise``: a finite float .npy array (never unpickled)."""
    import zipfile

    import numpy as np

    try:
        noise = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise CommandError(f"--noise {path}: no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise CommandError(f"--noise {path}: not a readable .npy array ({error})") from None
    if not isinstance(noise, np.ndarray):  # an .npz archive
        noise.close()
        raise CommandError(f"--noise {path}: an .npz archive; expected one .npy array of shape (n samples, C, H, W)")
    if not np.issubdtype(noise.dtype, np.floating):
        raise CommandError(f"--noise {path}: holds {noise.dtype} values; expected float32")
    bad = int(np.size(noise) - np.count_nonzero(np.isfinite(noise)))
    if bad:
        raise CommandError(f"--noise {path}: {bad} of its {noise.size} values are NaN or infinite; expected finite "
                           f"noise")
    return noise.astype(np.float32)


def save_npy(path: Path, array) -> None:
    import io

    import numpy as np

    from ..core.util import atomic_write_bytes

    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


def backend_options(device: str | None, backend: str) -> dict:
    if device is None:
        return {}
    if backend == "onnxruntime":
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        return {"providers": providers}
    if backend == "torch":
        return {"device": device}
    raise click.UsageError(f"--device does not apply to --backend {backend}")


def threads_option(function):
    """--threads: torch's intra-op threads and ONNX Runtime's intra-op pool (:func:`use_threads`)."""
    return click.option(
        "--threads", type=click.IntRange(0, 1024),
        help="Intra-op threads of torch and ONNX Runtime (0: one per core whatever the load). Default: "
             "OMP_NUM_THREADS where set; else one per core, less the cores the 1-minute load average counts busy "
             "with other work (at least 1): on a shared machine threads on busy cores wait on each other, several "
             "times slower than fewer threads.")(function)


def use_threads(threads: int | None, torch: bool = False, warn: bool = True):
    """Applies ``--threads`` (or the default of :func:`l2c_export.core.threads.choose_threads`) to this process:
    OMP_NUM_THREADS, which ONNX Runtime's pool (runtime/backends/onnxruntime) and the subprocesses a command starts
    take, and torch's threads where the command runs torch (``torch``; the ONNX Runtime commands never import it).
    Warns on stderr (where ``warn``), one line, when the load average shows cores busy with other work. Returns the
    :class:`~l2c_export.core.threads.ThreadChoice`."""
    from ..core.threads import choose_threads

    choice = choose_threads(threads)  # a bad $L2C_LOADAVG: ValueError, one line (cli._Group)
    warning = choice.warning()
    if warning and warn:
        click.echo(warning, err=True)
    os.environ["OMP_NUM_THREADS"] = str(choice.threads)
    if torch:
        import torch as torch_module

        torch_module.set_num_threads(choice.threads)
    return choice


def threads_used(choice) -> dict:
    """For a command's results JSON: ``choice`` (:func:`use_threads`) and the threads torch and ONNX Runtime's pool
    ran with (None: the command did not use that library)."""
    import sys

    from ..runtime.backends.onnxruntime import global_threads

    torch = sys.modules.get("torch")
    return {**choice.record(), "torch_threads": None if torch is None else torch.get_num_threads(),
            "onnxruntime_threads": global_threads()}
