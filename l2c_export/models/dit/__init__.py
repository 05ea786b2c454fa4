"""The DiT family (facebookresearch/DiT): adaLN-gated blocks, learned sigma, DDIM by default. The model itself is
:mod:`.model`."""

from __future__ import annotations

from ...core.macs import MacCount
from .. import ModelFamily, TensorSpec, label_input
from .model import MODEL_NAMES, DiT, DiTConfig, default_guided_channels, dit_config


class DiTFamily(ModelFamily):
    name = "dit"
    config_class = DiTConfig
    model_names = MODEL_NAMES
    default_sampler = "ddim"
    default_cfg_scale = 4.0

    def preset(self, model_name: str, image_size: int, num_classes: int) -> DiTConfig:
        return dit_config(model_name, input_size=image_size // 8, num_classes=num_classes)

    def create(self, config: DiTConfig) -> DiT:
        return DiT(config)

    def num_layers(self, config: DiTConfig) -> int:
        return config.depth

    def cached_shape(self, config: DiTConfig) -> tuple[int, ...]:
        return (config.num_tokens, config.hidden_size)

    def graph_inputs(self, config: DiTConfig) -> list[TensorSpec]:
        side = config.input_size
        return [TensorSpec("x", "float32", (config.in_channels, side, side), "sample"),
                TensorSpec("t", "float32", (), "time"), label_input("y")]

    def graph_output(self, config: DiTConfig) -> TensorSpec:
        side = config.input_size
        return TensorSpec("model_out", "float32", (config.out_channels, side, side), "output")

    def count_macs(self, config: DiTConfig) -> MacCount:
        return count_macs(config)

    def guided_channels(self, config: DiTConfig, guide_all: bool = False) -> int:
        return config.in_channels if guide_all else default_guided_channels(config.in_channels)

    def null_class(self, config: DiTConfig) -> int:
        return config.num_classes


def count_macs(config: DiTConfig) -> MacCount:
    """DiT-XL/2 at 256 px (latent 32) counts 118.6 G here, the figure DiT's paper gives as "Gflops"."""
    tokens, hidden = config.num_tokens, config.hidden_size
    mlp_hidden = int(hidden * config.mlp_ratio)
    patch_in = config.in_channels * config.patch_size ** 2
    patch_out = config.out_channels * config.patch_size ** 2
    attn = tokens * hidden * 3 * hidden + 2 * tokens * tokens * hidden + tokens * hidden * hidden
    mlp = 2 * tokens * hidden * mlp_hidden
    always = (
        tokens * patch_in * hidden  # patch embedding
        + 256 * hidden + hidden * hidden  # timestep MLP (256 sinusoidal frequencies)
        + config.depth * hidden * 6 * hidden  # adaLN modulation of every block
        + hidden * 2 * hidden + tokens * hidden * patch_out  # final layer
    )
    return MacCount(always=always, attn=attn, mlp=mlp, depth=config.depth)


FAMILY = DiTFamily()
