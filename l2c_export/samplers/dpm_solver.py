"""DPM-Solver++ (data prediction), singlestep, order 2, as Learning-to-Cache's U-ViT samples: their dpm_solver_pp.py
with predict_x0=True, method='singlestep', order=2, skip_type='time_uniform', eps=1e-3, T=1, solver 'dpm_solver'.

Plain numpy tables and arithmetic, as :mod:`.gaussian`: the same code runs on torch tensors and numpy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.vocabulary import uvit_official_calls
from .base import CallGenerator, ModelCall


def stable_diffusion_betas(num_timesteps: int = 1000) -> np.ndarray:
    """``linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2``: float64 (num_timesteps,)."""
    return np.linspace(0.00085 ** 0.5, 0.0120 ** 0.5, num_timesteps, dtype=np.float64) ** 2


class DiscreteVPSchedule:
    """The discrete-time VP schedule as DPM-Solver's ``NoiseScheduleVP('discrete')``: log alpha piecewise linear in
    continuous time over the knots ``t_n = (n + 1) / N``, extended linearly beyond the outermost knots."""

    def __init__(self, betas: np.ndarray):
        self.log_alphas = 0.5 * np.cumsum(np.log(1.0 - betas))
        self.t_knots = np.linspace(1.0 / len(betas), 1.0, len(betas))

    def log_alpha(self, t: float) -> float:
        return _interpolate(t, self.t_knots, self.log_alphas)

    def sigma(self, t: float) -> float:
        return float(np.sqrt(1.0 - np.exp(2.0 * self.log_alpha(t))))

    def lambda_(self, t: float) -> float:
        """Half log-SNR, log(alpha_t) - log(sigma_t)."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * float(np.log(1.0 - np.exp(2.0 * log_alpha)))

    def inverse_lambda(self, lamb: float) -> float:
        log_alpha = -0.5 * float(np.logaddexp(0.0, -2.0 * lamb))
        return _interpolate(log_alpha, self.log_alphas[::-1], self.t_knots[::-1])


def _interpolate(x: float, xp: np.ndarray, fp: np.ndarray) -> float:
    """Piecewise linear through (xp, fp), xp ascending, extended linearly at both ends (numpy's interp clamps)."""
    i = int(np.clip(np.searchsorted(xp, x) - 1, 0, len(xp) - 2))
    return float(fp[i] + (x - xp[i]) * (fp[i + 1] - fp[i]) / (xp[i + 1] - xp[i]))


