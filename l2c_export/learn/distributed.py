"""Data-parallel learning under ``torchrun``: joining the process group (gloo on CPU, NCCL on GPUs)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    """Joins the process group that ``torchrun`` describes (env WORLD_SIZE > 1): gloo on CPU, NCCL on GPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())
