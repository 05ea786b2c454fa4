"""A diffusers family is one declaration (l2c_export/models/diffusers/declaration.py): the registry finds its file,
its graph interface and guidance come from it as the manifest's schema records them, a request is checked by the
kinds it declares, and no runtime (Python, Triton model, C++) writes any declared argument name itself."""

from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import numpy as np
import pytest

from l2c_export.core import manifest as manifest_io
from l2c_export.core.interface import GUIDANCE_EMBEDDING, TOKEN_EMBEDDINGS, TOKEN_MASK
from l2c_export.models import FAMILIES, get_family
from l2c_export.models.diffusers import (Blocks, Conditioning, Declaration, DiffusersConfig, DiffusersFamily,
                                         Guidance, transformer_families)
from l2c_export.samplers.conditioning import ConditioningError, batch_conditioning

from .conftest import REPO
from .diffusers_pipelines import (DIT_CONFIG, FLUX_CONFIG, PIXART_CONFIG, QWEN_CONFIG, SANA15_CONFIG, SD35_CONFIG,
                                 WAN_CONFIG)

# family -> a tiny config of its transformer (the tests' folders'), with FLUX.1's and Qwen-Image's latent side and
# Wan's latents (F', H', W')
CONFIGS = {"diffusers-dit": DiffusersConfig("DiTTransformer2DModel", DIT_CONFIG),
           "diffusers-pixart": DiffusersConfig("PixArtTransformer2DModel", PIXART_CONFIG),
           "diffusers-sd3": DiffusersConfig("SD3Transformer2DModel", SD35_CONFIG),
           "diffusers-sana": DiffusersConfig("SanaTransformer2DModel", SANA15_CONFIG),
           "diffusers-flux": DiffusersConfig("FluxTransformer2DModel", dict(FLUX_CONFIG, guidance_embeds=True),
                                             latent_size=8),
           "diffusers-qwenimage": DiffusersConfig("QwenImageTransformer2DModel", QWEN_CONFIG, latent_size=8),
           "diffusers-wan": DiffusersConfig("WanTransformer3DModel", dict(WAN_CONFIG, patch_size=[1, 2, 2]),
                                            latent_shape=(2, 2, 4))}
RUNTIMES = ("l2c_export/runtime", "l2c_export/serving", "cpp/src", "cpp/include", "cpp/tools")


def test_every_family_file_is_registered_under_its_name_and_reads_its_class():
    declared = sorted(name for name in FAMILIES if name.startswith("diffusers-"))
    assert declared == sorted(CONFIGS)
    by_class = transformer_families()
    for name in declared:
        family = get_family(name)
        assert family.name == name and by_class[family.transformer_class] is family
        assert family.declaration.transformer_class == family.transformer_class


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_declared_inputs_and_guidance_are_what_the_manifest_schema_records(name):
    family, config = get_family(name), CONFIGS[name]
    schema = manifest_io.schema()
    tensor_schema = {**schema["$defs"]["tensor"], "$defs": schema["$defs"]}
    records = [tensor.record() for tensor in family.graph_inputs(config)]
    for record in records:
        jsonschema.validate(record, tensor_schema)
    declared = family.declaration.present_conditioning(config)
    assert [(r["name"], r["argument"], r["kind"], r.get("negative")) for r in records[2:]] == [
        (c.input, c.argument, c.kind, c.negative) for c in declared]
    guidance = family.guidance_record(config)
    jsonschema.validate({"cfg_scale": 2.0, "guided_channels": 1, **guidance}, schema["properties"]["guidance"])
    assert (guidance["rule"] == GUIDANCE_EMBEDDING) == (name == "diffusers-flux")
    assert family.latent_layout in schema["properties"]["model"]["properties"]["latent_layout"]["enum"]
    # the traced tensors are one per graph input, of its shape (the token axis at the traced length)
    dummies = family.dummy_inputs(config, 2, tokens=3)
    assert [tuple(t.shape) for t in dummies] == [
        (2, *(3 if isinstance(size, str) else size for size in r["shape"][1:])) for r in records]


