"""Multiply-accumulate counts of one forward, per sample, split into what a schedule can skip and what always runs.
Each model family counts its own (:meth:`l2c_export.models.ModelFamily.count_macs`)."""

from __future__ import annotations

from dataclasses import dataclass


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
