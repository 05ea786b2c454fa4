"""Decoding latents of latent-space models with a local diffusers ``AutoencoderKL`` (the SD VAE DiT uses)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def decode_latents(vae_dir: str | Path, latents: np.ndarray, latent_scale: float = 0.18215,
                   batch_size: int = 8) -> np.ndarray:
    """latents (n, 4, h, w) float32 -> images (n, 3, 8h, 8w) in [-1, 1], as DiT's sample.py:
    ``vae.decode(latents / 0.18215).sample``. ``vae_dir`` is a local folder (no hub access)."""
    import torch

    from ..core.extras import import_extra

    AutoencoderKL = import_extra("diffusers", "--vae").AutoencoderKL
    vae_dir = Path(vae_dir)
    if not (vae_dir / "config.json").is_file():
        raise ValueError(f"{vae_dir}: not a diffusers AutoencoderKL folder (no config.json)")
    vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).eval()
    images = []
    with torch.no_grad():
        for start in range(0, len(latents), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(latents[start: start + batch_size], dtype=np.float32))
            images.append(vae.decode(chunk / latent_scale).sample.clamp(-1, 1).numpy())
    return np.concatenate(images)
