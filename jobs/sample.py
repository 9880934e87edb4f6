"""Write the embedded ILSVRC-shaped sample (``preprocessing.synthetic``): a SOURCE folder to try
``jobs.preprocess`` and the rest of the pipeline on when no ImageNet copy is at hand. Its
``LOC_train_solution.csv`` and ``LOC_val_solution.csv`` give every image one exact box (localisation).
With ``--imagenet-shape``: a tree of ILSVRC-2012's shape and counts instead (1,000 classes, 1,281,167
train and 50,000 val images of 32-64 px, or N train images and the rest scaled to match), for timing
preprocessing, reruns and loaders at scale (``preprocessing.imagenet_shape``).

    python -m jobs.sample OUT [--classes 10] [--train-per-class 20] [--val-per-class 5] [--oddities]
    python -m jobs.sample OUT --imagenet-shape [--images 1281167] [--workers 2] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys

from preprocessing import imagenet_shape
from preprocessing.synthetic import KINDS, generate

SAMPLE_DEFAULTS = {"classes": 10, "train_per_class": 20, "val_per_class": 5, "oddities": False,
                   "min_side": 300, "max_side": 640}


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import UsageError

    a = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if a.imagenet_shape:
        given = [f"--{k.replace('_', '-')}" for k in SAMPLE_DEFAULTS if getattr(a, k) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: not an option of --imagenet-shape (it takes --images, "
                             "--workers, --seed, --no-progress)")
        return _imagenet_shape(a)
    if a.images is not None:
        raise UsageError("--images: an option of --imagenet-shape only (the sample takes --train-per-class)")
    for k, v in SAMPLE_DEFAULTS.items():
        setattr(a, k, v if getattr(a, k) is None else getattr(a, k))
    root = generate(a.out, a.classes, a.train_per_class, a.val_per_class, a.oddities, a.seed,
                    (a.min_side, a.max_side), a.workers or 1)
    n = sum(1 for _ in root.rglob("*.JPEG"))
    print(f"wrote {n} images to {root} ({a.classes} classes, seed {a.seed})")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write the sample into (the SOURCE for jobs.preprocess)")
    p.add_argument("--classes", type=int, default=None, help=f"number of classes, 1..{len(KINDS)} (default 10)")
    p.add_argument("--train-per-class", type=int, default=None, help="default 20")
    p.add_argument("--val-per-class", type=int, default=None, help="default 5")
    p.add_argument("--oddities", action="store_true", default=None,
                   help="add one file of each bad case (PNG named .JPEG, CMYK, grayscale, palette, alpha, "
                        "EXIF-rotated, progressive, large, zero-byte, truncated, undecodable, not an image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-side", type=int, default=None, help="smallest image side in pixels (default 300)")
    p.add_argument("--max-side", type=int, default=None, help="largest image side in pixels (default 640)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes writing images, same bytes for any (default 1; --imagenet-shape: 2)")
    p.add_argument("--imagenet-shape", action="store_true",
                   help="write a tree of ILSVRC-2012's shape and counts of tiny JPEGs instead of the sample")
    p.add_argument("--images", type=int, default=None,
                   help=f"with --imagenet-shape: train images, {imagenet_shape.CLASSES:,}.."
                        f"{imagenet_shape.TRAIN_IMAGES:,} (default: all); val and boxes scale with it")
    p.add_argument("--no-progress", action="store_true", help="with --imagenet-shape: no progress bar")
    return p


def _imagenet_shape(a) -> int:
    from jobs.cli import UsageError

    n = imagenet_shape.TRAIN_IMAGES if a.images is None else a.images
    if not imagenet_shape.CLASSES <= n <= imagenet_shape.TRAIN_IMAGES:
        raise UsageError(f"--images {n}: between {imagenet_shape.CLASSES:,} (one train image a class) and "
                         f"{imagenet_shape.TRAIN_IMAGES:,}")
    workers = 2 if a.workers is None else a.workers
    if not 1 <= workers <= 64:
        raise UsageError(f"--workers {workers}: between 1 and 64")
    root = imagenet_shape.generate(a.out, n, a.seed, workers, progress=not a.no_progress)
    done = imagenet_shape.read_record(root)
    print(f"{root}: {done['train']:,} train images in {imagenet_shape.CLASSES:,} classes, {done['val']:,} val "
          f"images; boxes for {done['train_boxed']:,} train images ({done['train_boxes']:,} boxes) and every "
          f"val image ({done['val_boxes']:,} boxes); seed {a.seed}")
    return 0


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.run(main))
