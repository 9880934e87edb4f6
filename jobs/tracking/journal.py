"""The metric journal: what the tracker could not deliver to MLflow, kept in the run folder so that no
metric point is lost to a tracking outage, a killed rank 0 or a driver that ends while the server is
away. One JSON line per point, ``[key, value, timestamp ms, step]``; the file is rewritten whole
(atomically, through storage.files) with the points still undelivered, before every checkpoint is
reported and when a tracker closes; it is read back (and the points sent) by the next tracker of the
run: a restarted rank 0, or the driver at the end of the run or when the same command is run again."""
from __future__ import annotations

import json

from storage import files

JOURNAL = "mlflow_journal.jsonl"

Point = tuple[str, float, int, int]          # (key, value, timestamp ms, step: images seen)


def path(run_folder: str) -> str:
    return files.join(run_folder, JOURNAL)


def read(run_folder: str) -> list[Point]:
    """The journal's points in the order they were logged; [] when there is none."""
    where = path(run_folder)
    if not files.exists(where):
        return []
    return [tuple(json.loads(line)) for line in files.read_bytes(where).decode().splitlines() if line]


def write(run_folder: str, points: list[Point]) -> None:
    """Replace the journal by ``points``; no points, no journal."""
    where = path(run_folder)
    if points:
        files.atomic_write(where, "".join(json.dumps(list(p)) + "\n" for p in points).encode())
    elif files.exists(where):
        files.remove(where)
