"""``python -m jobs.bench <name> [options]``: dispatch to ``jobs.bench.<name>.main(argv)``."""
import importlib
import sys

BENCHES = {
    "train": "the training step on a batch resident on the device, variant by variant",
    "loader": "the DALI training pipeline from shards vs a torchvision ImageFolder + DataLoader baseline",
    "e2e": "the training step on a resident batch and fed from shards, side by side",
    "preprocess": "preprocessing images/s vs the naive webdataset ShardWriter + PIL re-encode baseline",
    "eval": "dense-evaluation images/s",
    "scaling": "DDP all-reduce time and scaling efficiency on paper (no GPU needed)",
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        lines = "\n".join(f"  {k:<11} {v}" for k, v in BENCHES.items())
        unknown = f"unknown benchmark {argv[0]!r}\n\n" if argv and argv[0] not in ("-h", "--help") else ""
        print(f"{unknown}usage: python -m jobs.bench <name> [--help | options]\n\nbenchmarks:\n{lines}",
              file=sys.stderr if unknown else sys.stdout)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    importlib.import_module(f"jobs.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
