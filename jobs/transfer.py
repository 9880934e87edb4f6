"""Transfer to other datasets (the paper's appendix B): appendix B's descriptors, a linear SVM per class,
mAP (VOC-style multi-label sets) or mean class recall (Caltech-style single-label sets).

    python -m jobs.transfer --run <run | checkpoint> [--run ...] --out DIR [--data ROOT]
        [--train-split train] [--split val] [--labels labels.csv] [--scales auto | 256,384,512]
        [--aggregate mean|stack] [--svm-c 1.0] [--train-per-class N [--test-per-class M] [--repeats 3]]
        [--seed 0] [--workers N] [--no-ray] [--gpu]
    python -m jobs.transfer sample-labels ROOT OUT.csv    # a multi-label file for the synthetic sample

- Descriptors as jobs.features: dense FC7, spatial mean, flip mean, scales averaged or stacked, L2;
  several ``--run`` (D and E) stacked. Written to DIR/features-<split>.parquet.
- ``--labels``: a multi-label CSV (``key,labels`` with the names separated by spaces) for every image
  of both splits: one SVM per name, scored by mAP. Without it, the manifest's single label: one SVM
  per class, scored by mean class recall (and mAP).
- ``--split`` equal to ``--train-split`` (Caltech: one pool of images): ``--repeats`` random splits of
  ``--train-per-class`` images per class to train on and up to ``--test-per-class`` of the rest to test
  on; the figures are averaged over the repeats. With two splits, ``--train-per-class`` samples the
  training images only.
- Results: DIR/results.json and results.md (the metric per repeat, mean and std, per class), and
  DIR/scores-<repeat>.csv (each test image's SVM scores, one column per class).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np

from jobs._cli import UsageError
from jobs._features import Pass, extract, split_data, write_parquet
from jobs._ranks import check_ensemble, check_workers, member_scales, pass_options, resolve_member
from jobs._transfer_report import report, sample_labels
from pipeline import dataset
from pipeline import features as F
from pipeline import transfer as T

def parse(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.transfer", description=__doc__, parents=[pass_options()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True,
                   help="MLflow run id or checkpoint file/folder; repeat to stack nets (D + E)")
    p.add_argument("--out", required=True, help="folder for the features, scores and results")
    p.add_argument("--train-split", default="train", help="the split the SVMs are trained on")
    p.add_argument("--labels", default="", help="multi-label CSV (key,labels) for both splits; default: "
                                                "the manifest's single label")
    p.add_argument("--aggregate", choices=F.AGGREGATES, default="mean", help="over the scales: mean or stack")
    p.add_argument("--svm-c", type=float, default=1.0, help="LinearSVC's C (regularisation: larger is weaker)")
    p.add_argument("--train-per-class", type=int, default=0, help="random training images per class (0: all)")
    p.add_argument("--test-per-class", type=int, default=0, help="with one split: test images per class (0: rest)")
    p.add_argument("--repeats", type=int, default=1, help="random splits to average over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    return p.parse_args(argv)


def check_options(args) -> None:
    """The combinations argparse cannot check."""
    same = args.split == args.train_split
    if args.svm_c <= 0 or args.repeats < 1 or args.train_per_class < 0 or args.test_per_class < 0:
        raise UsageError("--svm-c must be > 0, --repeats >= 1, --train-per-class and --test-per-class >= 0")
    if same and not args.train_per_class:
        raise UsageError(f"--split and --train-split are both {args.split!r}: give --train-per-class N to "
                         "split it at random per class (Caltech), or another --split to test on")
    if args.labels and args.train_per_class:
        raise UsageError("--train-per-class samples single-label classes; it does not apply with --labels")
    if args.repeats > 1 and not args.train_per_class:
        raise UsageError("--repeats needs --train-per-class: without it every repeat is the same split")


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "sample-labels":
        return sample_labels(argv[1:])
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    check_workers(args.workers)
    members = [resolve_member(spec, args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""))
               for spec in args.run]
    check_ensemble(members)
    args.split = args.split or members[0].cfg.data.val_split
    check_options(args)
    scales = member_scales(args.scales, members)
    run = Pass(args.workers, not args.no_ray, args.gpu, args.cpus_per_worker, args.batch_size, args.quiet)
    out = Path(args.out)
    splits = [args.train_split] if args.split == args.train_split else [args.train_split, args.split]
    got = {}
    for split in splits:
        data = split_data(members[0].cfg, args.data, split, args.gpu)
        keys, labels, per_net = extract(members, data, scales, not args.no_flip, run)
        feats = F.descriptor(per_net, args.aggregate)
        write_parquet(out / f"features-{split}.parquet", keys, labels, feats)
        got[split] = (keys, labels.numpy(), feats.numpy())
    root = args.data or members[0].cfg.data.root
    names, targets = class_targets(args.labels, root, got)
    return report(out, args, names, targets, got, splits_of(args, got), scales, members)


def class_targets(labels_file: str, root: str, got: dict) -> tuple[list[str], dict[str, np.ndarray]]:
    """(class names, per split the (N, classes) 0/1 targets): the multi-label file's names, or the
    dataset's classes with each image's single label."""
    if labels_file:
        names, labels = T.read_sidecar(labels_file)
        return names, {s: T.label_matrix(keys, names, labels, labels_file) for s, (keys, _, _) in got.items()}
    classes = dataset.read_info(root).get("classes") or []
    n = max(len(classes), 1 + max(int(lbl.max()) for _, lbl, _ in got.values() if len(lbl)))
    names = [c.get("wnid") or str(i) for i, c in enumerate(classes)] + [str(i) for i in range(len(classes), n)]
    return names, {s: T.one_hot(lbl, n) for s, (_, lbl, _) in got.items()}


def splits_of(args, got: dict) -> list[tuple[tuple[str, np.ndarray], tuple[str, np.ndarray]]]:
    """Per repeat ((train split, its indices), (test split, its indices))."""
    rng = np.random.default_rng(args.seed)
    train_labels = got[args.train_split][1]
    everything = {s: np.arange(len(v[0])) for s, v in got.items()}
    out = []
    for _ in range(args.repeats):
        if args.split == args.train_split:
            train, test = T.per_class_split(train_labels, args.train_per_class, args.test_per_class, rng)
        elif args.train_per_class:
            train = T.per_class_split(train_labels, args.train_per_class, 0, rng, test_share=False)[0]
            test = everything[args.split]
        else:
            train, test = everything[args.train_split], everything[args.split]
        out.append(((args.train_split, train), (args.split, test)))
    return out


if __name__ == "__main__":
    from jobs import _cli

    sys.exit(_cli.run(main))
