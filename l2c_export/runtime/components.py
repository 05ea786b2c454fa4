"""A build's components at run time (the manifest's ``components``; numpy, ONNX Runtime and the ``tokenizers`` library,
no torch or transformers): prompts to prompt embeddings, latents to images.

:class:`PromptEncoder` turns prompts into the pipelines' conditioning arrays as their ``encode_prompt`` makes them
(diffusers 0.42: PixArt's T5 with ``clean_caption=False``, SD3's CLIP-L + CLIP-G + T5, FLUX.1's CLIP-L + T5, Sana's
Gemma-2 and Qwen-Image's Qwen2.5-VL after their templates), from the manifest's ``components/prompt_encoding``
alone; :class:`ImageDecoder` decodes latents with the VAE decoder graph as the pipelines do before
``image_processor.postprocess`` (scaled, shifted, FLUX.1's unpacked by :func:`l2c_export.core.latents.unpack_latents`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..core import manifest as manifest_io
from ..core.interface import PACKED_2X2, conditioning_records
from ..core.latents import unpack_latents
from ..core.text_stack import ATTENTION_MASK, combine, preprocess, select_tokens
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


def stack_tokenizer(path: Path, max_length: int, pad_id: int, pad_token: str, padding_side: str = "right"):
    """A build's tokenizer file read with the ``tokenizers`` library and set as transformers calls it for the
    pipelines: truncated (right side, special tokens counted) and padded on ``padding_side`` with the pad token to
    ``max_length``."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the tokenizers library raises its own Exception on a bad file
        raise manifest_io.ManifestError(f"{path}: not a tokenizers library file ({error})") from None
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(direction=padding_side, pad_id=pad_id, pad_token=pad_token, length=max_length)
    return tokenizer


class StackEncoder:
    """One encoder of a build's text-encoder stack (an entry of ``components/prompt_encoding/encoders``): its
    tokenizer, read with the ``tokenizers`` library and set as transformers calls it for the pipelines
    (``padding="max_length", truncation=True``: on the tokenizer record's ``padding_side`` (right where it has none),
    longest first, special tokens added, to the entry's ``max_length``), and its graph, fed the ids (and the mask
    where the entry is ``masked``: PixArt, the decoder LLMs; else the padding is attended to, as SD3's and FLUX.1's
    pipelines call their encoders).

    Where the entry has a ``template``, a prompt is put in it first (the negative prompt only where
    ``template_negative``) and truncated and padded to ``template_max_length``; of the graph's token outputs and
    the mask the entry's ``selection`` is kept (:func:`l2c_export.core.text_stack.select_tokens`)."""

    def __init__(self, manifest: dict, folder: Path, entry: dict, providers: Sequence):
        self.name, self.max_length = entry["encoder"], entry["max_length"]
        self.template = entry.get("template")
        self.template_negative = entry.get("template_negative", True)
        self.template_max_length = entry.get("template_max_length", self.max_length)
        self.selection, self.selection_count = entry.get("selection", "all"), entry.get("selection_count", 0)
        self._pad = manifest["components"][entry["tokenizer"]]
        path = _component_path(folder, manifest, entry["tokenizer"], "file")
        self.tokenizer = stack_tokenizer(path, self.max_length, self._pad["pad_id"], self._pad["pad_token"],
                                         self._pad.get("padding_side", "right"))
        self.session = _component_session(folder, manifest, self.name, providers)
        self._inputs = [t["name"] for t in manifest["components"][self.name]["inputs"]]
        self._outputs = [t["name"] for t in manifest["components"][self.name]["outputs"]]

    def tokenize(self, texts: Sequence[str], negative: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Texts (checked and preprocessed; ``negative``: negative prompts) -> input_ids (n, length) int64 and
        attention_mask (n, length) int64, 1 on tokens; length ``max_length``, or ``template_max_length`` where the
        texts are put in the template."""
        length = self.max_length
        if self.template is not None and (self.template_negative or not negative):
            prefix, suffix = self.template.split("{}")
            texts, length = [prefix + text + suffix for text in texts], self.template_max_length
        self.tokenizer.enable_truncation(max_length=length)
        self.tokenizer.enable_padding(direction=self._pad.get("padding_side", "right"), pad_id=self._pad["pad_id"],
                                      pad_token=self._pad["pad_token"], length=length)
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=True)
        return (np.array([e.ids for e in encodings], dtype=np.int64),
                np.array([e.attention_mask for e in encodings], dtype=np.int64))

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs by name (float32) for input_ids and attention_mask (n, L) int64 (the mask fed only
        where the graph takes it)."""
        feeds = {"input_ids": ids, "attention_mask": mask}
        values = self.session.run(None, {name: feeds[name] for name in self._inputs})
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(self._outputs, values)}

    def __call__(self, texts: Sequence[str], negative: bool = False) -> dict[str, np.ndarray]:
        """Texts -> ``"<encoder>/<output>"`` -> each graph output, and ``"<encoder>/attention_mask"`` -> the mask,
        the tokens the selection keeps."""
        ids, mask = self.tokenize(texts, negative)
        outputs = self.encode(ids, mask)
        tokens, mask = select_tokens({name: value for name, value in outputs.items() if value.ndim == 3}, mask,
                                     self.selection, self.selection_count, self.max_length)
        outputs.update(tokens)
        pieces = {f"{self.name}/{name}": value for name, value in outputs.items()}
        pieces[f"{self.name}/{ATTENTION_MASK}"] = mask.astype(np.float32)
        return pieces


