"""The training step fed from shards by DALI vs the same step on a batch resident on the device.

Both run in one process on one compiled model, so their ratio (the goal: >= 0.97) measures only what
feeding costs. Data wait is the host time spent blocked on the loader, over the fed run's wall time;
on a GPU a host that runs ahead of the GPU also waits there, so a high figure alone does not say the
data is late. A third row waits for the GPU after every step, as any host-GPU sync per step would
(reading a loss, copying labels from pageable memory): its ratio is what such a sync costs.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

import model
from jobs.cli import positive
from jobs.bench.common import (Report, forever, peak_memory_gib, ratio, reset_peak_memory, sync,
                               time_it)
from jobs.bench.loader import make_sample
from jobs.bench.train import VARIANTS, forward_flops, matmul_tflops
from pipeline.config import DataConfig
from pipeline.loader import TrainLoader
from pipeline.step import prepare, sgd, train_step


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.bench e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="preprocessed dataset (default: a synthetic one made in --work)")
    p.add_argument("--work", help="where the synthetic sample goes (default: a temporary folder)")
    p.add_argument("--model", default="D")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--scale-min", type=int, default=256)
    p.add_argument("--scale-max", type=int, default=512)
    p.add_argument("--variant", default="compile", help=f"step variant, one of {', '.join(VARIANTS)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--decode", choices=("mixed", "cpu"), default=None, help="default: mixed on a GPU")
    p.add_argument("--hw-decoder-load", type=float, default=1.0,
                   help="share of JPEGs sent to the GPU's hardware JPEG decoder (mixed decode)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prefetch", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=positive, default=30)
    p.add_argument("--classes", type=int, default=10, help="synthetic sample: classes")
    p.add_argument("--per-class", type=int, default=100, help="synthetic sample: train images per class")
    p.add_argument("--size", default="300,500", help="synthetic sample: min,max image side (px)")
    p.add_argument("--out", help="also save the figures as JSON here")
    return p.parse_args(argv)


def loader_config(args, opts, on_gpu: bool) -> DataConfig:
    """The DALI pipeline's config: ``--root``, or a synthetic sample made in ``--work``; the batch's
    layout and dtype are the ones the step variant wants."""
    if args.root:
        root = Path(args.root)
    else:
        work = Path(args.work or tempfile.mkdtemp(prefix="bench-e2e-"))
        lo, hi = (int(v) for v in args.size.split(","))
        root = make_sample(work, args.classes, args.per_class, (lo, hi))[1]
    return DataConfig(root=str(root), crop_size=args.crop, scale_min=args.scale_min, scale_max=args.scale_max,
                      decode=args.decode or ("mixed" if on_gpu else "cpu"), hw_decoder_load=args.hw_decoder_load,
                      threads=args.threads, prefetch=args.prefetch,
                      layout="NHWC" if opts.channels_last else "NCHW",
                      dtype="bfloat16" if opts.amp_dtype == torch.bfloat16 else "float32")


def time_feeds(call, opt, opts, feed: Iterator, device: torch.device, warmup: int,
               steps: int) -> list[tuple[str, float, float]]:
    """(feed, seconds per step, share of the wall time the host spent blocked on the loader) of the
    step on a resident batch, fed from ``feed``, and fed with a wait for the GPU after every step."""
    first = next(feed)
    resident_x, resident_y = first.images.clone(), first.labels.clone()

    def resident():
        train_step(call, opt, resident_x, resident_y, opts.amp_dtype)

    waited = 0.0                       # host seconds blocked on the loader

    def fed_step(wait_for_gpu: bool) -> None:
        nonlocal waited
        t = time.perf_counter()
        batch = next(feed)
        waited += time.perf_counter() - t
        train_step(call, opt, batch.images, batch.labels, opts.amp_dtype)
        if wait_for_gpu:
            sync(device)

    def fed(wait_for_gpu: bool) -> tuple[float, float]:
        nonlocal waited
        for _ in range(warmup):        # here, not time_it's warmup: the wait is counted after it
            fed_step(wait_for_gpu)
        waited = 0.0
        seconds = time_it(lambda: fed_step(wait_for_gpu), device, warmup=0, iters=steps)
        return seconds, waited / (seconds * steps)

    # the last row shows what one host-GPU sync per step (e.g. copying labels from pageable memory)
    # costs: the host can no longer queue the next step while the GPU runs this one
    return [("resident", time_it(resident, device, warmup, steps), 0.0),
            ("shard-fed", *fed(False)), ("shard-fed+host-sync", *fed(True))]


def main(argv: list[str]) -> list[dict]:
    args = parse(argv)
    device = torch.device(args.device)
    opts, fused = VARIANTS[args.variant]
    on_gpu = device.type == "cuda"
    cfg = loader_config(args, opts, on_gpu)
    loader = TrainLoader(cfg, args.batch, 0, 1, device_id=(device.index or 0) if on_gpu else None)
    classes = 1000
    net = model.build(args.model, num_classes=classes, width=args.width, image_size=args.crop,
                      init="glorot").to(device)
    call, opt = prepare(net, opts), sgd(net, lr=1e-3, fused=fused and on_gpu)
    flops = forward_flops(model.build(args.model, num_classes=classes, width=args.width,
                                      image_size=args.crop), args.crop)
    peak = matmul_tflops(device)
    report = Report("e2e", device, out=args.out, model=args.model, batch=args.batch, variant=args.variant,
                    decode=cfg.decode, hw_decoder_load=cfg.hw_decoder_load, threads=args.threads, prefetch=args.prefetch,
                    scale=[args.scale_min, args.scale_max], matmul_peak_tflops=peak)
    reset_peak_memory(device)
    rows = []
    for name, t, wait in time_feeds(call, opt, opts, forever(loader), device, args.warmup, args.steps):
        ips = args.batch / t
        rows.append(report.add(feed=name, images_per_s=ips, tflops=3 * flops * ips / 1e12,
                               peak_fraction=ratio(3 * flops * ips / 1e12, peak), data_wait_fraction=wait,
                               peak_mem_gib=peak_memory_gib(device)))
    report.add(feed="ratio", fed_over_resident=ratio(rows[1]["images_per_s"], rows[0]["images_per_s"]),
               synced_over_resident=ratio(rows[2]["images_per_s"], rows[0]["images_per_s"]))
    print(report.table(["feed", "images_per_s", "tflops", "peak_fraction", "data_wait_fraction",
                        "fed_over_resident", "synced_over_resident"]))
    return report.rows


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
