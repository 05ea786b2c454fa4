"""The runtime: reads a build's manifest, and samples by running each model call on that call's subset engine.

It drives the one denoising loop (:func:`l2c_export.samplers.denoise`) with numpy arrays, so the ONNX Runtime and
TensorRT backends need no PyTorch; every name and shape comes from the manifest. Each call is one request with its
own cache, so a pipeline can serve requests from several threads. It is called as the family's diffusers pipeline
is, by the pipeline's argument names as the manifest records them::

    pipe = L2CPipeline.from_pretrained("engines/dit-digits-onnxruntime-fp32")
    result = pipe([3, 7], seed=0)    # class labels first, as DiTPipeline's; the build's scale and steps
    result.images      # list of PIL images (output_type="pil"); result.samples (n, C, H, W)

A build that carries a text encoder and tokenizer takes prompts, and one with a VAE decoder gives images of its
latents (the manifest's ``components``, :mod:`.components`)::

    result = pipe("a handwritten seven", negative_prompt="", seed=0, output_type="np")
    result.images      # (1, H, W, 3) in [0, 1], as the diffusers pipeline's output_type="np"
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..core import manifest as manifest_io
from ..core.interface import DEFAULT_SCALE_ARGUMENT, label_record
from ..core.util import check_finite
from ..samplers import ModelCall, denoise, sampler_from_dict
from ..samplers.conditioning import ARGUMENT_NAMES
from ..samplers.guidance import InitialNoiseRows, NoiseRows, apply_guidance, make_noise
from ..samplers.torch_noise import generator_seed
from .backends import Backend, load_backend
from .components import ImageDecoder, PromptEncoder, PromptError, check_prompt, refuse_unused_negative_prompt


@dataclass(frozen=True)
class ModelInterface:
    """The model's graph interface as the manifest records it: which input is the sample and the time, the
    conditioning inputs (:mod:`.conditioning`: a label, or prompt embeddings and their mask), their shapes, and the
    output. Every shape and name a runtime uses comes from here."""

    sample: str
    time: str
    label: str | None  # the label input's name; None for a model conditioned otherwise
    output: str
    sample_shape: tuple[int, ...]  # per sample: (C, H, W)
    output_shape: tuple[int, ...]  # per sample: (C_out, H, W)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "ModelInterface":
        from ..core.interface import CONDITIONING, label_record

        by_role = {tensor["role"]: tensor for tensor in manifest["model"]["inputs"]}
        missing = {"sample", "time", CONDITIONING} - set(by_role)
        if missing:
            raise manifest_io.ManifestError(f"manifest: field 'model/inputs' has no input with role "
                                            f"{', '.join(sorted(missing))}")
        output = manifest["model"]["output"]
        label = label_record(manifest["model"]["inputs"])
        return cls(sample=by_role["sample"]["name"], time=by_role["time"]["name"],
                   label=None if label is None else label["name"], output=output["name"],
                   sample_shape=tuple(by_role["sample"]["shape"][1:]), output_shape=tuple(output["shape"][1:]))

    def feeds(self, x: np.ndarray, t: np.ndarray, condition) -> dict[str, np.ndarray]:
        """Input name -> array for one model call: x (N, C, H, W) float32, t (N,) float32, and ``condition``: the
        conditioning inputs by name (:func:`.conditioning.model_batch_conditioning`), or the labels y (N,) int64."""
        if not isinstance(condition, dict):
            condition = {self.label: np.ascontiguousarray(condition, dtype=np.int64)}
        return {self.sample: np.ascontiguousarray(x, dtype=np.float32),
                self.time: np.ascontiguousarray(t, dtype=np.float32), **condition}


OUTPUT_TYPES = ("pil", "np", "latent")  # what result.images holds, by the pipelines' output_type


@dataclass
class SampleResult:
    """A call's samples, timings and, as the diffusers pipelines' output, ``images`` of its ``output_type``."""

    samples: np.ndarray  # (n, C, H, W) float32: images in [-1, 1] for pixel models, latents for latent models
    seconds: float  # the whole sampling loop
    engine_seconds: float  # inside the engines
    step_subsets: list[int] = field(default_factory=list)  # the subset of each model call
    # latent models decoded by the build's VAE decoder: (n, 3, H, W) in about [-1, 1]; a video model's (n, 3, F, H, W)
    decoded: np.ndarray | None = None
    output_type: str | None = None  # "pil", "np", "latent"; None: PIL images (decoded when first read)
    # a latent model's VAE decoder, (n, ...) latents -> (n, 3, H, W), where ``decoded`` is not made yet
    decoder: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def overhead_fraction(self) -> float:
        """Time spent outside the engines (sampler math, dispatch, binding) over the whole loop."""
        return max(0.0, 1.0 - self.engine_seconds / self.seconds) if self.seconds > 0 else 0.0

    @property
    def pixels(self) -> np.ndarray:
        """The images (n, C, H, W) in [-1, 1] before clamping (a video model's clips (n, C, F, H, W)): a pixel model's
        samples, or the decoded latents."""
        if self.decoded is None and self.decoder is not None:
            self.decoded = self.decoder(self.samples)
        if self.decoded is not None:
            return self.decoded
        if self.samples.shape[1] not in (1, 3):
            raise ValueError("output_type: the samples are latents and the build has no VAE decoder to make images "
                             "of them; call with output_type=\"latent\" (result.images is then the latents), or "
                             "decode result.samples with the model's VAE")
        return self.samples

    @property
    def frames(self):
        """A video model's clips as ``WanPipeline(...).frames`` of the same ``output_type``: (n, F, H, W, 3) float32
        in [0, 1] ("np", WanPipeline's default, and where none was given: the decoded (n, 3, F, H, W) halved and
        shifted, clamped, :func:`~l2c_export.core.images.clip_frames`), a list of n lists of F PIL images ("pil":
        those frames ``(x * 255).round()`` as uint8, as diffusers' ``numpy_to_pil``) or the latents (n, C, F', H',
        W') ("latent")."""
        from ..core.images import clip_frames

        if self.samples.ndim != 5:
            raise ValueError("frames are a video model's decoded clips; this build samples images (result.images)")
        if self.output_type == "latent":
            return self.samples
        frames = clip_frames(self.pixels)
        if self.output_type != "pil":
            return frames
        from PIL import Image

        return [[Image.fromarray(frame) for frame in clip] for clip in (frames * 255).round().astype(np.uint8)]

    @property
    def images(self):
        """As the diffusers pipeline's ``.images`` of the same ``output_type``: a list of PIL images ("pil", the
        default), (n, H, W, C) float32 in [0, 1] ("np": ``(pixels / 2 + 0.5).clip(0, 1)``, channels last), or the
        samples ("latent")."""
        if self.output_type == "latent":
            return self.samples
        if self.output_type == "np":
            return np.clip(self.pixels / np.float32(2) + np.float32(0.5), 0, 1).transpose(0, 2, 3, 1)
        from PIL import Image

        from ..core.images import to_uint8

        pictures = to_uint8(self.pixels)
        return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pictures]


class L2CPipeline:
    """Samples from an L2C build: class labels or prompts in, images or latents out, called as the family's
    diffusers pipeline is (:meth:`__call__`)."""

    def __init__(self, manifest: dict, folder: Path, backend: Backend, component_providers: Sequence | None = None):
        """``component_providers``: ONNX Runtime providers of the text encoder and VAE decoder sessions (default:
        the CPU; the onnxruntime backend's own where it runs the subsets)."""
        self.manifest = manifest
        self.folder = Path(folder)
        self.backend = backend
        self.sampler = sampler_from_dict(manifest["sampler"])
        self.interface = ModelInterface.from_manifest(manifest)
        self.num_classes = manifest["guidance"].get("null_class")  # labels 0 .. null_class - 1 (label models)
        self.sampler_channels = manifest["guidance"].get("sampler_channels")  # None: the sampler takes every channel
        self.sample_shape = self.interface.sample_shape
        self.label_record = label_record(manifest["model"]["inputs"])  # None: a model conditioned otherwise
        self.step_subset = manifest["schedule"]["step_subset"]
        experts = manifest.get("experts")  # a pipeline of experts (Wan2.2's): each call runs one, on its subsets
        self.step_expert = [0] * len(self.step_subset) if experts is None else experts["step_expert"]
        self.expert_scale_arguments = [] if experts is None else [m["scale_argument"] for m in experts["models"]]
        full = {}  # expert -> its subset that computes everything
        for record in manifest["subsets"]:
            if all(record["compute"]):
                full.setdefault(record.get("expert", 0), record["index"])
        self.full_subsets = [full[expert] for expert in self.step_expert]
        components = manifest.get("components", {})
        providers = component_providers or ("CPUExecutionProvider",)
        self.prompt_encoder = PromptEncoder(manifest, self.folder, providers) if "prompt_encoding" in components else None
        self.decoder = ImageDecoder(manifest, self.folder, providers) if "vae_decoder" in components else None

    @classmethod
    def from_engine_dir(cls, path: str | Path, backend: str = "onnxruntime", verify: bool = True,
                        subsets: Sequence[int] | None = None, **backend_options) -> "L2CPipeline":
        """Loads ``path/manifest.json`` (checking every file's sha256 unless ``verify`` is false) and its engines."""
        data = manifest_io.load(path, verify_files=verify)
        providers = backend_options.get("providers") if backend == "onnxruntime" else None
        return cls(data, Path(path), load_backend(backend, data, Path(path), subsets=subsets, **backend_options),
                   component_providers=providers)

    @classmethod
    def from_pretrained(cls, build_dir: str | Path, backend: str = "onnxruntime", verify: bool = True,
                        **backend_options) -> "L2CPipeline":
        """The build in ``build_dir`` (what ``l2c-export build --out`` writes), as a diffusers pipeline is loaded
        from its folder: :meth:`from_engine_dir`, whose arguments these are."""
        return cls.from_engine_dir(build_dir, backend=backend, verify=verify, **backend_options)

    @property
    def providers(self) -> list[str]:
        return self.backend.providers

    @property
    def num_inference_steps(self) -> int:
        """The steps the build samples: its diffusers scheduler's ``num_inference_steps``, or the model calls of
        an embedded sampler (``build --steps``)."""
        return int(self.manifest["sampler"].get("num_inference_steps", self.sampler.num_calls))

    @property
    def default_guidance_scale(self) -> float:
        """The build's guidance scale, a call's default (``guidance/cfg_scale``: the pipeline's default unless the
        build set another)."""
        return float(self.manifest["guidance"]["cfg_scale"])

    def __call__(self, prompt_or_labels=None, /, *, prompt: Sequence[str] | str | None = None,
                 negative_prompt: Sequence[str] | str | None = None, labels: Sequence[int] | None = None,
                 num_inference_steps: int | None = None, latents: np.ndarray | None = None, generator=None,
                 seed: int | None = None, num_images_per_prompt: int = 1, output_type: str | None = None,
                 conditioning: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
                 cfg_scale: float | None = None, cfg_scale_2: float | None = None, noise: np.ndarray | None = None,
                 full: bool = False,
                 progress: bool = False, decode: bool = False, batch_size: int | None = None,
                 where: str = "conditioning", names: Mapping[str, str] | None = None, **arguments) -> SampleResult:
        """Samples one image per label (a label model) or per prompt, as the family's diffusers pipeline is called.

        prompt_or_labels (the only positional argument): the prompt (a text, or a list of texts: a build with a text
        encoder and tokenizer), or the class labels (integers: a label model, as ``DiTPipeline``'s first argument).
        prompt / labels: the same, by name.
        ``arguments``, by the family pipeline's names as the manifest records them (no name is written here): the
        labels by the label input's argument; the guidance scale by ``guidance/scale_argument`` (the pipelines'
        common name, :data:`~l2c_export.core.interface.DEFAULT_SCALE_ARGUMENT`, or Qwen-Image's own); the prompt's
        arrays by their arguments and their negative partners' (:func:`.conditioning.request_arguments`). Or
        ``conditioning``: a dict of the arrays, or the path of an .npz of them (``where`` names it in errors).
        negative_prompt: with ``prompt``, when guiding: the unconditional half's text (default "", as the PixArt
        pipelines; one, or one per prompt); refused rather than dropped where it would not be used.
        num_inference_steps: the build's (:attr:`num_inference_steps`); another count is refused naming the rebuild.
        the scale (``cfg_scale``, or by its argument name): default :attr:`default_guidance_scale`.
        a build of a pipeline of experts (the manifest's ``experts``, Wan2.2's): the second expert's scale
        (``cfg_scale_2``, or by the name its ``experts/models/1/scale_argument`` gives) combines the halves at its
        calls, default the first's, as the pipeline's; whether to guide at all is the first scale's (> 1). Refused on
        other builds.
        latents (``noise``): (n, *sample shape) float32 initial latents of the n conditional samples; guidance
        duplicates them for the unconditional half.
        seed, or generator: a ``torch.Generator`` (or a list of one per image), read by its ``initial_seed()``
        without importing torch; only a freshly seeded CPU generator is reproduced
        (:func:`~l2c_export.samplers.torch_noise.generator_seed`). The latents are ``make_noise(seed, ...)``, those
        diffusers draws for ``generator=torch.Generator().manual_seed(seed)`` (default seed 0). DDPM draws its step
        noise from the seed too (numpy's stream, not torch's).
        num_images_per_prompt: images of each prompt (or label, or row of the arrays), next to each other as the
        pipelines order them.
        output_type: what ``result.images`` holds: "pil" (PIL images; the default), "np" ((n, H, W, C) float32 in
        [0, 1]) or "latent" (the samples); "pil" and "np" decode a latent model's samples with the build's VAE
        decoder (refused for a build without one). Left out, a latent model's samples are decoded when
        ``result.images`` is first read.
        full: run the full-compute engine at every call (the reference the schedule is measured against).
        decode: decode latents with the build's VAE decoder into ``result.decoded`` during the call.
        batch_size: images encoded, sampled and decoded at once (default: the build's largest model batch, halved
        when guiding, :func:`.conditioning.images_per_batch`), so that a long list of prompts takes the memory of
        one batch; the samples are those of one batch of all n, since every sample's noise is its own rows of the
        seeded streams.
        names: how messages call the request's parts (default the Python arguments this call used; the CLI passes
        its flags, ``l2c_export.cli.options.FLAG_NAMES``).
        """
        from .conditioning import ConditioningError, load_conditioning, request_arguments

        scale_argument = self.manifest["guidance"].get("scale_argument", DEFAULT_SCALE_ARGUMENT)
        label_argument = None if self.label_record is None else self.label_record["argument"]
        known_arrays = request_arguments(self.manifest, negatives=True)
        expert_scales = {name: arguments.pop(name) for name in self.expert_scale_arguments[1:] if name in arguments}
        scales, given_labels, arrays = self._sort_keywords(arguments, scale_argument, label_argument, known_arrays)
        if prompt_or_labels is not None:
            if _is_text(prompt_or_labels) or (label_argument is None and _is_empty(prompt_or_labels)):
                if prompt is not None:
                    raise TypeError("L2CPipeline got the prompt twice: as its first argument and as prompt=")
                prompt = prompt_or_labels
            else:
                given_labels["the first argument"] = prompt_or_labels
        label_name, labels = _only_one_named({"labels": labels, **given_labels}, "labels")
        if isinstance(labels, (int, np.integer)) and not isinstance(labels, (bool, np.bool_)):
            labels = [labels]  # one label, as DiTPipeline takes it
        scale_name, cfg_scale = _only_one_named({"cfg_scale": cfg_scale, **scales}, scale_argument)
        scale_2_name, cfg_scale_2 = _only_one_named({"cfg_scale_2": cfg_scale_2, **expert_scales},
                                                    (self.expert_scale_arguments or ["", "cfg_scale_2"])[1])
        if num_inference_steps is not None and (isinstance(num_inference_steps, bool)
                                                or num_inference_steps != self.num_inference_steps):
            raise ValueError(f"num_inference_steps is {num_inference_steps!r}; this build samples "
                             f"{self.num_inference_steps} steps (its schedule and engines are made for them): leave "
                             f"num_inference_steps out, or build again for {num_inference_steps!r} (l2c-export build "
                             f"--steps {num_inference_steps!r}, with a schedule for {num_inference_steps!r} steps)")
        if output_type not in (None, *OUTPUT_TYPES):
            raise ValueError(f"output_type is {output_type!r}; expected one of {', '.join(map(repr, OUTPUT_TYPES))} "
                             f"(no torch at run time: 'pt' is not made)")
        if output_type in ("pil", "np") and self.decoder is None and self.manifest["model"]["space"] == "latent":
            raise ValueError(f"output_type is {output_type!r}, but the build {self.folder} has no VAE decoder (field "
                             f"'components/vae_decoder') to make images of its latents; pass output_type=\"latent\" "
                             f"(result.images is then the latents), or build from a diffusers folder with a vae/")
        noise_name, noise = _only_one_named({"noise": noise, "latents": latents}, "latents")
        seeds = None
        if generator is not None:
            if seed is not None:
                raise ValueError("give seed or generator, not both: the generator's seed is the seed")
            if isinstance(generator, (list, tuple)):
                seeds = [generator_seed(g, f"generator {i + 1}") for i, g in enumerate(generator)]
                seed = seeds[0] if seeds else None
            else:
                seed = generator_seed(generator)
        seed = 0 if seed is None else seed
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, (int, np.integer)) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt is {num_images_per_prompt!r}; expected a positive integer")
        if arrays:
            if conditioning is not None:
                raise ValueError(f"give conditioning or the arrays ({', '.join(arrays)}) as arguments, not both")
            if prompt is not None:
                raise ValueError(f"give prompt or {', '.join(arrays)}, not both: the arrays are the prompt encoded")
            conditioning, where = arrays, ""  # messages name each array by its argument
        if isinstance(conditioning, (str, os.PathLike)):  # an .npz file
            where = f"conditioning {conditioning}"
            conditioning = load_conditioning(conditioning, where, request_arguments(self.manifest))
        elif conditioning is not None and not isinstance(conditioning, Mapping):
            raise ConditioningError(f"conditioning is a {type(conditioning).__name__}; expected a dict of arrays by "
                                    f"the pipelines' argument names ({', '.join(known_arrays)}), or the path of an "
                                    f".npz of them")
        if names is None:
            names = {**ARGUMENT_NAMES, "labels": label_argument if label_name == label_argument else "labels",
                     "cfg_scale": scale_name, "cfg_scale_2": scale_2_name,
                     "conditioning": ", ".join(arrays) if arrays else "conditioning"}
            if label_argument is None and prompt is None and conditioning is None and labels is None:
                raise ValueError(f"prompt: none given; expected prompt (texts, the build having a text encoder) or "
                                 f"the prompt's arrays ({', '.join(request_arguments(self.manifest, False))})"
                                 if self.prompt_encoder is not None else
                                 f"{', '.join(request_arguments(self.manifest, False))}: none given; expected the "
                                 f"prompt's arrays (the build has no text encoder to encode a prompt)")
        if num_images_per_prompt > 1:
            prompt, negative_prompt, labels, conditioning = _each_repeated(
                int(num_images_per_prompt), prompt, negative_prompt, labels, conditioning)
        if seeds is not None and noise is None:  # given latents, the generators only seed DDPM's step noise
            count = self._count(labels, prompt, conditioning)
            if count is not None and len(seeds) != count:
                raise ValueError(f"generator: a list of {len(seeds)} generators for {count} images; expected one per "
                                 f"image (num_images_per_prompt included), or a single generator")
            noise_name, noise = "generator", np.concatenate([make_noise(s, (1, *self.sample_shape)) for s in seeds])
        if output_type in ("pil", "np"):
            decode = True
        return self._generate(labels, (cfg_scale, cfg_scale_2), seed, noise, noise_name, full, progress, conditioning,
                              where, prompt, negative_prompt, decode, batch_size, names, output_type)

    @staticmethod
    def _sort_keywords(arguments: Mapping[str, object], scale_argument: str, label_argument: str | None,
                       known_arrays: Sequence[str]) -> tuple[dict, dict, dict]:
        """A call's keyword arguments beyond the named ones, by the family pipeline's names: (the scale by
        ``scale_argument``, the labels by ``label_argument``, the arrays of ``known_arrays``); any other is a
        TypeError listing what the build takes."""
        scales, labels, arrays = {}, {}, {}
        for name, value in arguments.items():
            if name == scale_argument:
                scales[name] = value
            elif name == label_argument:
                labels[name] = value
            elif name in known_arrays:
                arrays[name] = value
            elif name == DEFAULT_SCALE_ARGUMENT:
                raise ValueError(f"{name}: this model's guidance scale is its pipeline's {scale_argument} (the "
                                 f"manifest's 'guidance/scale_argument'); pass {scale_argument}= instead")
            else:
                accepted = [label_argument, scale_argument, *known_arrays]
                raise TypeError(f"L2CPipeline got an unexpected keyword argument {name!r}; this build takes, beside "
                                f"the pipeline's own (prompt, negative_prompt, num_inference_steps, latents, "
                                f"generator, num_images_per_prompt, output_type, ...), "
                                f"{', '.join(a for a in accepted if a)}")
        return scales, labels, arrays

    @staticmethod
    def _count(labels, prompt, conditioning) -> int | None:
        """The images a request asks for, where they can be counted before it is checked."""
        if labels is not None:
            return len(labels)
        if prompt is not None:
            return 1 if _is_text_item(prompt) else len(prompt)
        first = next((a for a in (conditioning or {}).values() if np.ndim(a)), None)
        return None if first is None else len(first)

    def _generate(self, labels, scales, seed, noise, noise_name, full, progress, conditioning, where, prompt,
                  negative_prompt, decode, batch_size, names, output_type) -> SampleResult:
        """:meth:`__call__`'s request, its arguments resolved (one name each, an .npz loaded, repeated per
        ``num_images_per_prompt``): checked whole, then sampled (and decoded) a batch at a time. ``scales``: the
        guidance scale and the second expert's (None: the defaults)."""
        from ..core.memory import check_run_fits
        from .conditioning import (ConditioningError, classifier_free_batch, images_per_batch,
                                   model_batch_conditioning, request_arguments)

        cfg_scale, cfg_scale_2 = scales
        cfg_scale = check_finite(self.manifest["guidance"]["cfg_scale"] if cfg_scale is None else cfg_scale,
                                 names["cfg_scale"], low=1.0)
        scale_2_name = names.get("cfg_scale_2", "cfg_scale_2")
        if cfg_scale_2 is not None and len(self.expert_scale_arguments) < 2:
            raise ValueError(f"{scale_2_name}: the build {self.folder} has one transformer (its manifest has no "
                             f"'experts'), guided by {names['cfg_scale']} alone; leave {scale_2_name} out")
        # each expert's scale, the second's defaulting to the first's as in the pipeline; the first decides guiding
        expert_scales = [cfg_scale, cfg_scale if cfg_scale_2 is None else check_finite(cfg_scale_2, scale_2_name,
                                                                                       low=1.0)]
        call_scales = [expert_scales[expert] for expert in self.step_expert]
        guiding = classifier_free_batch(self.manifest, cfg_scale)
        if batch_size is None:
            batch_size = images_per_batch(self.manifest, cfg_scale)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size is {batch_size!r}; expected a positive integer (images sampled at once)")
        if decode and self.decoder is None and self.manifest["model"]["space"] == "latent":
            raise ValueError(f"{self.folder}: the build has no VAE decoder (field 'components/vae_decoder'); build "
                             f"from a diffusers folder with a vae/ to decode, or save the latents")
        negatives = None
        if prompt is not None:
            if conditioning is not None:
                raise ValueError(f"give {names['prompt']} or {names['conditioning']}, not both")
            if self.label_record is not None:
                raise ConditioningError(f"{names['prompt']}: this model is conditioned on class labels "
                                        f"({names['labels']}), not prompts")
            if self.prompt_encoder is None:
                raise ValueError(f"{self.folder}: the build has no text encoder and tokenizer (field "
                                 f"'components/text_encoder'); give the prompt's arrays "
                                 f"({', '.join(request_arguments(self.manifest, False))}) instead, or build from a "
                                 f"diffusers folder with text_encoder/ and tokenizer/")
            prompts = [prompt] if _is_text_item(prompt) else list(prompt)
            if not prompts:
                raise PromptError("prompt: expected one or more prompts")
            prompts = [check_prompt(text, f"prompt {i + 1}" if len(prompts) > 1 else "prompt")
                       for i, text in enumerate(prompts)]
            self.prompt_encoder.check_preprocessing(prompts, names["prompt"])
            if negative_prompt is not None and not guiding:
                refuse_unused_negative_prompt(guiding, True, False, names)
            if guiding:
                negatives = self.prompt_encoder.negative_prompts(negative_prompt, len(prompts), names)
            n, where, what = len(prompts), "prompt", "prompts"
        else:
            if negative_prompt is not None:
                refuse_unused_negative_prompt(guiding, False, conditioning is not None, names)
            # the whole request checked once, so that a message names what is wrong in it, not in one batch
            n, _ = model_batch_conditioning(self.manifest, guiding, labels, conditioning, where, cfg_scale, names)
            what = names["labels"] if labels is not None else where or "prompts"
        check_run_fits(self.manifest, n, guiding, f"{n} {what}", batch=batch_size)
        expected = (n, *self.sample_shape)
        if noise is not None:
            noise = np.asarray(noise, dtype=np.float32)
            if noise.shape != expected:
                raise ValueError(f"{noise_name} has shape {noise.shape}; expected {expected} (n samples, then the "
                                 f"model's sample shape)")
            if not np.isfinite(noise).all():
                raise ValueError(f"{noise_name} holds NaN or infinite values; expected finite noise")
        # make_noise(seed, (n, ...)) (diffusers' draw for torch.Generator().manual_seed(seed)) and the first n rows of
        # each DDPM step's step_noise(seed, s, ...), drawn a batch at a time
        initial_noise = InitialNoiseRows(seed, self.sample_shape, n) if noise is None else None
        ddpm_streams: dict[int, NoiseRows] = {}

        def ddpm_noise(s: int, rows: int) -> np.ndarray:
            if s not in ddpm_streams:
                ddpm_streams[s] = NoiseRows(seed + s + 1, self.sample_shape)
            return ddpm_streams[s].draw(rows)

        starts = range(0, n, batch_size)
        subsets = list(self.full_subsets) if full else list(self.step_subset)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.sampler.num_calls * len(starts), leave=False,
                       desc=f"sampling {n} image(s) ({self.backend.name})")
        samples, decoded, seconds, engine_seconds = [], [], 0.0, 0.0
        try:
            for start in starts:
                stop = min(n, start + batch_size)
                if prompt is not None:
                    batch_conditioning = self.prompt_encoder(prompts[start:stop], negatives[start:stop] if guiding
                                                             else "", guiding)
                    batch_labels = None
                else:
                    batch_conditioning = None if conditioning is None else {
                        name: np.asarray(array)[start:stop] for name, array in conditioning.items()}
                    batch_labels = None if labels is None else list(labels)[start:stop]
                _, condition = model_batch_conditioning(self.manifest, guiding, batch_labels, batch_conditioning,
                                                        where, cfg_scale, names)
                batch_noise = noise[start:stop] if noise is not None else initial_noise.draw(stop - start)
                x, batch_seconds, batch_engine_seconds = self._sample(
                    np.asarray(batch_noise, dtype=np.float32), condition, guiding, call_scales, subsets,
                    lambda s, rows=stop - start: ddpm_noise(s, rows), bar)
                samples.append(x)
                seconds += batch_seconds
                engine_seconds += batch_engine_seconds
                if decode and self.decoder is not None:
                    decoded.append(self.decoder(x))
        finally:
            if bar is not None:
                bar.close()
        lazy_decoder = None
        if self.decoder is not None and not decoded:  # decoded when result.images is read, a batch at a time
            def lazy_decoder(x: np.ndarray) -> np.ndarray:
                return np.concatenate([self.decoder(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        return SampleResult(samples=np.concatenate(samples), seconds=seconds, engine_seconds=engine_seconds,
                            step_subsets=subsets, decoded=np.concatenate(decoded) if decoded else None,
                            output_type=output_type, decoder=lazy_decoder)

    def _sample(self, noise: np.ndarray, condition: dict, guiding: bool, call_scales: list[float],
                subsets: list[int], ddpm_noise, bar) -> tuple[np.ndarray, float, float]:
        """One batch: initial noise (b, C, H, W), the model batch's conditioning inputs (2b rows when ``guiding``),
        the guidance scale of each call (its expert's), ``ddpm_noise(call) -> (b, C, H, W)`` -> (samples (b, C, H,
        W) float32, seconds of the loop, seconds in the engines)."""
        n = len(noise)
        guided, rule = self.manifest["guidance"]["guided_channels"], self.manifest["guidance"]["rule"]
        state = self.backend.new_request()
        engine_seconds = 0.0

        def run_model(call: ModelCall) -> np.ndarray:
            nonlocal engine_seconds
            model_x = np.concatenate([call.x, call.x]) if guiding else call.x  # both halves run on the same samples
            t = np.full(len(model_x), call.t, dtype=np.float32)
            engine_start = time.perf_counter()
            out = self.backend.run(subsets[call.index], self.interface.feeds(model_x, t, condition), state)
            engine_seconds += time.perf_counter() - engine_start
            out = apply_guidance(out, call_scales[call.index], guided, rule)[:n] if guiding else out
            return out if self.sampler_channels is None else out[:, :self.sampler_channels]

        start = time.perf_counter()
        x = denoise(self.sampler, noise, run_model, ddpm_noise, progress=bar.update if bar is not None else None)
        return np.asarray(x, dtype=np.float32), time.perf_counter() - start, engine_seconds


def _is_text_item(value) -> bool:
    return isinstance(value, (str, bytes, bytearray, np.str_, np.bytes_))


def _is_text(value) -> bool:
    """Whether a first argument is a prompt (a text, or a sequence holding one) rather than class labels."""
    if _is_text_item(value):
        return True
    try:
        return any(_is_text_item(item) for item in value)
    except TypeError:  # not a sequence: a single label, refused as labels
        return False


def _is_empty(value) -> bool:
    try:
        return len(value) == 0
    except TypeError:
        return False


def _only_one_named(given: Mapping[str, object], default: str) -> tuple[str, object]:
    """(name, value) of the one argument given among ``given`` (names that mean the same), or (``default``, None)
    where none is; two given are refused naming both."""
    named = [(name, value) for name, value in given.items() if value is not None]
    if len(named) > 1:
        raise TypeError(f"L2CPipeline got {named[0][0]} and {named[1][0]}: they are the same argument; give one")
    return named[0] if named else (default, None)


def _each_repeated(times: int, prompt, negative_prompt, labels, conditioning):
    """``num_images_per_prompt``: each prompt (a list of negative prompts alike), label and row of the arrays
    ``times`` times, next to each other, as the pipelines repeat the encoded prompt for their latents."""
    def each(items):
        return [item for item in items for _ in range(times)]

    if prompt is not None:
        prompt = each([prompt] if _is_text_item(prompt) else prompt)
        if negative_prompt is not None and not _is_text_item(negative_prompt):
            negative_prompt = each(negative_prompt)
    if labels is not None:
        labels = each(labels)
    if conditioning is not None:
        conditioning = {name: np.repeat(array, times, axis=0) if np.ndim(array) else array
                        for name, array in conditioning.items()}
    return prompt, negative_prompt, labels, conditioning
