"""How a text-encoder stack's outputs become the conditioning arrays a pipeline hands its transformer: the one rule
the folder check (:mod:`l2c_export.models.diffusers.text_encoders`), the manifest check (:mod:`.manifest`) and the
runtime (:mod:`l2c_export.runtime.components`) share (numpy only).

An array is declared as token groups, each a list of pieces ``"<encoder>/<output>"`` (an encoder's graph output, or
``attention_mask``: the mask its tokenizer made): the pieces of a group are concatenated on channels, every group is
zero-padded on channels to the last group's width, and the groups are concatenated on tokens. So
``StableDiffusion3Pipeline.encode_prompt``'s prompt_embeds, ``cat([pad(cat([clip_l[-2], clip_g[-2]], -1), t5 width),
t5], -2)``, is ``[["text_encoder/penultimate_hidden_state", "text_encoder_2/penultimate_hidden_state"],
["text_encoder_3/last_hidden_state"]]`` and its pooled_prompt_embeds ``[["text_encoder/pooled",
"text_encoder_2/pooled"]]``. A pooled (N, P) piece has no token axis: an
array of pooled pieces, one group, is (N, P).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

ATTENTION_MASK = "attention_mask"  # the piece that is a tokenizer's mask (N, L), 1 on tokens, not a graph output
# How prompts are rewritten before any tokenizer sees them: as they are (SD3, FLUX.1), or PixArt's
# ``_text_preprocessing(clean_caption=False)``: lower-cased and stripped.
PREPROCESSING = ("none", "lower_strip")

Groups = Sequence[Sequence[str]]


def split_piece(piece: str) -> tuple[str, str]:
    """``"text_encoder_2/pooled"`` -> ("text_encoder_2", "pooled")."""
    encoder, _, output = piece.partition("/")
    return encoder, output


def preprocess(text: str, kind: str) -> str:
    """A prompt as the pipeline rewrites it before tokenizing (:data:`PREPROCESSING`)."""
    return text.lower().strip() if kind == "lower_strip" else text


def combined_width(groups: Groups, widths: Mapping[str, int], where: str) -> int:
    """The channels of the array ``groups`` makes from pieces of ``widths`` (piece -> channels): the last group's
    width, which every other group is padded to. Raises ValueError (naming ``where``) where a group is wider than the
    last (the pipeline would crop it, not pad it)."""
    sums = [sum(widths[piece] for piece in group) for group in groups]
    for group, width in zip(groups, sums[:-1]):
        if width > sums[-1]:
            raise ValueError(f"{where}: {' + '.join(group)} is {width} channels wide, wider than "
                             f"{' + '.join(groups[-1])} ({sums[-1]}), which it is padded to")
    return sums[-1]


def combine(groups: Groups, values: Mapping[str, np.ndarray]) -> np.ndarray:
    """The array ``groups`` makes from ``values`` (piece -> (N, L, D), a pooled (N, P) or a mask (N, L)), float32:
    (N, sum of L, D of the last group) from hidden states; (N, P) from pooled pieces (one group); the masks
    concatenated on tokens."""
    made = [np.concatenate([np.asarray(values[piece]) for piece in group], axis=-1) for group in groups]
    if made[-1].ndim == 3:
        width = made[-1].shape[-1]
        made = [np.pad(m, ((0, 0), (0, 0), (0, width - m.shape[-1]))) for m in made]
    return np.concatenate(made, axis=1).astype(np.float32)
