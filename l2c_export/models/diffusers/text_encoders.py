"""Text-encoder stacks as data: the tokenizer + encoder pairs a pipeline runs on a prompt, and how their outputs become
the conditioning arrays it hands the transformer.

A family's declaration names one :class:`TextEncoderStack` (``text_encoders``,
:class:`~.declaration.Declaration`): PixArt's T5 (its last hidden state and the
tokenizer's mask, prompts lower-cased and stripped); SD3's CLIP-L + CLIP-G (each its pooled output and penultimate
hidden state, 77 tokens) + T5 (``max_sequence_length`` tokens); FLUX.1's CLIP-L (pooled) + T5. Each encoder is one
folder part (``text_encoder``, ``text_encoder_2``, ...) with its tokenizer part, of a kind (:data:`ENCODER_KINDS`),
and becomes one ONNX graph of the outputs the stack reads (:mod:`l2c_export.builder.components`). The arrays are
made from those outputs by :mod:`l2c_export.core.text_stack`'s rule, recorded in the manifest's
``components/prompt_encoding`` (:meth:`TextEncoderStack.record`), which is all the runtime reads.

:func:`read_text_encoders` finds and checks a folder's stack: every pair's classes, sizes, weights and tokenizer, and
the widths the arrays come out at against the transformer's inputs. A folder with none of the stack's encoders builds
without them and takes embeddings; one with only some of them too (the pipelines would run the missing ones as zeros
or not at all: that is not reproduced).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ...core.text_stack import ATTENTION_MASK, PREPROCESSING, SELECTIONS, combined_width, split_piece
from ...core.util import short_repr
from .files import check_tokenizer, safetensors_weights
from .sizes import (CLIP_TEXT_SIZES, GEMMA2_SIZES, QWEN2_5_VL_TEXT_SIZES, TEXT_ENCODER_SIZES, Size, check_sizes,
                    is_integer)

# Where an encoder's token length comes from: the build's --max-sequence-length (the pipelines' argument), or the
# pipelines' ``tokenizer_max_length``: the first tokenizer's ``model_max_length`` (CLIP's 77).
MAX_SEQUENCE_LENGTH = "max_sequence_length"
TOKENIZER_MAX_LENGTH = "tokenizer_max_length"
DEFAULT_TOKENIZER_MAX_LENGTH = 77  # the pipelines' tokenizer_max_length where the folder has no tokenizer
# --max-sequence-length's range: StableDiffusion3Pipeline and FluxPipeline refuse more than 512 (T5's trained length)
SEQUENCE_LENGTHS = (1, 512)


@dataclass(frozen=True)
class EncoderKind:
    """A text encoder class family: the ``architectures`` its ``config.json`` may name, the outputs its graph can
    give, the config fields of its width and depth, and its integer fields' bounds. ``config_section``: the config's
    nested object its text fields are read from, over the top level (Qwen2.5-VL's ``text_config``); ``module``: the
    submodule whose ``last_hidden_state`` the graph is made of (Qwen2.5-VL's language model: its hidden_states[-1],
    the vision tower and the logits left out); ``eager``: loaded with eager attention for the export (the attention
    the exporter traces exactly)."""

    classes: tuple[str, ...]
    outputs: tuple[str, ...]
    width: str
    layers: str
    sizes: Mapping[str, Size]
    config_section: str | None = None
    module: str | None = None
    eager: bool = False

    def text_config(self, raw: Mapping) -> dict:
        """The config's text fields: its ``config_section`` over the top level (a config saved with the fields at
        the top, as transformers 4 saved Qwen2.5-VL's, reads as well)."""
        section = raw.get(self.config_section) if self.config_section else None
        return {**raw, **section} if isinstance(section, dict) else dict(raw)

    def width_field(self, output: str, config: Mapping) -> str:
        """The config field of ``output``'s channels: a pooled output's is the projection's
        (``CLIPTextModelWithProjection``) or the hidden width; hidden states' the hidden width."""
        if output == "pooled" and config.get("architectures") == ["CLIPTextModelWithProjection"]:
            return "projection_dim"
        return self.width


ENCODER_KINDS = {
    # last_hidden_state (N, L, d_model)
    "t5": EncoderKind(("T5EncoderModel",), ("last_hidden_state",), "d_model", "num_layers", TEXT_ENCODER_SIZES),
    # pooled (N, P): text_embeds (with projection, SD3) or pooler_output (FLUX.1), the hidden state at the first
    # end-of-text token (or the argmax of the ids, as configs with eos_token_id 2 say); penultimate_hidden_state
    # (N, L, hidden_size): hidden_states[-2]
    "clip": EncoderKind(("CLIPTextModelWithProjection", "CLIPTextModel"), ("pooled", "penultimate_hidden_state"),
                        "hidden_size", "num_hidden_layers", CLIP_TEXT_SIZES),
    # decoder LLMs whose last hidden states (N, L, hidden_size) a pipeline reads after its own template: Sana's
    # Gemma-2 (eager attention is its only one: logit soft-capping), Qwen-Image's Qwen2.5-VL (text only: its language
    # model at positions 0..L-1 on each of the three rotary axes, as a prompt without images gets them)
    "gemma2": EncoderKind(("Gemma2Model",), ("last_hidden_state",), "hidden_size", "num_hidden_layers",
                          GEMMA2_SIZES, eager=True),
    "qwen2_5_vl": EncoderKind(("Qwen2_5_VLForConditionalGeneration",), ("last_hidden_state",), "hidden_size",
                              "num_hidden_layers", QWEN2_5_VL_TEXT_SIZES, config_section="text_config",
                              module="model.language_model", eager=True),
    # Wan's UMT5-XXL encoder (T5's fields; a relative position bias in every layer), last_hidden_state (N, L, d_model)
    "umt5": EncoderKind(("UMT5EncoderModel",), ("last_hidden_state",), "d_model", "num_layers", TEXT_ENCODER_SIZES),
}


@dataclass(frozen=True)
class TextEncoder:
    """One tokenizer + encoder pair of a stack: the folder parts, the kind, the outputs the stack reads, where its
    token length comes from, and whether the encoder is fed the tokenizer's mask (PixArt) or none (SD3, FLUX.1: the
    padding is attended to, as their pipelines call the encoders).

    A decoder LLM's prompt is put in a ``template`` first (``{}`` for the prompt, after preprocessing: Qwen-Image's
    chat template; Sana's ``complex_human_instruction`` lines joined by newlines, then the prompt);
    ``template_negative``: the negative prompt too (Qwen-Image) or as given (Sana). A templated prompt is truncated
    and padded to more tokens than the length: the template's own (its text without the prompt, special tokens
    included) plus ``template_extra`` (Sana's ``num_chi_prompt_tokens + max_sequence_length - 2``), or, where
    ``template_extra`` is None, ``selection_count`` (Qwen-Image: the tokens dropped; a causal decoder's kept tokens
    never see the ones past them, so its 1024 + 34 comes to the same). Of the encoder's tokens the pipeline keeps
    ``selection`` (:data:`~l2c_export.core.text_stack.SELECTIONS`) with ``selection_count``: Sana's first_and_last
    1, Qwen-Image's mask_rows 34 (its ``prompt_template_encode_start_idx``). ``padding_side``: the side the pipeline
    sets its tokenizer to pad on (Sana's right), None where it pads as the tokenizer says."""

    part: str
    tokenizer: str
    kind: str
    outputs: tuple[str, ...]
    length: str = MAX_SEQUENCE_LENGTH
    masked: bool = False
    template: str | None = None
    template_negative: bool = True
    template_extra: int | None = None
    selection: str = "all"
    selection_count: int = 0
    padding_side: str | None = None

    def __post_init__(self):
        assert self.selection in SELECTIONS and self.padding_side in (None, "left", "right")
        assert self.template is None or self.template.count("{}") == 1

    def template_max_length(self, max_length: int, template_tokens: int) -> int:
        """The length a templated prompt is truncated and padded to, ``max_length`` being the untemplated one and
        ``template_tokens`` the template's own."""
        if self.template_extra is None:
            return max_length + self.selection_count
        return max_length + template_tokens + self.template_extra


@dataclass(frozen=True)
class TextEncoderStack:
    """A pipeline's text encoders and how their outputs make its conditioning arrays: ``arrays`` maps each array (by
    the pipeline's argument name) to its token groups of ``"<part>/<output>"`` pieces (:mod:`l2c_export.core.text_stack`);
    ``preprocessing``: how prompts are rewritten first (:data:`~l2c_export.core.text_stack.PREPROCESSING`);
    ``negative_prompt_required``: the pipeline guides only against a negative prompt it is given (Qwen-Image's
    ``do_true_cfg``), where the others default it to ""."""

    encoders: tuple[TextEncoder, ...]
    arrays: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...]
    preprocessing: str = "none"
    negative_prompt_required: bool = False

    def __post_init__(self):
        parts = {encoder.part: encoder for encoder in self.encoders}
        assert self.preprocessing in PREPROCESSING
        for _, groups in self.arrays:
            for group in groups:
                for piece in group:
                    part, output = split_piece(piece)
                    assert output in (*parts[part].outputs, ATTENTION_MASK), piece

    def tokens(self, encoder: TextEncoder, max_sequence_length: int, tokenizer_max_length: int) -> int:
        return max_sequence_length if encoder.length == MAX_SEQUENCE_LENGTH else tokenizer_max_length

    def prompt_tokens(self, max_sequence_length: int, tokenizer_max_length: int = DEFAULT_TOKENIZER_MAX_LENGTH) -> int:
        """L of the prompt embeddings the stack makes: the token lengths of ``prompt_embeds``'s groups summed (SD3:
        CLIP's 77 + ``max_sequence_length``)."""
        by_part = {encoder.part: encoder for encoder in self.encoders}
        groups = dict(self.arrays)["prompt_embeds"]
        return sum(self.tokens(by_part[split_piece(group[0])[0]], max_sequence_length, tokenizer_max_length)
                   for group in groups)

    def record(self, max_sequence_length: int, tokenizer_max_length: int,
               template_tokens: Mapping[str, int] | None = None) -> dict:
        """The manifest's ``components/prompt_encoding``: the pipeline's ``max_sequence_length``, the preprocessing,
        each encoder (its component, its tokenizer's component, the length prompts are truncated and padded to,
        whether it is fed the mask; where it has them, its template, whether negative prompts are put in it, the
        length templated prompts are truncated and padded to, and the tokens kept) in the order they run, and the
        arrays' token groups (and ``negative_prompt_required`` where it is). ``template_tokens``: each templated encoder's template's own tokens, by part."""
        encoders = []
        for e in self.encoders:
            entry = {"encoder": e.part, "tokenizer": e.tokenizer, "masked": e.masked,
                     "max_length": self.tokens(e, max_sequence_length, tokenizer_max_length)}
            if e.template is not None:
                entry.update(template=e.template, template_negative=e.template_negative,
                             template_max_length=e.template_max_length(entry["max_length"],
                                                                       (template_tokens or {})[e.part]))
            if e.selection != "all":
                entry.update(selection=e.selection, selection_count=e.selection_count)
            encoders.append(entry)
        required = {"negative_prompt_required": True} if self.negative_prompt_required else {}
        return {"max_sequence_length": max_sequence_length, "preprocessing": self.preprocessing,
                "encoders": encoders, **required,
                "arrays": {name: [list(group) for group in groups] for name, groups in self.arrays}}


