"""What every sampler is: a generator of model calls that owns its state, and the one loop that drives it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, Protocol

import numpy as np


@dataclass(frozen=True)
class ModelCall:
    """One model evaluation: ``index`` is its row in the schedule, ``x`` (n, C, H, W) the samples the model sees and
    ``t`` the timestep it is given (an integer for DDIM/DDPM, ``1000 * t`` as a float for DPM-Solver)."""

    index: int
    x: object
    t: float


CallGenerator = Generator[ModelCall, object, object]


class DenoisingSampler(Protocol):
    kind: str

    @property
    def num_calls(self) -> int:
        """Model calls (NFE) of one sample: the rows of a schedule."""

    @property
    def model_times(self) -> np.ndarray:
        """(num_calls,) float64: the timestep the model sees at each call."""

    calls_per_step: int  # model calls of one solver step; a step's first call is at ``step * calls_per_step``

    def calls(self, x, noise: Callable[[int], object] | None = None, first_step: int = 0) -> CallGenerator:
        """Yields each model call and receives its guided model output (n, C_out, H, W); returns the samples.
        ``x`` is the input of solver step ``first_step`` (0: the initial noise)."""

    def official_cache_calls(self) -> list[int]:
        """The calls where the authors' sampler consults the router (all others compute everything)."""

    def noise_level(self, call: int) -> tuple[float, float]:
        """(alpha, sigma) of the samples the model sees at ``call``: ``x = alpha * x0 + sigma * noise``."""

    def to_dict(self) -> dict:
        """The manifest's sampler section."""


def denoise(sampler: DenoisingSampler, x, model: Callable[[ModelCall], object],
            noise: Callable[[int], object] | None = None, progress: Callable | None = None):
    """The one denoising loop: runs ``model`` on every call ``sampler`` yields and returns the final samples.

    x: (n, C, H, W) initial noise; model(call) -> guided model output (n, C_out, H, W); noise(call_index) -> the
    noise DDPM adds after that call; progress: wraps the call counter (a tqdm bar's ``update``), or None.
    """
    steps = sampler.calls(x, noise)
    try:
        call = next(steps)
        while True:
            out = model(call)
            if progress is not None:
                progress(1)
            call = steps.send(out)
    except StopIteration as done:
        return done.value
