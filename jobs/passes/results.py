"""Where every pass's results go, written one way: a results folder of files (each written
atomically), the table printed, and, for an evaluation, an MLflow results run nested under the
training run it scored (``tracking.results``). A pass returns a ``Published``."""
from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from jobs import tracking
from jobs.tracking import results as tracking_results
from storage.files import atomic_write


@dataclass
class Published:
    """What a pass wrote: its table's rows, its files and its MLflow results run ("" if none)."""
    rows: list[dict]
    files: list[str]
    mlflow_run_id: str = ""


@dataclass(frozen=True)
class ResultsRun:
    """An evaluation's MLflow results run: the server, the training run it nests under ("" for a
    top-level run in ``experiment``), and when the evaluation started (its duration)."""
    uri: str
    parent_run_id: str
    experiment: str
    started_ms: int


def out_folder(out: str, prefix: str) -> Path:
    """``out``, or a new ``<prefix>-<time>`` folder."""
    return Path(out or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")


def markdown(rows: list[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(header: Iterable[str], rows: Iterable[Iterable]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(header))
    w.writerows(rows)
    return buf.getvalue()


def write(out: Path, files: dict[str, str | bytes]) -> list[Path]:
    """Each ``{name: text or bytes}`` as ``out/name``, atomically (temporary name, then rename)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files.items():
        atomic_write(out / name, data.encode() if isinstance(data, str) else data)
        paths.append(out / name)
    return paths


def publish(out: Path, files: dict[str, str | bytes], rows: list[dict], columns: Sequence[str], run: ResultsRun | None,
            name: str, metrics: dict[str, float], params: dict, tags: dict) -> Published:
    """The table printed, the files written to ``out``, and with ``run`` the MLflow results run
    (``metrics``, ``params``, ``tags``, the files and the table)."""
    print(markdown(rows, columns), end="")
    paths = write(out, files)
    print(f"results written to {out}/ ({', '.join(files)})")
    run_id = ""
    if run is not None:
        table = {c: [r[c] for r in rows] for c in columns}
        run_id = tracking_results.log_results_run(tracking.resolve_uri(run.uri), run.parent_run_id, name, metrics,
                                                  params, tags, paths, table, markdown(rows, columns),
                                                  run.experiment, run.started_ms, str(out.parent))
        print(f"MLflow: run {run_id}" + (f" (child of {run.parent_run_id})" if run.parent_run_id else ""))
    return Published(rows, [str(p) for p in paths], run_id)
