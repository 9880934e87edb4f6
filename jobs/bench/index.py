"""The index check of a loader start at ImageNet's size: every DALI index entry checked against its
tar's member header (``storage.shard_check.check_split_indexes``, what ``Dataset.split`` runs before
DALI reads an index), over 1,024 training shards holding 1,281,167 index entries by default.

The shards are synthetic, written into ``--work`` (default: a temporary folder, removed afterwards) by
the real shard writer with tiny members (a 4-byte stand-in for the JPEG: 4 KiB per sample, 5.2 GB at
the default size): what the check costs is parsing the indexes and one 512-byte header read per
member, not the members' bytes. Three figures, each one check of every index:

- ``cold``: the node's cache empty, the files in the page cache (as just written): the CPU cost;
- ``cold-disk``: the same after asking the kernel to drop the files' pages (``posix_fadvise``
  DONTNEED; where that is ignored it equals ``cold``). Tiny members put the headers on adjacent
  pages, so this is a lower bound for real shards, whose headers lie ~110 KB apart;
- ``warm``: the cache filled (the median of ``--rounds``): what every later loader start of the node pays.

``--mode boxed``: the training split's samples with boxes instead (``pipeline.box_augment.boxed_split``,
what ``TrainLoader(..., boxes=True)`` runs), over index files only (no tars: it reads nothing else),
``--boxed`` of the lines with a box member. Four figures: ``select-fast`` and ``select-reader``, picking
the boxed lines of every index by ``storage.dataformat.index_lines_with`` and by parsing them with
``read_index``; ``cold``, the node cache empty (read, filter, write, publish); ``warm``, its entry reused.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from jobs.bench.common import Report
from jobs.cli import UsageError, positive
from pipeline import box_augment
from preprocessing.shards import ShardWriter
from storage import dataformat as fmt
from storage import shard_check
from storage.dataset import Dataset, Split

JPEG = b"\xff\xd8\xff\xd9"       # SOI + EOI: a member of one block, like the other three
SAMPLE_BYTES = 4 * 2 * fmt.TAR_BLOCK   # four members, each one header block and one data block
BOXED = 544_546                  # ImageNet's training images with a box (the localisation subset)


def make_shards(work: Path, shards: int, samples: int) -> tuple[list[Path], list[Path]]:
    """``shards`` tars holding ``samples`` in all (ImageNet-like keys, labels 0-999) and their indexes,
    written by ``preprocessing.shards.ShardWriter``; reused when ``work`` holds them already."""
    tars = [work / f"train-{s:06d}.tar" for s in range(shards)]
    indexes = [t.with_suffix(".idx") for t in tars]
    stamp, want = work / "bench-index.json", {"shards": shards, "samples": samples}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and all(p.is_file() for p in tars + indexes):
        return tars, indexes
    need = samples * SAMPLE_BYTES + shards * 20 * fmt.TAR_BLOCK
    if shutil.disk_usage(work).free < 1.2 * need:
        raise SystemExit(f"{work}: {need / 1e9:.1f} GB needed for the shards, "
                         f"{shutil.disk_usage(work).free / 1e9:.1f} GB free; pass --work elsewhere")
    print(f"# writing {shards} shards, {samples:,} samples ({need / 1e9:.1f} GB) into {work}", flush=True)
    first = 0
    for s, tar in enumerate(tars):
        count = samples // shards + (s < samples % shards)
        with ShardWriter(tar) as tw:
            for i in range(first, first + count):
                tw.add(f"n{i % 1000:08d}_{i}", i % 1000, JPEG)
            _, lines, _ = tw.commit()
        fmt.write_index(indexes[s], lines)
        first += count
    stamp.write_text(json.dumps(want))
    return tars, indexes


def drop_pages(paths: list[Path]) -> None:
    """Ask the kernel to forget the files' cached pages (clean ones: the writer fsynced them)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def check_seconds(tars: list[Path], indexes: list[Path], cache: Path, empty: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of one ``check_split_indexes`` of every index, on an ``empty`` node cache or
    as it is. CPU time (all threads of this process) is what other jobs on a shared machine disturb least."""
    if empty:
        cache.unlink(missing_ok=True)
    start, cpu = time.perf_counter(), time.process_time()
    shard_check.check_split_indexes(tars, indexes, cache)
    return time.perf_counter() - start, time.process_time() - cpu


def measure(args, work: Path, report: Report) -> None:
    tars, indexes = make_shards(work, args.shards, args.samples)
    members = 4 * args.samples
    cache = work / "node-cache" / "shards.json"
    common = dict(shards=args.shards, entries=args.samples, header_reads=members,
                  index_mb=sum(p.stat().st_size for p in indexes) / 1e6,
                  tar_gb=sum(p.stat().st_size for p in tars) / 1e9,
                  threads=min(args.shards, shard_check.INDEX_THREADS))
    cold, cold_cpu = check_seconds(tars, indexes, cache, empty=True)
    report.add(start="cold", **common, seconds=cold, cpu_seconds=cold_cpu,
               us_per_entry=cold / args.samples * 1e6)
    drop_pages(tars + indexes)
    disk, disk_cpu = check_seconds(tars, indexes, cache, empty=True)
    report.add(start="cold-disk", **common, seconds=disk, cpu_seconds=disk_cpu,
               us_per_entry=disk / args.samples * 1e6)
    warm = [check_seconds(tars, indexes, cache, empty=False) for _ in range(args.rounds)]
    median = statistics.median(w for w, _ in warm)
    report.add(start="warm", **common, seconds=median, cpu_seconds=statistics.median(c for _, c in warm),
               seconds_by_round=[w for w, _ in warm], cache_kb=cache.stat().st_size / 1e3,
               warm_over_cold=median / cold)


def make_indexes(work: Path, shards: int, samples: int, boxed: int) -> list[Path]:
    """``shards`` index files of ``samples`` lines in all, ``boxed`` of them (spread evenly) with a box
    member first as the shard writer orders them; ImageNet-like keys and JPEG sizes. Reused when
    ``work`` holds them already."""
    indexes = [work / f"train-{s:06d}.idx" for s in range(shards)]
    stamp, want = work / "bench-boxed.json", {"shards": shards, "samples": samples, "boxed": boxed}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and all(p.is_file() for p in indexes):
        return indexes
    print(f"# writing {shards} indexes, {samples:,} lines, {boxed:,} with a box, into {work}", flush=True)
    first = 0
    for s, idx in enumerate(indexes):
        lines, at = [], 0
        for i in range(first, first + samples // shards + (s < samples % shards)):
            key = f"n{i % 1000:08d}_{i}"
            box = [(fmt.BOX_EXT, 16 * (1 + i % 3))] if i * boxed % samples < boxed else []
            parts = []
            for ext, size in box + [("cls", 3), ("jpg", 90_000 + i * 7919 % 60_000), ("key", len(key)), ("lbl", 4)]:
                parts.append(f"{ext} {at + fmt.TAR_BLOCK} {size} {key}.{ext}")
                at += fmt.TAR_BLOCK + size + (-size % fmt.TAR_BLOCK)
            lines.append(" ".join(parts))
        fmt.write_index(idx, lines)
        first += len(lines)
    stamp.write_text(json.dumps(want))
    return indexes


def timed(fn) -> tuple[float, float, object]:
    """(wall, CPU) seconds of ``fn()`` and its result."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - start, time.process_time() - cpu, out