def test_no_runtime_writes_a_declared_argument_name():
    """Each conditioning name is the declarations' alone: the runtimes read them from the manifest."""
    names = {name for family in map(get_family, CONFIGS) for c in family.declaration.conditioning
             for name in (c.argument, c.negative) if name is not None}
    assert {"prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds", "class_labels"} <= names
    found = []
    for folder in RUNTIMES:
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix in (".py", ".cpp", ".hpp") and path.is_file():
                text = path.read_text()
                found += [f"{path.relative_to(REPO)}: {name}" for name in sorted(names)
                          if re.search(rf"\b{name}\b", text)]
    assert not found, found


def _sketch(rule: str = "classifier_free") -> tuple[list[dict], dict]:
    """A family no file declares (Sana-like: embeddings and a mask with negative partners): its input records and
    guidance record."""
    negatives = rule != GUIDANCE_EMBEDDING
    declaration = Declaration(
        transformer_class="SketchTransformer2DModel", pipeline_classes=("SketchPipeline",),
        blocks=(Blocks(sublayers=("attn1", "ff")),),
        conditioning=(Conditioning("prompt_embeds", "encoder_hidden_states", TOKEN_EMBEDDINGS, width="caption_channels",
                                   negative="negative_prompt_embeds" if negatives else None),
                      Conditioning("prompt_attention_mask", "encoder_attention_mask", TOKEN_MASK,
                                   negative="negative_prompt_attention_mask" if negatives else None)),
        guidance=Guidance(default_scale=4.5, rule=rule))
    family = DiffusersFamily("diffusers-sketch", declaration)
    config = DiffusersConfig("SketchTransformer2DModel", dict(PIXART_CONFIG, caption_channels=12))
    return [t.record() for t in family.graph_inputs(config)], family.guidance_record(config)


def _arrays(n: int = 2, length: int = 5) -> dict[str, np.ndarray]:
    mask = np.ones((n, length), np.float32)
    mask[0, -2:] = 0
    return {"prompt_embeds": np.ones((n, length, 12), np.float32), "prompt_attention_mask": mask,
            "negative_prompt_embeds": np.zeros((n, length, 12), np.float32),
            "negative_prompt_attention_mask": np.ones((n, length), np.float32)}


def test_a_new_declaration_is_batched_by_its_declared_names_and_partners():
    records, guidance = _sketch()
    n, feeds = batch_conditioning(records, guidance, True, conditioning=_arrays(), max_tokens=8)
    assert n == 2 and sorted(feeds) == ["encoder_attention_mask", "encoder_hidden_states"]
    np.testing.assert_array_equal(feeds["encoder_hidden_states"][:, 0, 0], [1, 1, 0, 0])  # conditional half first
    np.testing.assert_array_equal(feeds["encoder_attention_mask"][:, -1], [0, 1, 1, 1])
    n, feeds = batch_conditioning(records, guidance, False, conditioning={
        k: v for k, v in _arrays().items() if not k.startswith("negative_")})
    assert feeds["encoder_hidden_states"].shape == (2, 5, 12)


