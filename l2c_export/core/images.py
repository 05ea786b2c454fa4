"""Pictures: pixel-space samples as a grid PNG, and any matplotlib figure as a PNG file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from .util import atomic_write_bytes


def figure_to_png(figure, path: str | Path, dpi: int = 120, tight: bool = True) -> None:
    """Writes a matplotlib ``figure`` to ``path`` as a PNG (atomically) and closes it; ``tight``: cropped to what
    is drawn (``bbox_inches="tight"``)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(figure)
    atomic_write_bytes(Path(path), buffer.getvalue())


def to_uint8(samples: np.ndarray) -> np.ndarray:
    """(n, C, H, W) in [-1, 1] -> (n, H, W, C) uint8; clips (n, C, F, H, W) -> (n, F, H, W, C)."""
    return np.moveaxis(np.clip((samples + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8), 1, -1)


def grid_picture(samples: np.ndarray, columns: int | None = None, scale: int = 8) -> Image.Image:
    """A grid of ``samples`` (n, C, H, W) in [-1, 1], each image upscaled ``scale`` times (bicubic)."""
    images = to_uint8(samples)
    n, h, w, c = images.shape
    columns = columns or min(n, 8)
    rows = -(-n // columns)
    pad = 2
    grid = np.full((rows * (h * scale + pad) + pad, columns * (w * scale + pad) + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, columns)
        # Bicubic upscaling: an 8x8 digit reads as a digit when smooth, and as a mosaic when nearest-neighbour.
        big = np.asarray(Image.fromarray(image[..., 0] if c == 1 else image).resize(
            (w * scale, h * scale), Image.Resampling.BICUBIC)).reshape(h * scale, w * scale, c)
        top, left = pad + r * (h * scale + pad), pad + q * (w * scale + pad)
        grid[top: top + h * scale, left: left + w * scale] = big
    return Image.fromarray(grid[..., 0] if c == 1 else grid)


def save_grid(samples: np.ndarray, path: str | Path, columns: int | None = None, scale: int = 8) -> None:
    """Writes a PNG grid of ``samples`` (n, C, H, W) in [-1, 1], each image upscaled ``scale`` times (bicubic)."""
    buffer = io.BytesIO()
    grid_picture(samples, columns, scale).save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())


CLIP_FORMATS = {".gif": "GIF", ".webp": "WEBP"}  # animated images Pillow writes


def save_clip(clips: np.ndarray, path: str | Path, columns: int | None = None, scale: int = 8,
              fps: int = 16) -> None:
    """Writes ``clips`` (n, C, F, H, W) in [-1, 1] as one animated image (``.gif`` or ``.webp``, by the suffix)
    whose frame f is the grid of the n clips' frames f, at ``fps`` frames per second (Wan's 16), looping."""
    path = Path(path)
    if path.suffix.lower() not in CLIP_FORMATS:
        raise ValueError(f"{path}: a clip is written as {' or '.join(CLIP_FORMATS)}; got {path.suffix or 'no suffix'}")
    frames = [grid_picture(clips[:, :, f], columns, scale) for f in range(clips.shape[2])]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=CLIP_FORMATS[path.suffix.lower()], save_all=True, append_images=frames[1:],
                   duration=round(1000 / fps), loop=0)
    atomic_write_bytes(path, buffer.getvalue())
