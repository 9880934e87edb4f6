"""What jobs.evaluate, jobs.features and jobs.transfer share: the nets named by ``--run``, their
compatibility and each one's test scales, the command-line options of a sharded pass over a split,
and running that pass as W Ray tasks (or one after another in this process) with one progress bar."""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from jobs import _ray
from jobs._cli import UsageError
from pipeline import checkpoint as ckpt
from pipeline import config as config_lib
from pipeline import dataset
from pipeline import evaluate as E
from pipeline.scoring import test_scales

RUN_ID = re.compile(r"^(runs:/)?([0-9a-f]{32})/?$")
# Tags jobs/train.py puts on a training run: its best checkpoint (set at the end) and its run folder
# (set at the start), tried in this order.
CHECKPOINT_TAGS = ("checkpoint", "run_folder")


def pass_options() -> argparse.ArgumentParser:
    """The options every sharded pass over a split takes (a parent parser)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--data", default="", help="dataset root (default: the run's data.root)")
    p.add_argument("--split", default="", help="split (default: the run's data.val_split)")
    p.add_argument("--scales", default="auto", help="auto (paper's 3 Q for the train S) | single | 256,384,512")
    p.add_argument("--no-flip", action="store_true", help="do not average with horizontally flipped views")
    p.add_argument("--workers", type=int, default=1, help="workers, each one DALI shard of the split")
    p.add_argument("--no-ray", action="store_true", help="run the workers' shares one by one in this process")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (DALI mixed decode, bf16)")
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--tracking-uri", default="", help="MLflow, for run ids (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_workers(workers: int) -> None:
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")


@dataclass
class Member:
    """One ``--run`` of the ensemble: its net (CPU, eval mode), config and MLflow training run."""

    spec: str
    net: nn.Module
    cfg: config_lib.Config
    checkpoint: str
    parent_run_id: str          # the training run in MLflow ("" when none is known)
    num_classes: int
    dataset_fingerprint: str = ""   # what it was trained on: its checkpoint's, else its dataset.json's


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
                  int(state["num_classes"]), state.get("dataset_fingerprint") or _fingerprint_of(cfg.data.root))


def _fingerprint_of(root: str) -> str:
    """dataset.json's fingerprint at ``root``; "" when there is none to read (moved, or never made)."""
    from storage.dataformat import DataError

    try:
        return str(dataset.read_info(root).get("fingerprint", ""))
    except (DataError, OSError):
        return ""


def check_ensemble(members: list[Member]) -> None:
    """Members must share their classes, training crop and dataset (fingerprints, where known)."""
    def differ(what: str, values: list) -> None:
        if len(set(values)) > 1:
            named = ", ".join(f"{m.spec}: {v}" for m, v in zip(members, values))
            raise UsageError(f"ensemble members disagree on {what} ({named})")
    differ("the number of classes", [m.num_classes for m in members])
    differ("the training crop", [m.cfg.data.crop_size for m in members])
    known = [m for m in members if m.dataset_fingerprint]
    if len({m.dataset_fingerprint for m in known}) > 1:
        named = ", ".join(f"{m.spec}: {m.dataset_fingerprint[:12]}" for m in known)
        raise UsageError(f"ensemble members were trained on different datasets (dataset fingerprints {named})")


def member_scales(text: str, members: list[Member]) -> tuple[tuple[int, ...], ...]:
    """Each member's own test scales: ``--scales auto`` or ``single`` from its own training S, a list
    for every member alike."""
    return tuple(parse_scales(text, m.cfg.data) for m in members)


def checkpoint_of_mlflow_run(run_id: str, tracking_uri: str) -> str:
    """Where the training run's checkpoint is: its ``checkpoint`` or ``run_folder`` tag (the best
    checkpoint there), else a ``checkpoint.pt`` artifact (downloaded). Raises naming what was tried."""
    from mlflow.tracking import MlflowClient

    if not tracking_uri:
        raise UsageError(f"--run {run_id} looks like an MLflow run id, but no tracking URI is set "
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


def parse_scales(text: str, data: config_lib.DataConfig) -> tuple[int, ...]:
    """'auto': the paper's three Q for the training S range; 'single': the validation Q; or a list."""
    if text in ("auto", "single"):
        scales = (tuple(test_scales(data.scale_min, data.scale_max)) if text == "auto"
                  else (config_lib.test_scale(data),))
        if min(scales) < data.crop_size:
            raise UsageError(f"--scales {text}: a net trained at S in [{data.scale_min}, {data.scale_max}] gets "
                             f"Q {E.scale_label(scales)}, below its crop {data.crop_size}; give --scales Q1,Q2,...")
        return scales
    try:
        scales = tuple(int(q) for q in text.split(","))
    except ValueError:
        raise UsageError(f"--scales {text!r}: auto, single or comma-separated integers") from None
    if not scales or min(scales) < data.crop_size:
        raise UsageError(f"--scales {text}: every Q must be >= the training crop {data.crop_size}")
    return scales


def prepare_rank(nets: list[nn.Module], data: config_lib.DataConfig, batch_size: int, rank: int, world: int,
                 use_gpu: bool, threads: int, boxes: bool = False) -> tuple[list[nn.Module], torch.device, Callable]:
    """One worker's setup for its share: its thread count, device, the nets in that device's memory
    format, and ``batches_at(Q)`` (with the ground-truth boxes when ``boxes``). A Ray task with
    num_gpus=1 sees only its GPU, as index 0."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    if use_gpu:  # channels_last weights make cuDNN run NHWC kernels (the bench measures this setting)
        nets = [n.to(memory_format=torch.channels_last) for n in nets]
    return nets, device, loader_batches(data, batch_size, rank, world, 0 if use_gpu else None, boxes)


def loader_batches(data: config_lib.DataConfig, batch_size: int, rank: int, world: int,
                   device_id: int | None, boxes: bool = False) -> Callable[[int], Iterable[E.Batch]]:
    """``batches_at(Q)``: this rank's share rescaled to Q by DALI, whole images grouped by size (one
    decode per image per scale); every protocol is cut from these in torch. With ``boxes``, each
    batch also carries its ground-truth boxes in the same pixels (``EvalLoader(boxes=True)``)."""
    from pipeline.loader import EvalLoader

    def batches_at(q: int):
        loader = EvalLoader(data, batch_size, rank, world, device_id=device_id, mode="dense", scale=q, boxes=boxes)
        for b in loader:
            yield (b.keys, b.labels, b.images, b.boxes) if boxes else (b.keys, b.labels, b.images)
    return batches_at


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

    import ray  # RAY

    _ray.connect(num_cpus=workers * cpus_per_worker)

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
