"""U-ViT with the exact parameter layout of the official U-ViT ``libs/uvit.py`` (and Learning-to-Cache's
``U-ViT/libs/uvit_dynamic.py``), plus the Learning-to-Cache forward at sub-layer granularity.

Tokens are ``[label, time, patches]`` plus ``pos_embed``; the time token is the sinusoidal embedding of the (float)
timestep, with no MLP unless ``mlp_time_embed``. ``depth / 2`` ``in_blocks``, one ``mid_block`` and ``depth / 2``
``out_blocks``, whose input is ``skip_linear(cat(x, skip))`` with the matching in_block's output (long skips). No adaLN.

Layers are counted in_blocks, mid_block, out_blocks (``depth + 1`` layers). Sub-layer ``2l`` is layer ``l``'s attention
output ``attn(norm1(x))`` and ``2l + 1`` its MLP output ``mlp(norm2(x))``, both *before* the residual add; a reused
value is added to the current residual stream. ``skip_linear`` is always computed.

Shapes: N batch, C channels, H = W = ``img_size``, P = (H / patch_size) ** 2 patches, T = P + 2 tokens (label and
time), D = ``embed_dim``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, MutableMapping, Sequence

import torch
import torch.nn as nn

from ..layers import Attention, LayerNorm, Mlp, PatchEmbed, TimestepEmbedder, cached_output


@dataclass(frozen=True)
class UViTConfig:
    """Architecture of a U-ViT, with the official constructor's argument names. ``img_size`` is the side of the
    model's input (the latent side for latent models); ``num_classes`` counts the null class of guidance (the last)."""

    img_size: int = 32
    patch_size: int = 2
    in_chans: int = 4
    embed_dim: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    mlp_time_embed: bool = False
    num_classes: int = 1001
    conv: bool = False
    skip: bool = True

    def __post_init__(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        if self.depth < 2 or self.depth % 2:
            raise ValueError(f"depth {self.depth} must be even and at least 2 (depth / 2 in_blocks and out_blocks)")
        if self.num_classes < 2:
            raise ValueError(f"num_classes {self.num_classes}: l2c-export serves class-conditional U-ViTs; expected "
                             f"at least 2 (the classes and the null class)")

    @property
    def num_layers(self) -> int:
        """in_blocks + mid_block + out_blocks."""
        return self.depth + 1

    @property
    def num_sublayers(self) -> int:
        return 2 * self.num_layers

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + 2  # label and time tokens first

    def to_dict(self) -> dict:
        return asdict(self)



# (embed_dim, depth, num_heads) of the official U-ViT configs; depth counts in_blocks + out_blocks.
_SIZES = {"S": (512, 12, 8), "M": (768, 16, 12), "L": (1024, 20, 16), "H": (1152, 28, 16)}
MODEL_NAMES = tuple(f"U-ViT-{size}/2" for size in _SIZES)


def uvit_config(name: str, img_size: int = 32, num_classes: int = 1001, in_chans: int = 4) -> UViTConfig:
    """The config of an official model name such as ``U-ViT-H/2`` at a given input (latent) size."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    embed_dim, depth, heads = _SIZES[name[len("U-ViT-"):].split("/")[0]]
    return UViTConfig(img_size=img_size, patch_size=2, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
                      num_heads=heads, num_classes=num_classes)


class Block(nn.Module):
    """A pre-norm transformer block; out_blocks first merge the long skip with ``skip_linear``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, skip: bool = False):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), approximate="none")
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward_cached(self, x: torch.Tensor, skip: torch.Tensor | None, layer: int, compute: Sequence[bool],
                       cache: MutableMapping[int, torch.Tensor]) -> torch.Tensor:
        """x, skip: (N, T, D) -> (N, T, D); sub-layers ``2 * layer`` (attention) and ``2 * layer + 1`` (MLP) are
        computed where ``compute`` says so and written to ``cache``, else read from it."""
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        attn, mlp = 2 * layer, 2 * layer + 1
        if compute[attn]:
            cache[attn] = self.attn(self.norm1(x))
        x = x + cached_output(cache, attn)
        if compute[mlp]:
            cache[mlp] = self.mlp(self.norm2(x))
        return x + cached_output(cache, mlp)

    def forward_soft(self, x: torch.Tensor, skip: torch.Tensor | None, layer: int, weights: torch.Tensor,
                     cache: Mapping[int, torch.Tensor],
                     fresh: MutableMapping[int, torch.Tensor] | None) -> torch.Tensor:
        """x, skip: (N, T, D) -> (N, T, D); each sub-layer adds ``w * fresh + (1 - w) * cache`` (see
        :meth:`UViT.forward_soft`)."""
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        attn, mlp = 2 * layer, 2 * layer + 1
        attn_out = self.attn(self.norm1(x))
        x = x + weights[attn] * attn_out + (1 - weights[attn]) * cached_output(cache, attn)
        mlp_out = self.mlp(self.norm2(x))
        if fresh is not None:
            fresh[attn], fresh[mlp] = attn_out, mlp_out
        return x + weights[mlp] * mlp_out + (1 - weights[mlp]) * cached_output(cache, mlp)


