"""Evaluate trained VGGs with the paper's testing protocols (section 3.2) on W Ray workers.

    python -m jobs.evaluate --run <MLflow run id | checkpoint path or folder> [--run ...]
        [--mode dense|multicrop|both|center|all] [--scales 256,384,512 | auto | single]
        [--no-flip] [--workers N] [--gpu] [--data ROOT] [--split val] [--out DIR]

- dense: the fully convolutional net on the whole image rescaled to Q, class-score map averaged,
  soft-max, averaged with the flipped image; multicrop: 5x5 crops x 2 flips per Q; both: their mean;
  center: the centre crop (and its flip), the training-time validation view.
- ``--scales auto``: the paper's multi-scale Q from the run's training S (Table 4): {S-32, S, S+32},
  or {Smin, (Smin+Smax)/2, Smax} when S was jittered; every single Q is reported too (Table 3).
  ``single``: the run's validation Q only. Several ``--run`` form an ensemble (posteriors averaged).
- Worker r of W evaluates DALI shard r of W; the driver checks that the keys it got back are the
  manifest's stored keys, each exactly once, before it computes anything.
- Results: a table (config, train S, test Q, mode, top-1, top-5) printed and written to
  ``--out`` as results.csv / results.md with per_class.csv, and logged as an MLflow child run of the
  training run (tag mlflow.parentRunId), metrics plus the table as artifacts.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from jobs import eval_report as report
from pipeline import checkpoint as ckpt
from pipeline import config as config_lib
from pipeline import dataset
from pipeline import evaluate as E
from pipeline.scoring import test_scales

log = logging.getLogger("jobs.evaluate")
RUN_ID = re.compile(r"^(runs:/)?([0-9a-f]{32})/?$")
# Tags jobs/train.py puts on a training run: its best checkpoint (set at the end) and its run folder
# (set at the start), tried in this order.
CHECKPOINT_TAGS = ("checkpoint", "run_folder")


@dataclass
class Member:
    """One ``--run`` of the ensemble: its net (CPU, eval mode), config and MLflow training run."""

    spec: str
    net: nn.Module
    cfg: config_lib.Config
    checkpoint: str
    parent_run_id: str          # the training run in MLflow ("" when none is known)
    num_classes: int


# ----------------------------------------------------------------------------- resolving --run

def resolve_member(spec: str, tracking_uri: str = "") -> Member:
    """``spec``: a checkpoint file/folder/run folder (local or URI), or an MLflow run id
    (``runs:/<id>`` or 32 hex digits) whose checkpoint is found from its tags or its artifacts."""
    m = RUN_ID.match(spec.strip())
    if m and not Path(spec).exists():
        location = checkpoint_of_mlflow_run(m.group(2), tracking_uri)
        parent = m.group(2)
    else:
        location, parent = spec, ""
    state = ckpt.load_checkpoint(location)
    cfg = ckpt.config_of(state)
    net = ckpt.build_model(cfg, state["num_classes"])
    net.load_state_dict(state["model"])
    return Member(spec, net.eval(), cfg, state["path"], parent or state.get("mlflow_run_id", "") or "",
                  int(state["num_classes"]))


def checkpoint_of_mlflow_run(run_id: str, tracking_uri: str) -> str:
    """Where the training run's checkpoint is: its ``checkpoint`` or ``run_folder`` tag (the best
    checkpoint there), else a ``checkpoint.pt`` artifact (downloaded). Raises naming what was tried."""
    from mlflow.tracking import MlflowClient

    if not tracking_uri:
        raise SystemExit(f"--run {run_id} looks like an MLflow run id, but no tracking URI is set "
                         "(--tracking-uri or $MLFLOW_TRACKING_URI)")
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    tried = []
    for tag in CHECKPOINT_TAGS:
        value = run.data.tags.get(tag)
        if value:
            tried.append(f"tag {tag}={value}")
            try:
                return ckpt.resolve(value)
            except FileNotFoundError:
                tried[-1] += " (no checkpoint there)"  # named in the error below if nothing else works
    artifact = _find_artifact(client, run_id, ckpt.FILENAME)
    if artifact:
        import mlflow.artifacts

        return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact,
                                                   tracking_uri=tracking_uri)
    tried.append(f"artifacts named {ckpt.FILENAME}")
    raise FileNotFoundError(f"MLflow run {run_id}: no checkpoint found; tried {'; '.join(tried)}")


def _find_artifact(client, run_id: str, name: str, path: str = "", depth: int = 3) -> str:
    """The first artifact called ``name``, preferring ``best/`` folders, at most ``depth`` down."""
    entries = client.list_artifacts(run_id, path or None)
    for e in sorted(entries, key=lambda e: (not e.is_dir, "best" not in e.path)):
        if not e.is_dir and e.path.rsplit("/", 1)[-1] == name:
            return e.path
    if depth:
        for e in sorted((e for e in entries if e.is_dir), key=lambda e: "best" not in e.path):
            found = _find_artifact(client, run_id, name, e.path, depth - 1)
            if found:
                return found
    return ""


# ----------------------------------------------------------------------------- protocol

def parse_modes(text: str) -> tuple[str, ...]:
    modes = ("center", "dense", "multicrop", "both") if text == "all" else tuple(text.split(","))
    bad = [m for m in modes if m not in E.MODES]
    if bad:
        raise SystemExit(f"Invalid --mode {text!r}. Only {', '.join(E.MODES)} (comma-separated) or all.")
    return modes


def parse_scales(text: str, data: config_lib.DataConfig) -> tuple[int, ...]:
    """'auto': the paper's three Q for the training S range; 'single': the validation Q; or a list."""
    if text == "auto":
        return tuple(test_scales(data.scale_min, data.scale_max))
    if text == "single":
        return (config_lib.test_scale(data),)
    try:
        scales = tuple(int(q) for q in text.split(","))
    except ValueError:
        raise SystemExit(f"Invalid --scales {text!r}: auto, single or comma-separated integers") from None
    if not scales or min(scales) < data.crop_size:
        raise SystemExit(f"--scales {text}: every Q must be >= the training crop {data.crop_size}")
    return scales


