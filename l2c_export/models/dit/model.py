"""Diffusion Transformer (DiT) with the exact parameter layout of facebookresearch/DiT ``models.py``,
plus the Learning-to-Cache forward at sub-layer granularity.

Sub-layer index ``2j`` is block ``j``'s attention branch, ``2j + 1`` its MLP branch. The value that is cached is the
branch output *before* the adaLN gate, ``attn(modulate(norm1(x)))`` and ``mlp(modulate(norm2(x)))``; shift, scale and
gate are recomputed from the current step's conditioning at every step, also when the branch is reused.

Shapes: N batch, C channels, H = W = ``input_size``, T = (H / patch_size) ** 2 tokens, D = ``hidden_size``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, MutableMapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ...samplers.guidance import apply_guidance
from ..layers import Attention, LayerNorm, Mlp, PatchEmbed, TimestepEmbedder, cached_output


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a DiT. ``input_size`` is the side of the model's input (latent side for latent models)."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True

    def __post_init__(self):
        for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DiT config field {name!r} is {value!r}; expected a positive integer")
        if not isinstance(self.mlp_ratio, (int, float)) or not 0 < self.mlp_ratio < 1e3:
            raise ValueError(f"DiT config field 'mlp_ratio' is {self.mlp_ratio!r}; expected a positive number")
        if not isinstance(self.class_dropout_prob, (int, float)) or not 0 <= self.class_dropout_prob <= 1:
            raise ValueError(f"DiT config field 'class_dropout_prob' is {self.class_dropout_prob!r}; expected a "
                             f"number in [0, 1]")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def num_sublayers(self) -> int:
        return 2 * self.depth

    def to_dict(self) -> dict:
        return asdict(self)



# (depth, hidden_size, num_heads) of the official configurations.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
MODEL_NAMES = tuple(f"DiT-{size}/{patch}" for size in _SIZES for patch in (2, 4, 8))


def dit_config(name: str, input_size: int = 32, num_classes: int = 1000, in_channels: int = 4,
               learn_sigma: bool = True) -> DiTConfig:
    """The config of an official model name such as ``DiT-XL/2`` at a given input (latent) size."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    size, patch = name[len("DiT-"):].split("/")
    depth, hidden, heads = _SIZES[size]
    return DiTConfig(input_size=input_size, patch_size=int(patch), in_channels=in_channels, hidden_size=hidden,
                     depth=depth, num_heads=heads, num_classes=num_classes, learn_sigma=learn_sigma)


