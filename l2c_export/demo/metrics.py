"""The evaluation's measures (:mod:`l2c_export.demo.evaluate`): Frechet distance, PSNR, and the feature spaces they
are taken in (the digits classifier's, a fixed random projection of the latents, or of a clip's latent frames).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

PROJECTION_DIM = 64  # features of the random projection (as many as the digits classifier's)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to (n, d) and (m, d) features:
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).

    Tr (S_a S_b)^(1/2) is taken as the sum of the square roots of the eigenvalues of the symmetric S_a^(1/2) S_b
    S_a^(1/2) (the same eigenvalues), which needs no general matrix square root.
    """
    mu_a, mu_b = features_a.mean(axis=0), features_b.mean(axis=0)
    sigma_a = np.atleast_2d(np.cov(features_a, rowvar=False))
    sigma_b = np.atleast_2d(np.cov(features_b, rowvar=False))
    values, vectors = np.linalg.eigh(sigma_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = root_a @ sigma_b @ root_a
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    distance = ((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_root
    return float(max(distance, 0.0))  # identical sets give a rounding error's worth below zero


def psnr(samples: np.ndarray, reference: np.ndarray, data_range: float | None = 2.0) -> float | None:
    """PSNR in dB of ``samples`` against ``reference`` (same shape); None when identical. With ``data_range`` 2 (pixel
    models) both are clipped to [-1, 1]; with None (latents) nothing is clipped and the range is the reference's
    (max - min)."""
    if data_range is not None:
        samples, reference = np.clip(samples, -1, 1), np.clip(reference, -1, 1)
    else:
        data_range = float(reference.max() - reference.min())
    mse = float(np.mean((samples - reference) ** 2, dtype=np.float64))
    return None if mse == 0.0 else float(10.0 * np.log10(data_range ** 2 / mse))


def clip_frames(clips: np.ndarray) -> np.ndarray:
    """Clips (n, C, F, H, W) -> their frames as images (n F, C, H, W): clip 0's frames in order, then clip 1's."""
    n, channels, frames, height, width = clips.shape
    return clips.transpose(0, 2, 1, 3, 4).reshape(n * frames, channels, height, width)


def frame_psnr(clips: np.ndarray, reference: np.ndarray, data_range: float | None = None) -> float | None:
    """The mean over every frame of every clip (n, C, F, H, W) of that frame's PSNR in dB against the same frame of
    ``reference`` (same shape): a frame that goes wrong counts as much as the clip's others, where one PSNR of whole
    clips would be dominated by its worst frames' error. The range as :func:`psnr`'s (``data_range`` None: the whole
    reference's max - min, nothing clipped). Frames equal to the reference's (infinite PSNR) are left out of the mean;
    None when every frame is."""
    if data_range is not None:
        clips, reference = np.clip(clips, -1, 1), np.clip(reference, -1, 1)
    else:
        data_range = float(reference.max() - reference.min())
    difference = clip_frames(clips).astype(np.float64) - clip_frames(reference)
    mse = np.mean(difference ** 2, axis=(1, 2, 3))
    changed = mse[mse > 0]
    return None if not len(changed) else float(np.mean(10.0 * np.log10(data_range ** 2 / changed)))


class DigitsFeatures:
    """The shipped digits classifier: 64 penultimate features, the 1797 real digits as reference, class accuracy."""

    description = "scikit-learn digits (1797) in the shipped classifier's 64-d feature space"
    data_range = 2.0  # pixels in [-1, 1]

    def __init__(self, classifier_path: Path | None = None):
        from .classifier import CLASSIFIER_PATH, load_classifier
        from .train import digits_dataset

        self.classifier = load_classifier(classifier_path or CLASSIFIER_PATH)
        self.real = self(digits_dataset()[0])

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        from .classifier import features

        return features(self.classifier, samples)

    def psnr(self, samples: np.ndarray, reference: np.ndarray) -> float | None:
        return psnr(samples, reference, self.data_range)

    def accuracy(self, samples: np.ndarray, labels: np.ndarray | None) -> float | None:
        from .classifier import accuracy

        return None if labels is None else accuracy(self.classifier, samples, labels)

    @staticmethod
    def applies(spec) -> bool:
        """8x8 one-channel pixel models of 10 classes (the embedded digits models)."""
        sample = next(t for t in spec.family.graph_inputs(spec.config) if t.role == "sample")
        return spec.space == "pixel" and tuple(sample.shape) == (1, 8, 8)


class RandomProjection:
    """A fixed random projection of the flattened samples (C * H * W) onto ``dim`` Gaussian directions of norm about
    1, from ``numpy.random.default_rng(seed)``: a feature space for any model, with no reference data (so FD to full
    only) and no classes."""

    real = None

    def __init__(self, sample_shape: Sequence[int], dim: int = PROJECTION_DIM, seed: int = 0,
                 data_range: float | None = None):
        size = int(np.prod(sample_shape))
        self.matrix = np.random.default_rng(seed).standard_normal((size, dim)) / np.sqrt(size)
        self.data_range = data_range  # None: latents, PSNR over the reference's range; 2: decoded pixels in [-1, 1]
        what = "latents" if data_range is None else "decoded images"
        self.description = (f"a fixed random projection of the flattened {'x'.join(map(str, sample_shape))} {what} "
                            f"onto {dim} Gaussian directions (numpy default_rng({seed})); no reference data")

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        return samples.reshape(len(samples), -1).astype(np.float64) @ self.matrix

    def psnr(self, samples: np.ndarray, reference: np.ndarray) -> float | None:
        return psnr(samples, reference, self.data_range)

    def accuracy(self, samples: np.ndarray, labels: np.ndarray | None) -> None:
        return None


class FrameProjection(RandomProjection):
    """A video model's clips (n, C, F, H, W) judged frame by frame: each latent frame (C, H, W) of every clip is an
    image, projected as :class:`RandomProjection` projects an image model's latents, so that FD is over the n F
    frames; PSNR is :func:`frame_psnr`, each frame's against the same frame of full compute, averaged."""

    def __init__(self, clip_shape: Sequence[int], dim: int = PROJECTION_DIM, seed: int = 0,
                 data_range: float | None = None):
        channels, frames, height, width = clip_shape
        super().__init__((channels, height, width), dim, seed, data_range)
        self.frames = frames
        kind = "latent frames" if data_range is None else "decoded frames"
        self.description = (f"frame by frame: each of the {frames} {kind} ({channels}x{height}x{width}) of "
                            f"every clip as an image, FD over the frames in a fixed random projection onto {dim} "
                            f"Gaussian directions (numpy default_rng({seed})), PSNR per frame averaged over the "
                            f"frames; no reference data")

    def __call__(self, clips: np.ndarray) -> np.ndarray:
        return super().__call__(clip_frames(clips))

    def psnr(self, clips: np.ndarray, reference: np.ndarray) -> float | None:
        return frame_psnr(clips, reference, self.data_range)


class DigitClips(FrameProjection):
    """The text-to-video digits model's decoded clips (n, 3, F, H, W) in [-1, 1], judged frame by frame: FD to full
    and PSNR as :class:`FrameProjection` (range 2, both clipped), and ``accuracy`` the share of clips in which
    :func:`l2c_export.demo.t2v.judge_clips` reads the prompted digit and sees it move as asked. ``labels`` are (n, 2)
    rows (digit, direction name), an object array; no reference data."""

    def __init__(self, clip_shape: Sequence[int]):
        super().__init__(clip_shape, data_range=2.0)
        self.description += ("; accuracy: the digits classifier reads the prompted digit in 2/3 of a clip's frames "
                             "and its ink moves as the prompt asks (l2c_export.demo.t2v.judge_clips)")
        self._classifier = None

    def accuracy(self, clips: np.ndarray, labels: np.ndarray | None) -> float | None:
        from .classifier import load_classifier
        from .t2v import judge_clips

        if labels is None or not len(labels):
            return None
        self._classifier = self._classifier or load_classifier()
        frames = (np.clip(clips, -1.0, 1.0).transpose(0, 2, 3, 4, 1) + 1.0) / 2.0  # the pipeline's "np" frames
        verdict = judge_clips(frames, [int(d) for d in labels[:, 0]], [str(r) for r in labels[:, 1]],
                              self._classifier)
        return float(verdict["ok"].mean())
