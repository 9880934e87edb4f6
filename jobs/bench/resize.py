"""What a resize costs at ImageNet's size (``pipeline/epochs.py``, docs/pipeline.md "Resizing"):
a checkpoint taken half-way through an epoch of 1,281,167 samples carries the keys trained on so far
(``epoch_keys``); a group of another size plans the rest from them. Over synthetic index files of
ImageNet's shape (``jobs.bench.index.make_indexes``: 1,024 shards, ImageNet-like keys), one process:

- ``keys``: rank 0 joining every rank's keys into the checkpoint's one string, and its size;
- ``checkpoint``: that string through ``torch.save`` and ``torch.load(weights_only=True)`` (in memory);
- ``read``: the string back into a set, as every rank of the new group does;
- ``plan``: one rank's part of the rest (``epoch_plan.plan``: read every index, leave out the trained
  keys, write the rank's index copies), what each rank of the new group pays before its first step.
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import tempfile
from pathlib import Path

import torch

from jobs.bench.common import Report
from jobs.bench.index import make_indexes, timed
from jobs.cli import UsageError, positive
from pipeline import epoch_plan
from storage.dataset import Split


def measure(args, work: Path, report: Report) -> None:
    indexes = make_indexes(work, args.shards, args.samples, 0)
    split = Split("train", tuple(str(i.with_suffix(".tar")) for i in indexes), tuple(map(str, indexes)), args.samples)
    every = [key for _, key, _ in epoch_plan.remaining_entries(split, frozenset())]
    done = every[: len(every) * args.trained_percent // 100 // args.global_batch * args.global_batch]
    common = dict(samples=args.samples, shards=args.shards, trained=len(done), world_before=args.before,
                  world_after=args.after)
    wall, cpu, text = timed(lambda: epoch_plan.join_keys(done))
    report.add(stage="keys", **common, seconds=wall, cpu_seconds=cpu, mb=len(text) / 1e6)

    def round_trip():
        buf = io.BytesIO()
        torch.save({"epoch_keys": text}, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)["epoch_keys"], buf.getbuffer().nbytes

    wall, cpu, (back, size) = timed(round_trip)
    assert back == text
    report.add(stage="checkpoint", **common, seconds=wall, cpu_seconds=cpu, mb=size / 1e6)
    wall, cpu, trained = timed(lambda: epoch_plan.split_keys(text))
    report.add(stage="read", **common, seconds=wall, cpu_seconds=cpu)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall, cpu, plan = timed(lambda: epoch_plan.plan(split, trained, args.after, 0, args.global_batch, 0,
                                                    work / "rank0"))
    report.add(stage="plan", **common, seconds=wall, cpu_seconds=cpu, rank_samples=plan.split.num_samples,
               steps=plan.steps, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               peak_rss_growth_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.bench resize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=positive, default=1_281_167, help="training samples (ImageNet's train)")
    p.add_argument("--shards", type=positive, default=1024, help="index files")
    p.add_argument("--trained-percent", type=int, default=50, help="0..100: how far into the epoch the resize comes")
    p.add_argument("--before", type=positive, default=8, help="workers before the resize (recorded)")
    p.add_argument("--after", type=positive, default=4, help="workers after it: the plan is one rank's of these")
    p.add_argument("--global-batch", type=positive, default=256)
    p.add_argument("--work", help="where the index files go, kept and reused (default: a temporary folder)")
    p.add_argument("--out", default="", help="also write the figures as a JSON list here")
    return p.parse_args(argv)


def main(argv: list[str]) -> list[dict]:
    args = parse(argv)
    if not 0 <= args.trained_percent <= 100:
        raise UsageError(f"--trained-percent {args.trained_percent}: must be 0..100")
    if args.samples < args.shards or args.after > args.global_batch:
        raise UsageError(f"--samples {args.samples} must be >= --shards {args.shards}, and --after {args.after} "
                         f"<= --global-batch {args.global_batch}")
    report = Report("resize", torch.device("cpu"), out=args.out, cpus=os.cpu_count())
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-resize-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        measure(args, work, report)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return report.rows
