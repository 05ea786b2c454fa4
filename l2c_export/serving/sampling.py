"""Serving requests as sampling batches: each request's tensors decoded and checked, and the requests that the
dynamic batcher hands over together merged into as few ``L2CPipeline`` calls as the build allows.

No Triton imports here: the Triton model (``triton_model.py``) only moves tensors in and out. A request holds ``n``
images (Triton's batch dimension). Its conditioning is the build's (:func:`served_inputs`, from the manifest's
``model/inputs``): ``labels`` for a label model, ``prompt`` texts for a build with a text encoder, else one input per
conditioning array a request feeds, named as the pipeline's argument (``run --conditioning`` takes the same
arrays), and its ``negative`` partner where the model's guidance runs an unconditional half (optional: needed when
guiding); an input fed the guidance scale is fed ``cfg_scale``. Per image:

====================== ============= =================================================================================
input                  shape, dtype  meaning
====================== ============= =================================================================================
labels                 (1,) int64    label models: class label, 0 .. num_classes - 1
prompt                 (1,) bytes    text models whose build has text encoders and tokenizers: the prompt, UTF-8,
                                     not empty (encoded as ``run --prompt`` encodes it, truncated to the model's
                                     max_sequence_length); such a build takes no embeddings
negative_prompt        (1,) bytes    optional, with ``prompt``: the unconditional half's text (default "", or
                                     needed when guiding where the build's record says the pipeline guides only
                                     against one); not served where the guidance rule runs no
                                     unconditional half (FLUX.1)
(a conditioning array) per its kind  the other models, by kind (:mod:`l2c_export.core.interface`): token embeddings
                                     (L, D) f32 (L tokens, 1 .. the model's max_sequence_length), finite; a token mask
                                     (L,) f32, 1 keep / 0 padding, at least one 1; a pooled vector (P,) f32, finite
(its negative partner) the same      needed when guiding (cfg_scale > 1) with an unconditional half
noise                  (sample) f32  optional: the initial noise, finite, within +-MAX_ABS_NOISE
seed                   (1,) int64    optional, 0 .. 2**63 - 1: the initial noise is ``make_noise(seed, (1, *sample))``,
                                     so the image equals ``L2CPipeline([label], seed=seed)``'s; with neither noise nor
                                     seed a fresh random seed
cfg_scale              (1,) f32      optional: the guidance scale in [1, MAX_CFG_SCALE] (default: the build's; 1: none)
cfg_scale_2            (1,) f32      a build of two experts only (the manifest's ``experts``, Wan2.2's), optional: the
                                     second expert's scale (the pipeline's guidance_scale_2) in [1, MAX_CFG_SCALE]
                                     (default: the image's cfg_scale); whether to guide is cfg_scale's
====================== ============= =================================================================================

:func:`input_ranges` holds those ranges, :func:`decode_request` enforces them (the only place that does), and the
Triton model config states them (its ``input_ranges`` parameter).

Images of the same guidance scales (and, for text models, the same prompt length L) are sampled as one batch (up to the
build's batch limit), whatever request they came from: each image's sample is the same as when it is sampled alone
(the model is per-sample; to float rounding).
DDPM draws its step noise per sampling batch, so DDPM images are sampled one per batch, each from its own seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.util import check_finite
from ..core.interface import SCALAR, TOKEN_EMBEDDINGS, TOKEN_MASK, runs_unconditional_half
from ..runtime.conditioning import (check_text_conditioning, classifier_free_batch, request_arguments, request_inputs,
                                   takes_labels)
from ..samplers.guidance import check_labels, make_noise

MAX_SEED = 2 ** 63 - 1  # int64, within what torch.Generator.manual_seed (make_noise) and numpy (step noise) take
MAX_CFG_SCALE = 100.0  # far above any scale in use (DiT samples at 1.5-4, text-to-image pipelines at up to ~20);
#                        a scale of 1e30 swamps the prediction (and overflows float32 in a latent model)
# how messages call a request's parts (the runtime's names for them: l2c_export.runtime.conditioning.FLAG_NAMES)
SERVED_NAMES = {name: f"input {name!r}" for name in ("labels", "conditioning", "cfg_scale", "cfg_scale_2", "prompt",
                                                      "negative_prompt")}
MAX_ABS_NOISE = 1000.0  # standard normal noise never comes near it (|x| > 10 has probability 1e-23)


def input_ranges(manifest: dict) -> dict[str, list]:
    """The closed range of every input's values, by input name: what :func:`decode_request` enforces. A label
    model's labels are 0 .. null_class - 1; a text model's token masks (and their partners) 0/1, its embeddings
    finite; a build served prompts as text takes neither."""
    ranges = {"noise": [-MAX_ABS_NOISE, MAX_ABS_NOISE], "seed": [0, MAX_SEED], "cfg_scale": [1.0, MAX_CFG_SCALE],
              **({"cfg_scale_2": [1.0, MAX_CFG_SCALE]} if has_experts(manifest) else {})}
    if takes_labels(manifest):
        return {"labels": [0, manifest["guidance"]["null_class"] - 1], **ranges}
    if takes_text(manifest):
        return ranges
    masks = [name for record in request_inputs(manifest) if record["kind"] == TOKEN_MASK
             for name in (record["argument"], record.get("negative")) if name is not None]
    return {**{name: [0, 1] for name in masks}, **ranges}


def has_experts(manifest: dict) -> bool:
    """Whether the build is of two experts switching by timestep (the manifest's ``experts``, Wan2.2's): served a
    second guidance scale, ``cfg_scale_2``."""
    return "experts" in manifest


def takes_text(manifest: dict) -> bool:
    """Whether the build is served prompts as text: it carries its text-encoder stack (``components/prompt_encoding``)."""
    return "prompt_encoding" in manifest.get("components", {})


def served_text_arguments(manifest: dict) -> list[str]:
    """A text model's conditioning inputs by the pipelines' argument names: the arrays a request feeds, then their
    ``negative`` partners where the model guides with an unconditional half."""
    return request_arguments(manifest)


def served_inputs(manifest: dict) -> list[tuple[str, str, list[int], bool]]:
    """Every input a served request may carry, from the manifest alone: (name, numpy dtype, per-image dims with -1 for
    a size that varies per request, optional). The conditioning comes first: ``labels`` for a label model, ``prompt``
    and ``negative_prompt`` (bytes) for a build with a text encoder, or for another text model each array a request
    feeds by its pipeline argument name, with its record's dtype and per-sample shape (the negatives are optional:
    needed only when guiding)."""
    from ..runtime.pipeline import ModelInterface

    sample_shape = list(ModelInterface.from_manifest(manifest).sample_shape)
    if takes_labels(manifest):
        conditioning = [("labels", "int64", [1], False)]
    elif takes_text(manifest):
        conditioning = [("prompt", "bytes", [1], False)] + (
            [("negative_prompt", "bytes", [1], True)] if runs_unconditional_half(manifest["guidance"]) else [])
    else:
        by_name = {}
        for record in request_inputs(manifest):
            dims = [-1 if isinstance(size, str) else size for size in record["shape"][1:]] or [1]
            by_name[record["argument"]] = (record["dtype"], dims, False)
            if record.get("negative"):
                by_name[record["negative"]] = (record["dtype"], dims, True)
        conditioning = [(name, *by_name[name]) for name in served_text_arguments(manifest)]
    return conditioning + [("noise", "float32", sample_shape, True), ("seed", "int64", [1], True),
                           ("cfg_scale", "float32", [1], True)] + (
        [("cfg_scale_2", "float32", [1], True)] if has_experts(manifest) else [])


def _token_argument(manifest: dict) -> str:
    """The argument of the token embeddings a request feeds (its prompt length groups images into batches)."""
    return next(r["argument"] for r in request_inputs(manifest) if r["kind"] == TOKEN_EMBEDDINGS)


def _negative_token_argument(manifest: dict) -> str | None:
    """The token embeddings' ``negative`` partner, whose length may differ from the prompt's where a token mask
    covers the axis (its length also groups images, where the batch guides); None without one."""
    return next((r.get("negative") for r in request_inputs(manifest) if r["kind"] == TOKEN_EMBEDDINGS), None)


@dataclass
class SampleRequest:
    """One request's images, checked."""

    labels: np.ndarray | None  # (n,) int64; None for a text model
    noise: np.ndarray  # (n, C, H, W) float32
    seeds: np.ndarray  # (n,) int64: DDPM's step noise is drawn from them
    cfg_scales: np.ndarray  # (n,) float64
    cfg_scales_2: np.ndarray | None = None  # (n,) float64: a build of experts' second scales; None for other builds
    conditioning: dict[str, np.ndarray] | None = None  # text models: argument name -> (n, L, D) / (n, L) / (n, P)
    prompt_length: int | None = None  # text models: L of the token embeddings
    negative_length: int | None = None  # L' of their negative partner, where sent (it may differ where masked)


