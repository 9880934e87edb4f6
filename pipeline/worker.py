"""Who runs the training loop and what it calls back: the worker's place (rank, world size, device)
and the two callables the caller binds (jobs/train.py to Ray and MLflow, tests to lists). A module of
its own so that pipeline/train_loop.py and pipeline/train_state.py both import it, not each other."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

Log = Callable[[dict[str, float], int], None]                  # (metrics, images seen)
Report = Callable[[dict[str, float], "str | None", bool], None]  # (metrics, checkpoint folder, is best)


@dataclass(frozen=True)
class Worker:
    """Where this copy of the loop runs."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    node: str = ""                       # the node's name or id, recorded in checkpoints

    @property
    def device_id(self) -> int | None:
        """DALI's device: the *local* CUDA index, or None for DALI's CPU-only mode."""
        return self.device.index if self.device.type == "cuda" else None
