"""Transfer to other datasets (the paper's appendix B): appendix B's descriptors, a linear SVM per class,
mAP (VOC-style multi-label sets) or mean class recall (Caltech-style single-label sets).

    python -m jobs.transfer --run <run | checkpoint> [--run ...] --out DIR [--data ROOT]
        [--train-split train] [--split val] [--labels labels.csv] [--scales auto | 256,384,512]
        [--aggregate mean|stack] [--svm-c 1.0 | auto] [--ap voc07|voc12|raw]
        [--train-per-class N [--test-per-class M] [--repeats 3]]
        [--seed 0] [--workers N] [--no-ray] [--gpu]
    python -m jobs.transfer sample-labels ROOT OUT.csv    # a multi-label file for the synthetic sample

- Descriptors as jobs.features: dense FC7, spatial mean, flip mean, scales averaged or stacked, L2;
  several ``--run`` (D and E) stacked. Written to DIR/features-<split>.parquet.
- ``--labels``: a multi-label CSV (``key,labels`` with the names separated by spaces) for every image
  of both splits: one SVM per name, scored by mAP. Without it, the manifest's single label: one SVM
  per class, scored by mean class recall (and mAP).
- ``--ap``: the mAP's average precision: voc07 (default; the VOC-2007 devkit's 11-point interpolated
  AP, the paper's VOC-2007 figure), voc12 (all-point interpolated, VOC 2010 onwards: the paper's
  VOC-2012 figure) or raw (non-interpolated, scikit-learn's average_precision_score).
- ``--svm-c auto``: per repeat, C from {0.01, 0.1, 1, 10, 100} by the same metric on a held-out 20 %
  of the training images (stratified per class when single-label), then the SVMs refitted on all of
  them; the choice is printed and recorded in results.json.
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
import sys
from pathlib import Path

from jobs.cli import pass_parser
from jobs.passes import front
from jobs.passes import transfer as transfer_pass
from pipeline import features as F
from pipeline import transfer as T
from storage import dataset
from storage.dataformat import DataError
from storage.files import atomic_write

# The synthetic sample's kinds (preprocessing.synthetic.KINDS) in three overlapping families: each
# image's labels are its kind and its family, so a multi-label set with a structure a net can see.
FAMILIES = {"round": ("disc", "ring", "dots", "target", "halfdisc"),
            "angular": ("square", "triangle", "cross", "diamond", "star", "hexagon"),
            "lined": ("hstripes", "vstripes", "dstripes", "checker", "grid")}


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.transfer", description=__doc__, parents=[pass_parser()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True,
                   help="MLflow run id or checkpoint file/folder; repeat to stack nets (D + E)")
    p.add_argument("--out", required=True, help="folder for the features, scores and results")
    p.add_argument("--train-split", default="train", help="the split the SVMs are trained on")
    p.add_argument("--labels", default="", help="multi-label CSV (key,labels) for both splits; default: "
                                                "the manifest's single label")
    p.add_argument("--aggregate", choices=F.AGGREGATES, default="mean", help="over the scales: mean or stack")
    p.add_argument("--svm-c", type=svm_c, default=1.0,
                   help="LinearSVC's C (regularisation: larger is weaker), or auto: chosen on held-out training images")
    p.add_argument("--ap", choices=T.FLAVOURS, default="voc07",
                   help="the mAP's AP: voc07 (11-point, VOC-2007 devkit), voc12 (all-point, VOC 2010+), raw")
    p.add_argument("--train-per-class", type=int, default=0, help="random training images per class (0: all)")
    p.add_argument("--test-per-class", type=int, default=0, help="with one split: test images per class (0: rest)")
    p.add_argument("--repeats", type=int, default=1, help="random splits to average over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    return p.parse_args(argv)


def svm_c(text: str) -> float | str:
    """``--svm-c``: a number (its range is Request.check's), or ``auto``."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'auto', got {text!r}") from None


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "sample-labels":
        return sample_labels(argv[1:])
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    opts = front.PassOptions.of(vars(args))
    members = front.open_members(args.run, opts)
    req = transfer_pass.Request(train_split=args.train_split, split=args.split or members[0].cfg.data.val_split,
                                labels=args.labels, aggregate=args.aggregate, svm_c=args.svm_c, ap=args.ap,
                                train_per_class=args.train_per_class, test_per_class=args.test_per_class,
                                repeats=args.repeats, seed=args.seed, batch_size=args.batch_size, out=Path(args.out))
    return transfer_pass.run(members, req, opts)


def sample_labels(argv: list[str]) -> int:
    """``python -m jobs.transfer sample-labels ROOT OUT.csv``: the synthetic sample's multi-label file,
    every stored image of every split labelled with its kind and its kind's family."""
    from preprocessing.synthetic import KINDS, synsets

    p = argparse.ArgumentParser(prog="python -m jobs.transfer sample-labels", description=sample_labels.__doc__)
    p.add_argument("root", help="the preprocessed synthetic sample (jobs.sample, then jobs.preprocess)")
    p.add_argument("out", help="the CSV to write (key,labels)")
    a = p.parse_args(argv)
    ds = dataset.open_dataset(a.root)
    kind_of = {w: KINDS[i] for i, (w, _) in enumerate(synsets()[:len(KINDS)])}
    family = {k: f for f, kinds in FAMILIES.items() for k in kinds}
    classes = [c.get("wnid", "") for c in ds.classes]
    if not classes or any(w not in kind_of for w in classes):
        raise DataError(f"{a.root}: not the synthetic sample (its classes are not the sample's wnids)")
    rows: dict[str, str] = {}
    for split in ds.info.get("splits", {}):
        for key, label in ds.stored_labels(split).items():
            if key in rows:
                raise DataError(f"{a.root}: key {key!r} is in two splits; a key-labelled file cannot tell them apart")
            kind = kind_of[classes[label]]
            rows[key] = f"{kind} {family[kind]}"
    atomic_write(Path(a.out), ("key,labels\n" + "".join(f"{k},{v}\n" for k, v in sorted(rows.items()))).encode())
    print(f"{len(rows)} images, labels {sorted({n for v in rows.values() for n in v.split()})} -> {a.out}")
    return 0


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.run(main))
