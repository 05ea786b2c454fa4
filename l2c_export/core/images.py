"""Pictures: pixel-space samples as a grid PNG, clips as animated images or H.264 video, and any matplotlib figure as a
PNG file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from .util import _umask, atomic_write_bytes


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


CLIP_FORMATS = {".gif": "GIF", ".webp": "WEBP", ".mp4": "H.264"}  # animated images Pillow writes; H.264 video
VIDEO_FPS = 16  # Wan's frames per second (WanPipeline's example writes export_to_video(frames, fps=16))
VIDEO_QUALITY = 5.0  # export_to_video's quality (imageio's variable bit rate, 0 to 10)
VIDEO_MACRO_BLOCK = 16  # export_to_video's macro_block_size: imageio pads the frames' sides up to a multiple of it


def clip_frames(clips: np.ndarray) -> np.ndarray:
    """Decoded clips (n, 3, F, H, W) in about [-1, 1] -> ``WanPipeline(output_type="np").frames``: (n, F, H, W, 3)
    float32 in [0, 1] (``video_processor.postprocess_video``: halved, shifted and clamped, channels last)."""
    return np.clip(np.moveaxis(np.asarray(clips, dtype=np.float32), 1, -1) / 2 + 0.5, 0, 1).astype(np.float32)


def tile_clips(frames: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Clips' frames (n, F, H, W, C) -> one clip (F, rows H, columns W, C) of the n side by side, in rows of
    ``columns`` (default all in one row), black where a row is short; one clip is returned as it is."""
    n, count, height, width, channels = frames.shape
    columns = min(n, columns or n)
    rows = -(-n // columns)
    tiled = np.zeros((count, rows * height, columns * width, channels), dtype=frames.dtype)
    for i, clip in enumerate(frames):
        r, q = divmod(i, columns)
        tiled[:, r * height:(r + 1) * height, q * width:(q + 1) * width] = clip
    return tiled


def export_video(frames: np.ndarray, path: str | Path, fps: int = VIDEO_FPS) -> None:
    """Writes ``frames`` (F, H, W, 3) float in [0, 1] to ``path`` (.mp4) as diffusers' ``export_to_video(frames,
    path, fps)`` does: each frame ``(frame * 255).astype(uint8)``, imageio's ffmpeg writer (H.264, yuv420p) at
    quality 5 and macro block 16; atomically (a temporary file beside it, then a rename)."""
    import os
    import tempfile

    import imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        with imageio.get_writer(tmp, format="FFMPEG", fps=fps, quality=VIDEO_QUALITY, bitrate=None,
                                macro_block_size=VIDEO_MACRO_BLOCK) as writer:
            for frame in frames:
                writer.append_data((frame * 255).astype(np.uint8))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_clip(clips: np.ndarray, path: str | Path, columns: int | None = None, scale: int = 8,
              fps: int = VIDEO_FPS) -> None:
    """Writes ``clips`` (n, C, F, H, W) in [-1, 1] as one animated image (``.gif`` or ``.webp``, by the suffix)
    whose frame f is the grid of the n clips' frames f, upscaled ``scale`` times, at ``fps`` frames per second
    (Wan's 16), looping; or as an ``.mp4`` (:func:`export_video`) of the clips' frames (:func:`clip_frames`) side by
    side (:func:`tile_clips`, ``columns`` to a row), not upscaled: one clip's file is ``export_to_video``'s."""
    path = Path(path)
    if path.suffix.lower() not in CLIP_FORMATS:
        raise ValueError(f"{path}: a clip is written as {', '.join(CLIP_FORMATS)}; got {path.suffix or 'no suffix'}")
    if path.suffix.lower() == ".mp4":
        export_video(tile_clips(clip_frames(clips), columns), path, fps)
        return
    frames = [grid_picture(clips[:, :, f], columns, scale) for f in range(clips.shape[2])]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=CLIP_FORMATS[path.suffix.lower()], save_all=True, append_images=frames[1:],
                   duration=round(1000 / fps), loop=0)
    atomic_write_bytes(path, buffer.getvalue())
