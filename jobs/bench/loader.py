"""Training-pipeline throughput: the DALI pipeline from shards vs torchvision ImageFolder + DataLoader.

Both do the paper's augmentation on the same images (the shards were written from the ImageFolder
source): shorter side rescaled to S ~ U[Smin, Smax], a random crop, a random flip, the PCA colour
shift and the mean subtraction from dataset.json, fp32 output on the device. One JSON line per figure
(images/s of each, then their ratio), with the device name. Images per CPU-second (this process's
threads plus the DataLoader's worker processes) are reported too: on a machine other jobs share, wall
time is noise, CPU time much less so.

Without ``--root`` a synthetic ILSVRC-shaped sample is generated and preprocessed into ``--work``
(ImageNet-sized JPEGs by default). On a GPU: ``--device 0 --decode mixed --threads 16``.

``--checksum`` times the shard sha256 check (``storage.dataset.check_shards``) in the same run: once
on a cold node cache (every shard hashed) and once warm (the cache read), then the loader without the
check and with it side by side, in ``--rounds`` alternating rounds so that load from other jobs falls
on both alike; the ratio row has their images/s ratio and the cold check as a share of one epoch.
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from jobs.cli import positive
from jobs.bench.common import Report, forever, ratio, sync


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.bench loader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="preprocessed dataset folder (default: make a synthetic one in --work)")
    p.add_argument("--source", help="its ImageFolder source (class folders of JPEGs) for the baseline; "
                                    "default: <work>/source/train when the sample is generated here")
    p.add_argument("--work", help="where the synthetic sample goes (default: a temporary folder)")
    p.add_argument("--device", default="cpu", help="CUDA device index, or cpu (DALI's CPU-only mode)")
    p.add_argument("--decode", choices=("mixed", "cpu"), default=None,
                   help="JPEG decoding on the GPU (mixed) or CPU; default mixed on a GPU")
    p.add_argument("--hw-decoder-load", type=float, default=1.0,
                   help="share of JPEGs sent to the GPU's hardware JPEG decoder (mixed decode)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="DALI CPU threads")
    p.add_argument("--prefetch", type=int, default=2, help="DALI prefetch queue depth")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: --threads)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=positive, default=20, help="timed batches per pipeline")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--scale-min", type=int, default=256)
    p.add_argument("--scale-max", type=int, default=512)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--layout", choices=("NCHW", "NHWC"), default="NCHW")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--checksum", action="store_true",
                   help="also time the shard sha256 check: cold, warm, and the loader with/without it")
    p.add_argument("--rounds", type=positive, default=3, help="--checksum: alternating timed rounds")
    p.add_argument("--classes", type=int, default=10, help="synthetic sample: classes")
    p.add_argument("--per-class", type=int, default=40, help="synthetic sample: train images per class")
    p.add_argument("--size", default="300,500", help="synthetic sample: min,max image side (px)")
    p.add_argument("--out", help="also save the figures as JSON here")
    return p.parse_args(argv)


def make_sample(work: Path, classes: int, per_class: int, size: tuple[int, int]) -> tuple[Path, Path]:
    """Synthetic source + its shards (reused when already there)."""
    from preprocessing import synthetic, writer

    source, root = work / "source", work / "shards"
    if not (root / "dataset.json").is_file():
        synthetic.generate(source, classes=classes, train_per_class=per_class, val_per_class=1,
                           seed=0, size_range=size, workers=os.cpu_count() or 1)
        writer.preprocess(source, root, shard_size=256, seed=0)
    return source, root


def cpu_seconds(pids=()) -> float:
    """CPU seconds (user + system) used so far by this process (all threads) and processes ``pids``:
    images per CPU-second stays meaningful on a machine other jobs share, where wall time does not."""
    total, tick = time.process_time(), os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15)
        except (OSError, IndexError, ValueError):
            return float("nan")
    return total


def dali_loader(args, root: Path, device: torch.device, check: bool = True):
    from pipeline.config import DataConfig
    from pipeline.loader import TrainLoader

    cfg = DataConfig(root=str(root), crop_size=args.crop, scale_min=args.scale_min, scale_max=args.scale_max,
                     decode=args.decode, hw_decoder_load=args.hw_decoder_load, threads=args.threads,
                     prefetch=args.prefetch, layout=args.layout, dtype=args.dtype)
    return TrainLoader(cfg, args.batch_size, 0, 1, device_id=device.index if device.type == "cuda" else None,
                       check=check)


def warm(loader, warmup: int):
    """An endless batch iterator over ``loader``, ``warmup`` batches in."""
    it = forever(loader)
    for _ in range(warmup):
        next(it)
    return it


def time_steps(it, steps: int, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of ``steps`` batches."""
    sync(device)
    start, cpu = time.perf_counter(), cpu_seconds()
    for _ in range(steps):
        batch = next(it)
    batch.images.float().sum().item()  # the last batch really exists (a sync point)
    sync(device)
    return time.perf_counter() - start, cpu_seconds() - cpu


