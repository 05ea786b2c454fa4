"""A build's components at run time (the manifest's ``components``; numpy, ONNX Runtime and the ``tokenizers`` library,
no torch or transformers): prompts to prompt embeddings, latents to images.

:class:`PromptEncoder` turns prompts into the pipelines' four conditioning arrays as ``PixArtAlphaPipeline.encode_prompt``
(diffusers 0.42, ``clean_caption=False``) makes them; :class:`ImageDecoder` decodes latents with the VAE decoder graph
as the pipelines do before ``image_processor.postprocess`` (scaled, shifted, FLUX.1's unpacked by
:func:`l2c_export.core.latents.unpack_latents`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..core import manifest as manifest_io
from ..core.interface import PACKED_2X2, TOKEN_EMBEDDINGS, TOKEN_MASK, conditioning_records
from ..core.latents import unpack_latents
from ..core.util import short_repr


# The longest prompt, in UTF-8 bytes. A prompt is cut at the model's max_sequence_length tokens (PixArt-Sigma's 300,
# T5's 512 at most), and a T5 token is a few characters: 16 KiB is far past any prompt that reaches the model, and
# bounds what the tokenizer is given to read.
MAX_PROMPT_BYTES = 16 * 1024


class PromptError(ValueError):
    """A prompt that cannot be encoded (empty, not UTF-8, not text, too long); the message names it."""


def check_prompt(text, where: str, allow_empty: bool = False) -> str:
    """``text`` (str, or UTF-8 bytes as Triton sends them) as a str; refuses bytes that are not UTF-8, a str that
    cannot be written as UTF-8 (undecodable command-line bytes arrive as lone surrogates), one longer than
    :data:`MAX_PROMPT_BYTES` and, unless ``allow_empty`` (the negative prompt, empty by default), a prompt with no
    visible characters."""
    if isinstance(text, (bytes, bytearray, np.bytes_)) and len(text) > MAX_PROMPT_BYTES:
        raise PromptError(f"{where}: {len(text)} bytes; expected a prompt of at most {MAX_PROMPT_BYTES} bytes (the "
                          f"model reads at most its max_sequence_length tokens of it)")
    if isinstance(text, (bytes, bytearray, np.bytes_)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as error:
            raise PromptError(f"{where}: not UTF-8 text (byte {error.start}: {bytes(text)[error.start]:#04x}); "
                              f"expected a UTF-8 prompt") from None
    if not isinstance(text, str):
        raise PromptError(f"{where}: a {type(text).__name__}; expected a text prompt")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as error:
        raise PromptError(f"{where}: not UTF-8 text (character {error.start} cannot be encoded); expected a UTF-8 "
                          f"prompt") from None
    if size > MAX_PROMPT_BYTES:
        raise PromptError(f"{where}: {size} bytes; expected a prompt of at most {MAX_PROMPT_BYTES} bytes (the model "
                          f"reads at most its max_sequence_length tokens of it)")
    if not allow_empty and not text.strip():
        raise PromptError(f"{where}: empty prompt; expected some text")
    return text


def _component_path(folder: Path, manifest: dict, name: str, field: str) -> Path:
    return manifest_io.file_path(folder, manifest["components"][name][field]["file"],
                                 f"manifest field 'components/{name}/{field}'")


def _component_session(folder: Path, manifest: dict, name: str, providers: Sequence):
    """A session of component ``name``'s graph, after checking that the graph reads its weights only from the
    recorded weights file (nothing outside the build folder) and that its inputs and outputs are the record's."""
    import onnx

    from .backends.onnxruntime import component_session

    record = manifest["components"][name]
    path = _component_path(folder, manifest, name, "graph")
    weights = _component_path(folder, manifest, name, "weights")
    where = str(folder / manifest_io.MANIFEST_NAME)
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as error:  # protobuf's DecodeError and friends
        raise manifest_io.ManifestError(f"{path}: not a readable ONNX graph ({error})") from None
    for initializer in graph.initializer:
        if initializer.data_location == onnx.TensorProto.EXTERNAL:
            location = {entry.key: entry.value for entry in initializer.external_data}.get("location")
            if location != weights.name:
                raise manifest_io.ManifestError(f"{path}: initializer {short_repr(initializer.name)} reads "
                                                f"{short_repr(location)}; the manifest's 'components/{name}/weights' "
                                                f"is {weights.name}")
    for kind, actual in (("inputs", graph.input), ("outputs", graph.output)):
        got = [t.name for t in actual]
        want = [t["name"] for t in record[kind]]
        if got != want:
            raise manifest_io.ManifestError(f"{where}: field 'components/{name}/{kind}' names {want}; the graph "
                                            f"{path.name} has {got}")
    return component_session(path, providers)


