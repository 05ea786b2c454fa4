"""What a build carries beside the transformer's subset graphs: a diffusers folder's VAE decoder, text encoders and
their tokenizers (:class:`l2c_export.models.diffusers.FolderComponents`), each run once per request by the runtime.

Each graph is exported once in fp32 (TorchScript exporter, as the subset graphs) with its weights in one file beside
it (``<name>.weights``), both recorded in the manifest's ``components`` with their sha256:

- ``vae_decoder``: ``latents`` (N, C, h, w) float32, already scaled -> ``sample`` (N, 3, H, W) float32,
  ``vae.decode(latents).sample`` of the folder's VAE (the declared kind's class: ``AutoencoderKL``, or Sana's DC-AE
  ``AutoencoderDC``, 32x). The pipelines decode ``latents / scaling_factor + shift_factor`` (SD3 and FLUX.1 have a
  shift; FLUX.1 first unpacks its packed (N, T, 4 C) latents to (N, C, h, w)); the record says so with
  ``scaling_factor``, ``shift_factor`` (where the VAE has one) and ``latent_layout`` ("nchw" or "packed_2x2"), and
  the runtime does it (:class:`l2c_export.runtime.components.ImageDecoder`);
- ``text_encoder``, ``text_encoder_2``, ...: one graph per encoder of the family's stack
  (:mod:`l2c_export.models.diffusers.text_encoders`), named by its folder part: ``input_ids`` (N, L) int64 (and
  ``attention_mask`` (N, L) int64 where the stack feeds it: PixArt) -> the outputs the stack reads, float32:
  ``last_hidden_state`` (N, L, D) (T5, L dynamic), ``penultimate_hidden_state`` (N, 77, D) and ``pooled`` (N, P)
  (CLIP, 77 tokens: the pipelines' ``tokenizer_max_length``); the decoder LLMs (Sana's Gemma-2, Qwen-Image's
  Qwen2.5-VL language model) take the mask and give ``last_hidden_state`` (N, L, D), L dynamic, eager attention;
- ``tokenizer``, ``tokenizer_2``, ...: ``<name>.json`` for the ``tokenizers`` library, with the pad token the
  runtime pads with;
- ``prompt_encoding``: no files: the stack's record (:meth:`~l2c_export.models.diffusers.text_encoders.
  TextEncoderStack.record`), how the runtime tokenizes and combines the encoders' outputs.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

from ..core import manifest as manifest_io

PROMPT_ENCODING = "prompt_encoding"  # the components record of the text-encoder stack (no files)
_DUMMY_TOKENS = 7  # the traced prompt length of a T5 (any: the axis is dynamic)


def component_files(name: str) -> tuple[str, ...]:
    """The files component ``name`` writes into the build, in record order: a tokenizer's ``<name>.json``, a graph's
    ``<name>.onnx`` and its weights."""
    return (f"{name}.json",) if name.startswith("tokenizer") else (f"{name}.onnx", f"{name}.weights")


def _text_encoders(spec) -> dict:
    """Component name -> the :class:`~l2c_export.models.diffusers.text_encoders.FoundTextEncoder` it is made from
    (each encoder's and its tokenizer's name)."""
    found = () if spec.components is None else spec.components.text_encoders
    return {name: encoder for encoder in found for name in (encoder.spec.part, encoder.spec.tokenizer)}


def source_sha256(folder: Path) -> str:
    """One digest of every file of a component's folder (its config and weights)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(folder)}:{manifest_io.sha256_of(file)}\n".encode())
    return digest.hexdigest()


def component_sources(spec) -> dict[str, Path]:
    """Component name -> the folder it is made from, for the components ``spec``'s diffusers folder has."""
    found = spec.components
    if found is None:
        return {}
    sources = {"vae_decoder": found.vae} if found.vae is not None else {}
    for encoder in found.text_encoders:
        sources[encoder.spec.part], sources[encoder.spec.tokenizer] = encoder.encoder, encoder.tokenizer
    return sources


