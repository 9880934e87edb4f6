"""The training step on a batch resident on the device, one figure per variant, in one process.

Reports images/s, achieved TFLOP/s (3x the forward FLOPs, torch's FlopCounterMode), the fraction of
the device's bf16 matmul rate measured in the same run, and peak memory. Each variant's ratio to a reference
variant (default: plain ``torch.compile``, ``compile``) is printed so that "faster" is always measured side by side.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import model
from jobs.cli import positive
from jobs.bench.common import (Report, add_ratios, peak_memory_gib, pick_variants, ratio,
                                reset_peak_memory, sync, time_it)
from pipeline.step import StepOptions, prepare, sgd, train_step
from storage.files import atomic_write

# name -> (step options, fused SGD). "compile" is the reference the goal is measured against.
VARIANTS = {
    "fp32": (StepOptions(), False),
    "tf32": (StepOptions(tf32=True), False),
    "bf16-nchw": (StepOptions(amp_dtype=torch.bfloat16), False),
    "bf16-cl": (StepOptions(amp_dtype=torch.bfloat16, channels_last=True), False),
    "compile": (StepOptions(amp_dtype=torch.bfloat16, channels_last=True, compile="default"), False),
    "compile+cudnn": (StepOptions(amp_dtype=torch.bfloat16, channels_last=True, compile="default",
                                  cudnn_benchmark=True), False),
    "compile+cudnn+fused": (StepOptions(amp_dtype=torch.bfloat16, channels_last=True, compile="default",
                                        cudnn_benchmark=True), True),
    "graphs+cudnn+fused": (StepOptions(amp_dtype=torch.bfloat16, channels_last=True,
                                       compile="reduce-overhead", cudnn_benchmark=True), True),
    # conv + bias + ReLU as one cuDNN call (model/fused.py)
    "bf16-cl+convrelu": (StepOptions(amp_dtype=torch.bfloat16, channels_last=True, fuse_conv_relu=True), False),
    "compile+cudnn+fused+convrelu": (StepOptions(amp_dtype=torch.bfloat16, channels_last=True, compile="default",
                                                 cudnn_benchmark=True, fuse_conv_relu=True), True),
    "graphs+cudnn+fused+convrelu": (StepOptions(amp_dtype=torch.bfloat16, channels_last=True,
                                                compile="reduce-overhead", cudnn_benchmark=True,
                                                fuse_conv_relu=True), True),
}


def forward_flops(net: torch.nn.Module, image_size: int) -> int:
    """FLOPs (2 per multiply-add) of one image's forward pass."""
    probe = copy.deepcopy(net).float().cpu()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        probe(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops()


def matmul_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """The bf16 matrix rate this device reaches right now: the ceiling for 'fraction of peak'."""
    if device.type != "cuda":
        return 0.0
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = time_it(lambda: a @ b, device, warmup=3, iters=iters)
    return 2 * n**3 / seconds / 1e12


KINDS = ("conv", "gemm", "generated", "other")


def kernel_kind(name: str) -> str:
    """Which kind of work a kernel (or, on a CPU, an aten op) does, from its name: cuDNN convolution,
    cuBLAS/CUTLASS matrix multiply, Inductor-generated (elementwise, reductions, pooling), other.
    A heuristic on kernel names: the JSON that ``--profile`` writes lists the names it judged."""
    n = name.lower()
    if n.startswith(("triton", "cpp_fused")):   # first: Inductor names them after the ops they fuse,
        return "generated"                       # e.g. triton_poi_fused_convolution_relu_3 (bias + ReLU)
    if any(w in n for w in ("conv", "cudnn", "implicit_gemm", "fprop", "dgrad", "wgrad")):
        return "conv"
    if any(w in n for w in ("gemm", "cutlass", "cublas", "nvjet", "addmm")) or n.startswith("aten::mm"):
        return "gemm"
    return "other"


def time_shares(times: dict[str, float]) -> dict[str, float | None]:
    """{kernel name: self time} -> share of the total per kind (None when nothing was timed)."""
    total = sum(times.values())
    shares = dict.fromkeys(KINDS, 0.0)
    for name, t in times.items():
        shares[kernel_kind(name)] += t
    return {f"time_share_{k}": (v / total if total else None) for k, v in shares.items()}


def profile_step(step, device: torch.device, path: Path, steps: int = 3) -> dict[str, float | None]:
    """Run ``step`` under torch.profiler; write the 40 costliest kernels (aten ops on a CPU) to
    ``path`` and return the time shares by kind."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = prof.key_averages()
    if gpu:   # the kernels themselves, not the CPU ops that launched them
        times = {e.key: e.self_device_time_total for e in events if e.device_type != DeviceType.CPU}
    else:
        times = {e.key: e.self_cpu_time_total for e in events}
    top = sorted(times.items(), key=lambda kv: -kv[1])[:40]
    total = sum(times.values()) or 1.0
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps({"steps": steps, "total_us": total, "top": [
        {"name": k, "us_per_step": v / steps, "share": v / total, "kind": kernel_kind(k)} for k, v in top]},
        indent=1) + "\n").encode())
    return time_shares(times)


def measure(name: str, args, device: torch.device, flops_per_image: int, peak: float, report: Report):
    opts, fused = VARIANTS[name]
    torch.manual_seed(0)
    net = model.build(args.model, num_classes=args.classes, width=args.width, image_size=args.image_size,
                      init="glorot").to(device)
    call = prepare(net, opts)
    opt = sgd(net, lr=1e-3, fused=fused and device.type == "cuda")
    fmt = torch.channels_last if opts.channels_last else torch.contiguous_format
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    reset_peak_memory(device)
    def step():
        train_step(call, opt, images, labels, opts.amp_dtype)

    seconds = time_it(step, device, warmup=args.warmup, iters=args.iters)
    ips = args.batch / seconds
    tflops = 3 * flops_per_image * ips / 1e12
    shares = profile_step(step, device, Path(args.profile) / f"{name}.json") if args.profile else {}
    row = report.add(variant=name, images_per_s=ips, tflops=tflops, peak_fraction=ratio(tflops, peak),
                     peak_mem_gib=peak_memory_gib(device), **shares)
    return row


def free(device: torch.device) -> None:
    """Give the last variant's memory back, so the next one starts from the same state."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="D")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--variants", default="bf16-nchw,bf16-cl,compile,compile+cudnn+fused,graphs+cudnn+fused",
                   help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--reference", default="compile", help="the variant every ratio is taken against")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=positive, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="", help="also write the figures as a JSON list here")
    p.add_argument("--profile", default="", metavar="DIR",
                   help="after timing, profile 3 more steps of each variant: DIR/<variant>.json lists the "
                        "costliest kernels, and the rows get each kind's share of the time")
    return p.parse_args(argv)


def main(argv: list[str]) -> list[dict]:
    args = parse(argv)
    device = torch.device(args.device)
    names = pick_variants(args.variants, VARIANTS)
    flops = forward_flops(model.build(args.model, num_classes=args.classes, width=args.width,
                                      image_size=args.image_size), args.image_size)
    peak = matmul_tflops(device)
    report = Report("train", device, out=args.out, model=args.model, batch=args.batch, image_size=args.image_size,
                    width=args.width, gflops_per_image_fwd=flops / 1e9, matmul_peak_tflops=peak)
    rows = {}
    for n in names:
        rows[n] = measure(n, args, device, flops, peak, report)
        free(device)
    add_ratios(rows, args.reference, "vs_reference")
    for r in rows.values():
        r["reference"] = args.reference
    print(report.table(["variant", "images_per_s", "tflops", "peak_fraction", "vs_reference", "peak_mem_gib",
                        *(f"time_share_{k}" for k in KINDS)]))
    report.save(args.out)   # again: the ratios were filled in after the rows were saved
    return report.rows


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