class UViT(nn.Module):
    """U-ViT: a ViT over [label, time, patch] tokens with long skips between shallow and deep blocks."""

    def __init__(self, config: UViTConfig):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, dim)
        self.time_embed = (nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
                           if config.mlp_time_embed else nn.Identity())
        self.label_emb = nn.Embedding(config.num_classes, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, dim))
        block = dict(dim=dim, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias)
        self.in_blocks = nn.ModuleList([Block(**block) for _ in range(config.depth // 2)])
        self.mid_block = Block(**block)
        self.out_blocks = nn.ModuleList([Block(**block, skip=config.skip) for _ in range(config.depth // 2)])
        self.norm = LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, config.patch_size ** 2 * config.in_chans, bias=True)
        self.final_layer = (nn.Conv2d(config.in_chans, config.in_chans, 3, padding=1) if config.conv
                            else nn.Identity())
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """U-ViT's initialisation: truncated normal (std 0.02) for linears and positions, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def layers(self) -> list[Block]:
        """Every block in sub-layer order: in_blocks, mid_block, out_blocks."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W), t: (N,) float timesteps, y: (N,) labels -> tokens (N, T, D)."""
        patches = self.patch_embed(x)
        frequencies = TimestepEmbedder.timestep_embedding(t, self.config.embed_dim).to(patches.dtype)
        time_token = self.time_embed(frequencies).unsqueeze(1)
        label_token = self.label_emb(y).unsqueeze(1)
        return torch.cat([label_token, time_token, patches], dim=1) + self.pos_embed

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, D) -> (N, C, H, W): norm, decoder_pred, drop the two extra tokens, unpatchify, final layer."""
        c, p = self.config.in_chans, self.config.patch_size
        patches = self.decoder_pred(self.norm(tokens))[:, 2:, :]
        h = self.config.img_size // p
        # einops "B (h w) (p1 p2 C) -> B C (h p1) (w p2)" as a plain reshape/transpose for exporters
        image = patches.reshape(-1, h, h, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(-1, c, h * p, h * p)
        return self.final_layer(image)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W), t: (N,) float timesteps (DPM-Solver's t * 1000), y: (N,) labels -> eps (N, C, H, W)."""
        return self.forward_cached(x, t, y, [True] * self.config.num_sublayers, {})

    def forward_cached(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, compute: Sequence[bool],
                       cache: MutableMapping[int, torch.Tensor]) -> torch.Tensor:
        """The L2C forward: sub-layer ``i`` is computed where ``compute[i]``, otherwise read from ``cache[i]``
        (N, T, D); every computed sub-layer's output is written to ``cache``. Returns eps (N, C, H, W)."""
        if len(compute) != self.config.num_sublayers:
            raise ValueError(f"compute has {len(compute)} entries; expected 2 * (depth + 1) = "
                             f"{self.config.num_sublayers}")
        tokens = self.embed(x, t, y)
        skips = []
        for layer, block in enumerate(self.in_blocks):
            tokens = block.forward_cached(tokens, None, layer, compute, cache)
            skips.append(tokens)
        tokens = self.mid_block.forward_cached(tokens, None, len(self.in_blocks), compute, cache)
        for offset, block in enumerate(self.out_blocks):
            tokens = block.forward_cached(tokens, skips.pop(), len(self.in_blocks) + 1 + offset, compute, cache)
        return self.decode(tokens)

    def forward_soft(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                     cache: Mapping[int, torch.Tensor],
                     fresh: MutableMapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """The soft-routed forward that router learning differentiates (L2C's student, as DiT's).

        Every sub-layer is computed; sub-layer ``i`` then adds ``weights[i] * fresh_i + (1 - weights[i]) * cache[i]``
        to the residual stream, ``fresh_i`` (N, T, D) being its output at this call. ``weights``: (2 * (depth + 1),)
        in [0, 1], gradients flow to it. With all weights 1 this is :meth:`forward`; with weights 0 or 1 it is
        :meth:`forward_cached` with ``compute = weights > 0.5``. ``fresh``, if given, receives every sub-layer's fresh
        output; ``cache`` is not modified. Returns eps (N, C, H, W).
        """
        if weights.shape != (self.config.num_sublayers,):
            raise ValueError(f"weights has shape {tuple(weights.shape)}; expected (2 * (depth + 1),) = "
                             f"({self.config.num_sublayers},)")
        tokens = self.embed(x, t, y)
        skips = []
        for layer, block in enumerate(self.in_blocks):
            tokens = block.forward_soft(tokens, None, layer, weights, cache, fresh)
            skips.append(tokens)
        tokens = self.mid_block.forward_soft(tokens, None, len(self.in_blocks), weights, cache, fresh)
        for offset, block in enumerate(self.out_blocks):
            tokens = block.forward_soft(tokens, skips.pop(), len(self.in_blocks) + 1 + offset, weights, cache, fresh)
        return self.decode(tokens)
