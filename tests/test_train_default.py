"""Training the embedded models: the digits data, DiT's and U-ViT's losses, real training steps, and
``train-default``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from l2c_export.demo.train import DiffusionLoss, UViTLoss, digits_dataset, fit, save_weights, train
from l2c_export.models import get_family
from l2c_export.models.dit.model import DiT, DiTConfig
from l2c_export.models.uvit.model import UViT, UViTConfig

SMALL = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def test_digits_are_the_bundled_set_in_minus_one_to_one():
    images, labels = digits_dataset()
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert images.min() == -1.0 and images.max() == 1.0
    assert sorted(set(labels.tolist())) == list(range(10))


@pytest.mark.parametrize("steps", [1, 19, 20, 21, 40])
def test_fit_runs_any_number_of_steps_and_lowers_the_loss(steps):
    """fit's one-cycle schedule at run lengths around its warm-up's edge (5% of 20 steps is one step, which
    OneCycleLR divided by zero): a least-squares fit of y = 3x on 8 points still moves the weight towards 3."""
    x = torch.linspace(-1, 1, 8)[:, None]
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)

    def batch_loss(model, generator):
        return ((model(x) - 3 * x) ** 2).mean()

    fitted = fit(model, batch_loss, steps, lr=0.1, ema_decay=None, progress=False)
    assert 0.0 < fitted.weight.item() <= 3.0


def _loss_on_fixed_batch(model: DiT) -> float:
    images, labels = (torch.from_numpy(a[:256]) for a in digits_dataset())
    torch.manual_seed(123)
    t = torch.randint(1000, (256,))
    with torch.no_grad():
        return DiffusionLoss()(model.eval(), images, labels, t).item()


def test_training_steps_lower_the_loss_and_the_weights_load_back(tmp_path):
    torch.manual_seed(0)
    untrained = _loss_on_fixed_batch(DiT(SMALL))
    trained = train(SMALL, steps=150, batch_size=64, lr=2e-3, ema_decay=0.9, progress=False)
    assert _loss_on_fixed_batch(trained) < 0.8 * untrained
    save_weights(trained, tmp_path / "w.safetensors")
    from l2c_export.models.checkpoint import load_dit

    again = load_dit(tmp_path / "w.safetensors", SMALL)
    for name, tensor in trained.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name].numpy(), tensor.numpy())


SMALL_UVIT = UViTConfig(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=11)


def test_uvit_training_steps_lower_u_vits_loss_and_the_weights_load_back_in_the_official_layout(tmp_path):
    images, labels = (torch.from_numpy(a[:256]) for a in digits_dataset())

    def loss_of(model: UViT) -> float:
        torch.manual_seed(123)
        t = torch.randint(1000, (256,))
        with torch.no_grad():
            return UViTLoss(SMALL_UVIT.num_classes, label_drop=0.0)(model.eval(), images, labels, t).item()

    torch.manual_seed(0)
    untrained = loss_of(UViT(SMALL_UVIT))
    trained = train(SMALL_UVIT, steps=150, batch_size=64, lr=2e-3, ema_decay=0.9, progress=False)
    assert isinstance(trained, UViT) and loss_of(trained) < 0.8 * untrained
    save_weights(trained, tmp_path / "w.safetensors")
    again = get_family("uvit").load(tmp_path / "w.safetensors", SMALL_UVIT)
    for name, tensor in trained.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name].numpy(), tensor.numpy())


def test_train_default_command_trains_the_digits_uvit(tmp_path):
    from l2c_export.models.zoo import embedded_default

    from .conftest import run_cli

    result = run_cli("train-default", "--model", "uvit-digits", "--steps", "2", "--batch-size", "8", "--out", str(tmp_path))
    assert "uvit-digits.safetensors" in result.stdout
    model = get_family("uvit").load(tmp_path / "uvit-digits.safetensors", embedded_default("uvit-digits").config)
    assert isinstance(model, UViT) and model.config.embed_dim == 96
