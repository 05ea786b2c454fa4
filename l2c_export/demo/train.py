"""Training the embedded defaults: small class-conditional pixel-space models on scikit-learn's bundled digits.

DiT (``--model dit-digits``): DiT's objective, eps MSE plus the variational bound for the learned sigma (with the mean's
gradient stopped), on the 1000-step linear schedule. U-ViT (``--model uvit-digits``): U-ViT's ``LSimple``, eps MSE at a
timestep n drawn from 1 .. 1000 of the discrete schedule DPM-Solver samples (``stable_diffusion_betas``), the model
seeing n as a float (DPM-Solver's ``1000 * t``). Both drop labels to the null class with probability 0.1 for
classifier-free guidance and keep an EMA of the weights. ``l2c-export train-default`` reproduces the shipped weights
in minutes on two CPU cores, from the config and training settings of their ``model.json``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models import family_of_config
from ..models.dit.model import DiT, DiTConfig
from ..models.uvit.model import UViT, UViTConfig
from ..samplers.dpm_solver import stable_diffusion_betas
from ..samplers.gaussian import NUM_TRAIN_TIMESTEPS, linear_betas


def digits_dataset() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits -> images (n, 1, 8, 8) float32 in [-1, 1] and labels (n,) int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0) * 2.0 - 1.0
    return images[:, None], digits.target.astype(np.int64)


class DiffusionLoss:
    """DiT's training loss on the 1000-step linear schedule (eps MSE + VLB for learned sigma)."""

    def __init__(self, num_timesteps: int = NUM_TRAIN_TIMESTEPS):
        betas = linear_betas(num_timesteps)
        ac = np.cumprod(1.0 - betas)
        ac_prev = np.append(1.0, ac[:-1])
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        tables = {
            "sqrt_ac": np.sqrt(ac), "sqrt_1m_ac": np.sqrt(1.0 - ac),
            "sqrt_recip_ac": np.sqrt(1.0 / ac), "sqrt_recipm1_ac": np.sqrt(1.0 / ac - 1.0),
            "coef1": betas * np.sqrt(ac_prev) / (1.0 - ac), "coef2": (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
            "post_logvar": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            "log_betas": np.log(betas),
        }
        self.tables = {name: torch.tensor(value, dtype=torch.float32) for name, value in tables.items()}
        self.num_timesteps = num_timesteps

    def _at(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return self.tables[name][t].view(-1, 1, 1, 1)

    def __call__(self, model: DiT, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x0)
        xt = self._at("sqrt_ac", t) * x0 + self._at("sqrt_1m_ac", t) * noise
        out = model(xt, t, y)
        channels = x0.shape[1]
        eps, var_values = out[:, :channels], out[:, channels:]
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        # Variational bound for the variance only: the mean is taken from a detached eps.
        frac = (var_values + 1) / 2
        model_logvar = frac * self._at("log_betas", t) + (1 - frac) * self._at("post_logvar", t)
        pred_x0 = self._at("sqrt_recip_ac", t) * xt - self._at("sqrt_recipm1_ac", t) * eps.detach()
        model_mean = self._at("coef1", t) * pred_x0 + self._at("coef2", t) * xt
        true_mean = self._at("coef1", t) * x0 + self._at("coef2", t) * xt
        true_logvar = self._at("post_logvar", t)
        kl = 0.5 * (-1.0 + model_logvar - true_logvar + torch.exp(true_logvar - model_logvar)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_logvar))
        kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).mean(dim=(1, 2, 3))
        vb = torch.where(t == 0, nll / math.log(2.0), kl)
        return (mse + vb).mean()


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of x in [-1, 1] discretised to 256 bins under N(means, exp(log_scales) ** 2)."""
    def cdf(v):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))

    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv_stdv * (centered + 1.0 / 255.0)), cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus,
                            torch.where(x > 0.999, log_one_minus_cdf_min,
                                        torch.log((cdf_plus - cdf_min).clamp(min=1e-12))))
    return log_probs


class UViTLoss:
    """U-ViT's ``LSimple`` on the discrete schedule of DPM-Solver: n ~ U{1 .. 1000}, x_n = sqrt(abar_n) x0 +
    sqrt(1 - abar_n) eps with abar_n the cumulative product of the first n alphas, loss = mean (eps - model(x_n, n,
    y)) ** 2. Labels become the null class (the last) with probability ``label_drop``."""

    def __init__(self, num_classes: int, label_drop: float = 0.1):
        alphas_cumprod = np.cumprod(1.0 - stable_diffusion_betas(NUM_TRAIN_TIMESTEPS))
        self.sqrt_ac = torch.tensor(np.sqrt(alphas_cumprod), dtype=torch.float32)
        self.sqrt_1m_ac = torch.tensor(np.sqrt(1.0 - alphas_cumprod), dtype=torch.float32)
        self.null_class, self.label_drop = num_classes - 1, label_drop

    def __call__(self, model: UViT, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """t: (N,) int64 in 0 .. 999, the timestep n - 1 (as DiT's loss draws it)."""
        noise = torch.randn_like(x0)
        xt = self.sqrt_ac[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1m_ac[t].view(-1, 1, 1, 1) * noise
        y = torch.where(torch.rand(y.shape) < self.label_drop, torch.full_like(y, self.null_class), y)
        return ((noise - model(xt, (t + 1).float(), y)) ** 2).mean()


# The training objective of each family: the loss its authors train with.
LOSSES = {"dit": lambda config: DiffusionLoss(), "uvit": lambda config: UViTLoss(config.num_classes)}


def fit(model: torch.nn.Module, batch_loss, steps: int, lr: float, ema_decay: float | None, seed: int = 0,
        progress: bool = True, description: str = "training", ema: torch.nn.Module | None = None) -> torch.nn.Module:
    """The training loop of every embedded model: AdamW (no weight decay) under a one-cycle learning rate (5% warm-up;
    none in a run of 20 steps or fewer), gradients clipped to norm 1, ``batch_loss(model, generator)`` the loss of one
    batch drawn with ``generator`` (seeded by ``seed``). Returns the EMA of the weights (``ema_decay``; None: the
    weights themselves), in eval mode, kept in ``ema`` (a model of the same architecture; default: a copy of
    ``model``)."""
    import copy

    if ema_decay is None:
        ema = None
    else:
        ema = (ema or copy.deepcopy(model)).eval()
        ema.load_state_dict(model.state_dict())
        ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # OneCycleLR ends the warm-up at step pct_start x steps - 1 and divides by that: a warm-up of one step (20 steps)
    # divides by zero, so a run too short for a warm-up of more than one step has none
    warm_up = 0.05 if 0.05 * steps > 1 else 0.0
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=warm_up)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc=description, disable=not progress)
    for step in bar:
        loss = batch_loss(model, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if ema is not None:
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), model.parameters()):
                    p_ema.lerp_(p, 1.0 - ema_decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema if ema is not None else model.eval()


def train(config: DiTConfig | UViTConfig, steps: int = 6000, batch_size: int = 128,
          lr: float = 2e-3, ema_decay: float = 0.999, seed: int = 0, shift_augment: bool = False,
          progress: bool = True) -> DiT | UViT:
    """Trains a DiT or a U-ViT (by the config's family) on the digits with that family's loss and returns its EMA
    weights (eval mode)."""
    torch.manual_seed(seed)
    images, labels = (torch.from_numpy(a) for a in digits_dataset())
    family = family_of_config(config)
    model = family.create(config)
    ema = family.create(config)  # before anything else draws from torch's global generator: the shipped weights' order
    loss_fn = LOSSES[family.name](config)

    def batch_loss(model, generator):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        x0 = images[index]
        if shift_augment:  # random shifts by up to one pixel: 1797 images are few for a diffusion model
            x0 = torch.roll(x0, shifts=(int(torch.randint(-1, 2, ())), int(torch.randint(-1, 2, ()))), dims=(2, 3))
        t = torch.randint(NUM_TRAIN_TIMESTEPS, (batch_size,), generator=generator)
        return loss_fn(model, x0, labels[index], t)

    return fit(model, batch_loss, steps, lr, ema_decay, seed, progress,
               f"training the digits {type(model).__name__}", ema=ema)


def save_weights(model: DiT | UViT, path: str | Path) -> None:
    from safetensors.torch import save

    from ..core.util import atomic_write_bytes

    layout = "baofff/U-ViT" if isinstance(model, UViT) else "facebookresearch/DiT"
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    atomic_write_bytes(Path(path), save(state, metadata={"format": "pt", "layout": layout}))