def decode_request(pipeline, labels: np.ndarray | None = None, noise: np.ndarray | None = None,
                   seed: np.ndarray | None = None, cfg_scale: np.ndarray | None = None,
                   cfg_scale_2: np.ndarray | None = None, prompt: np.ndarray | None = None,
                   negative_prompt: np.ndarray | None = None,
                   **prompts: np.ndarray | None) -> SampleRequest:
    """Checks one request's tensors (shapes as in the table above, with the batch dimension first) against
    ``pipeline``'s build; raises ``ValueError`` with a message naming the input and what was expected. ``prompts``:
    a text model's conditioning by the pipelines' argument names (None: not sent); ``prompt`` and
    ``negative_prompt``: texts (n, 1), for a build with a text encoder, encoded here (once per request)."""
    prompts = {name: value for name, value in prompts.items() if value is not None}
    texts = {name: value for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt))
             if value is not None}
    if texts and not takes_text(pipeline.manifest):
        raise ValueError(f"input {sorted(texts)[0]!r}: this build has no text encoder; send "
                         + ("'labels'" if pipeline.interface.label is not None else "prompt embeddings"))
    if takes_text(pipeline.manifest):
        if prompts:
            raise ValueError(f"input {sorted(prompts)[0]!r}: this build encodes prompts itself; send 'prompt' (text)")
        if labels is not None:
            raise ValueError("input 'labels': this model is conditioned on prompts (input 'prompt'), not class labels")
        if "negative_prompt" in texts and not runs_unconditional_half(pipeline.manifest["guidance"]):
            raise ValueError("input 'negative_prompt' is not used: this model runs no classifier-free batch (a "
                             "guidance-distilled model: cfg_scale feeds its guidance embedding); leave it out")
        n, texts = _decode_texts(texts)
    elif pipeline.interface.label is not None:
        if prompts:
            raise ValueError(f"input {sorted(prompts)[0]!r}: this model is conditioned on class labels (input "
                             f"'labels')")
        n, labels = _decode_labels(pipeline, labels)
    else:
        if labels is not None:
            raise ValueError("input 'labels': this model is conditioned on prompt embeddings (inputs "
                             f"{', '.join(served_text_arguments(pipeline.manifest))}), not class labels")
        embeddings = _token_argument(pipeline.manifest)
        if embeddings not in prompts:
            raise ValueError(f"input {embeddings!r} is missing; expected float32 prompt embeddings of shape "
                             f"(n, L, D)")
        if np.ndim(prompts[embeddings]) != 3:
            raise ValueError(f"input {embeddings!r} has shape {list(np.shape(prompts[embeddings]))}; expected "
                             f"[n, L, D]")
        n = np.shape(prompts[embeddings])[0]

    def per_image(name: str, value: np.ndarray | None, dtype) -> np.ndarray | None:
        if value is None:
            return None
        value = np.asarray(value)
        if value.shape != (n, 1):
            raise ValueError(f"input '{name}' has shape {list(value.shape)}; expected [{n}, 1] (one per image)")
        return value.reshape(n).astype(dtype)

    ranges = input_ranges(pipeline.manifest)
    seeds = per_image("seed", seed, np.int64)
    if seeds is not None and np.any(seeds < 0):
        raise ValueError(f"input 'seed' is {seeds.tolist()}; expected seeds in 0..{MAX_SEED}")
    scales = per_image("cfg_scale", cfg_scale, np.float64)
    if scales is None:
        scales = np.full(n, float(pipeline.manifest["guidance"]["cfg_scale"]))
    for scale in scales:
        check_finite(float(scale), "input 'cfg_scale'", *ranges["cfg_scale"])  # 1 is no guidance
    scales_2 = per_image("cfg_scale_2", cfg_scale_2, np.float64)
    if scales_2 is not None and not has_experts(pipeline.manifest):
        raise ValueError("input 'cfg_scale_2': this build has one transformer (its manifest has no 'experts'), "
                         "guided by 'cfg_scale' alone; leave it out")
    if has_experts(pipeline.manifest):
        scales_2 = scales.copy() if scales_2 is None else scales_2  # as the pipeline's guidance_scale_2 default
        for scale in scales_2:
            check_finite(float(scale), "input 'cfg_scale_2'", *ranges["cfg_scale_2"])
    conditioning = None
    if texts:  # encoded once for the request; the negatives whenever any image guides
        guiding = any(classifier_free_batch(pipeline.manifest, float(scale)) for scale in scales)
        conditioning = pipeline.prompt_encoder(texts["prompt"], texts.get("negative_prompt"), guiding,
                                               where="input 'prompt'", names=SERVED_NAMES)
    elif pipeline.interface.label is None:
        # the negatives are checked whenever they are sent, and needed when any image of the request guides with a
        # classifier-free batch (a guidance-distilled model takes none)
        names = served_text_arguments(pipeline.manifest)
        unknown = sorted(set(prompts) - set(names))
        if unknown:
            raise ValueError(f"input {unknown[0]!r} is not one of this model's; expected {', '.join(names)}")
        guiding = any(classifier_free_batch(pipeline.manifest, float(scale)) for scale in scales) or \
            bool(set(prompts) - set(request_arguments(pipeline.manifest, negatives=False)))
        records = request_inputs(pipeline.manifest)
        scalars = {name for r in records if r["kind"] == SCALAR for name in (r["argument"], r.get("negative")) if name}
        prompts = {name: np.reshape(value, -1) if name in scalars else value  # (n, 1) per Triton's batch: (n,)
                   for name, value in prompts.items()}
        checked = check_text_conditioning(prompts, records, guiding, where="request",
                                          max_tokens=pipeline.manifest["model"].get("max_sequence_length"))
        conditioning = {}
        for record in records:
            array, negative = checked[record["argument"]]
            conditioning[record["argument"]] = array
            if negative is not None and record.get("negative"):
                conditioning[record["negative"]] = negative
    if noise is not None:
        if seeds is not None:
            raise ValueError("inputs 'noise' and 'seed' are both given; give one of them (seed draws the noise)")
        noise = np.asarray(noise)
        expected = (n, *pipeline.sample_shape)
        if noise.shape != expected:
            raise ValueError(f"input 'noise' has shape {list(noise.shape)}; expected {list(expected)} (n, C, H, W)")
        low, high = ranges["noise"]
        if not np.all(np.isfinite(noise)):
            raise ValueError(f"input 'noise' holds values that are not finite; expected finite values in "
                             f"[{low}, {high}]")
        if np.any(noise < low) or np.any(noise > high):
            raise ValueError(f"input 'noise' holds a value of magnitude {float(np.abs(noise).max())!r}; expected "
                             f"values in [{low}, {high}] (standard normal noise)")
        noise = noise.astype(np.float32)
        seeds = np.zeros(n, dtype=np.int64)  # as L2CPipeline's default seed for DDPM's step noise
    else:
        if seeds is None:
            seeds = np.random.SeedSequence().generate_state(n, dtype=np.uint64).astype(np.int64) & MAX_SEED
        noise = np.stack([make_noise(int(s), (1, *pipeline.sample_shape))[0] for s in seeds])
    length = None if conditioning is None else conditioning[_token_argument(pipeline.manifest)].shape[1]
    negative = None if conditioning is None else conditioning.get(_negative_token_argument(pipeline.manifest))
    return SampleRequest(labels=labels, noise=noise, seeds=seeds, cfg_scales=scales, cfg_scales_2=scales_2,
                         conditioning=conditioning,
                         prompt_length=length, negative_length=None if negative is None else negative.shape[1])


