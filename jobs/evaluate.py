"""Evaluate trained VGGs with the paper's testing protocols (section 3.2) on W Ray workers.

    python -m jobs.evaluate [--task classification] --run <MLflow run id | checkpoint path or folder> [--run ...]
        [--mode dense|multicrop|both|center|all] [--scales 256,384,512 | auto | single]
        [--no-flip] [--workers N] [--gpu] [--data ROOT] [--split val] [--out DIR]

- dense: the fully convolutional net on the whole image rescaled to Q, class-score map averaged,
  soft-max, averaged with the flipped image; multicrop: 5x5 crops x 2 flips per Q; both: their mean;
  center: the centre crop (and its flip), the training-time validation view.
- ``--scales auto``: the paper's multi-scale Q from the run's training S (Table 4): {S-32, S, S+32},
  or {Smin, (Smin+Smax)/2, Smax} when S was jittered; every single Q is reported too (Table 3).
  ``single``: the run's validation Q only. Several ``--run`` form an ensemble (posteriors averaged),
  each member at its own Q set (from its own training S with auto/single): Table 6's 7 nets are
  one command. The table gives each member's row (its config, train S, Qs), then the ensemble's.
  Members must share classes, crop and dataset (the fingerprint in their checkpoints).
- Worker r of W evaluates DALI shard r of W; the driver checks that the keys it got back are the
  manifest's stored keys, each exactly once, before it computes anything.
- Results: a table (config, train S, test Q, mode, top-1, top-5) printed and written to
  ``--out`` as results.csv / results.md with per_class.csv, and logged as an MLflow child run of the
  training run (tag mlflow.parentRunId), metrics plus the table as artifacts.
- ``--task localisation``: the localisation nets' testing (Appendix A, Tables 8 and 9), with its own
  options (``--checkpoint``, ``--classifier``, ``--protocol a|b|both``); see
  ``python -m jobs.evaluate --task localisation --help`` and jobs/_loc_eval.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from jobs import _eval_report as report
from jobs._cli import UsageError
from jobs._ranks import (check_ensemble, check_workers, member_scales, pass_options, prepare_rank, resolve_member,
                         run_ranks)
from jobs._tracking import resolve_uri
from pipeline import config as config_lib
from pipeline import dataset
from pipeline import evaluate as E

log = logging.getLogger("jobs.evaluate")
TASKS = ("classification", "localisation")


# ----------------------------------------------------------------------------- protocol

def parse_modes(text: str) -> tuple[str, ...]:
    modes = ("center", "dense", "multicrop", "both") if text == "all" else tuple(text.split(","))
    bad = [m for m in modes if m not in E.MODES]
    if bad:
        raise UsageError(f"--mode {text!r}: only {', '.join(E.MODES)} (comma-separated) or all")
    return modes


# ----------------------------------------------------------------------------- one worker's share

def evaluate_rank(nets: list[nn.Module], data: config_lib.DataConfig, protocol: E.Protocol,
                  batch_size: int, rank: int, world: int, use_gpu: bool = False, threads: int = 0,
                  progress: Callable[[int], None] | None = None) -> E.ShareResult:
    """Evaluate DALI shard ``rank`` of ``world`` (in a Ray task, or in-process)."""
    nets, device, batches_at = prepare_rank(nets, data, batch_size, rank, world, use_gpu, threads)
    return E.evaluate_share(nets, batches_at, protocol, device=device, progress=progress)


def evaluate(nets: list[nn.Module], data: config_lib.DataConfig, protocol: E.Protocol, batch_size: int,
             workers: int, use_ray: bool = True, use_gpu: bool = False, cpus_per_worker: int = 1,
             quiet: bool = False) -> list[E.ShareResult]:
    """Every rank's ShareResult, rank order."""
    total = dataset.load_split(data.root, data.val_split).num_samples * len(protocol.scales)
    nets = [n.cpu() for n in nets]
    work = functools.partial(_evaluate_work, nets, data, protocol, batch_size, use_gpu,
                             cpus_per_worker if use_ray else 0)
    return run_ranks(work, workers, total, use_ray, use_gpu, cpus_per_worker, quiet)


def _evaluate_work(nets, data, protocol, batch_size, use_gpu, threads, rank, world, progress):
    return evaluate_rank(nets, data, protocol, batch_size, rank, world, use_gpu, threads, progress)


# ----------------------------------------------------------------------------- main