# ----------------------------------------------------------------------------- one worker's share

def loader_batches(data: config_lib.DataConfig, batch_size: int, rank: int, world: int,
                   device_id: int | None) -> Callable[[int], Iterable[E.Batch]]:
    """``batches_at(Q)``: this rank's share rescaled to Q by DALI, whole images grouped by size (one
    decode per image per scale); every protocol is cut from these in torch."""
    from pipeline.loader import EvalLoader

    def batches_at(q: int):
        loader = EvalLoader(data, batch_size, rank, world, device_id=device_id, mode="dense", scale=q)
        for b in loader:
            yield b.keys, b.labels, b.images
    return batches_at


def evaluate_rank(nets: list[nn.Module], data: config_lib.DataConfig, protocol: E.Protocol,
                  batch_size: int, rank: int, world: int, use_gpu: bool = False, threads: int = 0,
                  progress: Callable[[int], None] | None = None) -> E.ShareResult:
    """Evaluate DALI shard ``rank`` of ``world`` (in a Ray task, or in-process)."""
    if threads:
        torch.set_num_threads(threads)
    # A Ray task with num_gpus=1 sees only its GPU, as index 0.
    device_id = 0 if use_gpu else None
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    if use_gpu:  # channels_last weights make cuDNN run NHWC kernels (the bench measures this setting)
        nets = [n.to(memory_format=torch.channels_last) for n in nets]
    batches_at = loader_batches(data, batch_size, rank, world, device_id)
    return E.evaluate_share(nets, batches_at, protocol, device=device, progress=progress)


def run_ranks(work: Callable[..., object], workers: int, total: int, use_ray: bool = True,
              use_gpu: bool = False, cpus_per_worker: int = 1, quiet: bool = False,
              desc: str = "evaluating") -> list:
    """``work(rank, world, progress)`` for every rank, as W Ray tasks (one CPU set or GPU each) or,
    without Ray, one after another in this process (the same sharding). A tqdm bar counts the images
    the workers report through ``progress(n)`` (with Ray, via a small counter actor)."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc=f"{desc} ({workers} worker{'s' * (workers > 1)})", disable=quiet)
    if not use_ray:
        with bar:
            return [work(r, workers, bar.update) for r in range(workers)]

    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):          # a cluster (`ray job submit` sets this)
            ray.init(address=os.environ["RAY_ADDRESS"])
        else:                                      # a local one, on the loopback only
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers * cpus_per_worker),
                     include_dashboard=False, _node_ip_address="127.0.0.1")

    @ray.remote(num_cpus=0)
    class Progress:
        def __init__(self):
            self.n = 0

        def add(self, n: int) -> None:
            self.n += n

        def get(self) -> int:
            return self.n

    counter = Progress.remote()

    def task(rank: int, world: int):
        return work(rank, world, lambda n: counter.add.remote(n))

    remote = ray.remote(num_cpus=cpus_per_worker, num_gpus=1 if use_gpu else 0, max_retries=0)(task)
    refs = [remote.remote(r, workers) for r in range(workers)]
    pending = list(refs)
    with bar:
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            bar.update(ray.get(counter.get.remote()) - bar.n)
    out = ray.get(refs)
    ray.kill(counter)
    return out


def evaluate(nets: list[nn.Module], data: config_lib.DataConfig, protocol: E.Protocol, batch_size: int,
             workers: int, use_ray: bool = True, use_gpu: bool = False, cpus_per_worker: int = 1,
             quiet: bool = False) -> list[E.ShareResult]:
    """Every rank's ShareResult, rank order."""
    total = dataset.load_split(data.root, data.val_split).num_samples * len(protocol.scales)
    nets = [n.cpu() for n in nets]
    work = functools.partial(_evaluate_work, nets, data, protocol, batch_size, use_gpu,
                             cpus_per_worker if use_ray else 0)
    return run_ranks(work, workers, total, use_ray, use_gpu, cpus_per_worker, quiet)


