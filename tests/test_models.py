"""The DiT: official parameter layout, checkpoint loading, and the L2C cached forward."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from l2c_export.models.checkpoint import CheckpointError, load_dit, load_torch_file
from l2c_export.models.dit.model import DiT, DiTConfig, dit_config

from .conftest import TINY

# The state_dict keys of one block and the non-block parameters of facebookresearch/DiT models.py (timm's Attention,
# Mlp and PatchEmbed inside), written out so that a renamed parameter fails here.
OFFICIAL_TOP_KEYS = {
    "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
    "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight", "final_layer.linear.bias",
    "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
}
OFFICIAL_BLOCK_KEYS = {
    "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    "adaLN_modulation.1.weight", "adaLN_modulation.1.bias",
}


def official_keys(depth: int) -> set[str]:
    return OFFICIAL_TOP_KEYS | {f"blocks.{j}.{key}" for j in range(depth) for key in OFFICIAL_BLOCK_KEYS}


def test_state_dict_has_exactly_the_official_layout():
    model = DiT(dit_config("DiT-S/2", input_size=32))
    state = model.state_dict()
    assert set(state) == official_keys(12)
    # Shapes of DiT-S/2 at 256 px: 384 hidden, 6 heads, 4 -> 8 channels (learned sigma), 256 tokens, 1001 labels.
    assert state["pos_embed"].shape == (1, 256, 384)
    assert state["x_embedder.proj.weight"].shape == (384, 4, 2, 2)
    assert state["y_embedder.embedding_table.weight"].shape == (1001, 384)
    assert state["blocks.0.adaLN_modulation.1.weight"].shape == (6 * 384, 384)
    assert state["final_layer.linear.weight"].shape == (2 * 2 * 8, 384)


@pytest.mark.parametrize("name,depth,hidden", [("DiT-XL/2", 28, 1152), ("DiT-L/4", 24, 1024), ("DiT-B/8", 12, 768)])
def test_official_configs(name, depth, hidden):
    config = dit_config(name, input_size=32)
    assert (config.depth, config.hidden_size, config.patch_size) == (depth, hidden, int(name[-1]))


def test_unknown_model_name_is_refused():
    with pytest.raises(ValueError, match="DiT-XL/2"):
        dit_config("DiT-XXL/2")


def _random_official_state(config: DiTConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: torch.randn_like(v) for k, v in DiT(config).state_dict().items()}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_loads_a_dit_s2_checkpoint_in_the_official_layout(tmp_path, suffix):
    config = dit_config("DiT-S/2", input_size=32)
    state = _random_official_state(config)
    path = tmp_path / f"DiT-S-2-256x256{suffix}"
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    model = load_dit(path, config)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_loads_the_ema_of_a_training_checkpoint(tmp_path):
    import argparse

    state = _random_official_state(TINY)
    path = tmp_path / "0400000.pt"
    torch.save({"model": {k: v * 0 for k, v in state.items()}, "ema": state, "opt": {},
                "args": argparse.Namespace(model="DiT-S/2")}, path)
    model = load_dit(path, TINY)
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])


def test_a_checkpoint_that_does_not_fit_names_keys_and_shapes(tmp_path):
    state = _random_official_state(TINY)
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.extra.weight"] = torch.zeros(3)
    state["final_layer.linear.weight"] = torch.zeros(5, 32)
    path = tmp_path / "wrong.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_dit(path, TINY)
    message = str(info.value)
    assert str(path) in message
    assert "missing keys (1): blocks.1.mlp.fc2.bias" in message
    assert "unexpected keys (1): blocks.0.extra.weight" in message
    assert "final_layer.linear.weight: file (5, 32), model (32, 32)" in message


class _Exploit:
    """Unpickling this calls a function of the file's choosing (here a harmless marker)."""

    def __reduce__(self):
        return (_mark_as_run, ())


_RAN: list[bool] = []


def _mark_as_run():
    _RAN.append(True)


def test_a_checkpoint_is_never_unpickled_without_restriction(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weights": torch.zeros(2), "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_torch_file(path)
    assert not _RAN


# ---------------------------------------------------------------------------------------------------------------------
def _inputs(config: DiTConfig, batch: int = 2, seed: int = 0, t: int = 500):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=generator)
    return x, torch.full((batch,), t), torch.arange(batch) % config.num_classes


def test_cached_forward_with_everything_computed_equals_the_plain_forward(tiny_model):
    x, t, y = _inputs(TINY)
    cache: dict = {}
    cached = tiny_model.forward_cached(x, t, y, [True] * TINY.num_sublayers, cache)
    assert torch.equal(cached, tiny_model(x, t, y))
    assert sorted(cache) == list(range(TINY.num_sublayers))
    assert all(v.shape == (2, TINY.num_tokens, TINY.hidden_size) for v in cache.values())


