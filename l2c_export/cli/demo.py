"""``l2c-export eval`` (an embedded digits model or a diffusers folder) and ``train-default`` (the embedded digits
models)."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.schedule import SCHEDULE_MODES
from ..models.zoo import DEFAULT_NAME, EMBEDDED_MODELS, TEXT_TO_IMAGE_MODELS, TEXT_TO_VIDEO_MODELS, embedded_default
from . import CFG_SCALE, IMAGE_SIZE, MAC_FRACTION, POSITIVE, SEED, THRESHOLD, CommandError, main
from .options import threads_option

DEFAULT_BUDGETS = "0.6,0.7,0.8,0.9"  # the label models' sweep (text-to-image: none unless asked)


@main.command("eval")
@click.option("--model", "model_name", type=click.Choice(EMBEDDED_MODELS),
              help="The embedded model: the digits DiT (DDIM; the default), U-ViT (DPM-Solver-2S), the "
                   "text-to-image t2i-digits or t2i-digits-sd3 (captions in, images judged by the digits classifier; "
                   "the schedules on ONNX Runtime builds and cache-dit's DBCache on diffusers' pipeline, each timed), "
                   "or the text-to-video t2v-digits (the same, on decoded clips judged frame by frame: PSNR and FD "
                   "to full compute per frame, accuracy: the prompted digit drawn and moving as asked).")
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
                                 f"t2i-digits, t2v-digits: none; given, the whole curve: every method and peer cache searched "
                                 f"to each budget, in quality and wall time; --diffusers with --prompts: the curve, "
                                 f"at the learned schedule's MAC fraction unless given, '' for the latents-only "
                                 f"evaluation].")
@click.option("--num-samples", type=click.IntRange(min=2), help="Samples per method (labels or prompts in turn) "
                                                                 "[1000; t2i-digits: 500; t2v-digits: 320, "
                                                                 "every prompt form, direction and digit once].")
@click.option("--batch-size", type=click.IntRange(min=1), default=50, show_default=True,
              help="t2i-digits and --diffusers with --prompts: prompts per pipeline call, for every method (the "
                   "timed calls; the first call's prompts calibrate the peers' searches).")
@click.option("--grid", "grid_out", type=click.Path(dir_okay=False, path_type=Path),
              help="t2i-digits (or the curve on --diffusers with --prompts: its first ten prompts): write a PNG of "
                   "one prompt per digit through full compute, the learned schedule and "
                   "cache-dit, side by side (with --budgets: every method at the lowest budget); t2v-digits: an "
                   "animated .gif/.webp (or .mp4), a row of clips per method.")
@click.option("--labels", help="A label model's class labels, comma-separated, used in turn [every class in turn].")
@click.option("--conditioning-data", type=click.Path(dir_okay=False, path_type=Path),
              help="A text model's prompts (--diffusers PixArt), used in turn: an .npz of prompt_embeds (P, L, D), "
                   "prompt_attention_mask (P, L) and, for guidance, negative_prompt_embeds and "
                   "negative_prompt_attention_mask (the pipeline's argument names).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Instead of --conditioning-data: a UTF-8 file of prompts, one a line, encoded by the --diffusers "
                   "folder's own text encoder at its pipeline's settings; the budget curve against every peer cache "
                   "on the folder's own pipeline, on decoded images (see --budgets).")
@click.option("--cfg-scale", type=CFG_SCALE, help="Guidance scale (default: the model's).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Noise seed, the same for every method.")
@click.option("--random-seeds", type=POSITIVE, default=2, show_default=True,
              help="Random-drop schedules averaged per budget.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the results JSON.")
@click.option("--png", "png_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the plot of FD against MAC fraction (the budget curve: FD to full and PSNR, and beside it "
                   "<stem>-speed.png, PSNR against seconds per image).")
@click.option("--search", "search_size", type=click.Choice(["small", "full"]), default="full", show_default=True,
              help="The models sampled from captions (t2i-digits, t2v-digits; the budget curve: with --budgets, "
                   "or --diffusers with --prompts): the grid of each peer cache's knobs searched for the budgets "
                   "(small: a few settings, for a quick look).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="The budget curve: interleaved timing rounds (medians).")
@click.option("--markdown", "markdown_out", type=click.Path(dir_okay=False, path_type=Path),
              help="The budget curve: write the table as Markdown.")
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

    from ..core.images import CLIP_FORMATS
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
        hint = (f" (learn a router on your prompts first: l2c-export learn --diffusers {diffusers} --prompts "
                f"{prompts_file} --out router.safetensors)" if prompts_file is not None else "")
        raise click.UsageError(f"{spec.name} comes with no schedule; pass --schedule or --router{hint}")
    # sampled from captions, judged on decoded images (the video model: clips, frame by frame)
    captioned = model_name in TEXT_TO_IMAGE_MODELS + TEXT_TO_VIDEO_MODELS
    # a folder's own prompts: the curve against every peer cache, at --budgets (default: the learned schedule's MAC
    # fraction); --budgets '' keeps the latents-only evaluation against the plain baselines
    own_curve = diffusers is not None and prompts_file is not None and budgets != ""
    if own_curve:
        _check_own_curve(spec, diffusers, schedule_file, router, int8)
    if budgets is None and not own_curve:  # the curve on a folder's prompts: at the learned schedule's (below)
        budgets = "" if captioned else DEFAULT_BUDGETS
    num_samples_given, num_samples = num_samples, num_samples or (
        320 if model_name in TEXT_TO_VIDEO_MODELS else 500 if captioned else 1000)
    if grid_out is not None and not (captioned or own_curve):
        raise click.BadParameter("the sample grid is drawn for a model sampled from captions (--model t2i-digits, "
                                 "t2v-digits, or --diffusers with --prompts)", param_hint="--grid")
    if grid_out is not None and model_name in TEXT_TO_VIDEO_MODELS and grid_out.suffix.lower() not in CLIP_FORMATS:
        raise click.BadParameter(f"{grid_out}: the clips of {model_name} are written as an animated image or video; "
                                 f"expected a name ending {', '.join(CLIP_FORMATS)}", param_hint="--grid")
    try:
        budget_list = [MAC_FRACTION.convert(part, None, None) for part in (budgets or "").split(",") if part.strip()]
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
    captions = model_captions(model_name, num_samples) if captioned else None
    if own_curve:
        learned.check_fits(spec.sampler(None, learned.num_steps).num_calls, spec.sublayer_names)
        budget_list = budget_list or [round(learned.mac_fraction(spec.family.count_macs(spec.config)), 3)]
        texts = prompts_text(prompts_file)
        captions = [(texts[i % len(texts)], None, False) for i in range(num_samples_given or len(texts))]
    curve = (captioned or own_curve) and bool(budget_list)
    if markdown_out is not None and not curve:
        raise click.BadParameter("the Markdown table is the budget curve's: give --model t2i-digits --budgets ..., "
                                 "or --diffusers DIR --prompts FILE", param_hint="--markdown")
    if captioned and curve and schedule_file is not None:
        raise click.BadParameter("the budget curve decodes the router at each budget; give --router, not a schedule",
                                 param_hint="--schedule")
    choice = use_threads(threads, torch=True)
    if curve:
        # the shipped general-mode router (l2c-general) beside the shipped router, which it is learned as
        general = load_router(spec.general_router) if spec.general_router and router is None else None
        _budget_curve(spec, None if own_curve and schedule_file is not None else logits, mode, budget_list,
                      captions, seed, batch_size, search_size, repeats, random_seeds, json_out, png_out, grid_out,
                      markdown_out, threads_used(choice),
                      schedule=learned if own_curve and schedule_file is not None else None, general_router=general)
        return
    grid = {}
    report = evaluate(spec, learned, logits, mode or learned.mode or "official", budget_list, num_samples, seed,
                      random_seeds=tuple(range(random_seeds)),
                      int8=(diffusers is None and not captioned) if int8 is None else int8,
                      labels=None if labels is None else parse_labels(labels), prompts=prompts,
                      prompts_source=f"{'--prompts' if prompts_file else '--conditioning-data'} {conditioning_data}",
                      captions=captions,
                      batch_size=batch_size, grid=grid, peer_search={"size": search_size})
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


def model_captions(model_name: str, num_samples: int) -> list[tuple]:
    """An embedded captioned model's evaluation prompts, ``num_samples`` of them: (caption, digit, held_out) for the
    text-to-image models (:func:`l2c_export.demo.t2i.evaluation_prompts`), (caption, digit, held_out, direction)
    for the text-to-video model (:func:`l2c_export.demo.t2v.evaluation_prompts`: every form, direction and digit)."""
    if model_name in TEXT_TO_VIDEO_MODELS:
        from ..demo.t2v import evaluation_prompts as clip_prompts

        return [(text, digit, held_out, direction) for text, digit, direction, held_out in clip_prompts(num_samples)]
    from ..demo.t2i import evaluation_prompts

    return evaluation_prompts(num_samples)


def _check_own_curve(spec, diffusers, schedule_file, router, int8) -> None:
    """The curve on a folder's own prompts takes an image model, one learned schedule (a router, decoded at each
    budget, or a schedule) and no int8 rows."""
    from ..core.interface import NCFHW

    if getattr(spec.family, "latent_layout", None) == NCFHW:
        raise CommandError(f"--diffusers {diffusers}: the budget curve compares decoded images; this is a video "
                           f"model ({spec.config.transformer_class}): give --budgets '' for the latents-only "
                           f"evaluation")
    if schedule_file is not None and router is not None:
        raise click.UsageError("the budget curve takes --router (decoded at each budget) or --schedule (at its own "
                               "MAC fraction), not both")
    if int8:
        raise click.BadParameter("the budget curve has no int8 rows", param_hint="--int8")


def prompts_text(prompts_file: Path) -> list[str]:
    """``--prompts FILE``'s lines, read as ``run --prompts`` reads them."""
    from .run import _read_prompts

    return _read_prompts((), prompts_file)


