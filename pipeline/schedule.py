"""The paper's learning-rate rule as a pure function: divide by 10 when validation stops improving.

"The learning rate was initially set to 10^-2, and then decreased by a factor of 10 when the
validation set accuracy stopped improving. In total, the learning rate was decreased 3 times, and the
learning was stopped after 370K iterations (74 epochs)." (section 3.1)

``Plateau`` is the whole state of the rule (it goes into every checkpoint as a plain dict);
``plateau_step`` maps (state, this epoch's validation top-1 error) to the next state, nanoGPT
``get_lr`` style: no optimizer, no side effects, unit-tested on its own. "Stopped improving" is read
as: no epoch beat the best error by more than ``min_delta`` for ``patience`` epochs, not counting the
``cooldown`` epochs right after a decay. The margin is what lets a curve that still creeps down by a
few images an epoch be decayed; the patience is what keeps one unlucky epoch of a noisy validation
from decaying a curve that is still learning. Their defaults come from ``python -m jobs.bench
schedule``, a simulation of noisy and creeping validation curves (docs/training.md).
``schedule.milestones`` replaces the rule by fixed epochs.
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
    best: float = math.inf         # lowest validation top-1 error seen so far (a fraction, 0..1)
    best_epoch: int = -1           # the epoch (0-based) that reached ``best``
    bad_epochs: int = 0            # counted epochs since the last improvement (or the last decay)
    decays: int = 0                # how many times the rate was divided so far
    stalled: bool = False          # max_decays reached and no improvement for ``patience`` epochs
    cooldown: int = 0              # epochs still to pass after a decay before bad epochs count again
    smoothed: float = math.inf     # the error the rule judges: an average of recent epochs' errors
    ref: float = math.inf          # the smoothed error the next improvement must beat by min_delta

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plateau":
        return cls(**d)  # a checkpoint from before cooldown/smoothed/ref existed gets their defaults


def smooth(state: Plateau, val_top1_err: float, cfg: ScheduleConfig) -> float:
    """Exponential moving average of the validation error with weight ``cfg.smoothing`` on the past
    (0: this epoch's error alone). The first epoch is its own average."""
    if math.isinf(state.smoothed):
        return val_top1_err
    return cfg.smoothing * state.smoothed + (1 - cfg.smoothing) * val_top1_err


def plateau_step(state: Plateau, val_top1_err: float, epoch: int, cfg: ScheduleConfig) -> Plateau:
    """The state after epoch ``epoch`` (0-based) whose validation top-1 error was ``val_top1_err``.

    The rule judges ``smoothed``, the errors' moving average (``smooth``). An improvement must beat
    the last improvement's smoothed error by more than ``cfg.min_delta``; it resets the count of bad
    epochs. A bad epoch inside the ``cfg.cooldown`` epochs after a decay is not counted. After
    ``cfg.patience`` counted bad epochs the rate is multiplied by ``cfg.factor``, the count restarts
    and the cooldown begins, at most ``cfg.max_decays`` times; after that the rate stays, and
    ``stalled`` turns true when another ``patience`` bad epochs pass (``should_stop`` may use it).
    With ``cfg.milestones`` the rate is multiplied once the epochs done reach each milestone, and
    nothing else decays it. ``best`` is the lowest raw error, margin or not (the best checkpoint).
    A NaN error (a diverged net) is never an improvement, nor is anything after it.
    """
    if math.isinf(state.smoothed):  # the first epoch: the average has no past yet, so it lags a falling
        state = dataclasses.replace(state, cooldown=cfg.cooldown)  # curve for a while, as after a decay
    smoothed = smooth(state, val_top1_err, cfg)
    better = smoothed < state.ref - cfg.min_delta
    state = dataclasses.replace(state, smoothed=smoothed, ref=smoothed if better else state.ref)
    if val_top1_err < state.best:
        state = dataclasses.replace(state, best=val_top1_err, best_epoch=epoch)
    if cfg.milestones:
        if epoch + 1 in cfg.milestones:  # epoch + 1 epochs are done: the next one runs at the new rate
            return dataclasses.replace(state, lr=state.lr * cfg.factor, decays=state.decays + 1)
        return state
    cooling = max(state.cooldown - 1, 0)
    if better:
        return dataclasses.replace(state, bad_epochs=0, cooldown=cooling)
    if state.cooldown > 0:
        return dataclasses.replace(state, cooldown=cooling)
    bad = state.bad_epochs + 1
    if bad < cfg.patience:
        return dataclasses.replace(state, bad_epochs=bad)
    if state.decays < cfg.max_decays:
        return dataclasses.replace(state, lr=state.lr * cfg.factor, decays=state.decays + 1, bad_epochs=0,
                                   cooldown=cfg.cooldown)
    return dataclasses.replace(state, bad_epochs=bad, stalled=True)


def decay_metrics(before: Plateau, after: Plateau, epochs_done: int, val_top1_err: float) -> dict[str, float]:
    """What the tracker records when the step from ``before`` to ``after`` divided the rate: the
    epochs done when it happened (the next epoch runs at the new rate) and the validation error that
    triggered it; nothing when the rate stayed."""
    if after.decays == before.decays:
        return {}
    return {"schedule/decay_epoch": epochs_done, "schedule/decay_val_err": val_top1_err}


def improved(before: Plateau, after: Plateau) -> bool:
    """Whether the epoch that led from ``before`` to ``after`` set a new best (the 'best' checkpoint)."""
    return after.best < before.best


def should_stop(state: Plateau, epochs_done: int, cfg: ScheduleConfig) -> bool:
    """Stop after ``cfg.epochs`` epochs (the paper: 74), or early once the rate was divided
    ``max_decays`` times and still stalls, if ``cfg.stop_after_max_decays``."""
    return epochs_done >= cfg.epochs or (cfg.stop_after_max_decays and state.stalled)
