"""The paper's learning-rate rule as a pure function: divide by 10 when validation stops improving.

"The learning rate was initially set to 10^-2, and then decreased by a factor of 10 when the
validation set accuracy stopped improving. In total, the learning rate was decreased 3 times, and the
learning was stopped after 370K iterations (74 epochs)." (section 3.1)

``Plateau`` is the whole state of the rule (it goes into every checkpoint as a plain dict);
``plateau_step`` maps (state, this epoch's validation top-1 error) to the next state, nanoGPT
``get_lr`` style: no optimizer, no side effects, unit-tested on its own.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pipeline.config import ScheduleConfig


@dataclass(frozen=True)
class Plateau:
    lr: float                      # the rate for the next epoch
    best: float = math.inf         # best validation top-1 error seen so far (a fraction, 0..1)
    best_epoch: int = -1           # the epoch (0-based) that reached ``best``
    bad_epochs: int = 0            # epochs since the last improvement (or the last decay)
    decays: int = 0                # how many times the rate was divided so far
    stalled: bool = False          # max_decays reached and no improvement for ``patience`` epochs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plateau":
        return cls(**d)


def plateau_step(state: Plateau, val_top1_err: float, epoch: int, cfg: ScheduleConfig) -> Plateau:
    """The state after an epoch whose validation top-1 error was ``val_top1_err``.

    An improvement must beat the best error by more than ``cfg.min_delta``; it resets the count of
    bad epochs. After ``cfg.patience`` bad epochs in a row the rate is multiplied by ``cfg.factor``
    and the count restarts, at most ``cfg.max_decays`` times; after that the rate stays, and
    ``stalled`` turns true when another ``patience`` bad epochs pass (``should_stop`` may use it).
    A NaN error (a diverged net) never counts as an improvement.
    """
    if val_top1_err < state.best - cfg.min_delta:
        return dataclasses.replace(state, best=val_top1_err, best_epoch=epoch, bad_epochs=0)
    bad = state.bad_epochs + 1
    if bad < cfg.patience:
        return dataclasses.replace(state, bad_epochs=bad)
    if state.decays < cfg.max_decays:
        return dataclasses.replace(state, lr=state.lr * cfg.factor, decays=state.decays + 1, bad_epochs=0)
    return dataclasses.replace(state, bad_epochs=bad, stalled=True)


def improved(before: Plateau, after: Plateau) -> bool:
    """Whether the epoch that led from ``before`` to ``after`` set a new best (the 'best' checkpoint)."""
    return after.best < before.best


def should_stop(state: Plateau, epochs_done: int, cfg: ScheduleConfig) -> bool:
    """Stop after ``cfg.epochs`` epochs (the paper: 74), or early once the rate was divided
    ``max_decays`` times and still stalls, if ``cfg.stop_after_max_decays``."""
    return epochs_done >= cfg.epochs or (cfg.stop_after_max_decays and state.stalled)