def bench_dali(args, root: Path, device: torch.device) -> tuple[float, float, int]:
    loader = dali_loader(args, root, device)
    wall, cpu = time_steps(warm(loader, args.warmup), args.steps, device)
    n = args.steps * args.batch_size
    return n / wall, n / cpu, len(loader)


def bench_checksum(args, root: Path, device: torch.device, report: Report) -> tuple[float, float, int]:
    """The check cold and warm, then the loader without and with it in alternating rounds."""
    from storage.shard_check import CACHE_ENV

    cache = Path(tempfile.mkdtemp(prefix="bench-shard-cache-")) / "shards.json"
    saved, os.environ[CACHE_ENV] = os.environ.get(CACHE_ENV), str(cache)
    try:                                             # cold at first, and never the user's own cache
        return _checksum_rounds(args, root, device, report)
    finally:
        os.environ.pop(CACHE_ENV)
        if saved is not None:
            os.environ[CACHE_ENV] = saved


def _checksum_rounds(args, root: Path, device: torch.device, report: Report) -> tuple[float, float, int]:
    from storage import dataset
    from storage.shard_check import SHARDS_SHA256

    ds = dataset.open_dataset(root)
    split = ds.split("train", check=False)
    if SHARDS_SHA256 not in ds.info["splits"]["train"]:
        raise SystemExit(f"--checksum: {root}/dataset.json records no {SHARDS_SHA256}; "
                         "preprocess the dataset again to record them")
    spans = []
    for _ in range(2):                               # cold: every shard hashed; warm: the cache read
        start = time.perf_counter()
        ds.check_shards("train")
        spans.append(time.perf_counter() - start)
    totals, round_ratios, steps = alternate(args, root, device)
    n = args.rounds * args.steps * args.batch_size
    rate = {name: (n / wall, n / cpu) for name, (wall, cpu) in totals.items()}
    size = sum(os.path.getsize(s) for s in split.shards)
    epoch_s = steps * args.batch_size / rate["dali"][0]
    common = dict(decode=args.decode, threads=args.threads, steps_per_epoch=steps, rounds=args.rounds)
    report.add(pipeline="dali", **common, images_per_s=rate["dali"][0], images_per_cpu_s=rate["dali"][1],
               epoch_s=epoch_s)
    report.add(pipeline="dali+checksum", **common, images_per_s=rate["dali+checksum"][0],
               images_per_cpu_s=rate["dali+checksum"][1], shards=len(split.shards), shard_bytes=size,
               check_cold_s=spans[0], check_warm_s=spans[1], hash_mb_per_s=size / spans[0] / 1e6)
    report.add(pipeline="ratio", checksum_over_plain=ratio(rate["dali+checksum"][0], rate["dali"][0]),
               checksum_over_plain_by_round=[r[0] for r in round_ratios],
               checksum_over_plain_per_cpu_s=ratio(rate["dali+checksum"][1], rate["dali"][1]),
               checksum_over_plain_per_cpu_s_by_round=[r[1] for r in round_ratios],
               cold_check_over_epoch=spans[0] / epoch_s, warm_check_over_epoch=spans[1] / epoch_s)
    return rate["dali"][0], rate["dali"][1], steps


def alternate(args, root: Path, device: torch.device) -> tuple[dict, list[list[float]], int]:
    """{variant: [wall s, CPU s]} and each round's [wall, CPU] rate ratio (checked over plain: the
    inverse of the time ratio) over ``args.rounds`` rounds, each timing a fresh loader without the
    check and one with it, in turns (ABBA) so that drift in the machine's load falls on both alike.
    One loader at a time: a second one alive would refill its prefetch queue on the timed one's CPUs
    (and in its CPU seconds, which count every thread of the process)."""
    totals, by_round, steps = {"dali": [0.0, 0.0], "dali+checksum": [0.0, 0.0]}, [], 0
    for r in range(args.rounds):
        spans = {}
        for name in (("dali", "dali+checksum") if r % 2 == 0 else ("dali+checksum", "dali")):
            loader = dali_loader(args, root, device, check=name == "dali+checksum")
            spans[name] = time_steps(warm(loader, args.warmup), args.steps, device)
            steps = len(loader)
            del loader                                # its DALI threads end before the next is built
            totals[name] = [t + x for t, x in zip(totals[name], spans[name])]
        by_round.append([round(spans["dali"][i] / spans["dali+checksum"][i], 4) for i in (0, 1)])
    return totals, by_round, steps


