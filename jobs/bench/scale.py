"""``python -m jobs.bench scale --images N``: every control-plane stage of the project timed at N
images, with its peak RSS, to see what happens at ImageNet's size (1,281,167 train images).

Each stage runs as a user runs it, in a child process (``jobs.bench.scale_child``): the entry point
itself (``python -m jobs.preprocess SOURCE OUT --workers 2``, ``jobs.preprocess verify`` / ``report``,
``jobs.train --dry-run``), or for a stage without one the library call a rank or driver makes. Each
stage's figures: wall seconds, CPU seconds (the process and everything it waited for), the driver's
peak RSS and, where it has worker processes, theirs apart. The stages, in the order they run:

  generate            the ILSVRC-shaped SOURCE tree (recorded, not a goal; found complete: seconds)
  preprocess          jobs.preprocess into a fresh OUT: images per CPU-second, wall, driver RSS
  verify, report      jobs.preprocess verify OUT (full decode) and report OUT
  rerun               jobs.preprocess again with nothing new
  dry_run_cold/_warm  jobs.train --dry-run: the node's first (every shard hashed) and a later one
  index               the DALI index check of both splits (jobs.bench.index), cold and warm
  loader_*            rank 0 and 1 (two processes) start a loader and take its first batch on DALI's
                      CPU: train, val, and each with boxes
  gather              the evaluation's exactly-once check over the val keys (no forward pass)
  merge               protocol (b)'s merging (jobs.bench.merge), skipped with its reason if absent
  mlflow              the dataset logged as a training run's input, to a local mlflow server
  rerun_added         jobs.preprocess after 1 % new train images and one new class (then SOURCE restored)

The result goes to benchmarks/results/scale-<machine>-<date>-<N>.json, saved after every stage, with
the load average at the start and end (the machine may be shared: CPU seconds are the steadier
figure). ``--summary FILES...`` prints a table of several such files (stage x N) with each stage's
growth exponent between the two largest N and every goal met or missed (jobs/bench/scale_summary.py).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from jobs.bench import scale_stages, scale_summary
from jobs.cli import UsageError, positive
from storage.files import atomic_write

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
NEEDS_OUT = set(scale_stages.STAGES) - {"generate", "preprocess", "merge"}


def machine() -> dict:
    """CPU model and cores of this machine, and the short name used in result file names."""
    try:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
    except OSError:            # no /proc (not Linux): the platform's own name for the CPU
        names = []
    model = names[0] if names else platform.processor() or platform.machine()
    cores = os.cpu_count() or 1
    return {"name": f"cpu-{cores}core", "cpu": model, "cores": cores, "python": platform.python_version()}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.bench scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=positive, help="train images in SOURCE (ImageNet: 1281167)")
    p.add_argument("--work", help="folder for OUT, logs and caches, kept (default: a temporary one, removed)")
    p.add_argument("--source", help="SOURCE tree (default: WORK/source); written when missing, "
                                    "reused when complete")
    p.add_argument("--out", help="result JSON (default: benchmarks/results/scale-<machine>-<date>-<N>.json)")
    p.add_argument("--stages", help=f"comma-separated subset, run in the usual order: {', '.join(scale_stages.STAGES)}")
    p.add_argument("--workers", type=positive, default=2, help="preprocessing/verify processes (default 2)")
    p.add_argument("--seed", type=int, default=0, help="the SOURCE's and the shuffle's seed")
    p.add_argument("--merge-images", type=positive, default=128,
                   help="synthetic images the merge stage times (jobs.bench.merge; at most the val size; default 128)")
    p.add_argument("--profile", default="", metavar="STAGES",
                   help="run these stages' drivers under cProfile (WORK/logs/<stage>.prof; their times inflate)")
    p.add_argument("--summary", nargs="+", metavar="FILE", help="print the table of these result files instead")
    a = p.parse_args(argv)
    if not a.summary and a.images is None:
        raise UsageError("--images N is required (or --summary FILES...)")
    a.stages, a.profile = chosen(a.stages), chosen(a.profile) if a.profile else []
    return a


def chosen(text: str | None) -> list[str]:
    """The stages named in ``text`` (all when empty), in the order they run."""
    names = [s for s in (text or "").split(",") if s] or list(scale_stages.STAGES)
    unknown = [s for s in names if s not in scale_stages.STAGES]
    if unknown:
        raise UsageError(f"--stages/--profile: unknown {', '.join(unknown)}; the stages are {', '.join(scale_stages.STAGES)}")
    return [s for s in scale_stages.STAGES if s in names]


def save(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps(doc, indent=1) + "\n").encode())


def run_stages(ctx: scale_stages.Ctx, names: list[str], doc: dict, out: Path) -> None:
    """Each stage in turn, its figures (or its skip reason) saved as soon as it ends."""
    for name in names:
        load = os.getloadavg()[0]
        if name in NEEDS_OUT and not (ctx.out / "dataset.json").is_file():
            fig = {"skipped": f"no dataset in {ctx.out} (the preprocess stage did not run or failed)"}
        else:
            try:
                fig = scale_stages.STAGES[name](ctx)
            except Exception as e:          # a stage's failure is a figure too; the others still run
                fig = {"error": f"{type(e).__name__}: {e}"}
        doc["stages"][name] = {**fig, "load_1m_at_start": load}
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in fig.items() if k != "ranks"}
        print(f"{name}: {json.dumps(shown)}", flush=True)
        save(out, doc)


def bench(a: argparse.Namespace) -> tuple[dict, Path]:
    m = machine()
    today = dt.datetime.now(dt.timezone.utc)
    out = Path(a.out or RESULTS / f"scale-{m['name']}-{today:%Y-%m-%d}-{a.images}.json")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    source = Path(a.source) if a.source else work / "source"
    ctx = scale_stages.Ctx(work=work, source=source, images=a.images, seed=a.seed, workers=a.workers,
                           merge_images=a.merge_images, profile=tuple(a.profile))
    from jobs.tracking import git_commit

    doc = {"bench": "scale", "images": a.images, "machine": m, "started_utc": today.isoformat(timespec="seconds"),
           "git_commit": git_commit(scale_stages.REPO), "load_avg_start": list(os.getloadavg()),
           "source": str(source), "work": str(work), "profiled": list(ctx.profile), "stages": {}}
    t0 = time.perf_counter()
    try:
        run_stages(ctx, a.stages, doc, out)
    finally:
        doc.update(load_avg_end=list(os.getloadavg()), total_s=time.perf_counter() - t0,
                   # every child's ru_maxrss starts from this (Linux carries it over fork and exec)
                   bench_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6)
        doc["goals"] = scale_summary.goals_at(doc)
        save(out, doc)
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    return doc, out


def main(argv: list[str]) -> dict:
    a = parse(argv)
    if a.summary:
        missing = [f for f in a.summary if not Path(f).is_file()]
        if missing:
            raise UsageError(f"--summary: no such file {missing[0]}")
        summary = scale_summary.summarize(a.summary)
        print(scale_summary.table(summary))
        return summary
    doc, out = bench(a)
    print(scale_summary.table(scale_summary.summarize([str(out)])))
    print(f"# {out}")
    return doc


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.run(main, sys.argv[1:]))
