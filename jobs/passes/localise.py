"""Localisation testing (the paper's Appendix A.1, Tables 8 and 9 in one table): the localisation nets
and classifiers checked, every rank's share scored by protocols (a) and (b), the table and its
results run.

- (a): each localisation net on the central crop of the image at the first Q, the ground-truth class's
  box (Table 8). No classifier needed.
- (b): the localisation nets densely on the whole image (and its flip) at every Q, boxes scored by
  the classifier nets' class posteriors at the same places, the union of all nets' boxes greedily
  merged, 5 ranked guesses (Table 9).
- Rows: each localisation net, the union of all of them when several (an ensemble), and two
  baselines measured in the same pass: the whole image and the mean training box.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from jobs.cli import UsageError
from jobs.passes import front, labels, results
from jobs.passes.members import Member, check_ensemble, config_name, member_scales, train_scale, train_scales
from pipeline import config as config_lib
from pipeline import evaluate as E
from pipeline import localise as L
from pipeline.task import task_for
from storage import dataset
from storage.dataset import Dataset

PROTOCOLS = ("a", "b", "both")
A, B1, B5 = "GT-class err % (a)", "top-1 err % (b)", "top-5 err % (b)"
COLUMNS = ("config", "head", "fine-tuned", "train S", "test Q", "labels (b)", A, B1, B5, "images")
TRAINED = {"all": "all", "fc": "FC layers"}   # the paper's Table 8 "fine-tuned layers"


@dataclass(frozen=True)
class Request:
    """What a localisation evaluation was asked: the protocol ("" to choose: both with classifiers,
    else a), protocol (b)'s label source (``labels.BOXES``, or a classification evaluation), the DALI
    and forward batches, the results folder and run (None: no MLflow)."""
    protocol: str
    labels: str
    batch_size: int
    max_batch: int
    out: Path
    run: results.ResultsRun | None


def check_nets(members: list[Member], classifiers: list[Member], protocol: str) -> str:
    """The right kind of net for each option, one class count, crop and dataset (protocol (b) pairs
    their output maps place by place); returns the protocol to run."""
    for m in members:
        task_for(m.cfg.model.head).require("localisation", f"--checkpoint {m.spec}", "give it as --classifier")
    check_ensemble(members)
    for c in classifiers:
        task_for(c.cfg.model.head).require("classification", f"--classifier {c.spec}",
                                           "protocol (b) ranks boxes by a classification net's posteriors")
    check_ensemble(members + classifiers)
    protocol = protocol or ("both" if classifiers else "a")
    if protocol != "a" and not classifiers:
        raise UsageError(f"--protocol {protocol}: protocol (b) needs --classifier (its class scores rank the boxes)")
    return protocol


def check_boxes(data: config_lib.DataConfig, ds: Dataset) -> torch.Tensor:
    """Both splits must have boxes; returns the mean training box."""
    for split in (data.val_split, data.train_split):
        if not ds.has_boxes(split):
            raise UsageError(f"split {split!r} of {data.root} has no boxes (no 'boxes' entry in its dataset.json): "
                             "localisation needs ground-truth boxes; preprocess with annotations")
    return L.mean_training_box(data.root, data.train_split)


def label_source(req: Request, which: str, expected: dict[str, int], num_classes: int,
                 opts: front.PassOptions):
    """(key -> protocol (b)'s 5 classes in order, or None for the classifiers' own; the source's name
    for the table), read and checked to cover the split before any worker starts."""
    if req.labels == labels.BOXES:
        return None, "classifier boxes" if which != "a" else "-"
    if which == "a":
        raise UsageError(f"--labels {req.labels}: labels are protocol (b)'s classes; this runs protocol (a) alone")
    path, name = labels.resolve(req.labels, front.tracking_uri(opts))
    given = labels.read(path)
    labels.check_cover(given, expected, num_classes, req.labels)
    return {k: given[k] for k in expected}, name


def evaluate(members: list[Member], classifiers: list[Member], req: Request,
             opts: front.PassOptions) -> tuple[results.Published, list[L.LocShare], torch.Tensor]:
    """The whole pass: nets checked, data checked, ranks run and counted, the table published."""
    which = check_nets(members, classifiers, req.protocol)
    classifiers = classifiers if which != "a" else []
    first = members[0].cfg
    data = front.split_data(first, opts)
    ds = dataset.open_dataset(data.root)
    mean_box = check_boxes(data, ds)
    own = member_scales(opts.scales, members)
    union = tuple(sorted({q for qs in own for q in qs}))
    protocol = L.LocProtocol(central=which != "b", scales=own[0] if len(set(own)) == 1 else union,
                             member_scales=() if len(set(own)) == 1 else own, crop=first.data.crop_size,
                             flip=opts.flip, max_batch=req.max_batch or (256 if opts.gpu else 64))
    batch = req.batch_size or first.data.eval_batch_size or 16
    expected = front.open_split(ds, data, opts)
    given, source = label_source(req, which, expected, members[0].num_classes, opts)
    work = functools.partial(_rank, [m.net.cpu() for m in members], [c.net.cpu() for c in classifiers], data,
                             protocol, mean_box, batch, opts.gpu, opts.threads, given)
    shares = front.run(work, opts, len(expected) * len(protocol.scales), "localising")
    front.check_counted_once(((s.keys, s.labels) for s in shares), expected)
    published = publish(members, classifiers, which, data, protocol, shares, req, opts.workers, mean_box, source)
    return published, shares, mean_box


def _rank(loc, cls, data, protocol, mean_box, batch, use_gpu, threads, given, rank, world, progress):
    nets, device, batches_at = front.prepare_rank(loc + cls, data, batch, rank, world, use_gpu, threads, boxes=True)
    return L.evaluate_loc_share(nets[:len(loc)], nets[len(loc):], batches_at, protocol, mean_box, device, progress,
                                given)


# ----------------------------------------------------------------------------- the table

def net_columns(cfgs: list[config_lib.Config]) -> dict:
    """config, head, fine-tuned layers and train S of one net, or of several (an ensemble)."""
    return {"config": config_name(cfgs), "head": " + ".join(task_for(c.model.head).label for c in cfgs),
            "fine-tuned": " + ".join(TRAINED[c.model.train_layers] for c in cfgs),
            "train S": train_scale(cfgs[0].data) if len(cfgs) == 1 else train_scales(cfgs)}


def table(shares: list[L.LocShare], members: list[Member], protocol: L.LocProtocol, source: str) -> list[dict]:
    """One row per localisation net, their union (several nets) and each baseline; '-' where a
    protocol was not run (and for an ensemble in (a), which the paper defines for one net)."""
    counts = L.tally(shares)
    cfgs, each = [m.cfg for m in members], [E.scale_label(protocol.scales_of(i)) for i in range(len(members))]
    rows = []
    for name in L.row_names(len(members)):
        q = E.scale_label(protocol.scales)
        if name.startswith("net"):
            what, q = net_columns([cfgs[int(name[3:]) - 1]]), each[int(name[3:]) - 1]
        elif name == L.ENSEMBLE:
            what, q = net_columns(cfgs), " / ".join(each) if protocol.member_scales else q
        else:
            what = {"config": name, "head": "-", "fine-tuned": "-", "train S": "-"}
        cells = {col: counts.get((name, key)) for col, key in ((A, "a"), (B1, "b1"), (B5, "b5"))}
        n = next((c[1] for c in cells.values() if c), 0)
        rows.append({"row": name, **what, "test Q": q, "labels (b)": source, "images": n,
                     **{col: round(100 * c[0] / c[1], 2) if c and c[1] else "-" for col, c in cells.items()}})
    return rows


def metric_name(row: str, column: str) -> str:
    """'loc/net1/gt_class_error', 'loc/ensemble/top5_error', 'loc/whole_image/top1_error'."""
    what = {A: "gt_class_error", B1: "top1_error", B5: "top5_error"}[column]
    return f"loc/{row.replace(' ', '_')}/{what}"


def publish(members, classifiers, which: str, data, protocol: L.LocProtocol, shares, req: Request, workers: int,
            mean_box: torch.Tensor, source: str) -> results.Published:
    """The table printed, written to ``req.out`` (results.csv, results.md) and logged as an MLflow
    results run of the (first) localisation net's training run."""
    rows = table(shares, members, protocol, source)
    files = {"results.csv": results.to_csv(COLUMNS, ([r[c] for c in COLUMNS] for r in rows)),
             "results.md": results.markdown(rows, COLUMNS)}
    metrics = {metric_name(r["row"], c): r[c] / 100 for r in rows for c in (A, B1, B5) if r[c] != "-"}
    head = rows[len(members) - 1 + (len(members) > 1)]   # the last net's row: the ensemble's when several
    headline = {k: head[c] / 100 for k, c in (("loc_gt_class_error", A), ("loc_top1_error", B1),
                                               ("loc_top5_error", B5)) if head[c] != "-"}
    params = {"task": "localisation", "protocol": which, "scales": E.scale_label(protocol.scales),
              "flip": protocol.flip, "workers": workers, "split": data.val_split, "images": head["images"],
              "models": config_name([m.cfg for m in members]),
              "classifiers": config_name([c.cfg for c in classifiers]) if classifiers else "-",
              "mean_training_box": ",".join(f"{v:.4f}" for v in mean_box.tolist()), "data": data.root,
              "labels": source}
    tags = {"eval.task": "localisation", "eval.checkpoints": " ".join(m.checkpoint for m in members),
            "eval.classifiers": " ".join(c.checkpoint for c in classifiers)}
    name = f"eval-loc-{which}-Q{params['scales'].replace(',', '-')}"
    return results.publish(req.out, files, rows, COLUMNS, req.run, name, {**metrics, **headline}, params, tags)
