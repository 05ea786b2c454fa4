"""``l2c-export run``, ``verify`` and ``bench``: sampling from a build, checking it, measuring it."""

from __future__ import annotations

from pathlib import Path

import click

from . import CFG_SCALE, EXIT_CHECK_FAILED, POSITIVE, SEED, CommandError, Finite, main
from .options import (FLAG_NAMES, backend_options, load_noise, parse_labels, save_npy, threads_option, threads_used,
                      use_threads)

# --prompts: every prompt's sample is held until the run ends (--save-latents writes them as one array), so a run takes
# at most this many; and the file is read whole, so it is bounded first: this many prompts of 670 bytes.
MAX_PROMPTS = 100_000
MAX_PROMPTS_FILE_BYTES = 64 * 2**20


@main.command()
@click.argument("engine_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--labels", help="Comma-separated class labels of a label model [0,1,...,9].")
@click.option("--conditioning", "conditioning_file", type=click.Path(dir_okay=False, path_type=Path),
              help="A text model's conditioning: an .npz of prompt_embeds (n, L, D), prompt_attention_mask (n, L) and, "
                   "for guidance, negative_prompt_embeds and negative_prompt_attention_mask (the pipeline's "
                   "argument names).")
@click.option("--prompt", "prompts", multiple=True,
              help="A text model whose build has a text encoder: a prompt (repeat for several, one image each).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path),
              help=f"A UTF-8 file of prompts, one a line (blank lines skipped; at most {MAX_PROMPTS} prompts and "
                   f"{MAX_PROMPTS_FILE_BYTES // 2**20} MiB), sampled --batch-size at a time.")
@click.option("--negative-prompt", help="With --prompt/--prompts, when guiding: the unconditional half's text "
                                        "(default: \"\", as the PixArt pipelines).")
@click.option("--batch-size", type=POSITIVE, help="Images encoded, sampled and decoded at once (default: the build's "
                                                  "largest model batch, build --batch, halved when guiding); each "
                                                  "sample's noise is its own whatever the batch size, so the samples "
                                                  "are the same up to the engines' rounding.")
@click.option("--cfg-scale", type=CFG_SCALE, help="Guidance scale (default: the manifest's).")
@click.option("--cfg-scale-2", type=CFG_SCALE,
              help="A build of two experts (Wan2.2): the second's guidance scale, the pipeline's guidance_scale_2 "
                   "(default: --cfg-scale's).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the initial (and DDPM) noise.")
@click.option("--noise", "noise_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Initial noise (the pipeline's latents) .npy of shape (n samples, C, H, W), float32; guidance "
                   "duplicates it.")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt", "torch"]), default="onnxruntime",
              show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="onnxruntime: provider; torch: device.")
@click.option("--full", is_flag=True, help="Run the full-compute engine at every step instead of the schedule.")
@click.option("--compare-full", is_flag=True,
              help="Also time full compute against the schedule on the same request: after a warm-up run of each, "
                   "--repeats interleaved pairs; prints the medians and their spread.")