def _evaluate_work(nets, data, protocol, batch_size, use_gpu, threads, rank, world, progress):
    return evaluate_rank(nets, data, protocol, batch_size, rank, world, use_gpu, threads, progress)


# ----------------------------------------------------------------------------- main

def parse(argv):
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True,
                   help="MLflow run id (or runs:/<id>) or checkpoint file/folder; repeat for an ensemble")
    p.add_argument("--mode", default="both", help="dense | multicrop | both | center | all, or a comma list")
    p.add_argument("--scales", default="auto", help="auto (paper's 3 Q for the train S) | single | 256,384,512")
    p.add_argument("--no-flip", action="store_true", help="do not average with horizontally flipped views")
    p.add_argument("--workers", type=int, default=1, help="evaluation workers (DALI shards)")
    p.add_argument("--no-ray", action="store_true", help="run the workers' shares one by one in this process")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (DALI mixed decode, bf16)")
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=0, help="DALI batch (0: data.eval_batch_size, else 16)")
    p.add_argument("--max-batch", type=int, default=0, help="images or crops per forward pass (0: 256 on GPU, 64)")
    p.add_argument("--data", default="", help="dataset root (default: the run's data.root)")
    p.add_argument("--split", default="", help="split to evaluate (default: the run's data.val_split)")
    p.add_argument("--out", default="", help="folder for results.csv/.md, per_class.csv (default: eval-<time>)")
    p.add_argument("--tracking-uri", default="", help="MLflow (default: the run's tracking.uri, $MLFLOW_TRACKING_URI)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the child run")
    p.add_argument("--experiment", default="vgg-eval", help="MLflow experiment when no training run is known")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    members = [resolve_member(spec, uri) for spec in args.run]
    first = members[0].cfg
    uri = uri or (first.tracking.uri if first.tracking.enabled else "")
    if args.workers < 1:
        raise SystemExit(f"--workers must be >= 1, got {args.workers}")
    crops = {m.cfg.data.crop_size for m in members}
    classes = {m.num_classes for m in members}
    if len(crops) > 1 or len(classes) > 1:
        raise SystemExit(f"an ensemble needs one crop size and one class count; got crops {sorted(crops)}, "
                         f"classes {sorted(classes)}")
    data = dataclasses.replace(first.data, root=args.data or first.data.root,
                               val_split=args.split or first.data.val_split, layout="NCHW", dtype="float32",
                               decode="mixed" if args.gpu else "cpu")
    protocol = E.Protocol(modes=parse_modes(args.mode), scales=parse_scales(args.scales, first.data),
                          flip=not args.no_flip, crop=first.data.crop_size,
                          max_batch=args.max_batch or (256 if args.gpu else 64),
                          amp_dtype=torch.bfloat16 if args.gpu else None)
    batch = args.batch_size or first.data.eval_batch_size or 16
    info = dataset.read_info(data.root)
    expected = dataset.stored_labels(data.root, data.val_split)
    shares = evaluate([m.net for m in members], data, protocol, batch, args.workers, use_ray=not args.no_ray,
                      use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker, quiet=args.quiet)
    E.check_exactly_once(shares, expected)  # before any figure: each stored image once, nothing else
    for s in shares:
        wrong = [k for k, lbl in zip(s.keys, s.labels.tolist()) if expected[k] != lbl]
        if wrong:
            raise RuntimeError(f"labels from the shards differ from the manifest for keys {wrong[:5]}")
    num_classes = members[0].num_classes
    name, train_s = report.config_name([m.cfg for m in members]), report.train_scale(first.data)
    rows, per_class = report.table(shares, protocol, name, train_s, num_classes)
    counts = torch.bincount(torch.cat([s.labels for s in shares]), minlength=num_classes)
    print(report.markdown(rows), end="")
    out = Path(args.out or f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    class_info = info.get("classes") or [{} for _ in range(num_classes)]
    files = report.write(out, rows, per_class, class_info, counts)
    print(f"results written to {out}/ (results.csv, results.md, per_class.csv)")
    # The headline: the last protocol asked for, over all scales (the table's last row).
    head = rows[-1]
    headline = {"top1_error": head["top-1 err %"] / 100, "top5_error": head["top-5 err %"] / 100}
    params = {"mode": args.mode, "scales": E.scale_label(protocol.scales), "flip": protocol.flip,
              "workers": args.workers, "split": data.val_split, "images": len(expected),
              "models": name, "train_S": train_s, "data": data.root}
    run_id, parent = "", members[0].parent_run_id
    if uri and not args.no_mlflow:
        from jobs.tracking import resolve_uri

        tags = {"eval.runs": " ".join(m.spec for m in members),
                "eval.checkpoints": " ".join(m.checkpoint for m in members)}
        run_id = report.log_child_run(resolve_uri(uri), parent, rows, files, params, headline, tags,
                                      args.experiment)
        print(f"MLflow: run {run_id}" + (f" (child of {parent})" if parent else ""))
    return {"rows": rows, "files": [str(f) for f in files], "mlflow_run_id": run_id, "shares": shares,
            "per_class": per_class}


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.run(main))