def require_exporters(spec) -> None:
    """Refuses a missing library that exports ``spec``'s components (:func:`~l2c_export.core.extras.require_extra`)
    before anything is exported."""
    from ..core.extras import require_extra

    sources = component_sources(spec)
    if "vae_decoder" in sources:
        require_extra("diffusers", "exporting the VAE decoder")
    if set(sources) - {"vae_decoder"}:
        require_extra("transformers", "exporting the text encoders and tokenizers")


def export_component(name: str, source: Path, spec, staging: Path) -> dict:
    """Writes component ``name`` from ``source`` into ``staging`` (the files of :func:`component_files`) and returns
    its manifest record without the file entries (the caller adds them)."""
    if name == "vae_decoder":
        return _export_vae_decoder(source, spec, staging)
    encoder = _text_encoders(spec)[name]
    if name == encoder.spec.part:
        return _export_text_encoder(encoder, spec, staging)
    return _write_tokenizer(encoder, staging)


def _export(module, inputs: tuple, input_names: list[str], output_names: list[str], dynamic_axes: dict,
            graph_file: str, weights_file: str, staging: Path) -> None:
    """``module`` (eval, fp32) to ONNX: the graph in ``graph_file``, every initializer in ``weights_file`` beside it
    (one file whatever the size: protobuf alone stops at 2 GiB, past which the exporter itself writes a file per
    tensor, so it exports into a scratch folder first)."""
    import onnx
    import torch

    from ..export.onnx import OPSET, register_symbolics

    register_symbolics()
    with tempfile.TemporaryDirectory(dir=staging, prefix=".export-") as scratch:
        exported = Path(scratch) / graph_file
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), inputs, str(exported), input_names=input_names,
                              output_names=output_names, opset_version=OPSET, dynamo=False,
                              dynamic_axes=dynamic_axes)
        graph = onnx.load(str(exported))
        onnx.save_model(graph, str(staging / graph_file), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=weights_file, size_threshold=0)
    shutil.copymode(staging / graph_file, staging / weights_file)  # onnx creates it private (0600)


def _export_vae_decoder(source: Path, spec, staging: Path) -> dict:
    """The folder's VAE decoder as its declared kind makes it (:mod:`l2c_export.models.diffusers.vae`), traced at a
    batch of 2, and the fields the runtime reads before it."""
    import torch

    decoder, fields = spec.family.declaration.vae.code.decoder(spec.components.vae_class, source, exporting=True)
    shape = list(spec.family.vae_latents(spec.config))
    latents = torch.zeros(2, *shape)
    with torch.no_grad():
        image_shape = list(decoder(latents).shape[1:])
    graph_file, weights_file = component_files("vae_decoder")
    _export(decoder, (latents,), ["latents"], ["sample"], {"latents": {0: "batch"}, "sample": {0: "batch"}},
            graph_file, weights_file, staging)
    return {"inputs": [{"name": "latents", "dtype": "float32", "shape": ["batch", *shape]}],
            "outputs": [{"name": "sample", "dtype": "float32", "shape": ["batch", *image_shape]}],
            **fields, "latent_layout": spec.family.latent_layout}


