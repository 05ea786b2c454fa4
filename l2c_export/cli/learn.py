"""``l2c-export learn``: router learning."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from ..core.schedule import SCHEDULE_MODES
from ..samplers import SAMPLER_KINDS
from . import CFG_SCALE, MAC_FRACTION, POSITIVE, SEED, STEPS, THRESHOLD, Finite, main
from .options import FLAG_NAMES, model_options, resolve_model, threads_option, use_threads


@main.command()
@model_options
@click.option("--model-config", type=click.Path(dir_okay=False, path_type=Path),
              help="A config JSON for a --checkpoint of any architecture: the family's config fields (DiTConfig, "
                   "UViTConfig) and \"family\" (dit, the default, or uvit).")
@click.option("--data", "data_arg",
              help="A folder of images (class subfolders), a .npy of latents (n, C, H, W), 'digits' or 'none' "
                   "(trajectories sampled from the model: the teacher needs no data). Default: digits for the "
                   "embedded pixel-space models, none for a checkpoint or a latent model.")
@click.option("--data-labels", type=click.Path(dir_okay=False, path_type=Path),
              help="Labels (n,) .npy for --data latents; default: random classes.")
@click.option("--trajectories", type=POSITIVE, default=256, show_default=True,
              help="With --data none: trajectories sampled from the model to learn on.")
@click.option("--conditioning-data", type=click.Path(dir_okay=False, path_type=Path),
              help="A text model's prompts to learn on: an .npz of prompt_embeds (P, L, D), prompt_attention_mask "
                   "(P, L) and, for guidance, negative_prompt_embeds and negative_prompt_attention_mask (the "
                   "pipeline's argument names); each trajectory takes one at random.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Instead of --conditioning-data, a --diffusers text model's prompts to learn on: a UTF-8 file, "
                   "one a line (blank lines skipped), encoded by the folder's own text encoder at its pipeline's "
                   "settings (the negative prompt: the empty one).")
@click.option("--mode", type=click.Choice(SCHEDULE_MODES), default="official", show_default=True,
              help="official: only the calls where the authors' sampler consults its router reuse (DDIM: every "
                   "other step; DPM-Solver-2S: each step's first call); general: any call may reuse.")
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
@threads_option
def learn(diffusers, checkpoint, model_name, image_size, num_frames, num_classes, model_config, data_arg, data_labels,
          trajectories, conditioning_data, prompts_file, mode, sampler_kind, steps, iterations, batch_size, lr, l1,
          cfg_scale, window, steps_per_iteration, init_std, seed, out, save_every, resume, threshold, target_mac_fraction,
          json_out, threads):
    """Learn router logits (L2C): teacher = full model, student = soft-routed cache, loss = MSE + lambda * sum(w).

    Runs under torchrun for data-parallel learning (gloo on CPU):
    python -m torch.distributed.run --standalone --nproc_per_node 2 -m l2c_export.cli learn ...
    """
    import torch

    from ..learn.data import NoisedData, load_image_folder, load_latents, sample_trajectories, with_random_labels
    from ..learn.distributed import init_distributed
    from ..learn.files import router_metadata, write_router
    from ..learn.learner import learn_router
    from ..learn.settings import LearnSettings

    if out.suffix != ".safetensors":
        raise click.BadParameter(f"{out}: the router is written as .safetensors", param_hint="--out")
    if json_out and threshold is None and target_mac_fraction is None:
        raise click.UsageError("--json needs --threshold or --target-mac-fraction")
    spec = _learn_model_spec(checkpoint, model_name, image_size, num_classes, model_config, diffusers, num_frames)
    sampler = spec.sampler(sampler_kind, steps)
    settings = LearnSettings(mode=mode, iterations=iterations, batch_size=batch_size, lr=lr, l1=l1,
                             cfg_scale=spec.cfg_scale if cfg_scale is None else cfg_scale, window=window,
                             steps_per_iteration=steps_per_iteration, init_std=init_std, seed=seed)
    dist_info = init_distributed()
    use_threads(threads, torch=True, warn=dist_info.is_main)  # each process's threads; one warning
    echo = click.echo if dist_info.is_main else (lambda *args, **kwargs: None)
    model = spec.load_model()
    config, family = spec.config, spec.family
    sample_shape = next(tensor.shape for tensor in family.graph_inputs(config) if tensor.role == "sample")
    num_labels = family.null_class(config)
    data_arg = data_arg or ("digits" if checkpoint is None and spec.space == "pixel" else "none")
    classifier_free = family.classifier_free
    prompts = _learning_prompts(spec, conditioning_data, classifier_free and settings.cfg_scale > 1.0, data_arg,
                                settings.cfg_scale, prompts_file)
    if not classifier_free:  # a guidance-distilled model: the scale rides in its guidance input; no negative batch
        settings = dataclasses.replace(settings, cfg_scale=1.0)
    if data_arg == "none":
        source = sample_trajectories(model, sampler, trajectories, settings.cfg_scale, seed,
                                     progress=dist_info.is_main, prompts=prompts)
    elif data_arg == "digits":
        from ..demo.train import digits_dataset

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
    echo(f"learning {len(spec.sublayer_names)} x {sampler.num_calls} router logits ({mode} mode, "
         f"{sampler.kind}) on {source.description}, {dist_info.world_size} process(es) of "
         f"{torch.get_num_threads()} thread(s)")
    state_path = out.with_name(out.name[: -len(".safetensors")] + ".state.safetensors")
    computed_calls = ()
    if spec.experts is not None:  # each expert's first call computes everything (its cache is empty)
        step_expert = spec.experts.step_expert(sampler)
        computed_calls = tuple(sorted({step_expert.index(expert) for expert in step_expert}))
        echo(f"{len(spec.experts.models)} experts ({', '.join(m.name for m in spec.experts.models)}): calls "
             f"{', '.join(map(str, computed_calls))} start one and compute everything")
    result = learn_router(model, sampler, source, settings, state_path=state_path, resume=resume,
                          save_every=save_every, progress=dist_info.is_main, source_name=source.description,
                          computed_calls=computed_calls)
    if dist_info.world_size > 1:
        import torch.distributed

        torch.distributed.destroy_process_group()
    if not dist_info.is_main:
        return
    official_model = model_name if checkpoint is not None and model_config is None else None
    write_router(result.router, out, router_metadata(spec.name, sampler, settings, source.description,
                                                     result.seconds, official_model,
                                                     image_size if official_model else None,
                                                     num_classes if official_model else None,
                                                     result.router.sublayers))
    last = result.history[-1] if result.history else {}
    echo(f"learned in {result.seconds:.1f} s" + (f" (last mse {last['mse']:.3g})" if last else ""))
    echo(f"wrote {out}")
    if threshold is not None or target_mac_fraction is not None:
        from ..routers.baselines import schedule_for_mac_fraction

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


def _learning_prompts(spec, conditioning_data, guiding: bool, data_arg: str, guidance_scale: float,
                      prompts_file: Path | None = None):
    """A text model's prompts to learn on (``--conditioning-data`` arrays, or ``--prompts`` texts encoded by the
    folder's text encoder), as a :class:`Condition` (a guidance-distilled model's guidance input fed
    ``guidance_scale``); None for a label model (which refuses the flags)."""
    from ..core.interface import conditioning_records, label_record
    from ..learn.live import prompt_condition
    from ..runtime.conditioning import load_conditioning

    given = "--prompts" if prompts_file is not None else "--conditioning-data"
    if conditioning_data is not None and prompts_file is not None:
        raise click.UsageError("give --conditioning-data or --prompts, not both")
    records = conditioning_records([tensor.record() for tensor in spec.family.graph_inputs(spec.config)])
    if label_record(records) is not None:
        if conditioning_data is not None or prompts_file is not None:
            raise click.BadParameter("this model is conditioned on class labels; prompts do not apply",
                                     param_hint=given)
        return None
    if conditioning_data is None and prompts_file is None:
        raise click.UsageError("a text model learns on prompts: give --conditioning-data prompts.npz or --prompts "
                               "prompts.txt (one a line)")
    if data_arg != "none":
        raise click.BadParameter(f"a text model learns on its own trajectories over {given}; use --data none",
                                 param_hint="--data")
    if prompts_file is not None:
        where = f"--prompts {prompts_file}"
        arrays = encoded_prompts(spec, prompts_file, guiding)
    else:
        where = f"--conditioning-data {conditioning_data}"
        arrays = load_conditioning(conditioning_data, where)
    return prompt_condition(spec.family, spec.config, arrays, guiding, guidance_scale, spec.max_prompt_tokens, where,
                            FLAG_NAMES)


def encoded_prompts(spec, prompts_file: Path, guiding: bool) -> dict:
    """``--prompts FILE``'s lines (read and capped as ``run --prompts`` reads them) encoded by the --diffusers
    folder's own tokenizer and text encoder (its pipeline's ``encode_prompt``): arrays by the pipeline's argument
    names."""
    from ..learn.live import encode_prompts, folder_text_pipeline
    from .run import _read_prompts

    texts = _read_prompts((), prompts_file)
    folder = Path(spec.weights).parent
    pipe = folder_text_pipeline(folder, f"--prompts {prompts_file}")
    return encode_prompts(pipe, texts, guiding, where=f"--prompts {prompts_file}")


def _learn_model_spec(checkpoint, model_name, image_size, num_classes, model_config, diffusers=None,
                      num_frames=None):
    """The model of the flags, or with --model-config a checkpoint of any architecture of a family: the config JSON
    holds the family's config fields and ``family`` (default ``dit``)."""
    from ..core.util import read_json
    from ..models import get_family, zoo

    if model_config is None:
        return resolve_model(checkpoint, model_name, image_size, num_classes, diffusers, num_frames=num_frames)
    if diffusers is not None:
        raise click.UsageError("--model-config describes a --checkpoint; a diffusers folder has its own config")
    if checkpoint is None:
        raise click.UsageError("--model-config describes a --checkpoint; give both")
    try:
        fields = dict(read_json(Path(model_config), ValueError))
        family = get_family(str(fields.pop("family", "dit")))
        config = family.config_from_dict(fields)
    except (ValueError, TypeError, KeyError) as error:
        raise click.BadParameter(f"{model_config}: {error}", param_hint="--model-config") from None
    channels = next(spec.shape[0] for spec in family.graph_inputs(config) if spec.role == "sample")
    return zoo.ModelSpec(name=Path(checkpoint).stem, config=config, weights=Path(checkpoint),
                         space="pixel" if channels in (1, 3) else "latent", cfg_scale=1.0)