def _manual_forward(model: DiT, x, t, y, values: dict[int, torch.Tensor]):
    """An independent L2C forward: sub-layers in ``values`` contribute the current gate times that value."""
    tokens, c = model.embed(x, t, y)
    for j, block in enumerate(model.blocks):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
        branch = values.get(2 * j)
        if branch is None:
            branch = block.attn(block.norm1(tokens) * (1 + scale_msa[:, None]) + shift_msa[:, None])
        tokens = tokens + gate_msa[:, None] * branch
        branch = values.get(2 * j + 1)
        if branch is None:
            branch = block.mlp(block.norm2(tokens) * (1 + scale_mlp[:, None]) + shift_mlp[:, None])
        tokens = tokens + gate_mlp[:, None] * branch
    return model.unpatchify(model.final_layer(tokens, c))


def test_reuse_takes_the_most_recent_computed_value_times_the_current_gate(tiny_model):
    x0, t0, y = _inputs(TINY, seed=0, t=900)
    x1, t1, _ = _inputs(TINY, seed=1, t=600)
    x2, t2, _ = _inputs(TINY, seed=2, t=300)
    cache: dict = {}
    everything = [True] * TINY.num_sublayers
    tiny_model.forward_cached(x0, t0, y, everything, cache)
    first = {k: v.clone() for k, v in cache.items()}
    # Step 1 recomputes all but sub-layer 1 (block 0's MLP): 1 keeps its step-0 value, the rest are overwritten.
    step1 = list(everything)
    step1[1] = False
    tiny_model.forward_cached(x1, t1, y, step1, cache)
    assert torch.equal(cache[1], first[1])
    assert not torch.equal(cache[2], first[2])
    after_step1 = {k: v.clone() for k, v in cache.items()}
    # Step 2 reuses sub-layers 1, 2 and 5: 1 from step 0, 2 and 5 from step 1.
    step2 = list(everything)
    for index in (1, 2, 5):
        step2[index] = False
    out = tiny_model.forward_cached(x2, t2, y, step2, cache)
    expected = _manual_forward(tiny_model, x2, t2, y, {1: first[1], 2: after_step1[2], 5: after_step1[5]})
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # The gate is the current step's: the same cached values under another timestep give another output.
    other = tiny_model.forward_cached(x2, t1, y, step2, dict(after_step1))
    assert not torch.allclose(out, other)
    # And reusing differs from computing.
    assert not torch.allclose(out, tiny_model(x2, t2, y))


def test_reusing_a_value_never_computed_is_an_error(tiny_model):
    x, t, y = _inputs(TINY)
    compute = [True] * TINY.num_sublayers
    compute[3] = False
    with pytest.raises(KeyError, match="sub-layer 3"):
        tiny_model.forward_cached(x, t, y, compute, {})


def test_guidance_reproduces_dit_first_three_channels_and_can_guide_all(tiny_model):
    x, t, _ = _inputs(TINY, batch=4)
    x = torch.cat([x[:2], x[:2]])
    y = torch.tensor([1, 2, TINY.num_classes, TINY.num_classes])
    raw = tiny_model(x, t, y)
    dit = tiny_model.forward_with_cfg(x, t, y, cfg_scale=4.0)
    expected_eps = raw[2:, :3] + 4.0 * (raw[:2, :3] - raw[2:, :3])
    torch.testing.assert_close(dit[:2, :3], expected_eps)
    torch.testing.assert_close(dit[2:, :3], expected_eps)
    assert torch.equal(dit[:, 3:], raw[:, 3:])  # channel 3 and the sigma channels pass through unguided
    every = tiny_model.forward_with_cfg(x, t, y, cfg_scale=4.0, guided_channels=4)
    torch.testing.assert_close(every[:2, 3], raw[2:, 3] + 4.0 * (raw[:2, 3] - raw[2:, 3]))


@pytest.mark.parametrize("family_name, config_class", [("dit", "DiTConfig"), ("uvit", "UViTConfig")])
def test_a_config_with_a_field_the_family_does_not_have_is_refused_by_name(family_name, config_class):
    from l2c_export.models import get_family

    family = get_family(family_name)
    with pytest.raises(ValueError, match=rf"unknown {config_class} fields \['hiden_size'\]"):
        family.config_from_dict({"hiden_size": 64})
    assert family.config_from_dict({}) == family.config_class()