def _decode_texts(texts: dict[str, np.ndarray]) -> tuple[int, dict[str, list[str]]]:
    """``prompt`` (n, 1) and optional ``negative_prompt`` (n, 1) bytes -> (n, the texts checked: UTF-8, the prompts
    not empty)."""
    from ..runtime.components import check_prompt

    if "prompt" not in texts:
        raise ValueError("input 'prompt' is missing; expected UTF-8 prompts of shape (n, 1)")
    n = None
    decoded = {}
    for name, value in texts.items():
        value = np.asarray(value, dtype=object)
        if value.ndim != 2 or value.shape[1] != 1 or value.shape[0] < 1 or (n is not None and value.shape[0] != n):
            raise ValueError(f"input {name!r} has shape {list(value.shape)}; expected [{n or 'n'}, 1] (one text per "
                             f"image)")
        n = value.shape[0]
        decoded[name] = [check_prompt(text, f"input {name!r}", allow_empty=name == "negative_prompt")
                         for text in value[:, 0]]
    return n, decoded


def _decode_labels(pipeline, labels: np.ndarray | None) -> tuple[int, np.ndarray]:
    """A label model's ``labels`` input (n, 1), checked -> (n, labels (n,) int64)."""
    if labels is None:
        raise ValueError("input 'labels' is missing; expected int64 class labels of shape (n, 1)")
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] != 1 or labels.shape[0] < 1:
        raise ValueError(f"input 'labels' has shape {list(labels.shape)}; expected [n, 1]")
    n = labels.shape[0]
    labels = labels.reshape(n).astype(np.int64)
    try:
        check_labels(labels, pipeline.num_classes)
    except ValueError as error:
        raise ValueError(f"input 'labels': {error}") from None
    return n, labels


