"""The goodput ledger: where a run's time goes, on rank 0, in seconds per category.

    compute      training steps (forward, backward, optimizer), less the data wait inside them
    data_wait    host time waiting for the loader
    validation   the per-epoch validation passes
    checkpoint   gathering, writing and reporting checkpoints
    startup      from a worker's start to its first step (building the net, the loaders, compiling)
    restore      loading the checkpoint a restarted worker resumes from
    resize       a start at another worker count than the checkpoint's (elastic training's shrink or
                 regrowth, or a resume on other nodes): its restore, start and the rest of the epoch's
                 plan, in place of restore and startup
    lost         work done after the last checkpoint by an attempt that failed: redone after the restart

The ledger travels in the checkpoint's metrics and is logged with the training metrics
(``goodput/<category>_s``); rank 0 also leaves its latest totals where the next attempt finds them, so
that a restart can count the work it throws away (``resumed``). Goodput = compute / wall time.

Two files in the run folder, both read by ``read`` alone: ``goodput-wall.json`` (the driver's: the wall
time of every command that trained the run) and ``goodput-ledger.json`` (rank 0's latest totals).
Decision: a damaged one is refused by the training driver before Ray starts (``check``: one ``error:``
line naming it and what moving it aside costs), since a run is not worth starting on records it cannot
add to. One damaged after that check, while the run trains, is recovered where it is read, with a
warning naming it: the driver's ``record_wall`` starts the count again from this command's wall time
(never lost), a restarted rank 0 counts nothing as lost.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from storage import files
from storage.files import StorageError

CATEGORIES = ("compute", "data_wait", "validation", "checkpoint", "startup", "restore", "resize", "lost")
PREFIX = "goodput/"
WALL = "goodput-wall.json"        # {"wall_s": seconds}: every command that trained the run
LEDGER = "goodput-ledger.json"    # rank 0's latest logged metrics, goodput/<category>_s among them


def key(category: str) -> str:
    return f"{PREFIX}{category}_s"


FIELDS = {WALL: ("wall_s",), LEDGER: tuple(key(c) for c in CATEGORIES)}   # what each file must hold
LATER = {key("resize")}          # added since: a file written before holds none (read as 0)
LOSES = {WALL: "goodput/wall_s will then count this run's time from this command on",
         LEDGER: "a failed attempt's redone work will then not be counted as lost"}


def read(run_folder: str, name: str) -> dict[str, float]:
    """The numbers ``FIELDS[name]`` of the run folder's file ``name`` (``WALL`` or ``LEDGER``); {}
    when there is none yet. A file that is not a JSON object holding each of them as a finite number
    >= 0 is a ``StorageError`` naming it and what is wrong."""
    path = files.join(run_folder, name)
    if not files.exists(path):
        return {}
    try:
        data = json.loads(files.read_bytes(path))
    except (ValueError, RecursionError) as e:  # not JSON or UTF-8, a number past 4300 digits, nested too deep
        raise StorageError(f"{path}: damaged goodput record, not JSON ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(data, dict):
        raise StorageError(f"{path}: damaged goodput record, not a JSON object")
    data = {k: 0.0 for k in LATER if k in FIELDS[name] and k not in data} | data
    bad = [f"{k} {data[k]!r}" if k in data else f"no {k}" for k in FIELDS[name] if not seconds(data.get(k))]
    if bad:
        raise StorageError(f"{path}: damaged goodput record ({', '.join(bad)}; each must be a number of seconds >= 0)")
    return {k: float(data[k]) for k in FIELDS[name]}


def seconds(value: object) -> bool:
    """Whether ``value`` (from JSON) is a finite number >= 0 (an int too, if a float holds it)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= sys.float_info.max


def check(run_folder: str) -> None:
    """Both files read back, before a command trains the run; a damaged one is a ``StorageError``
    saying how to go on and what that costs."""
    for name in FIELDS:
        try:
            read(run_folder, name)
        except StorageError as e:
            raise StorageError(f"{e}. Move it aside and run the same command again: {LOSES[name]}") from None


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
