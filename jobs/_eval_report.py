"""The evaluation's results: the paper-style table (Tables 3-6), its CSV / Markdown files, per-class
accuracy, and the MLflow child run of the training run that holds them."""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

from jobs import _mlflow_outputs
from pipeline import config as config_lib
from pipeline import evaluate as E
from storage.files import atomic_write

COLUMNS = ("config", "train S", "test Q", "mode", "top-1 err %", "top-5 err %", "images")


def train_scale(data: config_lib.DataConfig) -> str:
    """The table's 'train S' column, as the paper writes it: 256, or [256;512] when jittered."""
    if data.scale_min == data.scale_max:
        return str(data.scale_min)
    return f"[{data.scale_min};{data.scale_max}]"


def _one_name(c: config_lib.Config) -> str:
    w = c.model.width
    return c.model.name + ("" if w == 1 else f" (w={w:g})")


def config_name(cfgs: Sequence[config_lib.Config]) -> str:
    """'D', 'A (w=0.0625)', or 'D + E' for an ensemble."""
    return " + ".join(_one_name(c) for c in cfgs)


def train_scales(cfgs: Sequence[config_lib.Config]) -> str:
    """The 'train S' of several nets: one value when they share it, else each net's, ' / ' between."""
    each = [train_scale(c.data) for c in cfgs]
    return each[0] if len(set(each)) == 1 else " / ".join(each)


def scales_column(protocol: E.Protocol) -> str:
    """The test Qs of the whole evaluation: '256,384,512', or each member's set, ' / ' between."""
    if protocol.ensemble:
        return " / ".join(E.scale_label(qs) for qs in protocol.member_scales)
    return E.scale_label(protocol.scales)


def row_columns(row: str, protocol: E.Protocol, cfgs: Sequence[config_lib.Config]) -> dict:
    """config, train S and test Q of a result row: the nets' (one net, or nets sharing their Qs), an
    ensemble member's own ('net2@352,384,416'), or the ensemble's with every member's scales."""
    if not protocol.ensemble:
        return {"config": config_name(cfgs), "train S": train_scales(cfgs), "test Q": row}
    if row == E.ENSEMBLE:
        return {"config": config_name(cfgs), "train S": " / ".join(train_scale(c.data) for c in cfgs),
                "test Q": scales_column(protocol)}
    i = int(row[len("net"):row.index("@")]) - 1
    return {"config": _one_name(cfgs[i]), "train S": train_scale(cfgs[i].data),
            "test Q": E.scale_label(protocol.member_scales[i])}


def table(shares: list[E.ShareResult], protocol: E.Protocol, cfgs: Sequence[config_lib.Config],
          num_classes: int) -> tuple[list[dict], dict[tuple[str, str], torch.Tensor]]:
    """The rows (one per mode x Q-set, in ``E.rows`` order) and each row's per-class accuracy."""
    tallies = E.tally(shares, num_classes)
    rows, per_class = [], {}
    for mode, q in E.rows(protocol):
        t = tallies[(mode, q)]
        rows.append({**row_columns(q, protocol, cfgs), "mode": mode, "row": q,
                     "top-1 err %": round(100 * t.top1_error, 2), "top-5 err %": round(100 * t.top5_error, 2),
                     "images": t.n})
        per_class[(mode, q)] = t.per_class_accuracy()
    return rows, per_class


def markdown(rows: list[dict], columns: Sequence[str] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(header: Iterable[str], rows: Iterable[Iterable]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(header))
    w.writerows(rows)
    return buf.getvalue()


def write(out: Path, rows: list[dict], per_class: dict, classes: list[dict], counts: torch.Tensor) -> list[Path]:
    """results.csv, results.md, per_class.csv (images per class, one accuracy column per table row;
    empty where a class had no images), each written atomically (temporary name, then rename)."""
    out.mkdir(parents=True, exist_ok=True)
    cols = list(per_class)
    pc = to_csv(["class", "wnid", "name", "images"] + [f"{m}@{q}" for m, q in cols],
                ([i, c.get("wnid", ""), c.get("name", ""), int(counts[i]),
                  *(_fmt_acc(per_class[col][i].item()) for col in cols)] for i, c in enumerate(classes)))
    files = {"results.csv": to_csv(COLUMNS, ([r[c] for c in COLUMNS] for r in rows)),
             "results.md": markdown(rows), "per_class.csv": pc}
    paths = []
    for name, text in files.items():
        atomic_write(out / name, text.encode())
        paths.append(out / name)
    return paths


def _fmt_acc(a: float) -> str:
    return "" if a != a else f"{a:.4f}"  # NaN: no image of that class


def metric_key(mode: str, row: str, what: str) -> str:
    """MLflow metric names (no commas allowed there): 'dense/q256/top1_error', 'both/q256-384-512/top5_error';
    an ensemble's 'dense/net2/q352-384-416/top1_error' per member and 'dense/ensemble/top1_error'."""
    row = row.replace(",", "-")
    return f"{mode}/{row.replace('@', '/q') if not row[0].isdigit() else 'q' + row}/{what}"


def log_child_run(uri: str, parent_run_id: str, rows: list[dict], files: list[Path], params: dict,
                  headline: dict, tags: dict, experiment: str, started_ms: int | None = None,
                  storage: str = ".") -> str:
    """An MLflow run nested under the training run (its experiment, tag mlflow.parentRunId), with a
    metric per table cell, ``headline`` metrics (the same names in every evaluation, for the UI's
    side-by-side columns), the files and the table as artifacts, and the table as the run's note.
    A top-level run in ``experiment`` when no training run is known (with a SQLite store, its
    artifacts beside ``storage``). It starts at ``started_ms``, so its duration is the evaluation's.
    Returns its id."""
    name = f"eval-{params['mode']}-Q{params['scales'].replace(',', '-')}"
    metrics = {metric_key(r["mode"], r["row"], w): r[c] / 100
               for r in rows for w, c in (("top1_error", "top-1 err %"), ("top5_error", "top-5 err %"))}
    return log_results_run(uri, parent_run_id, name, {**metrics, **headline}, params, tags, files, rows, COLUMNS,
                           experiment, started_ms, storage)


def log_results_run(uri: str, parent_run_id: str, name: str, metrics: dict[str, float], params: dict, tags: dict,
                    files: list[Path], rows: list[dict], columns: Sequence[str], experiment: str,
                    started_ms: int | None = None, storage: str = ".") -> str:
    """The MLflow run of one evaluation's results (``log_child_run``; the localisation evaluation's
    too): nested under ``parent_run_id`` when known, else top-level in ``experiment``; ``metrics``,
    ``params``, ``tags``, the ``files`` and the table (``rows`` x ``columns``) as artifacts and note."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    tags = dict(tags)
    if parent_run_id:
        exp_id = client.get_run(parent_run_id).info.experiment_id
        tags["mlflow.parentRunId"] = parent_run_id
    else:
        exp_id = _mlflow_outputs.experiment_id(client, experiment, uri, storage)
    rid = client.create_run(exp_id, start_time=started_ms, run_name=name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in params.items()],
                     tags=[RunTag("mlflow.note.content", markdown(rows, columns))])
    for f in files:
        client.log_artifact(rid, str(f))
    client.log_table(rid, data={c: [r[c] for r in rows] for c in columns}, artifact_file="results_table.json")
    client.set_terminated(rid, "FINISHED")
    return rid
