"""``l2c-export schedule`` (decode or inspect a schedule) and ``sample`` (the PyTorch reference sampler)."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.schedule import SCHEDULE_MODES, format_model_time
from ..samplers import create_sampler
from . import CFG_SCALE, IMAGE_SIZE, MAC_FRACTION, POSITIVE, SEED, STEPS, THRESHOLD, CommandError, main
from .options import (macs_for, model_options, parse_labels, resolve_model, resolve_schedule, save_npy,
                      schedule_options, schedule_steps, threads_option, use_threads)


@main.command()
@click.option("--diffusers", type=click.Path(file_okay=False, path_type=Path),
              help="A diffusers pipeline folder: list its sub-layers by name (and check --schedule against them).")
@click.option("--router", type=click.Path(dir_okay=False, path_type=Path),
              help="Router file: the authors' .pt or this project's .safetensors.")
@click.option("--schedule", "schedule_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Inspect an existing schedule JSON instead.")
@click.option("--steps", type=STEPS, help="Model calls (NFE) the router was learned for (checked against the file).")
@click.option("--threshold", type=THRESHOLD, default=0.1, show_default=True,
              help="A sub-layer is computed where sigmoid(logit) > threshold.")
@click.option("--mode", type=click.Choice(SCHEDULE_MODES), default="official", show_default=True,
              help="official: only the calls where the authors' sampler consults its router reuse (DDIM: every "
                   "other step; DPM-Solver-2S: each step's first call); general: any call may reuse.")
@click.option("--model", "model_name", help="Model for MAC counting, e.g. DiT-XL/2 (default: from the router file, "
                                            "else the embedded default).")
@click.option("--image-size", type=IMAGE_SIZE, help="Image size in pixels for MAC counting of an official model [256], "
              "or of a --diffusers folder's build (FLUX.1, Qwen-Image; HxW: Wan's frames).")
@click.option("--num-frames", type=POSITIVE, help="A --diffusers video folder's frames per clip (Wan), as its build's.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the schedule JSON.")
@click.option("--png", "png_out", type=click.Path(dir_okay=False, path_type=Path), help="Write a heatmap PNG.")
@click.option("--target-mac-fraction", type=MAC_FRACTION,
              help="Instead of --threshold: the lowest threshold whose MAC fraction is at most this.")
def schedule(diffusers, router, schedule_file, steps, threshold, mode, model_name, image_size, num_frames, json_out,
             png_out, target_mac_fraction):
    """Decode a router into a schedule, or inspect one: sub-layers per step, subsets, MACs, ideal speedup."""
    from ..core.schedule import Schedule
    from ..models.zoo import embedded_diffusers_folder
    from ..routers import load_router

    if diffusers is None and embedded_diffusers_folder(model_name) is not None:  # --model t2i-digits
        diffusers, model_name = embedded_diffusers_folder(model_name), None
    if diffusers is not None:
        _diffusers_schedule(diffusers, router, schedule_file, model_name, json_out, png_out, threshold, mode,
                            target_mac_fraction, image_size, num_frames)
        return
    if num_frames is not None or isinstance(image_size, tuple):
        raise click.UsageError("--num-frames and --image-size HxW size a --diffusers video folder (Wan)")
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
            from ..routers.baselines import schedule_for_mac_fraction

            result = schedule_for_mac_fraction(logits, target_mac_fraction, macs_for(
                logits.depth, model_name or meta.get("model"), image_size or meta.get("image_size"),
                meta.get("num_classes", 1000)), mode, timesteps)
    else:
        result = Schedule.load(schedule_file)
    macs = macs_for(result.depth, model_name or meta.get("model"), image_size or meta.get("image_size"),
                     meta.get("num_classes", 1000))
    _show_schedule(result, macs, json_out, png_out, title=str(router or schedule_file))


def _show_schedule(result, macs, json_out, png_out, title: str, experts: list[tuple[int, str]] | None = None) -> None:
    """Prints the schedule's summary and writes its JSON and heatmap where asked; ``experts``: a pipeline's (first
    call, name) of each, shown where they switch."""
    _print_schedule(result, macs)
    if experts:
        click.echo("experts: " + ", ".join(f"{name} from call {first}" for first, name in experts))
    if json_out:
        result.save(json_out)
        click.echo(f"wrote {json_out}")
    if png_out:
        from ..tools.plots import schedule_heatmap

        schedule_heatmap(result, png_out, title=title, mac_fraction=result.mac_fraction(macs), experts=experts)
        click.echo(f"wrote {png_out}")


def _print_schedule(result, macs) -> None:
    subsets = result.distinct_subsets()
    subset_of_step = result.subset_of_step()
    width = result.width
    click.echo(f"schedule: {result.num_steps} model calls x {width} sub-layers ({result.source or 'unnamed'}"
               + (f", threshold {result.threshold}" if result.threshold is not None else "")
               + (f", mode {result.mode}" if result.mode else "") + ")")
    for s, (count, subset) in enumerate(zip(result.computed_per_step(), subset_of_step)):
        t = f" t={format_model_time(result.timesteps[s]):>6}" if result.timesteps else ""
        bar = "".join("#" if v else "." for v in result.compute[s])
        click.echo(f"  call {s:>3}{t}  {count:>4}/{width}  subset {subset:>2}  {bar}")
    reused_steps = result.cache_steps()
    if reused_steps:
        computed = int(result.compute[reused_steps].sum())
        click.echo(f"cache calls: {len(reused_steps)}, computing {computed} of {len(reused_steps) * width} sub-layers "
                   f"({100 * (1 - computed / (len(reused_steps) * width)):.2f}% removed)")
    click.echo(f"distinct subsets: {len(subsets)}")
    fraction = result.mac_fraction(macs)
    click.echo(f"MAC fraction: {fraction:.4f}  (full {macs.full / 1e9:.3f} GMAC per sample per model call)")
    click.echo(f"ideal speedup: {1 / fraction:.3f}x")


@main.command()
@model_options
@schedule_options
@click.option("--full", is_flag=True, help="Ignore any schedule: compute every sub-layer at every step.")
@click.option("--labels", help="Comma-separated class labels of a label model [0,1,...,9].")
@click.option("--conditioning", "conditioning_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A text model's conditioning (--diffusers PixArt): an .npz of prompt_embeds (n, L, D), "
                   "prompt_attention_mask (n, L) and, for guidance, negative_prompt_embeds and "
                   "negative_prompt_attention_mask (the pipeline's argument names).")
@click.option("--cfg-scale", type=CFG_SCALE, help="Classifier-free guidance scale (1 = none; default: the model's).")
@click.option("--guide-all-channels", is_flag=True, help="Guide every eps channel (DiT guides 3 of 4 latent channels).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the initial (and DDPM) noise.")
@click.option("--noise", "noise_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Initial noise (the pipeline's latents) .npy of shape (n samples, C, H, W), float32.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("samples.png"), show_default=True)
@click.option("--save-latents", type=click.Path(dir_okay=False, path_type=Path), help="Also save the samples (.npy).")
@threads_option
def sample(diffusers, checkpoint, model_name, image_size, num_frames, num_classes, schedule_file, router, threshold,
           target_mac_fraction, mode, steps, sampler_kind, full, labels, conditioning_file, cfg_scale,
           guide_all_channels, seed, noise_file, out, save_latents, threads):
    """Sample with the PyTorch reference sampler (eager), with or without the L2C schedule. For a diffusers folder:
    its transformer and scheduler as its pipeline samples them (--noise is the pipeline's latents)."""
    import time

    import torch

    from ..runtime.conditioning import load_conditioning
    from ..models.reference import sample_reference
    from .options import FLAG_NAMES, load_noise

    spec = resolve_model(checkpoint, model_name, image_size, num_classes, diffusers, num_frames=num_frames)
    sampler = spec.sampler(sampler_kind, schedule_steps(schedule_file, steps))
    plan = None if full else resolve_schedule(spec, sampler, schedule_file, router, threshold, target_mac_fraction,
                                               mode, use_default=checkpoint is None and diffusers is None)
    if plan is not None and plan.compute.all():
        plan = None  # nothing is reused: the plain forward
    conditioning = None if conditioning_file is None else load_conditioning(conditioning_file)
    label_list = parse_labels(labels) if labels is not None else (
        None if conditioning is not None or spec.family.null_class(spec.config) is None else list(range(10)))
    noise = None if noise_file is None else load_noise(noise_file)
    use_threads(threads, torch=True)
    model = spec.load_model()
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    samples = sample_reference(model, sampler, label_list, noise, cfg_scale=spec.cfg_scale if cfg_scale is None
                               else cfg_scale, schedule=plan, guide_all_channels=guide_all_channels,
                               step_noise_seed=seed, conditioning=conditioning,
                               where=f"--conditioning {conditioning_file or ''}".rstrip(), names=FLAG_NAMES)
    elapsed = time.perf_counter() - start
    what = "full compute" if plan is None else f"L2C schedule ({plan.source})"
    click.echo(f"sampled {len(samples)} x {sampler.num_calls} {sampler.kind} model calls with {what} in "
               f"{elapsed:.2f} s ({torch.get_num_threads()} thread(s))")
    if save_latents:
        save_npy(save_latents, samples)
        click.echo(f"wrote {save_latents}")
    if spec.space == "pixel":
        from ..core.images import save_grid

        save_grid(samples, out, columns=min(len(samples), 10))
        click.echo(f"wrote {out}")
    else:
        click.echo("latent model: no image written (decode the saved latents with a VAE)")


def _diffusers_schedule(folder, router, schedule_file, model_name, json_out, png_out, threshold, mode,
                        target_mac_fraction, image_size=None, num_frames=None) -> None:
    """``schedule --diffusers DIR [--schedule FILE | --router FILE]``: the folder's sub-layers by name, and a schedule
    (or a router learned on the folder, decoded) checked against them."""
    from ..core.schedule import Schedule
    from ..models.zoo import from_diffusers
    from ..routers import load_router

    if model_name is not None:
        raise CommandError("--model does not apply to --diffusers (the folder is the model)")
    if router is not None and schedule_file is not None:
        raise click.UsageError("give --router or --schedule, not both")
    spec = from_diffusers(folder, image_size, num_frames=num_frames)  # MACs at the build's size
    names = spec.sublayer_names
    macs = spec.family.count_macs(spec.config)
    click.echo(f"{folder}: {spec.config.transformer_class}, {len(names)} sub-layers in forward order "
               f"(full {macs.full / 1e6:.3f} MMAC per sample per model call, {macs.always / 1e6:.3f} always run)")
    for index, name in enumerate(names):
        click.echo(f"  {index:>4}  {name:<40} {macs.sublayer(index) / 1e6:>10.3f} MMAC")
    if router is not None:
        logits = load_router(router)
        timesteps = spec.sampler(None, logits.num_steps).model_times.tolist()
        if target_mac_fraction is not None:
            from ..routers.baselines import schedule_for_mac_fraction

            result = schedule_for_mac_fraction(logits, target_mac_fraction, macs, mode, timesteps)
        else:
            result = logits.to_schedule(threshold, mode=mode, timesteps=timesteps)
    elif schedule_file is not None:
        result = Schedule.load(schedule_file)
    else:
        if json_out or png_out:
            raise CommandError("--json/--png: give the --schedule or --router to write")
        return
    result.check_fits(result.num_steps, names)
    experts = None
    if spec.experts is not None:  # where the experts switch, each one's first call computing everything
        step_expert = spec.experts.step_expert(spec.sampler(None, result.num_steps))
        result.check_expert_starts(step_expert, [m.name for m in spec.experts.models])
        experts = [(step_expert.index(e), spec.experts.models[e].name) for e in dict.fromkeys(step_expert)]
    _show_schedule(result, macs, json_out, png_out, title=str(router or schedule_file), experts=experts)
