"""FLUX.1's 2x2 latent packing (``FluxPipeline._pack_latents`` / ``_unpack_latents``), defined once: the manifest's
check of a "packed_2x2" VAE decoder, the runtime's decoding, the seeded initial noise and the FLUX.1 family's VAE
latents all use it. Numpy only.

Latents (C, h, w), h and w even, pack into (T, 4 C) tokens, T = (h / 2) (w / 2): token (i, j) holds the 2x2 patch at
rows 2i, 2i + 1 and columns 2j, 2j + 1, channel-major (channel, row, column).
"""

from __future__ import annotations

import numpy as np


def packed_2x2_shape(channels: int, height: int, width: int) -> tuple[int, int]:
    """(C, h, w) -> the packed tokens' shape (T, 4 C), T = (h / 2) (w / 2); ValueError where h or w is odd."""
    if height % 2 or width % 2:
        raise ValueError(f"{height} x {width} latents: expected an even height and width (2x2 packing)")
    return (height // 2) * (width // 2), 4 * channels


def unpacked_2x2_shape(packed: tuple[int, ...], height: int, width: int) -> tuple[int, int, int]:
    """Packed latents ``packed`` ((n,) T, 4 C) of ``height`` x ``width`` latents -> (C, h, w); ValueError where they
    do not fit."""
    *batch, tokens, channels = packed
    if channels % 4 or height % 2 or width % 2 or tokens != (height // 2) * (width // 2):
        raise ValueError(f"packed latents {tuple(packed)}: expected ({'n, ' * len(batch)}"
                         f"{(height // 2) * (width // 2)}, 4 C) for {height} x {width} latents")
    return channels // 4, height, width


def unpack_latents(latents: np.ndarray, height: int, width: int) -> np.ndarray:
    """Packed latents (n, (h / 2) (w / 2), 4 C) -> (n, C, h, w), as ``FluxPipeline._unpack_latents``."""
    if latents.ndim != 3:
        raise ValueError(f"packed latents {tuple(latents.shape)}: expected (n, T, 4 C)")
    channels = unpacked_2x2_shape(latents.shape, height, width)[0]
    patches = latents.reshape(len(latents), height // 2, width // 2, channels, 2, 2)
    return patches.transpose(0, 3, 1, 4, 2, 5).reshape(len(latents), channels, height, width)


def pack_latents(latents: np.ndarray) -> np.ndarray:
    """(n, C, h, w) -> packed (n, (h / 2) (w / 2), 4 C), as ``FluxPipeline._pack_latents``."""
    n, channels, height, width = latents.shape
    tokens, width_4c = packed_2x2_shape(channels, height, width)
    patches = latents.reshape(n, channels, height // 2, 2, width // 2, 2)
    return np.ascontiguousarray(patches.transpose(0, 2, 4, 1, 3, 5).reshape(n, tokens, width_4c))