@click.option("--repeats", type=POSITIVE, default=3, show_default=True,
              help="With --compare-full: the timed (full, schedule) pairs.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="PNG grid (pixel models; latent models through the build's VAE decoder, or --vae); a video "
                   "model's clips: .gif or .webp (animated), or .mp4 (H.264, as diffusers' export_to_video; several "
                   "clips side by side).")
@click.option("--save-latents", type=click.Path(dir_okay=False, path_type=Path), help="Save the samples (.npy).")
@click.option("--vae", type=click.Path(file_okay=False, path_type=Path),
              help="The authors' latent models: a local diffusers AutoencoderKL folder to decode latents with torch "
                   "(scale 0.18215). A diffusers build decodes with its own VAE decoder graph.")
@threads_option
def run(engine_dir, labels, conditioning_file, prompts, prompts_file, negative_prompt, batch_size, cfg_scale,
        cfg_scale_2, seed, noise_file, backend, device, full, compare_full, repeats, out, save_latents, vae, threads):
    """Sample from a build: each step runs on its subset engine, cached activations fed between them."""
    from ..core.images import CLIP_FORMATS
    from ..core.interface import NCFHW
    from ..runtime.components import refuse_unused_negative_prompt
    from ..runtime.conditioning import load_conditioning, takes_labels
    from ..runtime.pipeline import L2CPipeline

    given = [flag for flag, value in (("--labels", labels), ("--conditioning", conditioning_file),
                                      ("--prompt", prompts), ("--prompts", prompts_file)) if value]
    if len(given) > 1:
        raise click.UsageError(f"give one of --labels, --conditioning, --prompt and --prompts; got {', '.join(given)}")
    if negative_prompt is not None and not (prompts or prompts_file):  # before loading; the pipeline checks the rest
        refuse_unused_negative_prompt(True, False, conditioning_file is not None, FLAG_NAMES)
    prompt_list = _read_prompts(prompts, prompts_file) if prompts or prompts_file else None
    conditioning = None if conditioning_file is None else load_conditioning(conditioning_file)
    noise = None if noise_file is None else load_noise(noise_file)
    choice = use_threads(threads, torch=backend == "torch")
    options = backend_options(device, backend)
    if backend == "onnxruntime":
        options["threads"] = choice.threads
    pipe = L2CPipeline.from_engine_dir(engine_dir, backend=backend, **options)
    if conditioning is None and labels is None and prompt_list is None and \
            takes_labels(pipe.manifest):
        labels = "0,1,2,3,4,5,6,7,8,9"
    label_list = None if labels is None else parse_labels(labels)
    request = {"labels": label_list, "conditioning": conditioning, "batch_size": batch_size, "names": FLAG_NAMES}
    if prompt_list is not None:
        request.update(prompt=prompt_list, negative_prompt=negative_prompt)
    where = f"--conditioning {conditioning_file or ''}".rstrip()
    threads_run = getattr(pipe.backend, "threads", None)  # torch's, or ONNX Runtime's pool (TensorRT: None)
    click.echo(f"{engine_dir}: {pipe.manifest['name']}, {len(pipe.manifest['subsets'])} subset engine(s), "
               f"{pipe.sampler.num_calls} {pipe.sampler.kind} model calls, backend {backend} on "
               f"{', '.join(pipe.providers)}" + ("" if threads_run is None else f", {threads_run} thread(s)"))
    latent = pipe.manifest["model"]["space"] == "latent"
    if vae is not None and pipe.decoder is not None:
        raise click.UsageError(f"--vae: the build {engine_dir} decodes with its own VAE decoder graph; leave --vae out")
    if latent and out is not None and vae is None and pipe.decoder is None:
        raise click.UsageError(f"--out needs --vae for a latent build without a VAE decoder graph ({engine_dir}; a "
                               f"diffusers folder with vae/ builds one), or use --save-latents")
    if out is not None and pipe.manifest["model"].get("latent_layout") == NCFHW \
            and out.suffix.lower() not in CLIP_FORMATS:
        raise click.BadParameter(f"{out}: a clip is written as {', '.join(CLIP_FORMATS)} (an animated image, or "
                                 f"H.264 video as diffusers' export_to_video writes it)", param_hint="--out")
    if out is not None and pipe.manifest["model"].get("latent_layout") != NCFHW and out.suffix.lower() != ".png":
        raise click.BadParameter(f"{out}: images are written as one .png grid; name the file .png",
                                 param_hint="--out")
    result = pipe(**request, cfg_scale=cfg_scale, cfg_scale_2=cfg_scale_2, seed=seed, noise=noise, full=full,
                  progress=True, where=where)
    what = "full compute" if full else "L2C schedule"
    click.echo(f"{what}: {result.seconds:.3f} s for {len(result.samples)} sample(s) "
               f"({100 * result.overhead_fraction:.1f}% outside the engines)")
    if compare_full and not full:
        import functools

        from ..tools.bench import WARMUP_RUNS, interleaved_runs, timing_summary

        timed = functools.partial(pipe, **request, cfg_scale=cfg_scale, cfg_scale_2=cfg_scale_2, seed=seed,
                                  noise=noise)
        (full_s, full_low, full_high), (l2c_s, l2c_low, l2c_high), (_, low, high) = timing_summary(
            *interleaved_runs([functools.partial(timed, full=True), timed], repeats))
        click.echo(f"full compute: {full_s:.3f} s [{full_low:.3f}-{full_high:.3f}]; L2C schedule: {l2c_s:.3f} s "
                   f"[{l2c_low:.3f}-{l2c_high:.3f}]; speedup {full_s / l2c_s:.2f}x [{low:.2f}-{high:.2f}] "
                   f"(ideal {pipe.manifest['macs']['ideal_speedup']:.2f}x): medians [min-max] of {repeats} "
                   f"interleaved run(s) of each after {WARMUP_RUNS} warm-up run(s)")
    if save_latents:
        save_npy(save_latents, result.samples)
        click.echo(f"wrote {save_latents}")
    if out is not None:
        from ..core.images import save_clip, save_grid

        samples, scale = result.samples, 8
        if latent and vae is not None:
            from ..models.vae import decode_latents

            samples = decode_latents(vae, samples, pipe.manifest["model"]["latent_scale"])
        elif latent:
            samples = pipe.decoder(samples)
            scale = max(1, 64 // samples.shape[-1])  # the VAE's images are the model's size; tiny ones are enlarged
        if samples.ndim == 5:  # a video model's clips (n, 3, F, H, W)
            save_clip(samples, out, columns=min(len(samples), 10), scale=scale)
        else:
            save_grid(samples, out, columns=min(len(samples), 10), scale=scale)
        click.echo(f"wrote {out}")


def _read_prompts(prompts: tuple[str, ...], prompts_file: Path | None) -> list[str]:
    """``--prompt`` texts, or ``--prompts FILE``'s lines (UTF-8, blank lines skipped), each checked; a file is
    bounded in bytes before it is read and in prompts before they are decoded."""
    from ..runtime.components import check_prompt

    if prompts_file is None:
        return [check_prompt(text, f"--prompt {text[:40]!r}{'...' if len(text) > 40 else ''}") for text in prompts]
    try:
        size = prompts_file.stat().st_size
    except FileNotFoundError:
        raise CommandError(f"--prompts {prompts_file}: no such file") from None
    if size > MAX_PROMPTS_FILE_BYTES:
        raise CommandError(f"--prompts {prompts_file}: {size} bytes; expected at most {MAX_PROMPTS_FILE_BYTES} (the "
                           f"file is read whole: {MAX_PROMPTS} prompts of {MAX_PROMPTS_FILE_BYTES // MAX_PROMPTS} "
                           f"bytes; split it)")
    with open(prompts_file, "rb") as file:
        data = file.read(MAX_PROMPTS_FILE_BYTES + 1)  # the file may have grown since
    if len(data) > MAX_PROMPTS_FILE_BYTES:
        raise CommandError(f"--prompts {prompts_file}: over {MAX_PROMPTS_FILE_BYTES} bytes; expected at most "
                           f"{MAX_PROMPTS_FILE_BYTES} (split the file)")
    lines = data.split(b"\n")
    count = sum(1 for line in lines if line.strip())
    if count > MAX_PROMPTS:
        raise CommandError(f"--prompts {prompts_file}: {count} prompts; expected at most {MAX_PROMPTS} (every sample "
                           f"is held until the run ends; split the file)")
    texts = [check_prompt(line.rstrip(b"\r"), f"--prompts {prompts_file} line {number}")
             for number, line in enumerate(lines, 1) if line.strip()]
    if not texts:
        raise CommandError(f"--prompts {prompts_file}: no prompts; expected one a line")
    return texts


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
@click.option("--diffusers", type=click.Path(file_okay=False, path_type=Path),
              help="The diffusers folder the build came from: compare with its transformer as diffusers saved it "
                   "(checked to be the build's by its weights' sha256).")
def verify(engine_dir, backend, device, tolerance, reference, diffusers):
    """Check every subset engine against the PyTorch cached forward on the same inputs."""
    from ..core.manifest import load as load_manifest
    from ..tools.verify import verify_build

    if reference is not None and diffusers is not None:
        raise click.UsageError("give --reference or --diffusers, not both")
    checks, providers = verify_build(engine_dir, backend=backend, tolerance=tolerance, reference=reference,
                                     diffusers=diffusers, **backend_options(device, backend))
    weights = (f"the fp32 weights of {reference}" if reference else f"the transformer of {diffusers}" if diffusers
               else "its weights dequantized" if "quantization" in load_manifest(engine_dir, verify_files=False)
               else "its weights")
    click.echo(f"{engine_dir}: {backend} on {', '.join(providers)} against PyTorch (fp32, {weights})")
    for check in checks:
        worst_output = max(check.worst, key=check.worst.get)
        click.echo(f"  {'ok  ' if check.passed else 'FAIL'} {check.name:<24} step {check.step:>3}  worst "
                   f"{check.worst_value:.2e} ({worst_output})  tolerance {check.tolerance:.0e}")
    components = []
    if diffusers is not None:  # the text encoder and VAE decoder graphs against the folder's own modules
        from ..tools.verify import verify_components

        components = verify_components(engine_dir, diffusers)
        for check in components:
            click.echo(f"  {'ok  ' if check.passed else 'FAIL'} {check.name:<24} (component)  worst "
                       f"{check.worst_value:.2e}  tolerance {check.tolerance:.0e}")
    failed = [c.name for c in (*checks, *components) if not c.passed]
    if failed:
        raise CommandError(f"{len(failed)} subset(s) differ from PyTorch beyond tolerance: {', '.join(failed)}",
                           EXIT_CHECK_FAILED)
    click.echo(f"all {len(checks)} subset engine(s) agree with PyTorch"
               + (f"; component(s) {', '.join(c.name for c in components)} agree with the folder's" if components
                  else ""))


@main.command()
@click.argument("engine_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--batch", type=POSITIVE, default=2, show_default=True, help="Images per request (x2 with guidance).")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["onnxruntime", "tensorrt", "torch"]),
              help="Backends to measure (repeatable; default: onnxruntime and torch).")
