"""The U-ViT family (baofff/U-ViT, as Learning-to-Cache runs it): long skips, no gates, label and time tokens,
DPM-Solver-2S by default, guidance on every channel. The model is :mod:`.model`."""

from __future__ import annotations

from ...core.macs import MacCount
from .. import ModelFamily, TensorSpec, label_input
from .model import MODEL_NAMES, UViT, UViTConfig, uvit_config


class UViTFamily(ModelFamily):
    name = "uvit"
    config_class = UViTConfig
    model_names = MODEL_NAMES
    default_sampler = "dpm_solver_2s"
    default_cfg_scale = 1.4  # the authors' scale 0.4 in cond + 0.4 * (cond - uncond)

    def preset(self, model_name: str, image_size: int, num_classes: int) -> UViTConfig:
        return uvit_config(model_name, img_size=image_size // 8, num_classes=num_classes)

    def create(self, config: UViTConfig) -> UViT:
        return UViT(config)

    def num_layers(self, config: UViTConfig) -> int:
        return config.num_layers

    def cached_shape(self, config: UViTConfig) -> tuple[int, ...]:
        return (config.num_tokens, config.embed_dim)

    def graph_inputs(self, config: UViTConfig) -> list[TensorSpec]:
        side = config.img_size
        return [TensorSpec("x", "float32", (config.in_chans, side, side), "sample"),
                TensorSpec("t", "float32", (), "time"), label_input("y")]

    def graph_output(self, config: UViTConfig) -> TensorSpec:
        side = config.img_size
        return TensorSpec("model_out", "float32", (config.in_chans, side, side), "output")

    def count_macs(self, config: UViTConfig) -> MacCount:
        tokens, dim = config.num_tokens, config.embed_dim
        patch_dim = config.patch_size ** 2 * config.in_chans
        mlp_hidden = int(dim * config.mlp_ratio)
        attn = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim
        mlp = 2 * tokens * dim * mlp_hidden
        always = (
            config.num_patches * patch_dim * dim  # patch embedding
            + (8 * dim * dim if config.mlp_time_embed else 0)  # time MLP
            + (config.depth // 2) * tokens * 2 * dim * dim * config.skip  # skip_linear of every out_block
            + tokens * dim * patch_dim  # decoder_pred (on every token, as the official model)
            + (9 * config.in_chans ** 2 * config.img_size ** 2 if config.conv else 0)  # final conv
        )
        return MacCount(always=always, attn=attn, mlp=mlp, depth=config.num_layers)

    def guided_channels(self, config: UViTConfig, guide_all: bool = False) -> int:
        return config.in_chans

    def null_class(self, config: UViTConfig) -> int:
        return config.num_classes - 1


FAMILY = UViTFamily()