@dataclass(frozen=True)
class FoundTextEncoder:
    """A stack's encoder as found in a folder, checked: its declaration, its ``text_encoder*/`` and ``tokenizer*/``
    folders and its config as read."""

    spec: TextEncoder
    encoder: Path
    tokenizer: Path
    config: dict = field(compare=False)


def read_text_encoders(folder: Path, index: dict, stack: TextEncoderStack, widths: Mapping[str, int],
                       read_json, error) -> tuple[tuple[FoundTextEncoder, ...], int | None]:
    """The stack's encoders found in ``folder`` (none where ``model_index.json`` names none, or only some, of them),
    each checked, and the pipelines' ``tokenizer_max_length`` (None: no encoder reads it). ``widths``: the channels of
    the transformer's conditioning inputs by role (``prompt_embeds``, ``pooled_prompt_embeds``); ``read_json(path,
    what, kind)`` and ``error`` (the exception class): the folder reader's."""

    def named(part: str) -> bool:
        entry = index.get(part)
        return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None

    where_index = folder / "model_index.json"
    for encoder in stack.encoders:
        if named(encoder.part) != named(encoder.tokenizer):
            missing = encoder.tokenizer if named(encoder.part) else encoder.part
            raise error(f"{where_index}: field {missing!r} is missing; a text encoder and its tokenizer come "
                        f"together")
    if not all(named(encoder.part) for encoder in stack.encoders):
        return (), None
    found, piece_widths = [], {}
    for encoder in stack.encoders:
        kind = ENCODER_KINDS[encoder.kind]
        part = folder / encoder.part
        where = part / "config.json"
        read = read_json(where, "expected the text encoder's config.json", "config")
        architectures = read.get("architectures")
        if not (isinstance(architectures, list) and len(architectures) == 1 and architectures[0] in kind.classes):
            raise error(f"{where}: field 'architectures' is {short_repr(architectures)}; supported text encoders: "
                        f"{', '.join(kind.classes)}")
        raw = kind.text_config(read)
        check_sizes(raw, kind.sizes, str(where), error)
        for key in ("pad_token_id", "eos_token_id", "bos_token_id", "decoder_start_token_id"):
            value = raw.get(key)  # an LLM's eos_token_id may be a list (Gemma's chat turns end with another)
            ids = value if isinstance(value, list) and value else [value]
            if value is not None and not all(is_integer(i) and 0 <= i < raw["vocab_size"] for i in ids):
                raise error(f"{where}: field {key!r} is {short_repr(value)}; expected a token id (or a list of "
                            f"them) below vocab_size {raw['vocab_size']}")
        safetensors_weights(part, "model")
        check_tokenizer(folder / encoder.tokenizer, raw["vocab_size"], encoder.part)
        for output in encoder.outputs:
            piece_widths[f"{encoder.part}/{output}"] = raw[kind.width_field(output, raw)]
        found.append(FoundTextEncoder(encoder, part, folder / encoder.tokenizer, raw))
    for name, groups in stack.arrays:
        if ATTENTION_MASK in {split_piece(piece)[1] for group in groups for piece in group}:
            continue
        try:
            made = combined_width(groups, piece_widths, str(where_index))
        except ValueError as refused:
            raise error(str(refused)) from None
        if made != widths.get(name):
            part, output = split_piece(groups[-1][-1])
            blamed = next(item for item in found if item.spec.part == part)
            key = ENCODER_KINDS[blamed.spec.kind].width_field(output, blamed.config)
            pieces = [piece for group in groups for piece in group]
            made_of = (f" (made of {' + '.join(f'{piece} {piece_widths[piece]}' for piece in pieces)}, {made})"
                       if len(pieces) > 1 else "")
            raise error(f"{blamed.encoder / 'config.json'}: field {key!r} is {blamed.config.get(key)}; the "
                        f"transformer takes {name} {widths.get(name)} wide{made_of}")
    length = None
    if any(encoder.length == TOKENIZER_MAX_LENGTH for encoder in stack.encoders):
        length = tokenizer_max_length(folder / stack.encoders[0].tokenizer, read_json, error)
        for item in found:
            positions = item.config.get("max_position_embeddings")
            if item.spec.length == TOKENIZER_MAX_LENGTH and positions is not None and length > positions:
                raise error(f"{folder / stack.encoders[0].tokenizer / 'tokenizer_config.json'}: field "
                            f"'model_max_length' is {length}; {item.spec.part} has {positions} positions "
                            f"(max_position_embeddings)")
    return tuple(found), length


