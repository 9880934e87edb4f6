"""Preprocess ImageNet into WebDataset shards, locally or as Ray tasks; or verify what was written.

    python -m jobs.preprocess SOURCE OUT [--split train --split val] [--workers N] [--shard-size 1000]
                              [--seed 0] [--max-side N] [--ray [--address ADDR]] [--break-lock]
    python -m jobs.preprocess verify OUT [--workers N] [--no-decode]
    python -m jobs.preprocess report OUT

A rerun into an existing OUT adds what is new in SOURCE and takes the options it is not given from
OUT (docs/preprocessing.md, "Adding data"). One run at a time holds OUT's lock.

Locally, ``--workers`` processes each take whole shards. With ``--ray`` every shard is one Ray task
(``num_cpus=1``) on the cluster at ``--address`` (default: a local Ray); SOURCE and OUT must then be
the same paths on every node (shared storage). The output bytes are the same either way.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from jobs import cluster
from jobs.cli import UsageError
from jobs.tracking import git_commit
from preprocessing.report import report_lines
from preprocessing.verify import verify
from preprocessing.writer import preprocess
from storage.dataformat import read_info


def ray_map(address: str | None):
    """A ``map_fn`` for ``preprocessing.writer.preprocess``: one Ray task per shard, results as they finish."""
    import ray  # RAY: the only Ray in preprocessing, at the edge

    cluster.connect(address=address)

    def map_fn(fn, jobs):
        task = ray.remote(num_cpus=1, max_retries=3)(fn)  # RAY: a retried task rewrites the same bytes
        pending = [task.remote(j) for j in jobs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])

    return map_fn


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "verify":
        return _verify(argv[1:])
    if argv and argv[0] == "report":
        return _report(argv[1:])
    p = argparse.ArgumentParser(
        prog="python -m jobs.preprocess", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check, normalise and shard an ImageNet-shaped SOURCE folder into OUT "
                    "(docs/data-format.md, docs/preprocessing.md).",
        epilog="verify: python -m jobs.preprocess verify OUT [--workers N] [--no-decode] re-reads every "
               "shard\nagainst the manifest and exits non-zero naming the first bad shard and key.\n"
               "report: python -m jobs.preprocess report OUT lists every quarantined and skipped file "
               "with its\nreason, and the runs that built OUT.")
    p.add_argument("source", help="ImageNet root (train/, val/, LOC_*.csv/txt) or a class-folder tree")
    p.add_argument("out", help="output folder: empty, or one this command wrote before (resume, add)")
    p.add_argument("--split", action="append", dest="splits", metavar="NAME",
                   help="a split to write (repeatable); default: train and val where present")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="local processes (default: all cores); ignored with --ray")
    # Defaults are None ("not given"): a rerun takes OUT's recorded value, a fresh OUT the one in the help.
    p.add_argument("--shard-size", default=None,
                   help="samples per shard (1000) or source bytes per shard (256MB); default: OUT's, else 1000")
    p.add_argument("--seed", type=int, default=None, help="global shuffle seed; default: OUT's, else 0")
    p.add_argument("--max-side", type=int, default=None,
                   help="resize images whose longer side exceeds this many pixels; default: OUT's, else never")
    p.add_argument("--ray", action="store_true", help="run one Ray task per shard")
    p.add_argument("--address", default=None, help="Ray cluster address (implies --ray); default local")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--break-lock", action="store_true",
                   help="remove OUT's lock even if its holder may still run (only when you know it is gone)")
    a = p.parse_args(argv)
    _check_out(a.out)  # before Ray starts
    shard_size = int(a.shard_size) if a.shard_size and a.shard_size.isdigit() else a.shard_size
    map_fn = ray_map(a.address) if (a.ray or a.address) else None
    preprocess(a.source, a.out, splits=a.splits, shard_size=shard_size, seed=a.seed,
               max_side=a.max_side, workers=a.workers, progress=not a.no_progress, map_fn=map_fn,
               break_lock=a.break_lock, git_commit=git_commit(Path(__file__).resolve().parents[1]))
    return 0


def _check_out(out: str) -> None:
    """Refuse an OUT that cannot become a folder: it, or the nearest part of it that exists, is a file."""
    for p in (Path(out), *Path(out).parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == Path(out) else f" ({p} is a file)"
                raise UsageError(f"OUT {out}: not a folder{where}; give an empty folder, a new path, or a "
                                 "folder this command wrote before")
            return


def _report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.preprocess report",
                                description="Every quarantined and skipped file of OUT with its reason, "
                                            "every rejected or unreadable box, then the runs that built OUT "
                                            "(history.json).")
    p.add_argument("out")
    a = p.parse_args(argv)
    for line in report_lines(a.out):
        print(line)
    return 0


def _verify(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.preprocess verify",
                                description="Re-read every shard of OUT against its manifest: counts, tar "
                                            "headers, DALI index, labels, sha256, full JPEG decode, and the "
                                            "box members (the manifest's boxes, inside the stored image).")
    p.add_argument("out")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-decode", action="store_true", help="skip the full decode (sha256 still checked)")
    a = p.parse_args(argv)
    problems = verify(a.out, workers=a.workers, decode=not a.no_decode, progress=True)
    if problems:
        print(f"FAILED: {problems[0]}", file=sys.stderr)
        for q in problems[1:10]:
            print(f"  also: {q}", file=sys.stderr)
        if len(problems) > 10:
            print(f"  ... {len(problems) - 10} more", file=sys.stderr)
        return 1
    splits = read_info(a.out)["splits"]
    checks = "tar headers, DALI index, labels, sha256 of every image and shard" + (
        "" if a.no_decode else ", full JPEG decode") + (
        ", boxes" if any("boxes" in s for s in splits.values()) else "")
    print(f"ok: {sum(len(s['shards']) for s in splits.values())} shards holding "
          f"{sum(s['num_samples'] for s in splits.values()):,} images ({', '.join(splits)}) match their "
          f"manifest: {checks}")
    return 0


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.run(main))
