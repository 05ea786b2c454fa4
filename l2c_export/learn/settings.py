"""What a learning run does (:func:`l2c_export.learn.learner.learn_router`); saved in its checkpoints and router
metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.schedule import ScheduleMode, check_mode


@dataclass(frozen=True)
class LearnSettings:
    """What a learning run does; saved in its checkpoints and router metadata."""

    mode: ScheduleMode = "official"
    iterations: int = 300
    batch_size: int = 16  # images per learned step and iteration, over all processes (guidance doubles them)
    lr: float = 0.05
    l1: float = 2e-4  # lambda of lambda * sum(w)
    cfg_scale: float = 1.0  # > 1: train on the guidance batch (conditional and null-class halves)
    window: int | None = None  # general mode: unroll this many steps back (None: from the first step)
    steps_per_iteration: int = 0  # learned steps drawn per iteration; 0: all of them
    init_std: float = 0.0  # learned logits start at init_std * N(0, 1) (the authors': 1)
    seed: int = 0

    def __post_init__(self):
        check_mode(self.mode)
        if self.iterations < 0 or self.batch_size < 1:
            raise ValueError(f"iterations ({self.iterations}) must be >= 0 and batch size ({self.batch_size}) >= 1")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be at least 1 step; got {self.window}")
        if self.steps_per_iteration < 0:
            raise ValueError(f"steps per iteration must be >= 0 (0: all); got {self.steps_per_iteration}")