def _budget_curve(spec, router, mode, budgets, captions, seed, batch_size, search_size, repeats, random_seeds,
                  json_out, png_out, grid_out, markdown_out, threads, schedule=None, general_router=None) -> None:
    """``eval --model t2i-digits --budgets ...`` or ``eval --diffusers DIR --prompts FILE``: every method at every
    budget (:mod:`l2c_export.demo.curve`); the table on stdout, and the files asked for (``--png`` also writes
    ``<stem>-speed.png``, PSNR against seconds)."""
    from ..core.util import atomic_write_text
    from ..demo.curve import evaluate_curve, format_curve_table
    from ..demo.eval_plots import plot_curve, plot_curve_grid
    from ..demo.evaluate import write_json

    report = evaluate_curve(spec, router, budgets, captions, seed=seed, batch_size=batch_size,
                            search_size=search_size, repeats=repeats, random_seeds=tuple(range(random_seeds)),
                            mode=mode or (schedule.mode if schedule is not None else None) or "official",
                            schedule=schedule, general_router=general_router)
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
                   "or the text-to-image t2i-digits (a PixArt-α diffusers folder; settings of "
                   "l2c_export/demo/t2i.py), t2i-digits-sd3 (an SD3 folder; l2c_export/demo/t2i_sd3.py) or the "
                   "text-to-video t2v-digits (a Wan folder; l2c_export/demo/t2v.py).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the weights [engines/MODEL] (t2i-digits, t2v-digits: the diffusers folder).")
