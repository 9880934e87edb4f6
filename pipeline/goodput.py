"""The goodput ledger: where a run's time goes, on rank 0, in seconds per category.

    compute      training steps (forward, backward, optimizer), less the data wait inside them
    data_wait    host time waiting for the loader
    validation   the per-epoch validation passes
    checkpoint   gathering, writing and reporting checkpoints
    startup      from a worker's start to its first step (building the net, the loaders, compiling)
    restore      loading the checkpoint a restarted worker resumes from
    lost         work done after the last checkpoint by an attempt that failed: redone after the restart

The ledger travels in the checkpoint's metrics and is logged with the training metrics
(``goodput/<category>_s``); rank 0 also leaves its latest totals where the next attempt finds them, so
that a restart can count the work it throws away (``resumed``). Goodput = compute / wall time.
"""
from __future__ import annotations

from dataclasses import dataclass, field

CATEGORIES = ("compute", "data_wait", "validation", "checkpoint", "startup", "restore", "lost")
PREFIX = "goodput/"


def key(category: str) -> str:
    return f"{PREFIX}{category}_s"


@dataclass
class Ledger:
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))

    def add(self, category: str, seconds: float) -> None:
        self.seconds[category] += max(0.0, seconds)

    def total(self) -> float:
        return sum(self.seconds.values())

    def metrics(self) -> dict[str, float]:
        return {key(c): s for c, s in self.seconds.items()}

    @classmethod
    def from_metrics(cls, metrics: dict[str, float]) -> "Ledger":
        return cls({c: float(metrics.get(key(c), 0.0)) for c in CATEGORIES})

    @classmethod
    def resumed(cls, checkpoint_metrics: dict[str, float], last_seen: dict[str, float]) -> "Ledger":
        """The ledger of an attempt resuming from a checkpoint: the checkpoint's totals, plus as lost
        everything the failed attempt recorded after it (``last_seen``: its latest totals)."""
        ledger, seen = cls.from_metrics(checkpoint_metrics), cls.from_metrics(last_seen)
        ledger.add("lost", seen.total() - ledger.total())
        return ledger


def summary(ledger: Ledger, wall_s: float) -> dict[str, list]:
    """A table (columns) of seconds and share of the wall time per category, with the time no
    category holds (scheduling, Ray's start, the driver) as "other", and goodput."""
    other = max(0.0, wall_s - ledger.total())
    rows = [*ledger.seconds.items(), ("other", other)]
    share = [s / wall_s if wall_s else 0.0 for _, s in rows]
    return {"category": [c for c, _ in rows] + ["goodput"],
            "seconds": [round(s, 3) for _, s in rows] + [round(ledger.seconds["compute"], 3)],
            "share_of_wall": [round(x, 4) for x in share] + [round(goodput(ledger, wall_s), 4)]}


def goodput(ledger: Ledger, wall_s: float) -> float:
    """Productive step time over wall time."""
    return ledger.seconds["compute"] / wall_s if wall_s else 0.0