class PromptEncoder:
    """Prompts -> the model's token embeddings (n, L, D) float32 and their token mask (n, L) float32 and, when
    guiding, the negative prompt's pair, by the pipeline argument names the manifest's conditioning inputs give them
    (``model/inputs`` of kinds token_embeddings and token_mask, and their ``negative`` partners), L = the
    manifest's ``model/max_sequence_length``.

    Written by hand because the pipeline's own ``encode_prompt`` needs torch and transformers; it mirrors diffusers
    0.42's ``PixArtAlphaPipeline.encode_prompt`` with ``clean_caption=False`` (``PixArtSigmaPipeline``'s is the
    same): each prompt lower-cased and stripped (``_text_preprocessing``), tokenized with special tokens (T5's
    ``</s>``), truncated and padded on the right to ``max_sequence_length`` (the mask 1 on tokens, 0 on padding),
    encoded with that mask; the negative prompt ("" by default) the same way, to the prompts' length, one per prompt.
    """

    def __init__(self, manifest: dict, folder: Path, providers: Sequence = ("CPUExecutionProvider",)):
        from tokenizers import Tokenizer

        self.max_length = manifest["model"]["max_sequence_length"]
        record = manifest["components"]["tokenizer"]
        path = _component_path(folder, manifest, "tokenizer", "file")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the tokenizers library raises its own Exception on a bad file
            raise manifest_io.ManifestError(f"{path}: not a tokenizers library file ({error})") from None
        # As transformers calls it (padding="max_length", truncation=True): right side, longest first, no stride.
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.tokenizer.enable_padding(direction="right", pad_id=record["pad_id"], pad_token=record["pad_token"],
                                      length=self.max_length)
        self.session = _component_session(folder, manifest, "text_encoder", providers)
        self._inputs = [t["name"] for t in manifest["components"]["text_encoder"]["inputs"]]
        records = {record["kind"]: record for record in conditioning_records(manifest["model"]["inputs"])}
        # (the argument, its negative partner) that the embeddings and the mask feed
        self._embeds = records[TOKEN_EMBEDDINGS]["argument"], records[TOKEN_EMBEDDINGS].get("negative")
        mask = records.get(TOKEN_MASK)
        self._mask = None if mask is None else (mask["argument"], mask.get("negative"))

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts (already checked) -> input_ids (n, L) int64 and attention_mask (n, L) int64."""
        encodings = self.tokenizer.encode_batch([prompt.lower().strip() for prompt in prompts],
                                                add_special_tokens=True)
        return (np.array([e.ids for e in encodings], dtype=np.int64),
                np.array([e.attention_mask for e in encodings], dtype=np.int64))

    def embed(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prompts -> embeddings (n, L, D) float32 and their mask (n, L) float32."""
        ids, mask = self.tokenize(prompts)
        (embeds,) = self.session.run(None, dict(zip(self._inputs, (ids, mask))))
        return np.asarray(embeds, dtype=np.float32), mask.astype(np.float32)

    def __call__(self, prompts: Sequence, negative_prompt="", guiding: bool = True,
                 where: str = "prompt") -> dict[str, np.ndarray]:
        """The conditioning arrays by the pipelines' argument names. ``negative_prompt``: one text for every prompt,
        or one per prompt; used only when ``guiding``."""
        if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
            raise PromptError(f"{where}: expected a list of one or more prompts")
        prompts = [check_prompt(text, f"{where} {i + 1}" if len(prompts) > 1 else where)
                   for i, text in enumerate(prompts)]
        arrays = {}
        for half, texts in enumerate([prompts, negative_prompts(negative_prompt, len(prompts))] if guiding
                                     else [prompts]):
            embeds, mask = self.embed(texts)
            arrays[self._embeds[half]] = embeds
            if self._mask is not None:
                arrays[self._mask[half]] = mask
        return arrays


