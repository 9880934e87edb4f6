"""``python -m jobs.evaluate --task localisation``: the paper's localisation testing (Appendix A.1) on W
Ray workers, the results table (Tables 8 and 9 in one) and its MLflow child run.

    python -m jobs.evaluate --task localisation --checkpoint <loc run | checkpoint> [--checkpoint ...]
        [--classifier <classification run | checkpoint> ...] [--protocol a|b|both]
        [--scales single | 256,384 | auto] [--no-flip] [--workers N] [--gpu] [--split val] [--out DIR]

- (a): each localisation net on the central crop of the image at the first Q, the ground-truth class's
  box (Table 8). No classifier needed.
- (b): the localisation nets densely on the whole image (and its flip) at every Q, boxes scored by
  the ``--classifier`` nets' class posteriors at the same places, the union of all nets' boxes
  greedily merged, 5 ranked guesses (Table 9). Needs ``--classifier``.
- Rows: each localisation net, the union of all of them when several (an ensemble), and two
  baselines measured in the same pass: the whole image and the mean training box.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import time
from pathlib import Path

import torch

from jobs import _eval_report as report
from jobs._cli import UsageError
from jobs._ranks import (check_ensemble, check_workers, parse_scales, pass_options, prepare_rank, resolve_member,
                         run_ranks)
from jobs._tracking import resolve_uri
from pipeline import config as config_lib
from pipeline import dataset
from pipeline import evaluate as E
from pipeline import localise as L
from storage import dataformat
from storage.files import atomic_write

log = logging.getLogger("jobs.evaluate")
PROTOCOLS = ("a", "b", "both")
A, B1, B5 = "GT-class err % (a)", "top-1 err % (b)", "top-5 err % (b)"
COLUMNS = ("config", "head", "fine-tuned", "train S", "test Q", A, B1, B5, "images")
TRAINED = {"all": "all", "fc": "FC layers"}   # the paper's Table 8 "fine-tuned layers"


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate --task localisation", description=__doc__,
                                parents=[pass_options()], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", "--run", dest="checkpoint", action="append", required=True,
                   help="localisation net: MLflow run id or checkpoint file/folder; repeat for an ensemble")
    p.add_argument("--classifier", action="append", default=[],
                   help="classification net whose posteriors rank protocol (b)'s boxes; repeat to average several")
    p.add_argument("--protocol", choices=PROTOCOLS, default="",
                   help="a (central crop, ground-truth class), b (dense, merged) or both (default: both "
                        "with --classifier, else a)")
    p.add_argument("--batch-size", type=int, default=0, help="DALI batch (0: data.eval_batch_size, else 16)")
    p.add_argument("--max-batch", type=int, default=0, help="images per forward pass (0: 256 on GPU, 64)")
    p.add_argument("--out", default="", help="folder for results.csv/.md (default: eval-loc-<time>)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the child run")
    p.add_argument("--experiment", default="vgg-eval", help="MLflow experiment when no training run is known")
    p.set_defaults(scales="single")   # Table 9 reports one Q per net, or two
    return p.parse_args(argv)


def head_of(cfg: config_lib.Config) -> str:
    return getattr(cfg.model, "head", "classes")


def load_nets(args, uri: str):
    """The localisation members and classifiers, checked: the right kind of net for each option, one
    class count and one crop (protocol (b) pairs their output maps place by place)."""
    members = [resolve_member(spec, uri) for spec in args.checkpoint]
    for m in members:
        if head_of(m.cfg) not in ("scr", "pcr"):
            raise UsageError(f"--checkpoint {m.spec}: a classification net (model.head={head_of(m.cfg)}); "
                             "localisation needs model.head scr or pcr (give it as --classifier)")
    check_ensemble(members)
    classifiers = [resolve_member(spec, uri) for spec in args.classifier]
    for c in classifiers:
        if head_of(c.cfg) != "classes":
            raise UsageError(f"--classifier {c.spec}: a localisation net (model.head={head_of(c.cfg)}); "
                             "protocol (b) ranks boxes by a classification net's posteriors")
    check_ensemble(members + classifiers)   # the same classes, crop and dataset
    protocol = args.protocol or ("both" if classifiers else "a")
    if protocol != "a" and not classifiers:
        raise UsageError(f"--protocol {protocol}: protocol (b) needs --classifier (its class scores rank the boxes)")
    return members, (classifiers if protocol != "a" else []), protocol


def check_boxes(data: config_lib.DataConfig) -> torch.Tensor:
    """Both splits must have boxes (dataset.json's ``boxes``); returns the mean training box."""
    info = dataset.read_info(data.root)
    for split in (data.val_split, data.train_split):
        if not dataformat.boxed_images(info, split):
            raise UsageError(f"split {split!r} of {data.root} has no boxes (no 'boxes' entry in its dataset.json): "
                             "localisation needs ground-truth boxes; preprocess with annotations")
    return L.mean_training_box(data.root, data.train_split)


def main(argv: list[str]) -> dict:
    args = parse(argv)
    args.started_ms = int(time.time() * 1000)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    check_workers(args.workers)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    members, classifiers, which = load_nets(args, uri)
    first = members[0].cfg
    uri = uri or (first.tracking.uri if first.tracking.enabled else "")
    data = dataclasses.replace(first.data, root=args.data or first.data.root,
                               val_split=args.split or first.data.val_split, layout="NCHW", dtype="float32",
                               decode="mixed" if args.gpu else "cpu")
    mean_box = check_boxes(data)
    protocol = L.LocProtocol(central=which != "b", scales=parse_scales(args.scales, first.data),
                             crop=first.data.crop_size, flip=not args.no_flip,
                             max_batch=args.max_batch or (256 if args.gpu else 64))
    batch = args.batch_size or first.data.eval_batch_size or 16
    expected = dataset.stored_labels(data.root, data.val_split)
    total = len(expected) * len(protocol.scales)
    work = functools.partial(_work, [m.net.cpu() for m in members], [c.net.cpu() for c in classifiers], data,
                             protocol, mean_box, batch, args.gpu, args.cpus_per_worker if not args.no_ray else 0)
    shares = run_ranks(work, args.workers, total, not args.no_ray, args.gpu, args.cpus_per_worker, args.quiet,
                       desc="localising")
    from jobs.evaluate import check_shares

    check_shares(shares, expected)
    return {**publish(args, members, classifiers, which, data, protocol, shares, uri, mean_box), "shares": shares,
            "mean_box": mean_box}


def _work(loc, cls, data, protocol, mean_box, batch, use_gpu, threads, rank, world, progress):
    nets, device, batches_at = prepare_rank(loc + cls, data, batch, rank, world, use_gpu, threads, boxes=True)
    return L.evaluate_loc_share(nets[:len(loc)], nets[len(loc):], batches_at, protocol, mean_box, device, progress)


# ----------------------------------------------------------------------------- the table

def table(shares: list[L.LocShare], members, protocol: L.LocProtocol) -> list[dict]:
    """One row per localisation net, their union (several nets) and each baseline; '-' where a
    protocol was not run (and for an ensemble in (a), which the paper defines for one net)."""
    counts = L.tally(shares)
    q = E.scale_label(protocol.scales)
    cfgs = [m.cfg for m in members]
    rows = []
    for name in L.row_names(len(members)):
        if name.startswith("net"):
            c = cfgs[int(name[3:]) - 1]
            what = {"config": report.config_name([c]), "head": head_of(c).upper(),
                    "fine-tuned": TRAINED.get(getattr(c.model, "train_layers", "all"), "all"),
                    "train S": report.train_scale(c.data)}
        elif name == L.ENSEMBLE:
            what = {"config": report.config_name(cfgs), "head": " + ".join(head_of(c).upper() for c in cfgs),
                    "fine-tuned": " + ".join(TRAINED.get(getattr(c.model, "train_layers", "all"), "all")
                                             for c in cfgs), "train S": report.train_scales(cfgs)}
        else:
            what = {"config": name, "head": "-", "fine-tuned": "-", "train S": "-"}
        cells = {col: counts.get((name, key)) for col, key in ((A, "a"), (B1, "b1"), (B5, "b5"))}
        n = next((c[1] for c in cells.values() if c), 0)
        rows.append({"row": name, **what, "test Q": q, "images": n,
                     **{col: round(100 * c[0] / c[1], 2) if c and c[1] else "-" for col, c in cells.items()}})
    return rows


def metric_name(row: str, column: str) -> str:
    """'loc/net1/gt_class_error', 'loc/ensemble/top5_error', 'loc/whole_image/top1_error'."""
    what = {A: "gt_class_error", B1: "top1_error", B5: "top5_error"}[column]
    return f"loc/{row.replace(' ', '_')}/{what}"


def publish(args, members, classifiers, which: str, data, protocol: L.LocProtocol, shares, uri: str,
            mean_box: torch.Tensor) -> dict:
    """The table printed, written to ``--out`` (results.csv, results.md) and logged as an MLflow child
    run of the (first) localisation net's training run."""
    rows = table(shares, members, protocol)
    print(report.markdown(rows, COLUMNS), end="")
    out = Path(args.out or f"eval-loc-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    files = {"results.csv": report.to_csv(COLUMNS, ([r[c] for c in COLUMNS] for r in rows)),
             "results.md": report.markdown(rows, COLUMNS)}
    paths = []
    for name, text in files.items():
        atomic_write(out / name, text.encode())
        paths.append(out / name)
    print(f"results written to {out}/ (results.csv, results.md)")
    metrics = {metric_name(r["row"], c): r[c] / 100 for r in rows for c in (A, B1, B5) if r[c] != "-"}
    head = rows[len(members) - 1 + (len(members) > 1)]   # the last net's row: the ensemble's when several
    headline = {k: head[c] / 100 for k, c in (("loc_gt_class_error", A), ("loc_top1_error", B1),
                                               ("loc_top5_error", B5)) if head[c] != "-"}
    params = {"task": "localisation", "protocol": which, "scales": E.scale_label(protocol.scales),
              "flip": protocol.flip, "workers": args.workers, "split": data.val_split, "images": head["images"],
              "models": report.config_name([m.cfg for m in members]),
              "classifiers": report.config_name([c.cfg for c in classifiers]) if classifiers else "-",
              "mean_training_box": ",".join(f"{v:.4f}" for v in mean_box.tolist()),
              "data": data.root}
    run_id, parent = "", members[0].parent_run_id
    if uri and not args.no_mlflow:
        tags = {"eval.task": "localisation", "eval.checkpoints": " ".join(m.checkpoint for m in members),
                "eval.classifiers": " ".join(c.checkpoint for c in classifiers)}
        name = f"eval-loc-{which}-Q{params['scales'].replace(',', '-')}"
        run_id = report.log_results_run(resolve_uri(uri), parent, name, {**metrics, **headline}, params, tags, paths,
                                        rows, COLUMNS, args.experiment, args.started_ms, str(out.parent))
        print(f"MLflow: run {run_id}" + (f" (child of {parent})" if parent else ""))
    return {"rows": rows, "files": [str(p) for p in paths], "mlflow_run_id": run_id}
