"""What the MMDiTs (SD3 and FLUX.1) share, defined once: their text conditioning (``prompt_embeds`` and
``pooled_prompt_embeds``, and the ``negative_`` partners where the pipeline guides with a second half), the caching of
joint attention's two streams, and the family base that packs it.

Joint attention returns (image output (N, T, D), text output (N, L, D)); its cached value is both, (N, T + L, D),
the image's T tokens first, split back where reused. A block that is ``context_pre_only`` (SD3's last) never reads
its attention's text output, so only (N, T, D) is cached there (its blocks declare that span :data:`IMAGE`).
"""

from __future__ import annotations

from dataclasses import replace

from ...core.interface import POOLED, TOKEN_EMBEDDINGS
from .cache import OutputPacking
from .declaration import IMAGE, Conditioning
from .family import DiffusersConfig, DiffusersFamily

# The transformer's prompt tokens (N, L, joint_attention_dim) and pooled text vector (N, pooled_projection_dim), each
# guided against its negative_ partner (StableDiffusion3Pipeline's arguments; FluxPipeline takes no partners).
TEXT_CONDITIONING = (
    Conditioning(argument="prompt_embeds", input="encoder_hidden_states", kind=TOKEN_EMBEDDINGS,
                 width="joint_attention_dim", negative="negative_prompt_embeds"),
    Conditioning(argument="pooled_prompt_embeds", input="pooled_projections", kind=POOLED,
                 width="pooled_projection_dim", negative="negative_pooled_prompt_embeds"),
)


def without_negatives(conditioning: tuple[Conditioning, ...]) -> tuple[Conditioning, ...]:
    """The same inputs with no unconditional partners (a pipeline that runs no second half)."""
    return tuple(replace(c, negative=None) for c in conditioning)


class JointAttentionPacking(OutputPacking):
    """Joint attention's (image, text) outputs cached as one (N, T + L, D), split at the image stream's token count T
    (the ``hidden_states`` it was called with). ``image_only``: the text output is never read; only (N, T, D) is
    cached and None stands for the text part."""

    def __init__(self, image_only: bool = False):
        self.image_only = image_only

    def pack(self, output, args, kwargs):
        import torch

        image, text = output
        return image if self.image_only else torch.cat([image, text], dim=1)

    def unpack(self, value, args, kwargs):
        if self.image_only:
            return value, None
        tokens = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[1]
        return value[:, :tokens], value[:, tokens:]


class MMDiTFamily(DiffusersFamily):
    """A diffusers MMDiT: the double-stream blocks' joint attention (``transformer_blocks.{i}.attn``) is cached with
    :class:`JointAttentionPacking`, image-only where its block declares the span :data:`IMAGE`."""

    double_stream = "transformer_blocks"

    def output_packing(self, transformer, config: DiffusersConfig, path: str) -> OutputPacking | None:
        blocks = next(b for b in self.declaration.blocks if path.startswith(f"{b.path}."))
        if blocks.path == self.double_stream and path.endswith(".attn"):
            block = int(path[len(blocks.path) + 1:].split(".")[0])
            return JointAttentionPacking(image_only=blocks.span(config, block, "attn") == IMAGE)
        return None
