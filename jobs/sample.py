"""Write the embedded ILSVRC-shaped sample (``preprocessing.synthetic``): a SOURCE folder to try
``jobs.preprocess`` and the rest of the pipeline on when no ImageNet copy is at hand. Its
``LOC_train_solution.csv`` and ``LOC_val_solution.csv`` give every image one exact box (localisation).

    python -m jobs.sample OUT [--classes 10] [--train-per-class 20] [--val-per-class 5] [--oddities]
"""
from __future__ import annotations

import argparse
import sys

from preprocessing.synthetic import KINDS, generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write the sample into (the SOURCE for jobs.preprocess)")
    p.add_argument("--classes", type=int, default=10, help=f"number of classes, 1..{len(KINDS)}")
    p.add_argument("--train-per-class", type=int, default=20)
    p.add_argument("--val-per-class", type=int, default=5)
    p.add_argument("--oddities", action="store_true",
                   help="add one file of each bad case (PNG named .JPEG, CMYK, grayscale, palette, alpha, "
                        "EXIF-rotated, progressive, large, zero-byte, truncated, undecodable, not an image)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-side", type=int, default=300, help="smallest image side in pixels")
    p.add_argument("--max-side", type=int, default=640, help="largest image side in pixels")
    p.add_argument("--workers", type=int, default=1, help="processes drawing images (same bytes for any)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    root = generate(a.out, a.classes, a.train_per_class, a.val_per_class, a.oddities, a.seed,
                    (a.min_side, a.max_side), a.workers)
    n = sum(1 for _ in root.rglob("*.JPEG"))
    print(f"wrote {n} images to {root} ({a.classes} classes, seed {a.seed})")
    return 0


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.run(main))