def _export_text_encoder(found, spec, staging: Path) -> dict:
    """One encoder of the stack as a graph of the outputs the stack reads (:data:`~l2c_export.models.diffusers.
    text_encoders.ENCODER_KINDS`): T5 and the decoder LLMs over a dynamic token axis (``prompt_tokens``), CLIP
    over its ``tokenizer_max_length`` tokens, fed ``attention_mask`` only where the stack says (PixArt, the LLMs);
    a kind's ``module`` (Qwen2.5-VL's language model) is the part exported."""
    import torch

    from ..core.extras import import_extra
    from ..models.diffusers.text_encoders import ENCODER_KINDS, TOKENIZER_MAX_LENGTH, encoder_outputs

    declared = found.spec
    kind = ENCODER_KINDS[declared.kind]
    architecture = found.config["architectures"][0]
    module = getattr(import_extra("transformers", "exporting the text encoders"), architecture)
    options = {"attn_implementation": "eager"} if kind.eager else {}
    encoder = module.from_pretrained(str(found.encoder), use_safetensors=True, local_files_only=True,
                                     **options).float().eval()
    if kind.module is not None:
        encoder = encoder.get_submodule(kind.module)
    outputs = declared.outputs
    hidden = "penultimate_hidden_state" in outputs

    class Encoder(torch.nn.Module):
        """input_ids (N, L) int64 (, attention_mask (N, L) int64) -> the declared outputs, float32."""

        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask=None):
            if attention_mask is None and declared.kind == "t5":
                # what T5 makes of no mask, as an op of the graph (so the token axis stays dynamic)
                attention_mask = torch.ones_like(input_ids)
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden)
            return encoder_outputs(out, outputs)

    fixed = declared.length == TOKENIZER_MAX_LENGTH
    tokens = spec.components.tokenizer_max_length if fixed else _DUMMY_TOKENS
    ids = torch.zeros(2, tokens, dtype=torch.int64)
    inputs, names = (ids,), ["input_ids"]
    if declared.masked:
        mask = torch.ones(2, tokens, dtype=torch.int64)
        mask[0, -2:] = 0  # padded tokens, so the trace keeps the mask's path
        inputs, names = (ids, mask), ["input_ids", "attention_mask"]
    with torch.no_grad():
        traced = Encoder()(*inputs)
    axes = {0: "batch"} if fixed else {0: "batch", 1: "prompt_tokens"}
    dynamic = {name: axes for name in names}
    for name, value in zip(outputs, traced):
        dynamic[name] = {0: "batch"} if value.dim() == 2 else axes
    graph_file, weights_file = component_files(declared.part)
    _export(Encoder(), inputs, names, list(outputs), dynamic, graph_file, weights_file, staging)
    token_axis = tokens if fixed else "prompt_tokens"
    return {"inputs": [{"name": name, "dtype": "int64", "shape": ["batch", token_axis]} for name in names],
            "outputs": [{"name": name, "dtype": "float32",
                         "shape": ["batch", int(value.shape[-1])] if value.dim() == 2
                         else ["batch", token_axis, int(value.shape[-1])]}
                        for name, value in zip(outputs, traced)]}


def _load_tokenizer(found):
    """The tokenizer of ``found`` (a stack's encoder) as transformers loads it for the pipeline (a T5 tokenizer is
    rebuilt on loading, a CLIP one made from vocab.json and merges.txt where there is no tokenizer.json, so this,
    not the folder's file as such, is what diffusers tokenizes with) and its ``backend_tokenizer``, checked: a fast
    tokenizer with a pad token, whose ids (vocabulary, pad and end-of-sequence tokens) are all below the text
    encoder's ``vocab_size``."""
    from ..core.extras import import_extra
    from ..models.diffusers import DiffusersFolderError

    AutoTokenizer = import_extra("transformers", "writing the tokenizer").AutoTokenizer

    source = found.tokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.pad_token is None:
        raise DiffusersFolderError(f"{source}: {type(tokenizer).__name__} has no tokenizers-library backend and pad "
                                   f"token; expected a fast tokenizer (tokenizer.json) with a pad token")
    vocab_size = found.config["vocab_size"]
    largest = max(backend.get_vocab(with_added_tokens=True).values(), default=0)
    for what, token_id in (("its vocabulary", largest), (f"pad token {tokenizer.pad_token!r}", tokenizer.pad_token_id),
                           (f"end-of-sequence token {tokenizer.eos_token!r}", tokenizer.eos_token_id)):
        if token_id is not None and not 0 <= token_id < vocab_size:
            raise DiffusersFolderError(f"{source}: {what} has token id {token_id}; the text encoder's vocab_size "
                                       f"is {vocab_size} ({found.encoder / 'config.json'})")
    return tokenizer, backend


def check_components(spec) -> None:
    """Loads what a build will export beside the transformer as the export will (the tokenizers, whose checks need
    transformers), so that a folder whose tokenizer cannot be used is refused before the first export, not after
    the transformer's."""
    for encoder in () if spec.components is None else spec.components.text_encoders:
        _load_tokenizer(encoder)


