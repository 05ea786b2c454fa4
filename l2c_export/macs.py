"""Multiply-accumulate counts of a DiT forward, per sample, split into what a schedule can skip and what always runs.

DiT-XL/2 at 256 px (latent 32) counts 118.6 G here, the figure DiT's paper gives as "Gflops".
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import DiTConfig


@dataclass(frozen=True)
class MacCount:
    """MACs of one sample's forward: ``always`` runs at every step (patch, timestep and label embedders, every
    block's adaLN modulation, the final layer); ``attn`` and ``mlp`` are one block's two branches."""

    always: int
    attn: int
    mlp: int
    depth: int

    @property
    def full(self) -> int:
        return self.always + self.depth * (self.attn + self.mlp)

    def sublayer(self, index: int) -> int:
        """MACs of sub-layer ``index`` (2j attention, 2j + 1 MLP)."""
        return self.attn if index % 2 == 0 else self.mlp

    def of_subset(self, compute) -> int:
        """MACs of one forward that computes the sub-layers where ``compute`` (2 * depth bools) is true."""
        return self.always + sum(self.sublayer(i) for i, on in enumerate(compute) if on)


def count_macs(config: DiTConfig) -> MacCount:
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
