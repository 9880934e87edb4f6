"""``python -m jobs.bench preprocess``: images/s of ``preprocessing.writer.preprocess`` against the naive
baseline many projects use (webdataset's ``ShardWriter`` fed PIL images: a full decode of every image
and a re-encode by webdataset's JPEG encoder), on the same images, with the same number of processes,
side by side in one run, alternating to share whatever else the machine is doing.

Both figures are from reading the files to the last shard on disk, in worker processes started (and
done importing) beforehand; ours also lists and plans, checks, hashes, indexes, and writes the
manifest, dataset.json and the colour statistics. Each run also reports CPU seconds (workers and
driver): ``cpu_bound_images_per_s`` = workers x images / CPU seconds, the rate on otherwise idle cores,
which other processes on a shared machine disturb far less than the wall clock.
"""
from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

from preprocessing import synthetic
from preprocessing.writer import preprocess, process_shard


def sample(root: Path, images: int, workers: int) -> list[tuple[str, str, int]]:
    """The benchmark images (generated once, then cached): [(path, key, label)]."""
    per_class = math.ceil(images / 10)
    marker = root / ".complete"
    if not marker.exists():
        if root.exists():
            shutil.rmtree(root)
        synthetic.generate(root, classes=10, train_per_class=per_class, val_per_class=0, seed=0,
                           size_range=(300, 640), workers=workers)
        marker.write_text("ok\n")
    classes = sorted(p.name for p in (root / "train").iterdir())
    return [(str(p), p.stem, c) for c, wnid in enumerate(classes)
            for p in sorted((root / "train" / wnid).glob("*.JPEG"))]


def _naive_worker(args) -> tuple[int, float]:
    """One process of the baseline: decode with PIL, let webdataset encode and write.
    Returns (images, CPU seconds)."""
    import webdataset as wds
    from PIL import Image

    cpu = time.process_time()
    rank, files, out, shard_size = args
    with wds.ShardWriter(f"{out}/naive-{rank}-%06d.tar", maxcount=shard_size, verbose=0) as sink:
        for path, key, label in files:
            with Image.open(path) as im:
                sink.write({"__key__": key, "jpg": im.convert("RGB"), "cls": label})
    return len(files), time.process_time() - cpu


def _ours_task(job) -> dict:
    """``process_shard`` plus the CPU seconds it took in its worker."""
    cpu = time.process_time()
    result = process_shard(job)
    return {**result, "cpu_s": time.process_time() - cpu}


def _import(module: str) -> None:
    __import__(module)


def warm_pool(workers: int, module: str):
    """A process pool whose workers have imported ``module`` (webdataset pulls in torch: seconds), so
    neither method is timed starting processes or importing libraries."""
    pool = get_context("spawn").Pool(workers, initializer=_import, initargs=(module,))
    pool.map(_import, [module] * workers)
    return pool


def naive(pool, files, out: Path, workers: int, shard_size: int) -> float:
    """Run the baseline; returns the workers' CPU seconds."""
    per = math.ceil(len(files) / workers)
    jobs = [(r, files[r * per:(r + 1) * per], str(out), shard_size) for r in range(workers)]
    done = pool.map(_naive_worker, jobs)
    assert sum(n for n, _ in done) == len(files)
    return sum(c for _, c in done)


def ours(pool, source: Path, out: Path, workers: int, shard_size: int) -> float:
    """Run preprocessing with the pool as its map_fn; returns the workers' CPU seconds."""
    cpu = []

    def map_fn(fn, jobs):
        for r in pool.imap_unordered(_ours_task, jobs):  # _ours_task is fn (process_shard), timed
            cpu.append(r["cpu_s"])
            yield r

    preprocess(source, out, splits=["train"], shard_size=shard_size, seed=0, workers=workers,
               progress=False, log=lambda s: None, map_fn=map_fn)
    return sum(cpu)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m jobs.bench preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000, help="sample images (>= 5000 for the README figure)")
    p.add_argument("--workers", type=int, default=2, help="processes, for both methods")
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the median is reported")
    p.add_argument("--cache", default=None, help="folder for the generated images (kept between runs)")
    p.add_argument("--out", default=None, help="also save the figures as JSON here")
    a = p.parse_args(argv)
    from jobs.bench.common import Report, ratio  # torch comes with it: import after the pools' module loads
    import torch

    cache = Path(a.cache or Path(tempfile.gettempdir()) / f"vgg-bench-preprocess-{a.images}")
    t = time.perf_counter()
    files = sample(cache, a.images, a.workers)  # ceil(images / 10) per class: both methods take them all
    source = cache
    print(f"# {len(files)} images in {cache} ({time.perf_counter() - t:.0f} s to list or generate); "
          f"mean file {sum(Path(f).stat().st_size for f, _, _ in files) / len(files) / 1e3:.0f} KB")
    report = Report("preprocess", torch.device("cpu"), out=a.out, workers=a.workers, images=len(files),
                    shard_size=a.shard_size)
    rates: dict[str, list[float]] = {"naive": [], "ours": []}
    cpu_rates: dict[str, list[float]] = {"naive": [], "ours": []}  # workers x images / CPU seconds
    work = Path(tempfile.mkdtemp(prefix="vgg-bench-preprocess-out-"))
    pools = {"naive": warm_pool(a.workers, "webdataset"), "ours": warm_pool(a.workers, "jobs.bench.preprocess")}
    try:
        for rep in range(a.repeats):
            for method in ("naive", "ours"):
                out = work / f"{method}-{rep}"
                out.mkdir()
                t, driver = time.perf_counter(), time.process_time()
                run = naive if method == "naive" else ours
                cpu = run(pools[method], source if method == "ours" else files, out, a.workers, a.shard_size)
                seconds = time.perf_counter() - t
                cpu += time.process_time() - driver
                rates[method].append(len(files) / seconds)
                cpu_rates[method].append(a.workers * len(files) / cpu)
                mb = sum(f.stat().st_size for f in out.glob("*.tar")) / 1e6
                report.add(method=method, repeat=rep, seconds=seconds, images_per_s=len(files) / seconds,
                           cpu_ms_per_image=1000 * cpu / len(files),
                           cpu_bound_images_per_s=a.workers * len(files) / cpu, shard_mb=mb)
                shutil.rmtree(out)
    finally:
        for pool in pools.values():
            pool.terminate()
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_rates.items()}
    report.add(method="summary", naive_images_per_s=med["naive"], ours_images_per_s=med["ours"],
               speedup=ratio(med["ours"], med["naive"]), naive_cpu_bound_images_per_s=cpu_med["naive"],
               ours_cpu_bound_images_per_s=cpu_med["ours"],
               cpu_speedup=ratio(cpu_med["ours"], cpu_med["naive"]))
    print(report.table(["method", "repeat", "seconds", "images_per_s", "cpu_ms_per_image",
                        "cpu_bound_images_per_s", "shard_mb", "speedup", "cpu_speedup"]))
    print(f"# wall clock: ours {med['ours']:.0f} images/s, naive {med['naive']:.0f} images/s, "
          f"{ratio(med['ours'], med['naive']):.2f}x (medians of {a.repeats}, {a.workers} processes each)")
    print(f"# CPU-bound (workers x images / CPU seconds, robust to other load on the machine): ours "
          f"{cpu_med['ours']:.0f}, naive {cpu_med['naive']:.0f}, {ratio(cpu_med['ours'], cpu_med['naive']):.2f}x")