def measure_boxed(args, work: Path, report: Report) -> None:
    indexes = make_indexes(work / "boxed", args.shards, args.samples, args.boxed)
    info = {"fingerprint": "bench", "splits": {"train": {fmt.SPLIT_BOXES: {"images": args.boxed}}}}
    ds = Dataset(work / "boxed", info)
    split = Split("train", tuple(str(i.with_suffix(".tar")) for i in indexes), tuple(map(str, indexes)), args.samples)
    cache = work / "node-cache" / box_augment.CACHE_NAME
    common = dict(shards=args.shards, entries=args.samples, boxed=args.boxed,
                  index_mb=sum(p.stat().st_size for p in indexes) / 1e6)
    fast, fast_cpu, _ = timed(lambda: [fmt.index_lines_with(i, fmt.BOX_EXT) for i in indexes])
    report.add(start="select-fast", **common, seconds=fast, cpu_seconds=fast_cpu)
    parsed, parsed_cpu, _ = timed(lambda: [[s for s in fmt.read_index(i) if s[0][0] == fmt.BOX_EXT] for i in indexes])
    report.add(start="select-reader", **common, seconds=parsed, cpu_seconds=parsed_cpu, over_fast=parsed / fast)
    shutil.rmtree(cache, ignore_errors=True)
    cold, cold_cpu, out = timed(lambda: box_augment.boxed_split(ds, split, cache))
    if out.num_samples != args.boxed:
        raise SystemExit(f"boxed_split found {out.num_samples:,} boxed samples, not {args.boxed:,}")
    report.add(start="cold", **common, seconds=cold, cpu_seconds=cold_cpu,
               entry_mb=sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 1e6)
    warm = [timed(lambda: box_augment.boxed_split(ds, split, cache))[:2] for _ in range(args.rounds)]
    median = statistics.median(w for w, _ in warm)
    report.add(start="warm", **common, seconds=median, cpu_seconds=statistics.median(c for _, c in warm),
               seconds_by_round=[w for w, _ in warm], warm_over_cold=median / cold)


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.bench index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=positive, default=1024, help="training shards (ImageNet at 1,251 per shard)")
    p.add_argument("--samples", type=positive, default=1_281_167, help="index entries in all (ImageNet's train)")
    p.add_argument("--mode", choices=("check", "boxed"), default="check",
                   help="check: the index check of every entry; boxed: the boxed index cache (see above)")
    p.add_argument("--boxed", type=positive, default=BOXED, help="--mode boxed: lines with a box member")
    p.add_argument("--rounds", type=positive, default=5, help="warm checks, the median reported")
    p.add_argument("--work", help="where the shards go, kept and reused (default: a temporary folder, removed)")
    p.add_argument("--out", default="", help="also write the figures as a JSON list here")
    return p.parse_args(argv)


def main(argv: list[str]) -> list[dict]:
    args = parse(argv)
    if args.samples < args.shards:
        raise SystemExit(f"--samples {args.samples}: fewer than --shards {args.shards}")
    if args.mode == "boxed" and args.boxed > args.samples:
        raise UsageError(f"--boxed {args.boxed}: more than --samples {args.samples}")
    report = Report("index", torch.device("cpu"), out=args.out, cpus=os.cpu_count())
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-index-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        (measure_boxed if args.mode == "boxed" else measure)(args, work, report)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(report.table(["start", "shards", "entries", "boxed", "header_reads", "seconds", "cpu_seconds",
                        "us_per_entry", "over_fast", "warm_over_cold"]))
    return report.rows


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