def tokenizer_max_length(tokenizer: Path, read_json, error) -> int:
    """The pipelines' ``tokenizer_max_length``: the tokenizer's ``model_max_length`` (tokenizer_config.json)."""
    path = tokenizer / "tokenizer_config.json"
    value = read_json(path, "expected the tokenizer's config (its model_max_length: the CLIP length)",
                      "tokenizer_config").get("model_max_length")
    if not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4096):
        raise error(f"{path}: field 'model_max_length' is {short_repr(value)}; expected the CLIP tokenizer's length "
                    f"(77), 1 to 4096")
    return value


def encoder_outputs(output, names: tuple[str, ...]) -> tuple:
    """The outputs ``names`` of a transformers text encoder's ``output`` (called with ``output_hidden_states`` where
    ``penultimate_hidden_state`` is among them): ``last_hidden_state`` (a causal LM's ``hidden_states[-1]``, as
    ``QwenImagePipeline`` reads Qwen2.5-VL's), ``penultimate_hidden_state``
    (``hidden_states[-2]``, as the SD3 pipeline reads it), ``pooled`` (``text_embeds`` of a
    ``CLIPTextModelWithProjection``, else ``pooler_output``)."""
    values = {"last_hidden_state": lambda: output.last_hidden_state if "last_hidden_state" in output
              else output.hidden_states[-1],
              "penultimate_hidden_state": lambda: output.hidden_states[-2],
              "pooled": lambda: output.text_embeds if getattr(output, "text_embeds", None) is not None
              else output.pooler_output}
    return tuple(values[name]() for name in names)
