"""``l2c-export verify``: every subset engine against the PyTorch cached forward on the same inputs.

The PyTorch reference (fp32, rebuilt from ``weights.bin``) samples through the schedule, driven by the one denoising
loop; at the first model call that runs each subset, the engine gets exactly the reference's inputs and cache
contents, and its model output and fresh branch outputs are compared with the reference's. Differences are relative to the reference tensor's largest magnitude.

An int8/fp8 build's reference is by default the float32 model of its own weights dequantized (what the engines stand
for: the error of quantized activations and arithmetic); with ``reference`` (an fp32 build of the same checkpoint) it
is the original fp32 model, so the error includes the weights' quantization too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core import manifest as manifest_io
from ..core.extras import import_extra
from ..runtime.backends import cache_inputs, fresh_outputs, load_backend
from ..runtime.backends.torch import model_from_manifest
from ..runtime.pipeline import ModelInterface
from ..samplers import ModelCall, denoise, sampler_from_dict
from ..runtime.conditioning import classifier_free_batch, example_conditioning, model_batch_conditioning
from ..samplers.guidance import apply_guidance, make_noise, step_noise

# int8, measured on the embedded default against its fp32 build (verify --reference): the worst tensor of any subset,
# a fresh branch output at the first step, is 4.6e-2 off with dynamic activations and 0.17 to 0.26 with static Q/DQ
# ones (verify seeds 0-3, calibrated on make_noise's 4 images; numpy's and torch's noise alike); model_out 1.2e-2 and
# 3.2e-2; fp8 (E4M3 Q/DQ): 0.15 to 0.22, model_out 0.1. The tolerances leave 1.3x to 2x of headroom.
DEFAULT_TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2, "bf16": 6e-2, "int8": 0.1, "int8-qdq": 0.35,
                     "fp8": 0.3}


@dataclass
class SubsetCheck:
    name: str
    step: int  # the model call at which the subset was checked
    worst: dict[str, float]  # output name -> max |engine - reference| / max |reference|
    tolerance: float

    @property
    def worst_value(self) -> float:
        return max(self.worst.values())

    @property
    def passed(self) -> bool:
        return self.worst_value <= self.tolerance


@torch.no_grad()
def verify_build(folder: str | Path, backend: str = "onnxruntime", tolerance: float | None = None,
                 labels: tuple[int, ...] = (0, 1), seed: int = 0, reference: str | Path | None = None,
                 diffusers: str | Path | None = None, **backend_options) -> tuple[list[SubsetCheck], list[str]]:
    """Returns one check per subset and the providers the engines ran on. ``reference``: an fp32 build of the same
    checkpoint whose weights are the reference (default: this build's own, dequantized where int8); ``diffusers``:
    the diffusers folder the build came from, whose transformer (as diffusers saved it) is the reference."""
    folder = Path(folder)
    data = manifest_io.load(folder)
    tolerance = default_tolerance(data) if tolerance is None else tolerance
    engines = load_backend(backend, data, folder, **backend_options)
    reference = _diffusers_model(data, folder, diffusers) if diffusers is not None else _reference_model(
        data, folder, reference)
    interface = ModelInterface.from_manifest(data)
    sampler = sampler_from_dict(data["sampler"])
    cfg_scale = data["guidance"]["cfg_scale"]
    guiding = classifier_free_batch(data, cfg_scale)
    example = example_conditioning(data, len(labels), seed)  # labels, or seeded prompt embeddings with padding
    if "labels" in example:
        example["labels"] = [label % data["guidance"]["null_class"] for label in labels]
    n, condition = model_batch_conditioning(data, guiding, example.get("labels"), example.get("conditioning"))
    noise = make_noise(seed, (n, *interface.sample_shape))
    sampler_channels = data["guidance"].get("sampler_channels")
    slot_index = {slot["name"]: slot["index"] for slot in data["cache_slots"]}
    step_subset = data["schedule"]["step_subset"]
    reference_cache: dict[int, torch.Tensor] = {}
    checks: dict[int, SubsetCheck] = {}

    def run_model(call: ModelCall) -> np.ndarray:
        subset_index = step_subset[call.index]
        record = data["subsets"][subset_index]
        x = np.concatenate([call.x, call.x]) if guiding else call.x  # both halves run on the same samples
        feeds = interface.feeds(x, np.full(len(x), call.t, dtype=np.float32), condition)
        check_now = subset_index not in checks
        if check_now:  # the engine gets exactly the reference's inputs and cache contents
            state = engines.new_request()
            for tensor in cache_inputs(record):
                engines.write_cache(state, tensor["slot"], reference_cache[slot_index[tensor["slot"]]].numpy())
            engine_out = engines.run(subset_index, feeds, state)
        inputs = [torch.from_numpy(feeds[spec["name"]]) for spec in data["model"]["inputs"]]
        out = reference.forward_cached(*inputs, [bool(c) for c in record["compute"]], reference_cache).numpy()
        if check_now:
            worst = {interface.output: _relative(engine_out, out)}
            for tensor in fresh_outputs(record):
                worst[tensor["name"]] = _relative(engines.read_cache(state, tensor["slot"]),
                                                  reference_cache[slot_index[tensor["slot"]]].numpy())
            checks[subset_index] = SubsetCheck(record["name"], call.index, worst, tolerance)
        guidance = data["guidance"]
        out = apply_guidance(out, cfg_scale, guidance["guided_channels"], guidance["rule"])[:n] if guiding else out
        return out if sampler_channels is None else out[:, :sampler_channels]

    def ddpm_noise(s: int) -> np.ndarray:
        return step_noise(seed, s, ((2 if guiding else 1) * n, *interface.sample_shape))[:n]

    denoise(sampler, noise, run_model, ddpm_noise)
    return [checks[i] for i in sorted(checks)], engines.providers


def default_tolerance(data: dict) -> float:
    qdq = data.get("quantization", {}).get("form") == "qdq"
    return DEFAULT_TOLERANCE["int8-qdq" if qdq and data["precision"] == "int8" else data["precision"]]


def _reference_model(data: dict, folder: Path, reference: str | Path | None):
    if reference is None:
        return model_from_manifest(data, folder, precision="fp32")
    reference = Path(reference)
    other = manifest_io.load(reference)
    where = reference / manifest_io.MANIFEST_NAME
    if other["precision"] != "fp32":
        raise manifest_io.ManifestError(f"{where}: field 'precision' is {other['precision']!r}; the reference must "
                                        f"be an fp32 build")
    for field in ("weights_sha256", "config"):
        if other["model"][field] != data["model"][field]:
            raise manifest_io.ManifestError(f"{where}: field 'model/{field}' differs from {folder}'s: the reference "
                                            f"must be built from the same checkpoint")
    return model_from_manifest(other, reference, precision="fp32")


def _diffusers_model(data: dict, folder: Path, diffusers: str | Path):
    """The transformer of the diffusers folder a build came from, refused unless its weights are the build's; at the
    build's size (FLUX.1: the ``latent_size`` its ``--image-size`` set; Wan: its ``--num-frames`` and ``--image-size``
    from ``latent_shape``)."""
    import dataclasses

    from ..models.diffusers import read_folder
    from ..models.diffusers.vae import WAN_VAE_TEMPORAL
    from ..models.zoo import from_diffusers

    built = data["model"]["config"]
    if isinstance(built.get("latent_shape"), list) and len(built["latent_shape"]) == 3:  # a clip: at the build's size
        frames, height, width = built["latent_shape"]
        scale = read_folder(diffusers).vae_scale_factor
        spec = from_diffusers(diffusers, (height * scale, width * scale),
                              num_frames=(frames - 1) * WAN_VAE_TEMPORAL + 1)
    else:
        spec = from_diffusers(diffusers)
    if "latent_size" in built and spec.config.latent_size is not None:
        spec = dataclasses.replace(spec, config=dataclasses.replace(spec.config, latent_size=built["latent_size"]))
    if spec.family.name != data["model"]["family"] or spec.config.to_dict() != built:
        raise manifest_io.ManifestError(f"{folder / manifest_io.MANIFEST_NAME}: field 'model/config' differs from "
                                        f"{diffusers}'s transformer: the build did not come from that folder")
    if spec.family.weights_sha256(spec.weights) != data["model"]["weights_sha256"]:
        raise manifest_io.ManifestError(f"{folder / manifest_io.MANIFEST_NAME}: field 'model/weights_sha256' differs "
                                        f"from the weights of {diffusers}: the build did not come from that folder")
    built_experts = data.get("experts", {}).get("models", [])
    experts = [] if spec.experts is None else list(spec.experts.models)
    if [m["name"] for m in built_experts] != [m.name for m in experts] or any(
            spec.family.weights_sha256(m.weights) != record["weights_sha256"]
            for m, record in zip(experts, built_experts)):
        raise manifest_io.ManifestError(f"{folder / manifest_io.MANIFEST_NAME}: field 'experts' differs from "
                                        f"{diffusers}'s experts: the build did not come from that folder")
    return spec.load_model()


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    scale = float(np.abs(want).max()) or 1.0
    return float(np.abs(got.astype(np.float32) - want).max()) / scale


@torch.no_grad()
def verify_components(folder: str | Path, diffusers: str | Path, tolerance: float = 1e-4,
                      seed: int = 0) -> list[SubsetCheck]:
    """The build's component graphs against the diffusers folder's own modules on the same inputs, one check each
    (``step`` 0): each text encoder (transformers' own class, as the pipeline runs it) on example prompts tokenized
    as the runtime tokenizes them (in the template where it has one; padded, one truncated), the VAE decoder
    (diffusers' VAE as its kind decodes, after the pipelines' scaling, shift and the packed layouts'
    ``FluxPipeline._unpack_latents``) on seeded random latents. A component whose
    folder part is not the one it was built from (``source_sha256``) is refused."""
    from ..builder.components import component_sources, source_sha256
    from ..models.diffusers import read_folder
    from ..runtime.pipeline import L2CPipeline

    folder = Path(folder)
    pipe = L2CPipeline.from_engine_dir(folder)
    components = pipe.manifest.get("components", {})
    # the folder's parts, read and checked (not sized: the build's size is in its graphs)
    spec = read_folder(diffusers)
    sources, family = component_sources(spec), spec.family
    where = folder / manifest_io.MANIFEST_NAME
    for name, record in components.items():
        if "source_sha256" not in record:  # prompt_encoding: no files, made of the encoders' records
            continue
        if name not in sources or source_sha256(sources[name]) != record["source_sha256"]:
            raise manifest_io.ManifestError(f"{where}: field 'components/{name}/source_sha256' differs from "
                                            f"{diffusers}'s: the component did not come from that folder")
    checks = []
    if pipe.prompt_encoder is not None:
        from ..core.text_stack import preprocess
        from ..models.diffusers.text_encoders import encoder_outputs

        transformers = import_extra("transformers", "verify --diffusers")
        prompts = ["a photo of a cat", "the digit seven, handwritten", " ".join(["word"] * 400)]
        texts = [preprocess(prompt, pipe.prompt_encoder.preprocessing) for prompt in prompts]
        for encoder in pipe.prompt_encoder.encoders:
            config = json.loads((sources[encoder.name] / "config.json").read_text())
            module = getattr(transformers, config["architectures"][0]).from_pretrained(
                str(sources[encoder.name]), use_safetensors=True, local_files_only=True).float().eval()
            ids, mask = encoder.tokenize(texts)
            got = encoder.encode(ids, mask)
            names = tuple(t["name"] for t in components[encoder.name]["outputs"])
            masked = "attention_mask" in [t["name"] for t in components[encoder.name]["inputs"]]
            out = module(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask) if masked else None,
                         output_hidden_states=True)
            want = encoder_outputs(out, names)
            checks.append(SubsetCheck(encoder.name, 0, {name: _relative(got[name], value.numpy())
                                                        for name, value in zip(names, want)}, tolerance))
    if pipe.decoder is not None:
        source = Path(sources["vae_decoder"])
        # the decoder module of the folder's VAE kind as the pipeline decodes (not the exporter's stand-ins)
        vae, _ = family.declaration.vae.code.decoder(spec.components.vae_class, source)
        record = components["vae_decoder"]
        latents = make_noise(seed, (2, *pipe.sample_shape))
        spatial = torch.from_numpy(latents)
        if record.get("latent_layout") == "packed_2x2":
            FluxPipeline = import_extra("diffusers", "verify --diffusers").FluxPipeline
            _, height, width = record["inputs"][0]["shape"][1:]
            spatial = FluxPipeline._unpack_latents(spatial, height, width, 1)
        with torch.no_grad():
            want = vae(spatial / record["scaling_factor"] + (record.get("shift_factor") or 0.0))
        checks.append(SubsetCheck("vae_decoder", 0, {"sample": _relative(pipe.decoder(latents), want.numpy())},
                                  tolerance))
    return checks
