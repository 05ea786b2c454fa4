"""Tiny random diffusers pipelines saved with ``save_pretrained``, and diffusers' own pipelines as the reference
(test-time only: the runtime never imports torch or diffusers).

:func:`save_tiny_pipeline` writes a ``DiTPipeline`` or a ``PixArtAlphaPipeline(tokenizer=None, text_encoder=None)``
with a DDIM or DPM-Solver++ multistep scheduler; :func:`schedule_hooks` makes a diffusers transformer follow a
schedule the way the paper defines it, with forward hooks on the named sub-modules that return their last computed
output at the calls the schedule skips.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch

SCHEDULERS = ("ddim", "dpm")
DIT_CONFIG = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                  sample_size=8, patch_size=2)
PIXART_CONFIG = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                     cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=12)
CAPTION_CHANNELS = PIXART_CONFIG["caption_channels"]


def _scheduler(kind: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if kind == "ddim":
        return DDIMScheduler()
    if kind == "dpm":
        return DPMSolverMultistepScheduler()
    raise ValueError(f"unknown scheduler {kind!r}; expected one of {SCHEDULERS}")


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8,), latent_channels=4, norm_num_groups=8, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))


def tiny_pipeline(family: str, scheduler: str = "ddim", seed: int = 0):
    """A tiny random ``DiTPipeline`` (``family`` "dit") or ``PixArtAlphaPipeline`` ("pixart"), fp32, eval."""
    from diffusers import DiTPipeline, DiTTransformer2DModel, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    if family == "dit":
        pipe = DiTPipeline(transformer=DiTTransformer2DModel(**DIT_CONFIG), vae=tiny_vae(),
                           scheduler=_scheduler(scheduler))
    elif family == "pixart":
        pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(),
                                   transformer=PixArtTransformer2DModel(**PIXART_CONFIG),
                                   scheduler=_scheduler(scheduler))
    else:
        raise ValueError(f"unknown family {family!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(folder: Path, family: str, scheduler: str = "ddim", seed: int = 0) -> Path:
    tiny_pipeline(family, scheduler, seed).save_pretrained(str(folder))
    return folder


def load_pipeline(folder: Path):
    """The saved pipeline, as diffusers loads it."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def schedule_hooks(transformer: torch.nn.Module, sublayers: Sequence[str], compute):
    """While active, call ``k`` of ``transformer`` computes sub-module ``sublayers[j]`` where ``compute[k][j]``; where
    not, the module's output is replaced by its most recent computed output (forward hooks, diffusers untouched).
    Yields the list of calls made so far."""
    calls: list[int] = [0]
    last: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name, column):
        def replace(module, args, output):
            call = calls[0]
            if compute[call][column]:
                last[name] = output
                return output
            return last[name]
        return replace

    def count(module, args, output):
        calls[0] += 1

    for column, name in enumerate(sublayers):
        handles.append(transformer.get_submodule(name).register_forward_hook(hook(name, column)))
    handles.append(transformer.register_forward_hook(count))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()