@pytest.mark.parametrize("change,message", [
    (lambda a: a.pop("negative_prompt_attention_mask"), "array 'negative_prompt_attention_mask' is missing (guidance "
                                                        "runs the negative prompt as the unconditional half)"),
    (lambda a: a.update(prompt_attention_mask=np.ones((2, 4))), "array 'prompt_attention_mask' has shape (2, 4); "
                                                                "expected (2, 5) (n, L of the embeddings)"),
    (lambda a: a.update(negative_prompt_embeds=np.zeros((2, 4, 12))), "array 'negative_prompt_embeds' has shape "
                                                                      "(2, 4, 12); expected (2, 5, 12), that of "
                                                                      "'prompt_embeds'"),
    (lambda a: a.update(prompt_embedz=a.pop("prompt_embeds")), "unknown array 'prompt_embedz'; expected prompt_embeds, "
                                                               "prompt_attention_mask, negative_prompt_embeds, "
                                                               "negative_prompt_attention_mask"),
    (lambda a: a.update(prompt_embeds=np.ones((2, 9, 12))), "9 prompt tokens; expected at most the model's "
                                                            "max_sequence_length 8"),
], ids=["missing-partner", "mask-length", "partner-shape", "unknown", "too-long"])
def test_a_new_declaration_refuses_what_does_not_fit_its_kinds_by_name(change, message):
    records, guidance = _sketch()
    arrays = _arrays()
    change(arrays)
    with pytest.raises(ConditioningError) as error:
        batch_conditioning(records, guidance, True, conditioning=arrays, where="--conditioning c.npz", max_tokens=8)
    assert str(error.value).startswith("--conditioning c.npz: ") and message in str(error.value)


def test_a_guidance_distilled_declaration_refuses_negatives():
    records, guidance = _sketch(GUIDANCE_EMBEDDING)
    assert json.dumps(records).count("negative") == 0
    with pytest.raises(ConditioningError, match="array 'negative_prompt_attention_mask' is not used: this model is "
                                                "guidance-distilled"):
        batch_conditioning(records, guidance, False, conditioning=_arrays())


def test_a_text_encoder_stack_makes_only_declared_conditioning_and_sd3s_prompt_is_clip_plus_t5():
    """The stack's arrays are the declaration's conditioning arguments (one name, one place); the token bound of
    SD3's prompt_embeds is CLIP's 77 + the pipeline's max_sequence_length, FLUX.1's the latter alone."""
    sd3 = get_family("diffusers-sd3")
    assert [name for name, _ in sd3.declaration.text_encoders.arrays] == ["prompt_embeds", "pooled_prompt_embeds"]
    assert sd3.max_prompt_tokens("StableDiffusion3Pipeline") == 77 + 256
    assert sd3.max_prompt_tokens("StableDiffusion3Pipeline", 24) == 77 + 24
    assert get_family("diffusers-flux").max_prompt_tokens("FluxPipeline", 24) == 24
    with pytest.raises(ValueError, match=r"the text encoders make \['prompt_embeds', 'pooled_prompt_embeds'\]; each "
                                         r"must be a declared conditioning argument"):
        dataclasses.replace(sd3.declaration, conditioning=sd3.declaration.conditioning[:1])


def test_true_cfg_is_qwen_images_combination_rescaled_to_the_conditional_norm():
    """The true_cfg rule (Qwen-Image's true_cfg_scale) equals QwenImagePipeline's own lines, on numpy arrays (the
    runtime) and torch tensors (the reference) alike; classifier_free is the plain combination."""
    import torch

    from l2c_export.core.interface import CLASSIFIER_FREE, TRUE_CFG
    from l2c_export.samplers.guidance import apply_guidance

    out = np.random.default_rng(0).standard_normal((4, 6, 8)).astype(np.float32)  # (2n, T, C): packed latents
    noise_pred, neg_noise_pred = torch.from_numpy(out[:2]), torch.from_numpy(out[2:])
    comb_pred = neg_noise_pred + 4.0 * (noise_pred - neg_noise_pred)  # QwenImagePipeline.__call__
    cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
    noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
    want = (comb_pred * (cond_norm / noise_norm)).numpy()
    np.testing.assert_allclose(apply_guidance(out, 4.0, 6, TRUE_CFG)[:2], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(apply_guidance(torch.from_numpy(out), 4.0, 6, TRUE_CFG)[:2].numpy(), want, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(apply_guidance(out, 4.0, 6, CLASSIFIER_FREE)[:2], comb_pred.numpy(), rtol=1e-6)
    assert np.abs(want - comb_pred.numpy()).max() > 1e-3  # the rescale changed something