def parse(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__, parents=[pass_options()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="classification",
                   help="classification (this page) or localisation (its own options: --task localisation --help)")
    p.add_argument("--run", action="append", required=True,
                   help="MLflow run id (or runs:/<id>) or checkpoint file/folder; repeat for an ensemble")
    p.add_argument("--mode", default="both", help="dense | multicrop | both | center | all, or a comma list")
    p.add_argument("--batch-size", type=int, default=0, help="DALI batch (0: data.eval_batch_size, else 16)")
    p.add_argument("--max-batch", type=int, default=0, help="images or crops per forward pass (0: 256 on GPU, 64)")
    p.add_argument("--out", default="", help="folder for results.csv/.md, per_class.csv (default: eval-<time>)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the child run")
    p.add_argument("--experiment", default="vgg-eval", help="MLflow experiment when no training run is known")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    task, rest = task_of(argv)
    if task == "localisation":
        from jobs import _loc_eval

        return _loc_eval.main(rest)
    args = parse(argv)
    args.started_ms = int(time.time() * 1000)   # the MLflow child run spans the whole evaluation
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    check_workers(args.workers)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    members = [resolve_member(spec, uri) for spec in args.run]
    check_ensemble(members)
    first = members[0].cfg
    uri = uri or (first.tracking.uri if first.tracking.enabled else "")
    data = dataclasses.replace(first.data, root=args.data or first.data.root,
                               val_split=args.split or first.data.val_split, layout="NCHW", dtype="float32",
                               decode="mixed" if args.gpu else "cpu")
    protocol = E.Protocol(modes=parse_modes(args.mode), flip=not args.no_flip, crop=first.data.crop_size,
                          max_batch=args.max_batch or (256 if args.gpu else 64),
                          amp_dtype=torch.bfloat16 if args.gpu else None,
                          **scales_fields(member_scales(args.scales, members)))
    batch = args.batch_size or first.data.eval_batch_size or 16
    expected = dataset.stored_labels(data.root, data.val_split)
    shares = evaluate([m.net for m in members], data, protocol, batch, args.workers, use_ray=not args.no_ray,
                      use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker, quiet=args.quiet)
    check_shares(shares, expected)
    result = publish(args, members, data, protocol, shares, len(expected), uri)
    return {**result, "shares": shares}


def task_of(argv: list[str]) -> tuple[str, list[str]]:
    """(--task, the other arguments): each task parses its own options."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--task", choices=TASKS, default="classification")
    known, rest = p.parse_known_args(argv)
    return known.task, rest


def scales_fields(own: tuple[tuple[int, ...], ...]) -> dict:
    """Protocol fields: one member (or members sharing one Q set) at its scales in the order given;
    members at different Q sets each at its own, over the union of them (one decode per Q)."""
    if len(set(own)) == 1:
        return {"scales": own[0]}
    return {"scales": tuple(sorted({q for qs in own for q in qs})), "member_scales": own}


def check_shares(shares: list[E.ShareResult], expected: dict[str, int]) -> None:
    """Before any figure: each stored image exactly once, with the manifest's label."""
    E.check_exactly_once(shares, expected)
    for s in shares:
        wrong = [k for k, lbl in zip(s.keys, s.labels.tolist()) if expected[k] != lbl]
        if wrong:
            raise RuntimeError(f"labels from the shards differ from the manifest for keys {wrong[:5]}")


def publish(args, members, data: config_lib.DataConfig, protocol: E.Protocol, shares: list[E.ShareResult],
            images: int, uri: str) -> dict:
    """The table printed, written to ``--out`` and logged as an MLflow child run of the training run."""
    cfgs, num_classes = [m.cfg for m in members], members[0].num_classes
    rows, per_class = report.table(shares, protocol, cfgs, num_classes)
    counts = torch.bincount(torch.cat([s.labels for s in shares]), minlength=num_classes)
    print(report.markdown(rows), end="")
    out = Path(args.out or f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    class_info = dataset.read_info(data.root).get("classes") or [{} for _ in range(num_classes)]
    files = report.write(out, rows, per_class, class_info, counts)
    print(f"results written to {out}/ (results.csv, results.md, per_class.csv)")
    head = rows[-1]  # the headline: the last protocol asked for, over all scales
    headline = {"top1_error": head["top-1 err %"] / 100, "top5_error": head["top-5 err %"] / 100}
    params = {"mode": args.mode, "scales": report.scales_column(protocol), "flip": protocol.flip,
              "workers": args.workers, "split": data.val_split, "images": images,
              "models": report.config_name(cfgs), "train_S": report.train_scales(cfgs), "data": data.root}
    run_id, parent = "", members[0].parent_run_id
    if uri and not args.no_mlflow:
        tags = {"eval.runs": " ".join(m.spec for m in members),
                "eval.checkpoints": " ".join(m.checkpoint for m in members)}
        run_id = report.log_child_run(resolve_uri(uri), parent, rows, files, params, headline, tags,
                                      args.experiment, started_ms=args.started_ms, storage=str(out.parent))
        print(f"MLflow: run {run_id}" + (f" (child of {parent})" if parent else ""))
    return {"rows": rows, "files": [str(f) for f in files], "mlflow_run_id": run_id, "per_class": per_class}


if __name__ == "__main__":
    from jobs import _cli

    sys.exit(_cli.run(main))
