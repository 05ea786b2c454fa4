"""What a build carries beside the transformer's subset graphs: a diffusers folder's VAE decoder, T5 text encoder and
tokenizer (:class:`l2c_export.models.diffusers.FolderComponents`), each run once per request by the runtime.

Each graph is exported once in fp32 (TorchScript exporter, as the subset graphs) with its weights in one file beside
it (``<name>.weights``), both recorded in the manifest's ``components`` with their sha256:

- ``vae_decoder``: ``latents`` (N, C, h, w) float32, already scaled -> ``sample`` (N, 3, H, W) float32,
  ``vae.decode(latents).sample`` of the folder's VAE (the declared kind's class: ``AutoencoderKL``, or Sana's DC-AE
  ``AutoencoderDC``, 32x). The pipelines decode ``latents / scaling_factor + shift_factor`` (SD3 and FLUX.1 have a
  shift; FLUX.1 first unpacks its packed (N, T, 4 C) latents to (N, C, h, w)); the record says so with
  ``scaling_factor``, ``shift_factor`` (where the VAE has one) and ``latent_layout`` ("nchw" or "packed_2x2"), and
  the runtime does it (:class:`l2c_export.runtime.components.ImageDecoder`);
- ``text_encoder``: ``input_ids`` (N, L) int64 and ``attention_mask`` (N, L) int64 -> ``last_hidden_state``
  (N, L, D) float32, L dynamic up to ``model/max_sequence_length``;
- ``tokenizer``: ``tokenizer.json`` for the ``tokenizers`` library, with the pad token the runtime pads with.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable

from ..core import manifest as manifest_io

# name -> the files a component writes into the build (the graph, its weights), in record order
COMPONENT_FILES = {"vae_decoder": ("vae_decoder.onnx", "vae_decoder.weights"),
                   "text_encoder": ("text_encoder.onnx", "text_encoder.weights"),
                   "tokenizer": ("tokenizer.json",)}
_DUMMY_TOKENS = 7  # the traced prompt length (any: the axis is dynamic)


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
    sources = {"vae_decoder": found.vae, "text_encoder": found.text_encoder, "tokenizer": found.tokenizer}
    return {name: folder for name, folder in sources.items() if folder is not None}


def require_exporters(spec) -> None:
    """Refuses a missing library that exports ``spec``'s components (:func:`~l2c_export.core.extras.require_extra`)
    before anything is exported."""
    from ..core.extras import require_extra

    sources = component_sources(spec)
    if "vae_decoder" in sources:
        require_extra("diffusers", "exporting the VAE decoder")
    if {"text_encoder", "tokenizer"} & set(sources):
        require_extra("transformers", "exporting the text encoder and tokenizer")


def export_component(name: str, source: Path, spec, staging: Path) -> dict:
    """Writes component ``name`` from ``source`` into ``staging`` (the files of :data:`COMPONENT_FILES`) and returns
    its manifest record without the file entries (the caller adds them)."""
    return {"vae_decoder": _export_vae_decoder, "text_encoder": _export_text_encoder,
            "tokenizer": _write_tokenizer}[name](source, spec, staging)


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
    graph_file, weights_file = COMPONENT_FILES["vae_decoder"]
    _export(decoder, (latents,), ["latents"], ["sample"], {"latents": {0: "batch"}, "sample": {0: "batch"}},
            graph_file, weights_file, staging)
    return {"inputs": [{"name": "latents", "dtype": "float32", "shape": ["batch", *shape]}],
            "outputs": [{"name": "sample", "dtype": "float32", "shape": ["batch", *image_shape]}],
            **fields, "latent_layout": spec.family.latent_layout}


def _export_text_encoder(source: Path, spec, staging: Path) -> dict:
    import torch

    from ..core.extras import import_extra

    T5EncoderModel = import_extra("transformers", "exporting the text encoder").T5EncoderModel

    encoder = T5EncoderModel.from_pretrained(str(source), use_safetensors=True, local_files_only=True).float().eval()

    class Encoder(torch.nn.Module):
        """input_ids (N, L) int64, attention_mask (N, L) int64 -> last_hidden_state (N, L, D) float32."""

        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones(2, _DUMMY_TOKENS, dtype=torch.int64)
    mask = torch.ones(2, _DUMMY_TOKENS, dtype=torch.int64)
    mask[0, -2:] = 0  # padded tokens, so the trace keeps the mask's path
    axes = {0: "batch", 1: "prompt_tokens"}
    graph_file, weights_file = COMPONENT_FILES["text_encoder"]
    _export(Encoder(), (ids, mask), ["input_ids", "attention_mask"], ["last_hidden_state"],
            {"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes}, graph_file, weights_file, staging)
    tokens = ["batch", "prompt_tokens"]
    return {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": tokens},
                       {"name": "attention_mask", "dtype": "int64", "shape": tokens}],
            "outputs": [{"name": "last_hidden_state", "dtype": "float32",
                         "shape": [*tokens, int(encoder.config.d_model)]}]}


def _load_tokenizer(source: Path, spec):
    """The tokenizer as transformers loads it for the pipeline (a T5 tokenizer is rebuilt on loading, so this, not
    the folder's file as such, is what diffusers tokenizes with) and its ``backend_tokenizer``, checked: a fast
    tokenizer with a pad token, whose ids (vocabulary, pad and end-of-sequence tokens) are all below the text
    encoder's ``vocab_size``."""
    from ..core.extras import import_extra
    from ..models.diffusers import DiffusersFolderError

    AutoTokenizer = import_extra("transformers", "writing the tokenizer").AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or tokenizer.pad_token is None:
        raise DiffusersFolderError(f"{source}: {type(tokenizer).__name__} has no tokenizers-library backend and pad "
                                   f"token; expected a fast tokenizer (tokenizer.json) with a pad token")
    config = spec.components.text_encoder_config
    vocab_size = None if config is None else config["vocab_size"]
    if vocab_size is not None:
        largest = max(backend.get_vocab(with_added_tokens=True).values(), default=0)
        for what, token_id in (("its vocabulary", largest), (f"pad token {tokenizer.pad_token!r}",
                                                             tokenizer.pad_token_id),
                               (f"end-of-sequence token {tokenizer.eos_token!r}", tokenizer.eos_token_id)):
            if token_id is not None and not 0 <= token_id < vocab_size:
                raise DiffusersFolderError(f"{source}: {what} has token id {token_id}; the text encoder's vocab_size "
                                           f"is {vocab_size} ({spec.components.text_encoder / 'config.json'})")
    return tokenizer, backend


def check_components(spec) -> None:
    """Loads what a build will export beside the transformer as the export will (the tokenizer, whose checks need
    transformers), so that a folder whose tokenizer cannot be used is refused before the first export, not after
    the transformer's."""
    sources = component_sources(spec)
    if "tokenizer" in sources:
        _load_tokenizer(sources["tokenizer"], spec)


def _write_tokenizer(source: Path, spec, staging: Path) -> dict:
    """The tokenizer as :func:`_load_tokenizer` loads it, truncation and padding cleared (the runtime sets them per
    request), and its pad token."""
    tokenizer, backend = _load_tokenizer(source, spec)
    backend.no_truncation()
    backend.no_padding()
    (staging / COMPONENT_FILES["tokenizer"][0]).write_text(backend.to_str())
    return {"pad_token": str(tokenizer.pad_token), "pad_id": int(tokenizer.pad_token_id)}


def component_record(name: str, record: dict, staging: Path, keys: dict[str, str]) -> dict:
    """``record`` with its file entries: ``graph`` and ``weights`` for a graph, ``file`` for the tokenizer."""
    files = [manifest_io.file_entry(staging, file, keys[file]) for file in COMPONENT_FILES[name]]
    named = dict(zip(("graph", "weights") if len(files) == 2 else ("file",), files))
    return {**named, **record}


def _made_for(name: str, spec) -> dict:
    """What a component's files depend on beside its folder: the VAE decoder's latents (C, h, w) and their layout
    (FLUX.1's differ with ``--image-size``)."""
    if name != "vae_decoder":
        return {}
    return {"latents": list(spec.family.vae_latents(spec.config)), "latent_layout": spec.family.latent_layout}


def build_components(spec, staging: Path, key_of: Callable[[str, dict], str],
                     reuse: Callable[[str, Path], bool], previous_record: Callable[[str], dict | None]) -> dict:
    """The manifest's ``components`` record, every file written into ``staging``: reused from the previous build
    where ``reuse(key, target)`` links it (same source and shapes, same tools), else exported. ``key_of(file,
    source)`` makes a file's key (``source``: the folder part's sha256 and what the file is made for);
    ``previous_record(name)`` is the previous build's record of the component."""
    components = {}
    for name, source in component_sources(spec).items():
        source_sha = source_sha256(source)
        files = COMPONENT_FILES[name]
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
    return components