def images_per_batch(pipeline, cfg_scale: float) -> int:
    """The most images one sampling batch may hold (:func:`l2c_export.runtime.conditioning.images_per_batch`)."""
    from ..runtime.conditioning import images_per_batch as build_images_per_batch

    return build_images_per_batch(pipeline.manifest, cfg_scale)


def sample_requests(pipeline, requests: list[SampleRequest]) -> tuple[list[np.ndarray | Exception], list[int]]:
    """Samples every image of ``requests``, merged into sampling batches.

    Returns each request's samples (n, C, H, W) float32, or the exception that its sampling batch raised, and the
    size of every sampling batch that ran (for the metrics).
    """
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for r, request in enumerate(requests):
        for i, scale in enumerate(request.cfg_scales):
            # the negative prompt's length too where the batch runs it (it may differ from the prompt's)
            negative_length = request.negative_length if classifier_free_batch(pipeline.manifest, float(scale)) \
                else None
            scale_2 = None if request.cfg_scales_2 is None else float(request.cfg_scales_2[i])
            key = (float(scale), scale_2, request.prompt_length, negative_length,
                   (r, i) if pipeline.sampler.kind == "ddpm" else None)
            groups.setdefault(key, []).append((r, i))
    results: list[np.ndarray | Exception] = [np.empty((len(q.noise), *pipeline.sample_shape), np.float32)
                                             for q in requests]
    batch_sizes = []
    for (scale, scale_2, length, _, _), members in groups.items():
        size = images_per_batch(pipeline, scale)
        for start in range(0, len(members), size):
            chunk = members[start: start + size]
            if length is None:
                condition = {"labels": [int(requests[r].labels[i]) for r, i in chunk]}
            else:  # the negatives only where this batch guides (a request may send them for its unguided images too)
                guided = classifier_free_batch(pipeline.manifest, scale)
                names = request_arguments(pipeline.manifest, negatives=guided)
                condition = {"conditioning": {name: np.stack([requests[r].conditioning[name][i] for r, i in chunk])
                                              for name in names}}
            noise = np.stack([requests[r].noise[i] for r, i in chunk])
            seed = int(requests[chunk[0][0]].seeds[chunk[0][1]])
            try:
                samples = pipeline(**condition, cfg_scale=scale, cfg_scale_2=scale_2, seed=seed, noise=noise).samples
            except Exception as error:  # noqa: BLE001 - reported to the requests of this batch, the rest go on
                for r, _ in chunk:
                    results[r] = error
                continue
            batch_sizes.append(len(chunk))
            for (r, i), sample in zip(chunk, samples):
                if not isinstance(results[r], Exception):
                    results[r][i] = sample
    return results, batch_sizes