@click.option("--steps", type=POSITIVE, help="Training steps [the model.json's: 6000; t2i-digits: 3000 of the "
                                             "transformer, after a third as many of the VAE; t2i-digits-sd3: 5000 "
                                             "of the transformer on t2i-digits' VAE; t2v-digits: 1500 of the "
                                             "transformer in each of its five rounds, after as many of the VAE on "
                                             "frames and 400 on clips (N: N, N and 4N/15)].")
@click.option("--batch-size", type=POSITIVE, help="Images per step [the model.json's: DiT 128, U-ViT 64; t2i: 128; "
                                                  "t2v: 32 clips (the VAE half as many)].")
@click.option("--seed", type=SEED, default=0, show_default=True)
def train_default_command(model_name, out, steps, batch_size, seed):
    """Reproduce an embedded model's training on scikit-learn's digits (minutes on two CPU cores)."""
    out = out or Path("engines") / model_name
    if model_name in TEXT_TO_IMAGE_MODELS + TEXT_TO_VIDEO_MODELS:
        _train_text_to_image(model_name, out, steps, batch_size, seed)
        return
    from ..demo.train import save_weights, train

    spec = embedded_default(model_name)  # the shipped model.json: its config and training settings
    model = train(spec.config, steps=steps or spec.training["steps"],
                  batch_size=batch_size or spec.training["batch_size"], seed=seed)
    save_weights(model, out / f"{model_name}.safetensors")
    click.echo(f"wrote {out / f'{model_name}.safetensors'}")


