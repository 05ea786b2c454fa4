"""``l2c-export eval`` (an embedded digits model or a diffusers folder) and ``train-default`` (the embedded digits
models)."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.schedule import SCHEDULE_MODES
from ..models.zoo import DEFAULT_NAME, EMBEDDED_MODELS, TEXT_TO_IMAGE_MODELS, embedded_default
from . import CFG_SCALE, IMAGE_SIZE, MAC_FRACTION, POSITIVE, SEED, THRESHOLD, CommandError, main
from .options import threads_option

DEFAULT_BUDGETS = "0.6,0.7,0.8,0.9"  # the label models' sweep (text-to-image: none unless asked)


@main.command("eval")
@click.option("--model", "model_name", type=click.Choice(EMBEDDED_MODELS),
              help="The embedded model: the digits DiT (DDIM; the default), U-ViT (DPM-Solver-2S), or the "
                   "text-to-image t2i-digits (captions in, images judged by the digits classifier; the schedules on "
                   "ONNX Runtime builds and cache-dit's DBCache on diffusers' pipeline, each timed).")
@click.option("--diffusers", type=click.Path(file_okay=False, path_type=Path),
              help="Or a diffusers pipeline folder (DiTPipeline, PixArtAlphaPipeline/PixArtSigmaPipeline): its "
                   "transformer and scheduler; needs --schedule or --router.")
@click.option("--image-size", type=IMAGE_SIZE,
              help="With --diffusers: the size in pixels of a transformer without sample_size (FLUX.1), or HxW: a "
                   "video model's frames (Wan).")
@click.option("--num-frames", type=POSITIVE, help="With --diffusers: a video model's frames per clip (Wan).")
@click.option("--router", type=click.Path(dir_okay=False, path_type=Path),
              help="Router for the l2c sweep (default: the embedded model's); with --diffusers and no --schedule, "
                   "decoded at --threshold it is also the learned schedule.")
@click.option("--schedule", "schedule_file", type=click.Path(dir_okay=False, path_type=Path),
              help="The learned schedule to compare (default: the embedded model's); its rows are the steps.")
@click.option("--threshold", type=THRESHOLD, default=0.1, show_default=True,
              help="With --router and no --schedule: the threshold the learned schedule is decoded at.")
@click.option("--mode", type=click.Choice(SCHEDULE_MODES), help="How the router is decoded for the sweep "
                                                                          "(default: the schedule's).")
@click.option("--budgets", help=f"MAC fractions of the sweep, comma-separated ('' for none) [{DEFAULT_BUDGETS}; "
                                 f"t2i-digits: none; given, the whole curve: every method and peer cache searched "
                                 f"to each budget, in quality and wall time].")
@click.option("--num-samples", type=click.IntRange(min=2), help="Samples per method (labels or prompts in turn) "
                                                                 "[1000; t2i-digits: 500].")
@click.option("--batch-size", type=click.IntRange(min=1), default=50, show_default=True,
              help="t2i-digits: prompts per pipeline call, for every method (the timed calls).")
@click.option("--grid", "grid_out", type=click.Path(dir_okay=False, path_type=Path),
              help="t2i-digits: write a PNG of one prompt per digit through full compute, the learned schedule and "
                   "cache-dit, side by side (with --budgets: every method at the lowest budget).")
@click.option("--labels", help="A label model's class labels, comma-separated, used in turn [every class in turn].")
@click.option("--conditioning-data", type=click.Path(dir_okay=False, path_type=Path),
              help="A text model's prompts (--diffusers PixArt), used in turn: an .npz of prompt_embeds (P, L, D), "
                   "prompt_attention_mask (P, L) and, for guidance, negative_prompt_embeds and "
                   "negative_prompt_attention_mask (the pipeline's argument names).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Instead of --conditioning-data: a UTF-8 file of prompts, one a line, encoded by the --diffusers "
                   "folder's own text encoder at its pipeline's settings.")
@click.option("--cfg-scale", type=CFG_SCALE, help="Guidance scale (default: the model's).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Noise seed, the same for every method.")
@click.option("--random-seeds", type=POSITIVE, default=2, show_default=True,
              help="Random-drop schedules averaged per budget.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the results JSON.")
@click.option("--png", "png_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the plot of FD against MAC fraction (t2i-digits with --budgets: FD to full and PSNR, and "
                   "beside it <stem>-speed.png, PSNR against seconds per image).")
@click.option("--search", "search_size", type=click.Choice(["small", "full"]), default="full", show_default=True,
              help="t2i-digits with --budgets: the grid of each peer cache's knobs searched for the budgets "
                   "(small: a few settings, for a quick look).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="t2i-digits with --budgets: interleaved timing rounds (medians).")
@click.option("--markdown", "markdown_out", type=click.Path(dir_okay=False, path_type=Path),
              help="t2i-digits with --budgets: write the table as Markdown.")
@click.option("--int8/--no-int8", default=None,
              help="Add the int8 build's rows (ONNX Runtime): full compute and the learned schedule [on for the "
                   "embedded models, off for --diffusers].")
@threads_option
def eval_command(model_name, diffusers, image_size, num_frames, router, schedule_file, threshold, mode, budgets,
                 num_samples,
                 batch_size, grid_out, labels, conditioning_data, prompts_file, cfg_scale, seed, random_seeds,
                 json_out, png_out, search_size, repeats, markdown_out, int8, threads):
    """Full compute, the learned schedule and the baselines (FORA, random drop, fewer steps) at equal MACs, from the
    same noise: PSNR and Frechet distance against full compute; on the digits models also FD to the real digits and
    class accuracy (digits classifier features; elsewhere a fixed random projection of the latents)."""
    import dataclasses

    from ..core.schedule import Schedule
    from ..demo.eval_plots import plot_fd, plot_t2i_grid
    from ..demo.evaluate import evaluate, format_table, write_json
    from ..models import zoo
    from ..routers import load_router
    from .options import parse_labels, threads_used, use_threads

    if diffusers is not None and model_name is not None:
        raise click.UsageError("give --model (an embedded model) or --diffusers, not both")
    if (image_size is not None or num_frames is not None) and diffusers is None:
        raise click.UsageError("--image-size and --num-frames size a --diffusers folder's transformer")
    try:
        spec = (zoo.from_diffusers(diffusers, image_size, num_frames=num_frames) if diffusers is not None
                else zoo.embedded_default(model_name or DEFAULT_NAME))
    except ValueError as error:  # an --image-size or --num-frames the family does not take (named in the message)
        raise CommandError(str(error)) from None
    if spec.experts is not None:  # the baselines' schedules would reuse at an expert's first step
        raise CommandError(f"--diffusers {diffusers}: a pipeline of {len(spec.experts.models)} experts "
                           f"({', '.join(m.name for m in spec.experts.models)}) is not evaluated yet; build and run "
                           f"its schedule, or verify it")
    if cfg_scale is not None:
        spec = dataclasses.replace(spec, cfg_scale=cfg_scale)
    router_path = router or spec.default_router
    logits = load_router(router_path) if router_path else None
    if schedule_file is not None:
        learned = Schedule.load(schedule_file)
    elif diffusers is not None and logits is not None:
        learned = logits.to_schedule(threshold, mode=mode or "official",
                                     timesteps=spec.sampler(None, logits.num_steps).model_times.tolist())
    else:
        learned = spec.schedule()
    if learned is None:
        raise click.UsageError(f"{spec.name} comes with no schedule; pass --schedule or --router")
    captioned = model_name in TEXT_TO_IMAGE_MODELS  # sampled from captions, judged on decoded images
    if budgets is None:
        budgets = "" if captioned else DEFAULT_BUDGETS
    num_samples = num_samples or (500 if captioned else 1000)
    if grid_out is not None and not captioned:
        raise click.BadParameter("the sample grid is drawn for a text-to-image model (--model t2i-digits)",
                                 param_hint="--grid")
    try:
        budget_list = [MAC_FRACTION.convert(part, None, None) for part in budgets.split(",") if part.strip()]
    except click.BadParameter as error:
        raise click.BadParameter(error.message, param_hint="--budgets") from None
    prompts = None
    if conditioning_data is not None:
        from ..runtime.conditioning import load_conditioning

        prompts = load_conditioning(conditioning_data, f"--conditioning-data {conditioning_data}")
    text_model = spec.family.null_class(spec.config) is None
    if prompts_file is not None:
        from .learn import encoded_prompts

        if conditioning_data is not None:
            raise click.UsageError("give --conditioning-data or --prompts, not both")
        if diffusers is None:
            raise click.BadParameter("prompts are encoded by a --diffusers folder's text encoder; the embedded models "
                                     "are evaluated on their own captions or labels", param_hint="--prompts")
        if not text_model:
            raise click.BadParameter("this model is conditioned on class labels; prompts do not apply",
                                     param_hint="--prompts")
        guiding = getattr(spec.family, "classifier_free", True) and spec.cfg_scale > 1.0
        prompts, conditioning_data = encoded_prompts(spec, prompts_file, guiding), prompts_file
    if captioned and prompts is not None:
        raise click.BadParameter(f"{model_name} is evaluated on its own captions (every caption form with every "
                                 f"digit); prompt embeddings do not apply", param_hint="--conditioning-data")
    if text_model and prompts is None and not captioned:
        raise click.UsageError("a text model is evaluated on prompts: give --conditioning-data prompts.npz")
    if not text_model and prompts is not None:
        raise click.BadParameter("this model is conditioned on class labels; prompts do not apply",
                                 param_hint="--conditioning-data")
    if text_model and labels is not None:
        raise click.BadParameter("this model is conditioned on prompt embeddings (--conditioning-data), not class "
                                 "labels", param_hint="--labels")
    if captioned and int8:
        raise click.BadParameter(f"{model_name} has no int8 rows", param_hint="--int8")
    captions = None
    if captioned:
        from ..demo.t2i import evaluation_prompts

        captions = evaluation_prompts(num_samples)
    curve = captioned and bool(budget_list)
    if markdown_out is not None and not curve:
        raise click.BadParameter("the Markdown table is the budget curve's: give --model t2i-digits --budgets ...",
                                 param_hint="--markdown")
    if curve and schedule_file is not None:
        raise click.BadParameter("the budget curve decodes the router at each budget; give --router, not a schedule",
                                 param_hint="--schedule")
    choice = use_threads(threads, torch=True)
    if curve:
        _budget_curve(spec, logits, mode, budget_list, captions, seed, batch_size, search_size, repeats,
                      random_seeds, json_out, png_out, grid_out, markdown_out, threads_used(choice))
        return
    grid = {}
    report = evaluate(spec, learned, logits, mode or learned.mode or "official", budget_list, num_samples, seed,
                      random_seeds=tuple(range(random_seeds)),
                      int8=(diffusers is None and not captioned) if int8 is None else int8,
                      labels=None if labels is None else parse_labels(labels), prompts=prompts,
                      prompts_source=f"{'--prompts' if prompts_file else '--conditioning-data'} {conditioning_data}",
                      captions=captions,
                      batch_size=batch_size, grid=grid)
    report["threads"] = threads_used(choice)
    click.echo(format_table(report))
    click.echo(f"features: {report['features']}")
    if json_out:
        write_json(report, json_out)
        click.echo(f"wrote {json_out}")
    if png_out:
        plot_fd(report, png_out)
        click.echo(f"wrote {png_out}")
    if grid_out:
        plot_t2i_grid(grid, grid_out)
        click.echo(f"wrote {grid_out}")


def _budget_curve(spec, router, mode, budgets, captions, seed, batch_size, search_size, repeats, random_seeds,
                  json_out, png_out, grid_out, markdown_out, threads) -> None:
    """``eval --model t2i-digits --budgets ...``: every method at every budget (:mod:`l2c_export.demo.curve`); the
    table on stdout, and the files asked for (``--png`` also writes ``<stem>-speed.png``, PSNR against seconds)."""
    from ..core.util import atomic_write_text
    from ..demo.curve import evaluate_curve, format_curve_table
    from ..demo.eval_plots import plot_curve, plot_curve_grid
    from ..demo.evaluate import write_json

    report = evaluate_curve(spec, router, budgets, captions, seed=seed, batch_size=batch_size,
                            search_size=search_size, repeats=repeats, random_seeds=tuple(range(random_seeds)),
                            mode=mode or "official")
    report["threads"] = threads
    grid = report.pop("grid")
    table = format_curve_table(report)
    click.echo(table)
    if json_out:
        write_json(report, json_out)
        click.echo(f"wrote {json_out}")
    if markdown_out:
        atomic_write_text(markdown_out, table + "\n")
        click.echo(f"wrote {markdown_out}")
    if png_out:
        speed = png_out.with_name(f"{png_out.stem}-speed{png_out.suffix}")
        plot_curve(report, png_out, speed)
        click.echo(f"wrote {png_out}\nwrote {speed}")
    if grid_out:
        plot_curve_grid(grid, grid_out)
        click.echo(f"wrote {grid_out}")


@main.command("train-default")
@click.option("--model", "model_name", type=click.Choice(EMBEDDED_MODELS), default=DEFAULT_NAME, show_default=True,
              help="The embedded model to train: the digits DiT or U-ViT (config and settings from its model.json), "
                   "or the text-to-image t2i-digits (a diffusers folder; settings of l2c_export/demo/t2i.py).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the weights [engines/MODEL] (t2i-digits: the diffusers folder).")
@click.option("--steps", type=POSITIVE, help="Training steps [the model.json's: 6000; t2i-digits: 3000 of the "
                                             "transformer, after a third as many of the VAE].")
@click.option("--batch-size", type=POSITIVE, help="Images per step [the model.json's: DiT 128, U-ViT 64; t2i: 128].")
@click.option("--seed", type=SEED, default=0, show_default=True)
def train_default_command(model_name, out, steps, batch_size, seed):
    """Reproduce an embedded model's training on scikit-learn's digits (minutes on two CPU cores)."""
    out = out or Path("engines") / model_name
    if model_name in TEXT_TO_IMAGE_MODELS:
        _train_text_to_image(out, steps, batch_size, seed)
        return
    from ..demo.train import save_weights, train

    spec = embedded_default(model_name)  # the shipped model.json: its config and training settings
    model = train(spec.config, steps=steps or spec.training["steps"],
                  batch_size=batch_size or spec.training["batch_size"], seed=seed)
    save_weights(model, out / f"{model_name}.safetensors")
    click.echo(f"wrote {out / f'{model_name}.safetensors'}")


def _train_text_to_image(out: Path, steps, batch_size, seed) -> None:
    """t2i-digits: the VAE, then the PixArt transformer; the pipeline saved as a diffusers folder at ``out`` (written
    beside it, then moved into place: a failed run leaves no half-written folder)."""
    import dataclasses
    import shutil
    import tempfile

    from ..core.util import replace_folder
    from ..demo.t2i import T2IConfig, save_t2i, train_t2i

    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "model_index.json").is_file())):
        raise CommandError(f"--out {out}: exists and is not a diffusers folder; give an absent or empty folder, or "
                           f"a previous t2i-digits folder to replace")
    config = T2IConfig()
    if steps is not None:  # the VAE trains for a third as many steps as the transformer (1000 of 3000)
        config = dataclasses.replace(config, steps=steps, vae_steps=max(1, steps // 3))
    config = dataclasses.replace(config, batch_size=batch_size or config.batch_size)
    pipe = train_t2i(config, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_t2i(pipe, staging, config)
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    click.echo(f"wrote {out} (a PixArtAlphaPipeline folder; learn its router with l2c-export learn --diffusers {out} "
               f"--conditioning-data prompts.npz, the prompts from python -m l2c_export.demo.t2i prompts)")
