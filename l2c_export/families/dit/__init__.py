"""The DiT family (facebookresearch/DiT): adaLN-gated blocks, learned sigma, DDIM by default. The model itself is
:mod:`l2c_export.models`."""

from __future__ import annotations

from typing import Mapping

from .. import ModelFamily, TensorSpec
from ...macs import count_macs
from ...models import MODEL_NAMES, DiT, DiTConfig, default_guided_channels, dit_config


class DiTFamily(ModelFamily):
    name = "dit"
    config_class = DiTConfig
    model_names = MODEL_NAMES
    default_sampler = "ddim"
    default_cfg_scale = 4.0

    def config_from_dict(self, data: Mapping) -> DiTConfig:
        return DiTConfig.from_dict(data)

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
                TensorSpec("t", "float32", (), "time"), TensorSpec("y", "int64", (), "label")]

    def graph_output(self, config: DiTConfig) -> TensorSpec:
        side = config.input_size
        return TensorSpec("model_out", "float32", (config.out_channels, side, side), "output")

    def count_macs(self, config: DiTConfig):
        return count_macs(config)

    def guided_channels(self, config: DiTConfig, guide_all: bool = False) -> int:
        return config.in_channels if guide_all else default_guided_channels(config.in_channels)

    def null_class(self, config: DiTConfig) -> int:
        return config.num_classes


FAMILY = DiTFamily()
