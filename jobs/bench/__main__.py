"""``python -m jobs.bench <name> [options]``: dispatch to ``jobs.bench.<name>.main(argv)``."""
import importlib
import sys

from jobs.cli import UsageError

BENCHES = {
    "train": "the training step on a batch resident on the device, variant by variant",
    "loader": "the DALI training pipeline from shards vs a torchvision ImageFolder + DataLoader baseline",
    "e2e": "the training step on a resident batch and fed from shards, side by side",
    "preprocess": "preprocessing images/s vs the naive webdataset ShardWriter + PIL re-encode baseline",
    "eval": "dense-evaluation images/s",
    "scaling": "DDP all-reduce time and scaling efficiency on paper (no GPU needed)",
    "schedule": "the plateau rule's decay epochs on simulated noisy and creeping val curves (no GPU)",
    "index": "the DALI index check (every entry against its tar header) at ImageNet's size, cold and warm "
             "(--mode boxed: the boxed index cache)",
    "scale": "every control-plane stage (preprocess ... MLflow) timed at N images, with its peak RSS",
    "merge": "protocol (b)'s greedy box merging, the loop against the vectorised one, on the same boxes",
    "resize": "what a resize costs at ImageNet's size: the epoch's keys in a checkpoint, one rank's plan of the rest",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        lines = "\n".join(f"  {k:<11} {v}" for k, v in BENCHES.items())
        print(f"usage: python -m jobs.bench <name> [--help | options]\n\nbenchmarks:\n{lines}")
        return 0
    if argv[0] not in BENCHES:
        raise UsageError(f"unknown benchmark {argv[0]!r}; the benchmarks are {', '.join(BENCHES)}")
    return importlib.import_module(f"jobs.bench.{argv[0]}").main(argv[1:]) or 0


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.run(main, sys.argv[1:]))