@click.option("--repeats", type=POSITIVE, default=5, show_default=True, help="Interleaved (full, schedule) pairs.")
@click.option("--no-memory", is_flag=True, help="Skip the memory measurements (subprocesses).")
@click.option("--prompt-tokens", type=click.IntRange(1, 4096),
              help="Text models: the requests' prompt length (random embeddings) [each build's length that its MACs "
                   "and ideal speedup are counted at: manifest macs/prompt_tokens, Wan's 512, PixArt-α's 120].")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the results.")
@click.option("--png", "png_out", type=click.Path(dir_okay=False, path_type=Path),
              help="Plot achieved against ideal speedup.")
@threads_option
def bench(engine_dirs, batch, backends, repeats, no_memory, prompt_tokens, json_out, png_out, threads):
    """Full compute against the schedule, interleaved: speedup vs ideal, step overhead, memory.

    All ENGINE_DIRS are measured in one interleaved loop per backend: `bench DIR_FP32 DIR_INT8` gives the int8 rows'
    speedups against the fp32 full compute of the same run. The torch backend skips int8 builds (it would run their
    dequantized weights in fp32)."""
    from ..core.manifest import load as load_manifest
    from ..tools.bench import WARMUP_RUNS, benchmark_together, machine_description, plot, table, write_results

    choice = use_threads(threads, torch=True)
    results = []
    for backend in backends or ("onnxruntime", "torch"):
        folders = [f for f in engine_dirs
                   if backend != "torch" or load_manifest(f, verify_files=False)["precision"] != "int8"]
        if folders:
            click.echo(f"benchmarking {', '.join(map(str, folders))} on {backend} ...")
            results += benchmark_together(folders, backend, batch=batch, repeats=repeats,
                                          measure_memory=not no_memory, threads=choice.threads,
                                          prompt_tokens=prompt_tokens)
    click.echo(table(results))
    click.echo(f"medians of {repeats} interleaved (full, schedule) pair(s) after {WARMUP_RUNS} warm-up run(s) of each; "
               f"spread: the lowest and highest speedup of a pair; {choice.threads} thread(s)"
               + (f"; load average {choice.load_average:.2f} on {choice.cores} core(s) at the start"
                  if choice.load_average is not None else ""))
    if json_out:
        write_results(results, json_out, {**machine_description(), **threads_used(choice)})
        click.echo(f"wrote {json_out}")
    if png_out:
        plot(results, png_out)
        click.echo(f"wrote {png_out}")
