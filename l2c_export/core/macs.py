"""Multiply-accumulate counts of one forward, per sample, split into what a schedule can skip and what always runs.
Each model family counts its own (:meth:`l2c_export.models.ModelFamily.count_macs`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MacCount:
    """MACs of one sample's forward: ``always`` runs at every step (patch, timestep and label embedders, every
    block's adaLN modulation, the final layer); ``attn`` and ``mlp`` are one block's two branches (the authors'
    layout, ``depth`` blocks). A model with named sub-layers gives each one's MACs in ``per_sublayer`` instead (in
    column order; ``attn``, ``mlp`` and ``depth`` are then 0)."""

    always: int
    attn: int = 0
    mlp: int = 0
    depth: int = 0
    per_sublayer: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        """Sub-layers (schedule columns)."""
        return len(self.per_sublayer) if self.per_sublayer else 2 * self.depth

    @property
    def full(self) -> int:
        if self.per_sublayer:
            return self.always + sum(self.per_sublayer)
        return self.always + self.depth * (self.attn + self.mlp)

    def sublayer(self, index: int) -> int:
        """MACs of sub-layer ``index`` (authors' layout: 2j attention, 2j + 1 MLP)."""
        if self.per_sublayer:
            return self.per_sublayer[index]
        return self.attn if index % 2 == 0 else self.mlp

    def of_subset(self, compute) -> int:
        """MACs of one forward that computes the sub-layers where ``compute`` (``width`` bools) is true."""
        return self.always + sum(self.sublayer(i) for i, on in enumerate(compute) if on)
