"""DDP scaling on paper: all-reduce time per step, and what bucketing, overlap and bf16 gradients buy.

A pure model, no GPU needed: ring all-reduce moves 2(n-1)/n of the gradient bytes through the
slowest link; DDP launches a bucket's all-reduce when backward has produced all of its gradients
(last layer first) and runs buckets one after another on one communication stream. Backward time is
spread over layers in proportion to their FLOPs. ``python -m jobs.bench scaling`` prints the table
that docs/scaling.md explains. One GPU's step rate is an input: ``--images-per-s``, or by default the
newest figure measured for that net and step variant in the committed benchmarks/results/*.json.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

import model


@dataclass(frozen=True)
class Layer:
    name: str
    params: int
    fwd_flops: float


def vgg_layers(name: str = "D", image_size: int = 224) -> list[Layer]:
    """Parameter count and forward FLOPs of every weight layer, input to output."""
    net = model.build(name, image_size=image_size)
    layers, size = [], image_size
    for i, m in enumerate(net.features):
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0]
            flops = 2 * m.in_channels * m.out_channels * k * k * size * size
            layers.append(Layer(f"features.{i}", sum(p.numel() for p in m.parameters()), flops))
        elif isinstance(m, nn.MaxPool2d):
            size //= 2
    for i, m in enumerate(net.classifier):
        if isinstance(m, nn.Linear):
            layers.append(Layer(f"classifier.{i}", sum(p.numel() for p in m.parameters()),
                                2 * m.in_features * m.out_features))
    return layers


def allreduce_seconds(nbytes: float, n: int, bus_gbytes_per_s: float, latency_s: float = 0.0) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` ranks whose slowest link moves ``bus_gbytes_per_s``."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / (bus_gbytes_per_s * 1e9) + 2 * (n - 1) * latency_s


def step_seconds(layers: list[Layer], compute_s: float, n: int, bus_gbytes_per_s: float,
                 grad_bytes: int = 4, bucket_mib: float = 25.0, overlap: bool = True,
                 bwd_fraction: float = 2 / 3, latency_s: float = 5e-6) -> float:
    """Time of one DDP step: ``compute_s`` is the single-GPU forward+backward time at the per-GPU
    batch. Without overlap, every byte is reduced after backward ends, in one bucket."""
    total_flops = sum(layer.fwd_flops for layer in layers)
    fwd_end = compute_s * (1 - bwd_fraction)
    if not overlap:
        nbytes = sum(layer.params for layer in layers) * grad_bytes
        return compute_s + allreduce_seconds(nbytes, n, bus_gbytes_per_s, latency_s)
    t, comm_free, bucket = fwd_end, 0.0, 0.0
    cap = bucket_mib * 2**20
    for i, layer in enumerate(reversed(layers)):  # backward runs output to input
        t += compute_s * bwd_fraction * layer.fwd_flops / total_flops
        bucket += layer.params * grad_bytes
        if bucket >= cap or i == len(layers) - 1:
            comm_free = max(comm_free, t) + allreduce_seconds(bucket, n, bus_gbytes_per_s, latency_s)
            bucket = 0.0
    return max(t, comm_free)


# (label, GPUs, intra-node bus GB/s, inter-node GB/s per node or None). NCCL reaches about 360 GB/s of
# bus bandwidth between NVLink-4 H100s; a node's inter-node figure is all of its NICs together.
TOPOLOGIES = [("4 GPUs, NVLink (the paper's 4)", 4, 360.0, None), ("8 GPUs, NVLink", 8, 360.0, None)] + [
    (f"{nodes} nodes x 8, {nics}{gbit} Gb/s", nodes * 8, 360.0, gbit / 8 * (8 if nics else 1))
    for nics, gbit in (("", 100), ("", 400), ("8x", 400)) for nodes in (2, 4, 16)
]


def table(images_per_s: float, global_batch: int, name: str = "D") -> list[dict]:
    """Scaling efficiency of the paper's global batch over each topology: per-GPU throughput with n
    GPUs divided by one GPU's, for plain (no overlap), bucketed+overlapped, and bf16 gradients."""
    layers = vgg_layers(name)
    rows = []
    for label, n, intra, inter in TOPOLOGIES:
        per_gpu = global_batch / n
        compute = per_gpu / images_per_s  # optimistic: assumes small per-GPU batches keep full speed
        # Hierarchical NCCL: the inter-node ring is the bottleneck once there is one.
        nodes = n // 8
        bus, ranks = (intra, n) if inter is None else (inter, nodes)
        row = {"topology": label, "gpus": n, "per_gpu_batch": per_gpu, "compute_ms": compute * 1e3,
               "grad_mb_fp32": sum(layer.params for layer in layers) * 4 / 1e6,
               "allreduce_ms_fp32": allreduce_seconds(sum(layer.params for layer in layers) * 4, ranks, bus) * 1e3}
        for key, kwargs in (("no_overlap", dict(overlap=False)), ("overlap", {}),
                            ("overlap_bf16", dict(grad_bytes=2))):
            t = step_seconds(layers, compute, ranks, bus, **kwargs)
            row[f"efficiency_{key}"] = compute / t
        rows.append(row)
    return rows


RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
RATE_VARIANT = "compile+cudnn+fused"     # the step the shard-fed bench (e2e) times as well


def measured_rate(name: str, variant: str = RATE_VARIANT, results: Path = RESULTS) -> tuple[float, str]:
    """(images/s, file) of the newest committed ``jobs.bench train`` figure for net ``name`` and
    ``variant`` in ``results``: the newest by the file's date, then by file name."""
    name = model.canonical_name(name)
    found = []
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        rows = data.get("figures", []) if isinstance(data, dict) else data
        date = data.get("date", "") if isinstance(data, dict) else ""
        found += [(date, path.name, row["images_per_s"]) for row in rows
                  if row.get("bench") == "train" and row.get("model") == name and row.get("variant") == variant]
    if not found:
        raise SystemExit(f"no train-bench figure for net {name}, variant {variant!r} in {results}; "
                         "pass --images-per-s")
    _, file, rate = max(found)
    return rate, file


def main(argv: list[str]) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m jobs.bench scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images-per-s", type=float, default=None,
                   help="one GPU's training-step rate, images/s; default: the newest figure for "
                        f"--model and --variant committed in {RESULTS.parent.name}/{RESULTS.name}/*.json "
                        "(written by jobs/bench/gpu.sh)")
    p.add_argument("--variant", default=RATE_VARIANT,
                   help=f"the train-bench variant whose committed rate is the default (default: {RATE_VARIANT})")
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--model", default="D")
    args = p.parse_args(argv)
    rate = args.images_per_s
    if rate is None:
        rate, file = measured_rate(args.model, args.variant)
        print(f"# one GPU: {rate:.0f} images/s ({args.variant}, {RESULTS.parent.name}/{RESULTS.name}/{file})")
    rows = table(rate, args.global_batch, args.model)
    for r in rows:
        print(json.dumps(r))
    cols = ["topology", "per_gpu_batch", "compute_ms", "allreduce_ms_fp32", "efficiency_no_overlap",
            "efficiency_overlap", "efficiency_overlap_bf16"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return rows


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])
