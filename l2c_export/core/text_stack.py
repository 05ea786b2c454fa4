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

Before that, a decoder LLM's hidden states are cut to the tokens its pipeline keeps (:data:`SELECTIONS`,
:func:`select_tokens`): Sana's first token and last ``max_sequence_length - 1``; Qwen-Image's each prompt's own tokens
after its template's first 34, re-padded to the batch's longest.
"""

from __future__ import annotations

import html
import re
from typing import Mapping, Sequence

import numpy as np

ATTENTION_MASK = "attention_mask"  # the piece that is a tokenizer's mask (N, L), 1 on tokens, not a graph output
# How prompts are rewritten before any tokenizer sees them: as they are (SD3, FLUX.1), PixArt's
# ``_text_preprocessing(clean_caption=False)``: lower-cased and stripped, or WanPipeline's ``prompt_clean``
# (:func:`wan_prompt_clean`).
PREPROCESSING = ("none", "lower_strip", "wan_prompt_clean")

# WanPipeline's whitespace_clean runs the ``regex`` module's ``\s+``: Python's ``\s`` but for U+001C..U+001F, which
# str.isspace() counts and Unicode's White_Space does not.
_WAN_WHITESPACE = re.compile(r"[^\S\x1c-\x1f]+")
# A prompt ftfy.fix_text leaves as it is, whatever its version: printable ASCII, tabs and line breaks (ftfy's fixes
# act on other characters: mojibake, curly quotes, widths, ligatures, control characters, terminal escapes), with no
# HTML entity (ftfy unescapes one more time than the pipeline's two html.unescape calls).
_FTFY_UNCHANGED = re.compile(r"[\t\n\r\x20-\x7e]*")
_HTML_ENTITY = re.compile(r"&#?\w+;")

# Which encoder tokens a pipeline keeps (the hidden states' and the mask's token axis alike): "all" as tokenized (T5,
# CLIP); "first_and_last": the first ``count`` tokens and the last ``max_length - count`` (SanaPipeline.encode_prompt's
# select_index, count 1); "mask_rows": each row's tokens under its mask after its first ``count``, zero-padded under
# mask 0 to the batch's longest and at most ``max_length`` (QwenImagePipeline's _extract_masked_hidden, drop_idx 34,
# and encode_prompt's cut to max_sequence_length); "zeroed_past_prompt": all the tokens, each row's past its prompt's
# (the first mask.sum() tokens: padding on the right) zeroed (WanPipeline._get_t5_prompt_embeds).
SELECTIONS = ("all", "first_and_last", "mask_rows", "zeroed_past_prompt")

Groups = Sequence[Sequence[str]]


def split_piece(piece: str) -> tuple[str, str]:
    """``"text_encoder_2/pooled"`` -> ("text_encoder_2", "pooled")."""
    encoder, _, output = piece.partition("/")
    return encoder, output


def preprocess(text: str, kind: str, where: str = "prompt") -> str:
    """A prompt as the pipeline rewrites it before tokenizing (:data:`PREPROCESSING`); ``where`` names it in a
    refusal (:func:`wan_prompt_clean`)."""
    if kind == "wan_prompt_clean":
        return wan_prompt_clean(text, where)
    return text.lower().strip() if kind == "lower_strip" else text


def wan_prompt_clean(text: str, where: str = "prompt") -> str:
    """``WanPipeline``'s ``prompt_clean`` (diffusers 0.42): ``ftfy.fix_text`` where ftfy is installed, the HTML
    unescaped twice, stripped, every run of whitespace one space. Without ftfy (the pipeline skips it then, the
    original Wan code never does), a prompt ftfy could change is refused (ValueError naming ``where`` and the
    character), so that the text encoded is the pipeline's with ftfy or without."""
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    else:
        kept = _FTFY_UNCHANGED.match(text).end()
        entity = _HTML_ENTITY.search(text)
        if kept < len(text) or entity:
            what = (f"the HTML entity {entity.group()!r}" if kept == len(text)
                    else f"{text[kept]!r} (U+{ord(text[kept]):04X}) at character {kept + 1}")
            raise ValueError(f"{where}: {what}; WanPipeline cleans prompts with ftfy.fix_text, which is not "
                             f"installed here: install ftfy, or give printable ASCII without HTML entities")
    return _WAN_WHITESPACE.sub(" ", html.unescape(html.unescape(text)).strip()).strip()


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
    concatenated on tokens. C-ordered (a kept token selection can leave a mask Fortran-ordered, which ``.npz`` files
    then keep, and the C++ runtime refuses)."""
    made = [np.concatenate([np.asarray(values[piece]) for piece in group], axis=-1) for group in groups]
    if made[-1].ndim == 3:
        width = made[-1].shape[-1]
        made = [np.pad(m, ((0, 0), (0, 0), (0, width - m.shape[-1]))) for m in made]
    return np.ascontiguousarray(np.concatenate(made, axis=1), dtype=np.float32)


def select_tokens(values: Mapping[str, np.ndarray], mask: np.ndarray, selection: str, count: int,
                  max_length: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The tokens a pipeline keeps (:data:`SELECTIONS`) of an encoder's outputs with a token axis ``values`` (name ->
    (n, L, D)) and of its tokenizer's ``mask`` (n, L), 1 on tokens: (the outputs (n, L', D), the mask (n, L'))."""
    if selection == "all":
        return dict(values), mask
    if selection == "zeroed_past_prompt":
        kept = (np.arange(mask.shape[1]) < mask.sum(axis=1, keepdims=True))[..., None]
        return {name: np.where(kept, value, np.zeros((), value.dtype)) for name, value in values.items()}, mask
    if selection == "first_and_last":
        index = np.r_[np.arange(count), np.arange(mask.shape[1] - (max_length - count), mask.shape[1])]
        return {name: value[:, index] for name, value in values.items()}, mask[:, index]
    rows = [np.flatnonzero(row)[count:count + max_length] for row in mask]
    length = max(len(row) for row in rows)
    kept = np.zeros((len(rows), length), dtype=mask.dtype)
    selected = {}
    for name, value in values.items():
        out = np.zeros((len(rows), length, value.shape[-1]), dtype=value.dtype)
        for i, row in enumerate(rows):
            out[i, :len(row)] = value[i, row]
        selected[name] = out
    for i, row in enumerate(rows):
        kept[i, :len(row)] = 1
    return selected, kept
