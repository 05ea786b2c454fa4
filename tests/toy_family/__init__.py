"""A toy third model family, all in this one folder: no gates, a long skip, extra (register) tokens, and its own input
and output names. The tests register it at run time (``l2c_export.models.register``) and take it through build,
verify and run; the runtime, which reads only the manifest, never imports it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import MutableMapping, Sequence

import torch
import torch.nn as nn

from l2c_export.core.macs import MacCount
from l2c_export.models import ModelFamily, TensorSpec, label_input
from l2c_export.models.layers import Attention, LayerNorm, Mlp, TimestepEmbedder, cached_output


@dataclass(frozen=True)
class ToyConfig:
    side: int = 8
    channels: int = 1
    patch: int = 2
    dim: int = 16
    layers: int = 3
    heads: int = 2
    registers: int = 3
    num_classes: int = 5  # label num_classes is the null class

    @property
    def num_patches(self) -> int:
        return (self.side // self.patch) ** 2

    @property
    def num_tokens(self) -> int:
        return self.registers + 1 + self.num_patches

    def to_dict(self) -> dict:
        return asdict(self)


class ToyModel(nn.Module):
    """tokens [registers, label, patches] + time; layer l: x += attn(norm(x)) (sub-layer 2l), x += mlp(norm(x))
    (2l + 1); the last layer's input also gets layer 0's output (a long skip); no gates."""

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = config
        d = config.dim
        self.patchify = nn.Linear(config.channels * config.patch ** 2, d)
        self.registers = nn.Parameter(torch.randn(1, config.registers, d) * 0.02)
        self.labels = nn.Embedding(config.num_classes + 1, d)
        self.time = nn.Linear(d, d)
        self.norms = nn.ModuleList([LayerNorm(d) for _ in range(2 * config.layers)])
        self.attns = nn.ModuleList([Attention(d, config.heads) for _ in range(config.layers)])
        self.mlps = nn.ModuleList([Mlp(d, 2 * d) for _ in range(config.layers)])
        self.head = nn.Linear(d, config.channels * config.patch ** 2)

    def forward_cached(self, noisy: torch.Tensor, time_step: torch.Tensor, class_id: torch.Tensor,
                       compute: Sequence[bool], cache: MutableMapping[int, torch.Tensor]) -> torch.Tensor:
        c, p, side = self.config.channels, self.config.patch, self.config.side
        h = side // p
        patches = noisy.reshape(-1, c, h, p, h, p).permute(0, 2, 4, 3, 5, 1).reshape(-1, h * h, p * p * c)
        time = self.time(TimestepEmbedder.timestep_embedding(time_step, self.config.dim).to(patches.dtype))
        registers = self.registers.expand(noisy.shape[0], -1, -1)  # noisy.shape, not len(): a traced batch
        tokens = torch.cat([registers, self.labels(class_id).unsqueeze(1),
                            self.patchify(patches)], dim=1) + time.unsqueeze(1)
        skip = None
        for layer in range(self.config.layers):
            if layer == self.config.layers - 1:
                tokens = tokens + skip
            for index, branch in ((2 * layer, self.attns[layer]), (2 * layer + 1, self.mlps[layer])):
                if compute[index]:
                    cache[index] = branch(self.norms[index](tokens))
                tokens = tokens + cached_output(cache, index)
            if layer == 0:
                skip = tokens
        out = self.head(tokens[:, self.config.registers + 1:])
        return out.reshape(-1, h, h, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(-1, c, side, side)

    def forward(self, noisy, time_step, class_id):
        return self.forward_cached(noisy, time_step, class_id, [True] * (2 * self.config.layers), {})


class ToyFamily(ModelFamily):
    name = "toy"
    config_class = ToyConfig
    model_names = ("Toy/2",)
    default_sampler = "ddim"
    default_cfg_scale = 2.0

    def preset(self, model_name: str, image_size: int, num_classes: int) -> ToyConfig:
        return ToyConfig(side=image_size, num_classes=num_classes)

    def create(self, config: ToyConfig) -> ToyModel:
        return ToyModel(config)

    def num_layers(self, config: ToyConfig) -> int:
        return config.layers

    def cached_shape(self, config: ToyConfig) -> tuple[int, ...]:
        return (config.num_tokens, config.dim)

    def graph_inputs(self, config: ToyConfig) -> list[TensorSpec]:
        return [TensorSpec("noisy", "float32", (config.channels, config.side, config.side), "sample"),
                TensorSpec("time_step", "float32", (), "time"), label_input("class_id")]

    def graph_output(self, config: ToyConfig) -> TensorSpec:
        return TensorSpec("prediction", "float32", (config.channels, config.side, config.side), "output")

    def count_macs(self, config: ToyConfig) -> MacCount:
        t, d = config.num_tokens, config.dim
        return MacCount(always=config.num_patches * 2 * d * config.channels * config.patch ** 2 + d * d,
                        attn=4 * t * d * d + 2 * t * t * d, mlp=4 * t * d * d, depth=config.layers)

    def guided_channels(self, config: ToyConfig, guide_all: bool = False) -> int:
        return config.channels

    def null_class(self, config: ToyConfig) -> int:
        return config.num_classes


FAMILY = ToyFamily()