class PromptEncoder:
    """Prompts -> the conditioning arrays by the pipelines' argument names (token embeddings (n, L, D) float32, a
    token mask (n, L), a pooled vector (n, P)) and, when guiding, the negative prompt's arrays by their ``negative``
    partners (the manifest's conditioning records), as the manifest's ``components/prompt_encoding`` says: each prompt preprocessed (PixArt's
    lower-cased and stripped), run through every encoder (:class:`StackEncoder`), the outputs combined by
    :func:`l2c_export.core.text_stack.combine`.

    Written by hand because the pipelines' own ``encode_prompt`` needs torch and transformers; it mirrors diffusers
    0.42's ``PixArtAlphaPipeline.encode_prompt`` (``clean_caption=False``; ``PixArtSigmaPipeline``'s is the same),
    ``StableDiffusion3Pipeline.encode_prompt`` (``prompt_2``, ``prompt_3`` and their negatives the prompt's, no
    ``clip_skip``), ``FluxPipeline.encode_prompt``, ``SanaPipeline.encode_prompt`` (its default
    ``complex_human_instruction``, ``clean_caption=False``) and ``QwenImagePipeline.encode_prompt``; the negative
    prompt ("" by default) is encoded the same way, one per prompt, out of the template where the entry says so.
    """

    def __init__(self, manifest: dict, folder: Path, providers: Sequence = ("CPUExecutionProvider",)):
        record = manifest["components"]["prompt_encoding"]
        self.max_sequence_length = record["max_sequence_length"]
        self.preprocessing = record["preprocessing"]
        self.arrays = record["arrays"]
        # each array's negative partner, as the model's conditioning inputs name it (where guidance runs one)
        self.negatives = {r["argument"]: r.get("negative") for r in conditioning_records(manifest["model"]["inputs"])}
        self.negative_prompt_required = record.get("negative_prompt_required", False)
        self.encoders = [StackEncoder(manifest, folder, entry, providers) for entry in record["encoders"]]

    def check_preprocessing(self, prompts: Sequence[str], where: str) -> None:
        """Refuses, before anything runs, a prompt the preprocessing refuses (Wan's ``prompt_clean`` without ftfy:
        :func:`~l2c_export.core.text_stack.wan_prompt_clean`), naming it ``where`` (numbered if several)."""
        for i, text in enumerate(prompts):
            preprocess(text, self.preprocessing, f"{where} {i + 1}" if len(prompts) > 1 else where)

    def tokenize(self, prompts: Sequence[str], encoder: int = 0,
                 negative: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Prompts (already checked) -> encoder ``encoder``'s input_ids and attention_mask (n, its length)."""
        return self.encoders[encoder].tokenize([preprocess(prompt, self.preprocessing) for prompt in prompts],
                                               negative)

    def embed(self, prompts: Sequence[str], negative: bool = False) -> dict[str, np.ndarray]:
        """Prompts (already checked; ``negative``: negative prompts, which an encoder's template may leave out) ->
        the arrays by name (without negatives)."""
        texts = [preprocess(prompt, self.preprocessing) for prompt in prompts]
        pieces = {}
        for encoder in self.encoders:
            pieces.update(encoder(texts, negative))
        return {name: combine(groups, pieces) for name, groups in self.arrays.items()}

    def negative_prompts(self, negative_prompt, count: int, names: Mapping[str, str] | None = None) -> list[str]:
        """``negative_prompt`` (None: not given; one text for every prompt, or one per prompt) as ``count`` checked
        texts: "" where not given, unless the record says the pipeline guides only against a negative prompt it is
        given, when that is refused naming it (``names``: how messages call the arguments)."""
        from .conditioning import ARGUMENT_NAMES

        name = names or ARGUMENT_NAMES
        if negative_prompt is None and self.negative_prompt_required:
            raise PromptError(f"{name['negative_prompt']} is missing: this model's pipeline guides only against a "
                              f"negative prompt (it runs unguided without one); give {name['negative_prompt']}, or "
                              f"{name['cfg_scale']} 1")
        negatives = negative_prompts("" if negative_prompt is None else negative_prompt, count)
        self.check_preprocessing(list(dict.fromkeys(negatives)), name["negative_prompt"])
        return negatives

    def __call__(self, prompts: Sequence, negative_prompt=None, guiding: bool = True,
                 where: str = "prompt", names: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
        """The conditioning arrays by the pipelines' argument names. ``negative_prompt``: one text for every prompt,
        or one per prompt, None for the default (:meth:`negative_prompts`); used only when ``guiding``."""
        if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
            raise PromptError(f"{where}: expected a list of one or more prompts")
        prompts = [check_prompt(text, f"{where} {i + 1}" if len(prompts) > 1 else where)
                   for i, text in enumerate(prompts)]
        self.check_preprocessing(prompts, where)
        arrays = self.embed(prompts)
        if guiding:
            negatives = self.negative_prompts(negative_prompt, len(prompts), names)
            arrays.update({self.negatives[name]: value for name, value in self.embed(negatives, True).items()
                           if self.negatives.get(name)})
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