def default_guided_channels(in_channels: int) -> int:
    """DiT's ``forward_with_cfg`` guides ``model_out[:, :3]``: the first three eps channels of a 4-channel latent
    model. Reproduce that for 4 channels; for other models guide all eps channels (``[:, :3]`` would reach into the
    learned-sigma channels of a 1-channel model)."""
    return 3 if in_channels == 4 else in_channels


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: (N, T, D); shift, scale: (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class LabelEmbedder(nn.Module):
    """Embeds class labels (N,) into vectors (N, D); index ``num_classes`` is the null class of guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Drops labels to the null class for classifier-free guidance training."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning.

    The two residual branches are exposed separately so that either can be computed or reused.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """c: (N, D) -> shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (N, D)."""
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def attn_branch(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Ungated attention branch output (N, T, D): the value L2C caches for sub-layer 2j."""
        return self.attn(modulate(self.norm1(x), shift, scale))

    def mlp_branch(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Ungated MLP branch output (N, T, D): the value L2C caches for sub-layer 2j + 1."""
        return self.mlp(modulate(self.norm2(x), shift, scale))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        x = x + gate_msa.unsqueeze(1) * self.attn_branch(x, shift_msa, scale_msa)
        x = x + gate_mlp.unsqueeze(1) * self.mlp_branch(x, shift_mlp, scale_mlp)
        return x


class FinalLayer(nn.Module):
    """(N, T, D) -> (N, T, patch_size ** 2 * out_channels)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        self.learn_sigma = config.learn_sigma
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads

        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)
        # Fixed sin-cos embedding; a parameter (without gradient) so that it is part of the official state_dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, config.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(config.hidden_size, config.num_heads, mlp_ratio=config.mlp_ratio) for _ in range(config.depth)]
        )
        self.final_layer = FinalLayer(config.hidden_size, config.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, sin-cos positions, zeroed adaLN modulations and output layer."""

        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        grid = int(self.config.num_tokens ** 0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, patch_size ** 2 * C) -> (N, C, H, W)."""
        c = self.out_channels
        p = self.patch_size
        h = w = int(int(x.shape[1]) ** 0.5)
        x = x.reshape(-1, h, w, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)  # DiT's einsum("nhwpqc->nchpwq"), as a plain transpose for exporters
        return x.reshape(-1, c, h * p, h * p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, C, H, W), t: (N,), y: (N,) -> tokens (N, T, D) and conditioning c (N, D)."""
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        return tokens, c

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W), t: (N,) diffusion timesteps, y: (N,) labels -> (N, out_channels, H, W)."""
        tokens, c = self.embed(x, t, y)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))

    def forward_cached(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, compute: Sequence[bool],
                       cache: MutableMapping[int, torch.Tensor]) -> torch.Tensor:
        """The L2C forward: sub-layer ``i`` is computed where ``compute[i]``, otherwise read from ``cache[i]``.

        ``compute`` has ``2 * depth`` entries. ``cache`` maps a sub-layer index to its ungated branch output
        (N, T, D); every computed sub-layer's fresh output is written into it, so that after the call it holds each
        sub-layer's most recent computed value. A reused sub-layer contributes the *current* gate times the cached value.
        Returns the model output (N, out_channels, H, W).
        """
        if len(compute) != self.config.num_sublayers:
            raise ValueError(f"compute has {len(compute)} entries; expected 2 * depth = {self.config.num_sublayers}")
        tokens, c = self.embed(x, t, y)
        for j, block in enumerate(self.blocks):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.modulation(c)
            if compute[2 * j]:
                cache[2 * j] = block.attn_branch(tokens, shift_msa, scale_msa)
            tokens = tokens + gate_msa.unsqueeze(1) * cached_output(cache, 2 * j)
            if compute[2 * j + 1]:
                cache[2 * j + 1] = block.mlp_branch(tokens, shift_mlp, scale_mlp)
            tokens = tokens + gate_mlp.unsqueeze(1) * cached_output(cache, 2 * j + 1)
        return self.unpatchify(self.final_layer(tokens, c))

    def forward_soft(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
                     cache: Mapping[int, torch.Tensor],
                     fresh: MutableMapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """The soft-routed forward that router learning differentiates (L2C's student).

        Every sub-layer is computed; sub-layer ``i`` then contributes ``weights[i] * fresh_i + (1 - weights[i]) *
        cache[i]`` times the current gate, where ``fresh_i`` is its ungated branch output (N, T, D) at this step and
        ``cache[i]`` (N, T, D) the value the cached forward would reuse. ``weights``: (2 * depth,) in [0, 1], usually
        sigmoid(router logits); gradients flow to it (and to ``cache`` if that carries any). With all weights 1 this
        is :meth:`forward`; with weights 0 or 1 it is :meth:`forward_cached` with ``compute = weights > 0.5``.
        ``fresh``, if given, receives each sub-layer's fresh branch output. ``cache`` is not modified.
        Returns the model output (N, out_channels, H, W).
        """
        if weights.shape != (self.config.num_sublayers,):
            raise ValueError(f"weights has shape {tuple(weights.shape)}; expected (2 * depth,) = "
                             f"({self.config.num_sublayers},)")
        tokens, c = self.embed(x, t, y)
        for j, block in enumerate(self.blocks):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.modulation(c)
            attn_out = block.attn_branch(tokens, shift_msa, scale_msa)
            if fresh is not None:
                fresh[2 * j] = attn_out
            mixed = weights[2 * j] * attn_out + (1 - weights[2 * j]) * cached_output(cache, 2 * j)
            tokens = tokens + gate_msa.unsqueeze(1) * mixed
            mlp_out = block.mlp_branch(tokens, shift_mlp, scale_mlp)
            if fresh is not None:
                fresh[2 * j + 1] = mlp_out
            mixed = weights[2 * j + 1] * mlp_out + (1 - weights[2 * j + 1]) * cached_output(cache, 2 * j + 1)
            tokens = tokens + gate_mlp.unsqueeze(1) * mixed
        return self.unpatchify(self.final_layer(tokens, c))

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guided_channels: int | None = None, compute: Sequence[bool] | None = None,
                         cache: MutableMapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Classifier-free guidance as one batch of 2B: the first half of ``x`` is conditional, the second half is
        run with the null labels in ``y``. Guidance applies to the first ``guided_channels`` output channels (DiT
        guides only the first 3 of a 4-channel latent model's eps); the rest (learned sigma) is left as it comes.
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        if compute is None:
            model_out = self.forward(combined, t, y)
        else:
            model_out = self.forward_cached(combined, t, y, compute, cache if cache is not None else {})
        return apply_guidance(model_out, cfg_scale, guided_channels or default_guided_channels(self.in_channels))


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size ** 2, embed_dim) fixed 2-D sin-cos position embedding (MAE's)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = _get_1d_sincos_pos_embed(embed_dim // 2, grid[0])
    emb_w = _get_1d_sincos_pos_embed(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _get_1d_sincos_pos_embed(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
