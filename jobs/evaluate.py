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
  ``python -m jobs.evaluate --task localisation --help`` and docs/localisation.md.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from jobs.cli import UsageError, pass_parser
from jobs.passes import classify, front, labels, localise, results
from pipeline import evaluate as E
from storage import dataset

TASKS = ("classification", "localisation")
LOC_USAGE = """python -m jobs.evaluate --task localisation --checkpoint <loc run | checkpoint> [--checkpoint ...]
    [--classifier <classification run | checkpoint> ...] [--protocol a|b|both] [--labels <evaluation> | boxes]
    [--scales single | 256,384 | auto | 256/352,384] [--no-flip] [--workers N] [--gpu] [--split val] [--out DIR]"""


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__, parents=[pass_parser()],
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


def parse_localisation(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate --task localisation", usage=LOC_USAGE,
                                description=localise.__doc__, parents=[pass_parser()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", "--run", dest="checkpoint", action="append", required=True,
                   help="localisation net: MLflow run id or checkpoint file/folder; repeat for an ensemble")
    p.add_argument("--classifier", action="append", default=[],
                   help="classification net whose posteriors rank protocol (b)'s boxes; repeat to average several")
    p.add_argument("--protocol", choices=localise.PROTOCOLS, default="",
                   help="a (central crop, ground-truth class), b (dense, merged) or both (default: both "
                        "with --classifier, else a)")
    p.add_argument("--labels", default=labels.BOXES,
                   help="protocol (b)'s 5 classes per image: a classification evaluation (its --out folder, its "
                        "labels.parquet or its MLflow run id), in its order, as the paper took its best "
                        f"classification system's; default {labels.BOXES}: the --classifier nets' classes whose "
                        "merged boxes score highest")
    p.add_argument("--batch-size", type=int, default=0, help="DALI batch (0: data.eval_batch_size, else 16)")
    p.add_argument("--max-batch", type=int, default=0, help="images per forward pass (0: 256 on GPU, 64)")
    p.add_argument("--out", default="", help="folder for results.csv/.md (default: eval-loc-<time>)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the child run")
    p.add_argument("--experiment", default="vgg-eval", help="MLflow experiment when no training run is known")
    p.set_defaults(scales="single")   # Table 9 reports one Q per net, or two
    return p.parse_args(argv)


def parse_modes(text: str) -> tuple[str, ...]:
    modes = ("center", "dense", "multicrop", "both") if text == "all" else tuple(text.split(","))
    bad = [m for m in modes if m not in E.MODES]
    if bad:
        raise UsageError(f"--mode {text!r}: only {', '.join(E.MODES)} (comma-separated) or all")
    return modes


def task_of(argv: list[str]) -> tuple[str, list[str]]:
    """(--task, the other arguments): each task parses its own options."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--task", choices=TASKS, default="classification")
    known, rest = p.parse_known_args(argv)
    return known.task, rest


def results_run(args, opts: front.PassOptions, first, parent_run_id: str, started_ms: int) -> results.ResultsRun | None:
    uri = front.results_uri(opts, first.cfg)
    if not uri or args.no_mlflow:
        return None
    return results.ResultsRun(uri, parent_run_id, args.experiment, started_ms)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    started_ms = int(time.time() * 1000)   # the MLflow results run spans the whole evaluation
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    task, rest = task_of(argv)
    if task == "localisation":
        return main_localisation(rest, started_ms)
    args = parse(argv)
    modes = parse_modes(args.mode)
    opts = front.PassOptions.of(vars(args))
    members = front.open_members(args.run, opts)
    first = members[0]
    protocol = E.Protocol(modes=modes, flip=opts.flip, crop=first.cfg.data.crop_size,
                          max_batch=args.max_batch or (256 if opts.gpu else 64), amp_dtype=opts.amp_dtype,
                          **classify.scales_fields(members, opts.scales))
    data = front.split_data(first.cfg, opts)
    req = classify.Request(args.mode, args.batch_size or first.cfg.data.eval_batch_size or 16,
                           results.out_folder(args.out, "eval"),
                           results_run(args, opts, first, first.parent_run_id, started_ms))
    ds = dataset.open_dataset(data.root)
    shares = classify.shares(members, data, ds, protocol, req.batch_size, opts)
    published, per_class = classify.publish(members, data, ds, protocol, shares, req, opts.workers)
    return {**vars(published), "per_class": per_class, "shares": shares}


def main_localisation(argv: list[str], started_ms: int) -> dict:
    args = parse_localisation(argv)
    opts = front.PassOptions.of(vars(args))
    members, classifiers = front.open_members(args.checkpoint, opts), front.open_members(args.classifier, opts)
    req = localise.Request(args.protocol, args.labels, args.batch_size, args.max_batch,
                           results.out_folder(args.out, "eval-loc"),
                           results_run(args, opts, members[0], members[0].parent_run_id, started_ms))
    published, shares, mean_box = localise.evaluate(members, classifiers, req, opts)
    return {**vars(published), "shares": shares, "mean_box": mean_box}


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.run(main))
