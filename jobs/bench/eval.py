"""Dense-evaluation images/s on images resident on the device, through ``pipeline.evaluate`` itself.

One image costs the dense net on the whole image rescaled to Q plus its flip (2 forwards), exactly
what ``python -m jobs.evaluate --mode dense`` runs per scale. Variants:

- ``same``: a batch of images of one shape (Q x 4Q/3, ImageNet's usual 4:3), one forward per chunk;
- ``mixed``: every image of the batch a different width (2 px apart), so shape grouping runs them
  one by one:
  the price of evaluating without padding (see docs/evaluation.md);
- ``multicrop`` / ``center``: the other protocols on the same images, for comparison (50 and 2
  forwards of the crop per image).

Decoding is not timed: the DALI loader benchmark measures it (``python -m jobs.bench loader``).
"""
from __future__ import annotations

import argparse

import torch

import model
from jobs.cli import positive
from jobs.bench.common import (Report, add_ratios, peak_memory_gib, pick_variants, reset_peak_memory,
                               time_it)
from pipeline.evaluate import Protocol, posteriors_at_scale

VARIANTS = ("same", "mixed", "multicrop", "center")


def images_for(variant: str, batch: int, q: int, aspect: float, device: torch.device,
               dtype: torch.dtype) -> list[torch.Tensor]:
    w = round(q * aspect)
    # mixed: widths 2 px apart around w (never below Q): no two images share a shape
    widths = [max(q, w + 2 * (i - batch // 2)) if variant == "mixed" else w for i in range(batch)]
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, q, wi, generator=g).to(device, dtype) for wi in widths]


def measure(variant: str, args, device: torch.device, report: Report) -> dict:
    torch.manual_seed(0)
    crop = args.image_size
    net = model.build(args.model, num_classes=args.classes, width=args.width, image_size=crop,
                      init="glorot").to(device).eval()
    amp = torch.bfloat16 if args.amp and device.type == "cuda" else None
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    mode = {"same": "dense", "mixed": "dense"}.get(variant, variant)
    p = Protocol(modes=(mode,), scales=(args.scale,), flip=not args.no_flip, crop=crop,
                 max_batch=args.max_batch, amp_dtype=amp)
    imgs = images_for(variant, args.batch, args.scale, args.aspect, device, torch.float32)
    # Off by default, as in jobs.evaluate: with every image size new, autotuning would run per shape.
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    reset_peak_memory(device)
    seconds = time_it(lambda: posteriors_at_scale([net], imgs, p), device, warmup=args.warmup, iters=args.iters)
    row = report.add(variant=variant, mode=mode, scale=args.scale, image_shape=f"{args.scale}x{round(args.scale * args.aspect)}",
                     shapes=len({tuple(i.shape) for i in imgs}),
                     images_per_s=args.batch / seconds, seconds_per_batch=seconds,
                     peak_mem_gib=peak_memory_gib(device))
    return row


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.bench eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--model", default="D")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (1.0 = the paper)")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=224, help="the training crop (multicrop/center size)")
    p.add_argument("--scale", type=int, default=384, help="test scale Q (the shorter side)")
    p.add_argument("--aspect", type=float, default=4 / 3, help="width / height of the images")
    p.add_argument("--batch", type=int, default=64 if gpu else 4, help="images per call")
    p.add_argument("--max-batch", type=int, default=256 if gpu else 64, help="images or crops per forward pass")
    p.add_argument("--variants", default="same,mixed" if gpu else "same",
                   help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--no-flip", action="store_true", help="skip the flipped image (halves the work)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast on GPU")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=gpu)
    p.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN autotune (per new shape)")
    p.add_argument("--warmup", type=int, default=2 if gpu else 1)
    p.add_argument("--iters", type=positive, default=5 if gpu else 2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--out", default="", help="also write the figures as a JSON list here")
    return p.parse_args(argv)


def main(argv: list[str]) -> list[dict]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = pick_variants(args.variants, VARIANTS)
    report = Report("eval", device, out=args.out, model=args.model, width=args.width, batch=args.batch,
                    flip=not args.no_flip, amp=bool(args.amp and device.type == "cuda"),
                    channels_last=args.channels_last, torch=torch.__version__)
    rows = {n: measure(n, args, device, report) for n in names}
    add_ratios(rows, "same", "vs_same")
    print(report.table(["variant", "mode", "image_shape", "images_per_s", "vs_same", "peak_mem_gib"]))
    report.save(args.out)   # again: add_ratios filled in vs_same after the rows were saved
    return report.rows


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
