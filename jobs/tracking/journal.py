"""The metric journal: what the tracker could not deliver to MLflow, kept in the run folder so that no
metric point is lost to a tracking outage, a killed rank 0 or a driver that ends while the server is
away. One JSON line per point, ``[key, value, timestamp ms, step]``; the file is rewritten whole
(atomically, through storage.files) with the points still undelivered, before every checkpoint is
reported and when a tracker closes; it is read back (and the points sent) by the next tracker of the
run: a restarted rank 0, or the driver at the end of the run or when the same command is run again.

What goes in, and what comes out, is checked:

- Decision: the tracker checks a value where it is logged (``number``). A value that is not a number
  (a string, None, a bool) is a bug in the caller: ``TypeError`` naming the metric. A NaN or infinite
  value is a real training event (a loss that diverged), so it must neither stop training nor enter
  the journal, where MLflow would refuse it on every later delivery: it is dropped, and the tracker logs
  a warning naming the metric, its value and its step (the first of each metric; at close, how many
  were dropped). MLflow's history of that metric has a gap there; the worker's log says why.
- Decision: ``read`` refuses a damaged journal whole, naming the file, each damaged line (the first
  few) and the recovery, instead of keeping its good lines: a line cut short or edited by hand means
  the file is not what the tracker wrote, and the user decides (repair or delete the lines named, or
  move the file aside; the message says how many points that leaves behind). The training driver
  checks it before Ray starts (jobs/driver/preflight.py ``check_journal``), so it is one ``error:``
  line, never a worker's traceback.
"""
from __future__ import annotations

import json
import math
import sys

from storage import files
from storage.files import StorageError

JOURNAL = "mlflow_journal.jsonl"
SHOWN = 3                                    # damaged lines named in the error

Point = tuple[str, float, int, int]          # (key, value, timestamp ms, step: images seen)


def path(run_folder: str) -> str:
    return files.join(run_folder, JOURNAL)


def number(key: str, value: object) -> float | None:
    """``value`` of metric ``key`` as a float; None when it is NaN or infinite (not logged); a value
    that is no number (str, None, bool, ...) is a ``TypeError`` naming the metric."""
    if isinstance(value, (str, bytes, bool)) or value is None:
        raise TypeError(f"metric {key!r}: {value!r} is not a number")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r}: {value!r} is not a number") from None
    return out if math.isfinite(out) else None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a finite number")


def point(line: str) -> Point:
    """One journal line as a point; ``ValueError`` saying what is wrong with it."""
    try:
        item = json.loads(line, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise ValueError("not JSON (nested too deep)") from None
    if not isinstance(item, list) or len(item) != 4:
        raise ValueError("not a [key, value, timestamp, step] list")
    key, value, stamp, step = item
    if not isinstance(key, str) or not key:
        raise ValueError(f"key {key!r} is not a metric name")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= sys.float_info.max:
        raise ValueError(f"value {value!r} of {key!r} is not a finite number")
    for name, v in (("timestamp", stamp), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} {v!r} of {key!r} is not a whole number >= 0")
    return key, float(value), stamp, step


def read(run_folder: str) -> list[Point]:
    """The journal's points in the order they were logged; [] when there is none. A damaged line is a
    ``StorageError`` naming the file, the damaged lines and how to recover (module docstring)."""
    where = path(run_folder)
    if not files.exists(where):
        return []
    points, bad = [], []
    lines = files.read_bytes(where).decode("utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            points.append(point(line))
        except ValueError as e:
            bad.append(f"line {n}: {e}")
    if bad:
        more = f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise StorageError(
            f"{where}: the MLflow metric journal is damaged ({len(bad)} of {len(points) + len(bad)} lines: "
            f"{'; '.join(bad[:SHOWN])}{more}). Repair or delete those lines, or move the file aside (its "
            f"{len(points)} good points will then not reach MLflow), and run the same command again")
    return points


def write(run_folder: str, points: list[Point]) -> None:
    """Replace the journal by ``points``; no points, no journal."""
    where = path(run_folder)
    if points:
        files.atomic_write(where, "".join(json.dumps(list(p), allow_nan=False) + "\n" for p in points).encode())
    elif files.exists(where):
        files.remove(where)
