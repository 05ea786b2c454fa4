"""A small digits classifier, the feature space of the evaluation's Frechet distance and its class accuracy.

Trained on scikit-learn's bundled 8x8 digits (the data the embedded DiT learned), with a fixed held-out split; the
weights ship as ``l2c_export/demo/classifier.safetensors`` and :func:`train_classifier` reproduces them
(``python -m l2c_export.demo.classifier --out FILE``, under a minute on two CPU cores).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

CLASSIFIER_PATH = Path(__file__).parent / "classifier.safetensors"
FEATURE_DIM = 64
HELD_OUT = 360  # the last 360 digits (20%) are never trained on


class DigitsClassifier(nn.Module):
    """(N, 1, 8, 8) images in [-1, 1] -> logits (N, 10); :meth:`features` gives the (N, 64) penultimate features."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 8, 8) -> (N, 64): conv, conv, 2x2 max pool, linear, ReLU."""
        x = F.relu(self.conv1(x.clamp(-1.0, 1.0)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def split_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits in [-1, 1]: train images (n, 1, 8, 8), train labels, held-out images, held-out labels."""
    from .train import digits_dataset

    images, labels = digits_dataset()
    return images[:-HELD_OUT], labels[:-HELD_OUT], images[-HELD_OUT:], labels[-HELD_OUT:]


def train_classifier(epochs: int = 30, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                     progress: bool = True) -> tuple[DigitsClassifier, float]:
    """Trains the classifier on the training split with one-pixel shifts (as the DiT was trained); returns it (eval
    mode) and its held-out accuracy."""
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = (torch.from_numpy(a) for a in split_digits())
    model = DigitsClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(train_x) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    for _ in tqdm(range(epochs), desc="training the digits classifier", disable=not progress):
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(steps_per_epoch):
            index = order[i * batch_size: (i + 1) * batch_size]
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            x = torch.roll(train_x[index], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model, accuracy(model, test_x.numpy(), test_y.numpy())


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``images`` (n, 1, 8, 8) classified as ``labels`` (n,)."""
    predicted = model(torch.from_numpy(np.asarray(images, dtype=np.float32))).argmax(dim=1).numpy()
    return float((predicted == np.asarray(labels)).mean())


@torch.no_grad()
def features(model: DigitsClassifier, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """(n, 1, 8, 8) images -> (n, 64) float64 features."""
    images = torch.from_numpy(np.asarray(images, dtype=np.float32))
    return np.concatenate([model.features(images[i: i + batch_size]).double().numpy()
                           for i in range(0, len(images), batch_size)])


def save_classifier(model: DigitsClassifier, path: str | Path, held_out_accuracy: float) -> None:
    from safetensors.torch import save

    from ..core.util import atomic_write_bytes

    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"format": "l2c-export-digits-classifier-v1", "held_out_accuracy": f"{held_out_accuracy:.4f}",
                "held_out": json.dumps({"last": HELD_OUT, "of": "sklearn.datasets.load_digits"})}
    atomic_write_bytes(Path(path), save(state, metadata=metadata))


def load_classifier(path: str | Path = CLASSIFIER_PATH) -> DigitsClassifier:
    """The shipped classifier (eval mode)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (train one with python -m l2c_export.demo.classifier "
                                f"--out {path})")
    model = DigitsClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Reproduce the shipped digits classifier.")
    parser.add_argument("--out", type=Path, default=CLASSIFIER_PATH)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, held_out = train_classifier(epochs=args.epochs, seed=args.seed)
    save_classifier(model, args.out, held_out)
    print(f"held-out accuracy {held_out:.4f}; wrote {args.out}")


if __name__ == "__main__":  # pragma: no cover
    main()
