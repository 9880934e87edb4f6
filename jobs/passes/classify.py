"""Classification evaluation (the paper's section 3.2, Tables 3-6): every rank's share scored by
the protocols, the paper-style table, per-class accuracy, and the results published."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from jobs.passes import front, labels, results
from jobs.passes.members import Member, config_name, member_scales, one_name, train_scale, train_scales
from pipeline import config as config_lib
from storage.dataset import Dataset
from pipeline import evaluate as E

COLUMNS = ("config", "train S", "test Q", "mode", "top-1 err %", "top-5 err %", "images")


@dataclass(frozen=True)
class Request:
    """What an evaluation was asked: the protocol's modes as given, the DALI and forward batches,
    the results folder and run (None: no MLflow)."""
    mode: str
    batch_size: int
    out: Path
    run: results.ResultsRun | None


def scales_fields(members: list[Member], scales: str) -> dict:
    """Protocol fields: one member (or members sharing one Q set) at its scales in the order given;
    members at different Q sets each at its own, over the union of them (one decode per Q)."""
    own = member_scales(scales, members)
    if len(set(own)) == 1:
        return {"scales": own[0]}
    return {"scales": tuple(sorted({q for qs in own for q in qs})), "member_scales": own}


# ----------------------------------------------------------------------------- the ranks

def evaluate_rank(nets: list[nn.Module], data: config_lib.DataConfig, protocol: E.Protocol,
                  batch_size: int, rank: int, world: int, use_gpu: bool = False, threads: int = 0,
                  progress=None) -> E.ShareResult:
    """Evaluate DALI shard ``rank`` of ``world`` (in a Ray task, or in-process)."""
    nets, device, batches_at = front.prepare_rank(nets, data, batch_size, rank, world, use_gpu, threads)
    return E.evaluate_share(nets, batches_at, protocol, device=device, progress=progress)


def shares(members: list[Member], data: config_lib.DataConfig, ds: Dataset, protocol: E.Protocol,
           batch_size: int, opts: front.PassOptions) -> list[E.ShareResult]:
    """Every rank's ShareResult, rank order, each image checked counted once with its label."""
    expected = front.open_split(ds, data, opts)
    work = functools.partial(evaluate_rank, [m.net.cpu() for m in members], data, protocol, batch_size,
                             use_gpu=opts.gpu, threads=opts.threads)
    got = front.run(lambda rank, world, progress: work(rank, world, progress=progress), opts,
                    len(expected) * len(protocol.scales), "evaluating")
    front.check_counted_once(((s.keys, s.labels) for s in got), expected)
    return got


# ----------------------------------------------------------------------------- the table

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
    return {"config": one_name(cfgs[i]), "train S": train_scale(cfgs[i].data),
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


def per_class_csv(per_class: dict, classes: list[dict], counts: torch.Tensor) -> str:
    """Images per class, one accuracy column per table row; empty where a class had no images."""
    cols = list(per_class)
    return results.to_csv(["class", "wnid", "name", "images"] + [f"{m}@{q}" for m, q in cols],
                          ([i, c.get("wnid", ""), c.get("name", ""), int(counts[i]),
                            *(_fmt_acc(per_class[col][i].item()) for col in cols)] for i, c in enumerate(classes)))


def _fmt_acc(a: float) -> str:
    return "" if a != a else f"{a:.4f}"  # NaN: no image of that class


def metric_key(mode: str, row: str, what: str) -> str:
    """MLflow metric names (no commas allowed there): 'dense/q256/top1_error', 'both/q256-384-512/top5_error';
    an ensemble's 'dense/net2/q352-384-416/top1_error' per member and 'dense/ensemble/top1_error'."""
    row = row.replace(",", "-")
    return f"{mode}/{row.replace('@', '/q') if not row[0].isdigit() else 'q' + row}/{what}"


def publish(members: list[Member], data: config_lib.DataConfig, ds: Dataset, protocol: E.Protocol,
            got: list[E.ShareResult], req: Request, workers: int) -> tuple[results.Published, dict[tuple[str, str], torch.Tensor]]:
    """The table printed, written to ``req.out`` (results.csv, results.md, per_class.csv, and each
    image's top 5 of the last row as labels.parquet) and logged as an MLflow results run of the
    training run; and each row's per-class accuracy."""
    cfgs, num_classes = [m.cfg for m in members], members[0].num_classes
    rows, per_class = table(got, protocol, cfgs, num_classes)
    counts = torch.bincount(torch.cat([s.labels for s in got]), minlength=num_classes)
    classes = ds.classes or [{} for _ in range(num_classes)]
    files = {"results.csv": results.to_csv(COLUMNS, ([r[c] for c in COLUMNS] for r in rows)),
             "results.md": results.markdown(rows, COLUMNS), "per_class.csv": per_class_csv(per_class, classes, counts),
             labels.FILENAME: labels.to_parquet(got, protocol)}
    head = rows[-1]  # the headline: the last protocol asked for, over all scales
    headline = {"top1_error": head["top-1 err %"] / 100, "top5_error": head["top-5 err %"] / 100}
    metrics = {metric_key(r["mode"], r["row"], w): r[c] / 100
               for r in rows for w, c in (("top1_error", "top-1 err %"), ("top5_error", "top-5 err %"))}
    params = {"mode": req.mode, "scales": scales_column(protocol), "flip": protocol.flip, "workers": workers,
              "split": data.val_split, "images": int(counts.sum()), "models": config_name(cfgs),
              "train_S": train_scales(cfgs), "data": data.root}
    tags = {"eval.runs": " ".join(m.spec for m in members), "eval.checkpoints": " ".join(m.checkpoint for m in members)}
    name = f"eval-{req.mode}-Q{params['scales'].replace(',', '-')}"
    return results.publish(req.out, files, rows, COLUMNS, req.run, name, {**metrics, **headline}, params, tags), per_class