class PaperTrainTransform:
    """The same augmentation in PIL/torch: PIL image -> (3, crop, crop) float32, mean-subtracted."""

    def __init__(self, crop: int, smin: int, smax: int, pca: torch.Tensor, mean: torch.Tensor):
        self.crop, self.smin, self.smax, self.pca, self.mean = crop, smin, smax, pca, mean

    def __call__(self, img):
        import torchvision.transforms.functional as TF

        img = TF.resize(img.convert("RGB"), random.randint(self.smin, self.smax),
                        interpolation=TF.InterpolationMode.BILINEAR, antialias=True)  # shorter side = S
        w, h = img.size
        top, left = random.randint(0, h - self.crop), random.randint(0, w - self.crop)
        img = TF.crop(img, top, left, self.crop, self.crop)
        if random.random() < 0.5:
            img = TF.hflip(img)
        x = TF.pil_to_tensor(img).float()
        shift = self.pca @ torch.randn(3)
        return x + (shift - self.mean)[:, None, None]


def bench_torchvision(args, source: Path, root: Path, device: torch.device) -> float:
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from pipeline import augment
    from storage.dataset import load_stats

    stats = load_stats(root)
    tf = PaperTrainTransform(args.crop, args.scale_min, args.scale_max,
                             torch.as_tensor(augment.pca_matrix(stats, 0.1), dtype=torch.float32),
                             torch.as_tensor(augment.mean_rgb(stats, True)))
    workers = args.workers if args.workers is not None else args.threads
    data = DataLoader(ImageFolder(str(source), transform=tf), batch_size=args.batch_size, shuffle=True,
                      num_workers=workers, pin_memory=device.type == "cuda", drop_last=True,
                      persistent_workers=workers > 0)
    if len(data) == 0:
        raise SystemExit(f"{source}: fewer images than one batch of {args.batch_size}")

    def batches():
        while True:
            for images, labels in data:
                yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    it = batches()
    for _ in range(args.warmup):
        next(it)
    workers = [w.pid for w in getattr(data._iterator, "_workers", [])]  # persistent DataLoader workers
    sync(device)
    start, cpu = time.perf_counter(), cpu_seconds(workers)
    for _ in range(args.steps):
        images, _ = next(it)
    images.sum().item()
    sync(device)
    n = args.steps * args.batch_size
    return n / (time.perf_counter() - start), n / (cpu_seconds(workers) - cpu)


def main(argv: list[str]) -> None:
    args = parse(argv)
    device = torch.device("cpu") if args.device in ("cpu", "none") else torch.device("cuda", int(args.device))
    args.decode = args.decode or ("mixed" if device.type == "cuda" else "cpu")
    lo, hi = (int(v) for v in args.size.split(","))
    tmp = None
    if args.root:
        root, source = Path(args.root), Path(args.source) if args.source else None
    else:
        work = Path(args.work) if args.work else Path(tmp := tempfile.mkdtemp(prefix="bench-loader-"))
        source, root = make_sample(work, args.classes, args.per_class, (lo, hi))
        source = Path(args.source) if args.source else source / "train"
    report = Report("loader", device, out=args.out, batch_size=args.batch_size, crop=args.crop,
                    scale=[args.scale_min, args.scale_max], dtype=args.dtype, layout=args.layout)
    if args.checksum:
        dali, dali_cpu, steps = bench_checksum(args, root, device, report)
    else:
        dali, dali_cpu, steps = bench_dali(args, root, device)
        report.add(pipeline="dali", decode=args.decode, hw_decoder_load=args.hw_decoder_load,
                   threads=args.threads, steps_per_epoch=steps, images_per_s=dali, images_per_cpu_s=dali_cpu)
    if args.skip_baseline or source is None:
        if source is None:
            print("# no --source: the torchvision baseline needs the ImageFolder the shards came from")
    else:
        tv, tv_cpu = bench_torchvision(args, source, root, device)
        report.add(pipeline="torchvision", workers=args.workers if args.workers is not None else args.threads,
                   images_per_s=tv, images_per_cpu_s=tv_cpu)
        report.add(pipeline="ratio", dali_over_torchvision=ratio(dali, tv),
                   dali_over_torchvision_per_cpu_s=ratio(dali_cpu, tv_cpu))
    print(report.table(["pipeline", "decode", "threads", "workers", "images_per_s", "images_per_cpu_s",
                        "check_cold_s", "check_warm_s", "checksum_over_plain", "checksum_over_plain_per_cpu_s",
                        "cold_check_over_epoch", "dali_over_torchvision", "dali_over_torchvision_per_cpu_s"]))
    if tmp:
        print(f"# sample kept in {tmp} (pass --work {tmp} to reuse it)")