def negative_prompts(negative_prompt, count: int, where: str = "negative prompt") -> list[str]:
    """``negative_prompt`` (one text for every prompt, or a sequence of one per prompt) as ``count`` checked texts."""
    negatives = [negative_prompt] * count if isinstance(negative_prompt, (str, bytes, bytearray, np.bytes_)) \
        else list(negative_prompt)
    if len(negatives) != count:
        raise PromptError(f"{where}: {len(negatives)} given for {count} prompts; expected one, or one per prompt")
    return [check_prompt(text, where, allow_empty=True) for text in negatives]


def refuse_unused_negative_prompt(guiding: bool, prompts_given: bool, conditioning_given: bool,
                                  names: Mapping[str, str] | None = None) -> None:
    """A negative prompt is used only with prompts and a classifier-free batch: else it is refused, not dropped.
    ``names``: how messages call the request's parts (the CLI's flags, ``cli.options.FLAG_NAMES``; default the Python
    arguments)."""
    from .conditioning import ARGUMENT_NAMES

    name = names or ARGUMENT_NAMES
    if conditioning_given:
        raise PromptError(f"{name['negative_prompt']} is not used with {name['conditioning']}: the conditioning "
                          f"carries its own negative arrays; encode the negative prompt into it, or give "
                          f"{name['prompt']} instead")
    if not prompts_given:
        raise PromptError(f"{name['negative_prompt']} needs {name['prompt']}: it is the text the prompts are guided "
                          f"against")
    if not guiding:
        raise PromptError(f"{name['negative_prompt']} is not used: no classifier-free batch runs (a "
                          f"{name['cfg_scale']} of 1, or a guidance-distilled model); leave it out")


class ImageDecoder:
    """Latents (n, *sample shape) -> the VAE's sample (n, 3, H, W) float32 in about [-1, 1], as the pipelines decode
    before ``image_processor.postprocess``: ``vae.decode(latents / scaling_factor + shift_factor).sample``, the shift
    0 where the record has none (SD3 and FLUX.1 have one), and a "packed_2x2" ``latent_layout`` (FLUX.1's (n, T,
    4 C)) first unpacked to the decoder's (n, C, h, w) (:func:`~l2c_export.core.latents.unpack_latents`)."""

    def __init__(self, manifest: dict, folder: Path, providers: Sequence = ("CPUExecutionProvider",)):
        record = manifest["components"]["vae_decoder"]
        self.scaling_factor = float(record["scaling_factor"])
        self.shift_factor = record.get("shift_factor")
        self.layout = record.get("latent_layout")
        self.latent_shape = tuple(record["inputs"][0]["shape"][1:])  # (C, h, w)
        self.session = _component_session(folder, manifest, "vae_decoder", providers)
        self._input = record["inputs"][0]["name"]

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        latents = np.asarray(latents, dtype=np.float32)
        if self.layout == PACKED_2X2:
            latents = unpack_latents(latents, *self.latent_shape[1:])
        scaled = latents / np.float32(self.scaling_factor)
        if self.shift_factor is not None:
            scaled = scaled + np.float32(self.shift_factor)
        (sample,) = self.session.run(None, {self._input: np.ascontiguousarray(scaled)})
        return np.asarray(sample, dtype=np.float32)