@dataclass(frozen=True)
class DPMSolver2S:
    """DPM-Solver++ singlestep order 2 (r1 = 0.5) over K = num_calls / 2 steps between ``linspace(1, 1e-3, K + 1)``.

    Step k runs two calls: at its start s = t_k on x, and at its midpoint s1 (lambda halfway between t_k and t_{k+1})
    on ``x_s1 = mid_x * x + mid_x0 * x0_s``; then ``x <- out_x * x + out_x0 * x0_s + out_diff * (x0_s1 - x0_s)``. The
    data prediction at a call is ``x0 = (x - sigma * eps) / alpha`` with that call's alpha and sigma. Every table is
    float64: per call ``times`` (continuous), ``alphas``, ``sigmas``; per step the five coefficients.
    """

    times: np.ndarray  # (2K,) continuous time of each call: t_0, s1_0, t_1, s1_1, ...
    alphas: np.ndarray  # (2K,)
    sigmas: np.ndarray  # (2K,)
    mid_x: np.ndarray  # (K,) sigma_s1 / sigma_s
    mid_x0: np.ndarray  # (K,) -alpha_s1 * expm1(-r1 h)
    out_x: np.ndarray  # (K,) sigma_t / sigma_s
    out_x0: np.ndarray  # (K,) -alpha_t * expm1(-h)
    out_diff: np.ndarray  # (K,) -(0.5 / r1) * alpha_t * expm1(-h)
    kind: str = "dpm_solver_2s"

    R1 = 0.5
    calls_per_step = 2
    T_START, T_END = 1.0, 1e-3
    NUM_TRAIN_TIMESTEPS = 1000

    @classmethod
    def create(cls, kind: str, num_calls: int, clip_denoised: bool = False) -> "DPMSolver2S":
        """``num_calls`` model calls (``clip_denoised`` has no counterpart: the authors' data prediction is not
        clipped)."""
        if num_calls < 2 or num_calls % 2:
            raise ValueError(f"DPM-Solver-2S makes two model calls per step; --steps (model calls) must be even and "
                             f"at least 2; got {num_calls}")
        num_steps = num_calls // 2
        schedule = DiscreteVPSchedule(stable_diffusion_betas(cls.NUM_TRAIN_TIMESTEPS))
        knots = np.linspace(cls.T_START, cls.T_END, num_steps + 1)
        times, alphas, sigmas, tables = [], [], [], {name: [] for name in ("mid_x", "mid_x0", "out_x", "out_x0",
                                                                         "out_diff")}
        for k in range(num_steps):
            s, t = float(knots[k]), float(knots[k + 1])
            lambda_s, lambda_t = schedule.lambda_(s), schedule.lambda_(t)
            h = lambda_t - lambda_s
            s1 = schedule.inverse_lambda(lambda_s + cls.R1 * h)
            alpha_s, alpha_s1, alpha_t = (float(np.exp(schedule.log_alpha(v))) for v in (s, s1, t))
            sigma_s, sigma_s1, sigma_t = (schedule.sigma(v) for v in (s, s1, t))
            times += [s, s1]
            alphas += [alpha_s, alpha_s1]
            sigmas += [sigma_s, sigma_s1]
            tables["mid_x"].append(sigma_s1 / sigma_s)
            tables["mid_x0"].append(-alpha_s1 * np.expm1(-cls.R1 * h))
            tables["out_x"].append(sigma_t / sigma_s)
            tables["out_x0"].append(-alpha_t * np.expm1(-h))
            tables["out_diff"].append(-(0.5 / cls.R1) * alpha_t * np.expm1(-h))
        return cls(times=np.array(times), alphas=np.array(alphas), sigmas=np.array(sigmas),
                   **{name: np.array(values, dtype=np.float64) for name, values in tables.items()})

    @property
    def num_calls(self) -> int:
        return len(self.times)

    @property
    def num_steps(self) -> int:
        """Solver steps (K); the model is called twice per step."""
        return len(self.mid_x)

    @property
    def model_times(self) -> np.ndarray:
        """The model sees ``1000 * t`` as a float (the authors' ``t_continuous * N``)."""
        return self.times * self.NUM_TRAIN_TIMESTEPS

    @property
    def timesteps(self) -> np.ndarray:
        return self.model_times

    def _x0(self, call: int, x, model_out):
        eps = model_out[:, : x.shape[1]]
        return (x - float(self.sigmas[call]) * eps) / float(self.alphas[call])

    def calls(self, x, noise=None, first_step: int = 0) -> CallGenerator:
        for k in range(first_step, self.num_steps):
            start, middle = 2 * k, 2 * k + 1
            x0_s = self._x0(start, x, (yield ModelCall(start, x, float(self.model_times[start]))))
            x_s1 = float(self.mid_x[k]) * x + float(self.mid_x0[k]) * x0_s
            x0_s1 = self._x0(middle, x_s1, (yield ModelCall(middle, x_s1, float(self.model_times[middle]))))
            x = float(self.out_x[k]) * x + float(self.out_x0[k]) * x0_s + float(self.out_diff[k]) * (x0_s1 - x0_s)
        return x

    def official_cache_calls(self) -> list[int]:
        return self.official_calls(self.num_calls)

    official_calls = staticmethod(uvit_official_calls)

    def noise_level(self, call: int) -> tuple[float, float]:
        return float(self.alphas[call]), float(self.sigmas[call])

    def to_dict(self) -> dict:
        return {"kind": self.kind, "num_calls": self.num_calls, "model_times": self.model_times.tolist(),
                **{name: getattr(self, name).tolist() for name in _DPM_TABLES}}

    @classmethod
    def from_dict(cls, data: dict) -> "DPMSolver2S":
        return cls(**{name: np.asarray(data[name], dtype=np.float64) for name in _DPM_TABLES})


_DPM_TABLES = ("times", "alphas", "sigmas", "mid_x", "mid_x0", "out_x", "out_x0", "out_diff")