def _write_tokenizer(found, staging: Path) -> dict:
    """The tokenizer as :func:`_load_tokenizer` loads it, truncation and padding cleared (the runtime sets them per
    request), its pad token and the side the pipeline pads on: the declaration's where its pipeline sets one (Sana's
    right), else the tokenizer's own ``padding_side`` (GemmaTokenizer's default is left)."""
    tokenizer, backend = _load_tokenizer(found)
    backend.no_truncation()
    backend.no_padding()
    (staging / component_files(found.spec.tokenizer)[0]).write_text(backend.to_str())
    return {"pad_token": str(tokenizer.pad_token), "pad_id": int(tokenizer.pad_token_id),
            "padding_side": found.spec.padding_side or str(tokenizer.padding_side)}


def component_record(name: str, record: dict, staging: Path, keys: dict[str, str]) -> dict:
    """``record`` with its file entries: ``graph`` and ``weights`` for a graph, ``file`` for the tokenizer."""
    files = [manifest_io.file_entry(staging, file, keys[file]) for file in component_files(name)]
    named = dict(zip(("graph", "weights") if len(files) == 2 else ("file",), files))
    return {**named, **record}


def _made_for(name: str, spec) -> dict:
    """What a component's files depend on beside its folder: the VAE decoder's latents (C, h, w) and their layout
    (FLUX.1's differ with ``--image-size``); a text encoder's declaration (its outputs, mask and length)."""
    if name == "vae_decoder":
        return {"latents": list(spec.family.vae_latents(spec.config)), "latent_layout": spec.family.latent_layout}
    encoder = _text_encoders(spec)[name]
    if name != encoder.spec.part:
        return {"padding_side": encoder.spec.padding_side}
    return {"declared": vars(encoder.spec), "tokenizer_max_length": spec.components.tokenizer_max_length}


def build_components(spec, staging: Path, key_of: Callable[[str, dict], str],
                     reuse: Callable[[str, Path], bool], previous_record: Callable[[str], dict | None]) -> dict:
    """The manifest's ``components`` record, every file written into ``staging``: reused from the previous build
    where ``reuse(key, target)`` links it (same source and shapes, same tools), else exported. ``key_of(file,
    source)`` makes a file's key (``source``: the folder part's sha256 and what the file is made for);
    ``previous_record(name)`` is the previous build's record of the component."""
    components = {}
    for name, source in component_sources(spec).items():
        source_sha = source_sha256(source)
        files = component_files(name)
        keys = {file: key_of(file, {"sha256": source_sha, **_made_for(name, spec)}) for file in files}
        previous = previous_record(name)
        if previous is not None and all(reuse(keys[file], staging / file) for file in files):
            record = {field: value for field, value in previous.items()
                      if field not in ("graph", "weights", "file", "source_sha256")}
        else:
            for file in files:
                (staging / file).unlink(missing_ok=True)
            record = export_component(name, source, spec, staging)
        components[name] = {**component_record(name, record, staging, keys), "source_sha256": source_sha}
    if components and spec.components.text_encoders:
        from ..models.diffusers.text_encoders import DEFAULT_TOKENIZER_MAX_LENGTH

        components[PROMPT_ENCODING] = spec.family.declaration.text_encoders.record(
            spec.max_sequence_length, spec.components.tokenizer_max_length or DEFAULT_TOKENIZER_MAX_LENGTH,
            template_tokens(spec))
    return components


def template_tokens(spec) -> dict[str, int]:
    """Each templated encoder's template's own tokens (its text without the prompt, special tokens included), by
    part, counted by the pipeline's tokenizer (Sana's ``num_chi_prompt_tokens``)."""
    counts = {}
    for found in spec.components.text_encoders:
        if found.spec.template is not None:
            tokenizer, _ = _load_tokenizer(found)
            counts[found.spec.part] = len(tokenizer.encode(found.spec.template.replace("{}", "")))
    return counts
