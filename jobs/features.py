"""Transfer features (the paper's appendix B): the penultimate (FC7) 4096-D descriptor of every image.

    python -m jobs.features --run <MLflow run id | checkpoint> [--run ...] --out features.parquet
        [--data ROOT] [--split val] [--scales auto | 256,384,512] [--aggregate mean|stack] [--no-flip]
        [--workers N] [--gpu]

The net is applied densely to the whole image rescaled to each Q; the FC7 map (after its ReLU) is
averaged spatially and with the flipped image's; the descriptors of the scales are averaged
(``--aggregate mean``) or stacked (``stack``), then L2-normalised. Several ``--run`` (the paper's D and
E) are stacked, each net at its own Qs, and the stack L2-normalised again. The parquet file has one row
per stored image of the split, sorted by key, with the manifest's ``key`` and ``label`` and
``feature``: fixed_size_list<float32>[D] (D = 4096 x width x scales stacked x nets). Every stored image
exactly once, as in ``jobs.evaluate``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from jobs.cli import pass_parser
from jobs.passes import front
from jobs.passes.features import extract, write_parquet
from jobs.passes.members import member_scales
from pipeline import evaluate as E
from pipeline import features as F
from storage import dataset


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.features", description=__doc__, parents=[pass_parser()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True,
                   help="MLflow run id or checkpoint file/folder; repeat to stack nets (D + E)")
    p.add_argument("--out", required=True, help="the parquet file to write")
    p.add_argument("--aggregate", choices=F.AGGREGATES, default="mean", help="over the scales: mean or stack")
    p.add_argument("--batch-size", type=int, default=16)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    opts = front.PassOptions.of(vars(args))
    members = front.open_members(args.run, opts)
    scales = member_scales(opts.scales, members)           # the options first: they cost nothing to check
    ds = dataset.open_dataset(opts.data or members[0].cfg.data.root)
    keys, labels, per_net = extract(members, ds, opts.split, args.batch_size, opts)
    feats = F.descriptor(per_net, args.aggregate)
    out = Path(args.out)
    write_parquet(out, keys, labels, feats)
    print(f"{len(keys)} features of dimension {feats.shape[1]} (scales "
          f"{' / '.join(E.scale_label(qs) for qs in scales)}, {args.aggregate}) -> {out}")
    return out


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.run(main))
