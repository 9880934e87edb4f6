"""Transfer features (the paper's appendix B): the penultimate (FC7) 4096-D descriptor of every image.

    python -m jobs.features --run <MLflow run id | checkpoint> --out features.parquet
        [--data ROOT] [--split val] [--scales auto | 256,384,512] [--no-flip] [--workers N] [--gpu]

The net is applied densely to the whole image rescaled to each Q; the FC7 map (after its ReLU) is
averaged spatially and with the flipped image's, the descriptors of the scales are averaged, then
L2-normalised. The parquet file has one row per stored image of the split, sorted by key, with the
manifest's ``key`` and ``label`` and ``feature``: fixed_size_list<float32>[D] (D = 4096 x width).
Every stored image exactly once, as in ``jobs.evaluate``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch

from jobs._ranks import check_workers, parse_scales, pass_options, prepare_rank, resolve_member, run_ranks
from pipeline import dataset
from pipeline import evaluate as E
from storage.files import atomic_write


def features_rank(net, data, scales, flip, batch_size, use_gpu, threads, rank, world, progress):
    (net,), device, batches_at = prepare_rank([net], data, batch_size, rank, world, use_gpu, threads)
    return E.features_share(net, batches_at, scales, flip, device,
                            amp_dtype=torch.bfloat16 if use_gpu else None, progress=progress)


def write_parquet(path: Path, keys: list[str], labels: torch.Tensor, feats: torch.Tensor) -> None:
    """Write key, label, feature, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = feats.shape[1]
    flat = pa.array(feats.float().numpy().reshape(-1), type=pa.float32())
    table = pa.table({"key": pa.array(keys, pa.string()),
                      "label": pa.array(labels.numpy().astype(np.int32), pa.int32()),
                      "feature": pa.FixedSizeListArray.from_arrays(flat, d)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write(path, buffer.getvalue())


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.features", description=__doc__, parents=[pass_options()],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="MLflow run id or checkpoint file/folder")
    p.add_argument("--out", required=True, help="the parquet file to write")
    p.add_argument("--batch-size", type=int, default=16)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    check_workers(args.workers)
    member = resolve_member(args.run, args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""))
    cfg = member.cfg
    data = dataclasses.replace(cfg.data, root=args.data or cfg.data.root, val_split=args.split or cfg.data.val_split,
                               layout="NCHW", dtype="float32", decode="mixed" if args.gpu else "cpu")
    scales = parse_scales(args.scales, cfg.data)
    expected = dataset.stored_labels(data.root, data.val_split)
    work = functools.partial(features_rank, member.net.cpu(), data, scales, not args.no_flip, args.batch_size,
                             args.gpu, args.cpus_per_worker if not args.no_ray else 0)
    shares = run_ranks(work, args.workers, len(expected) * len(scales), not args.no_ray, args.gpu,
                       args.cpus_per_worker, args.quiet, desc="features")
    E.check_exactly_once([E.ShareResult(k, lbl, {}) for k, lbl, _ in shares], expected)
    keys = [k for ks, _, _ in shares for k in ks]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    labels = torch.cat([lbl for _, lbl, _ in shares])[order]
    feats = torch.cat([f for _, _, f in shares])[order]
    out = Path(args.out)
    write_parquet(out, [keys[i] for i in order], labels, feats)
    print(f"{len(keys)} features of dimension {feats.shape[1]} (scales {E.scale_label(scales)}) -> {out}")
    return out


if __name__ == "__main__":
    from jobs import _cli

    sys.exit(_cli.run(main))