def _train_text_to_image(model_name: str, out: Path, steps, batch_size, seed) -> None:
    """t2i-digits: the VAE, then the PixArt transformer; t2i-digits-sd3: the SD3 transformer on t2i-digits' VAE;
    t2v-digits: the Wan VAE, then the Wan transformer. The pipeline saved as a diffusers folder at ``out`` (written
    beside it, then moved into place: a failed run leaves no half-written folder)."""
    import dataclasses
    import shutil
    import tempfile

    from ..core.util import replace_folder

    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "model_index.json").is_file())):
        raise CommandError(f"--out {out}: exists and is not a diffusers folder; give an absent or empty folder, or "
                           f"a previous {model_name} folder to replace")
    if model_name == "t2v-digits":
        from ..demo.t2v import T2VConfig, save_t2v, train_t2v

        config, train, save, pipeline_class = T2VConfig(), train_t2v, save_t2v, "WanPipeline"
        if steps is not None:  # the VAE: as many steps on frames as the transformer's, 4/15 as many on clips
            config = dataclasses.replace(config, steps=steps, vae_frame_steps=steps, vae_steps=max(1, 4 * steps // 15))
        if batch_size is not None:
            config = dataclasses.replace(config, vae_batch_size=max(1, batch_size // 2))
        prompts = ("--num-frames 5 --image-size 16x16 --max-sequence-length 16 --conditioning-data prompts.npz, the "
                   "prompts from python -m l2c_export.demo.t2v prompts")
    elif model_name == "t2i-digits-sd3":
        from ..demo.t2i_sd3 import SD3Config, save_sd3, train_sd3

        config, train, save, pipeline_class = SD3Config(), train_sd3, save_sd3, "StableDiffusion3Pipeline"
        if steps is not None:
            config = dataclasses.replace(config, steps=steps)
        prompts = "--prompts prompts.txt (one caption a line)"
    else:
        from ..demo.t2i import T2IConfig, save_t2i, train_t2i

        config, train, save, pipeline_class = T2IConfig(), train_t2i, save_t2i, "PixArtAlphaPipeline"
        if steps is not None:  # the VAE trains for a third as many steps as the transformer (1000 of 3000)
            config = dataclasses.replace(config, steps=steps, vae_steps=max(1, steps // 3))
        prompts = "--conditioning-data prompts.npz, the prompts from python -m l2c_export.demo.t2i prompts"
    config = dataclasses.replace(config, batch_size=batch_size or config.batch_size)
    pipe = train(config, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save(pipe, staging, config)
        replace_folder(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    click.echo(f"wrote {out} (a {pipeline_class} folder; learn its router with l2c-export learn --diffusers {out} "
               f"{prompts})")
