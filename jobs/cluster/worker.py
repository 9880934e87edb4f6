"""The Ray Train worker of ``jobs.train``: ``pipeline.train_loop.run_worker`` bound to Ray's
report / get_checkpoint / prepare_model and, on rank 0, to the MLflow tracker. Every Ray line is
tagged ``# RAY``."""
from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from jobs import tracking
from pipeline import checkpoint as ckpt
from pipeline import config as config_lib
from pipeline import goodput
from pipeline.goodput import Ledger
from storage import dataset, files
from storage.dataformat import DataError
from storage.files import StorageError

MARKER = "reported"        # what Ray copies into checkpoint_<step>/ beside our checkpoint.pt
DATA_ERROR = "data_error"  # a worker met bad data: its message, for Ray's retries and the driver
LEDGER = goodput.LEDGER   # rank 0's latest goodput totals (pipeline/goodput.py)


def resume_state(folder: str, checkpoint, rank: int, world: int) -> dict[str, Any] | None:
    """The checkpoint to resume from: the newest complete one in the run folder. That is Ray's
    latest registered one (``checkpoint``, which lives there) or newer: Ray registers a reported
    checkpoint some time after its files land, so a driver killed in between would otherwise lose
    it. Rank 0 chooses; every rank loads the same file."""
    import torch.distributed as dist

    if rank == 0:
        state = ckpt.latest_loadable(folder)
        if state is None and checkpoint is not None:
            with checkpoint.as_directory() as local:
                state = ckpt.load_checkpoint(local)
        if world > 1:
            dist.broadcast_object_list([state["path"] if state is not None else None], src=0)
        return state
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return ckpt.load_checkpoint(box[0]) if box[0] else None


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray                                                     # RAY
    import ray.train                                               # RAY
    import ray.train.torch                                         # RAY

    from pipeline.train_loop import Worker, resized, run_worker

    started = time.perf_counter()
    worker_logging()
    cfg = config_lib.from_dict(config_lib.Config, yaml.safe_load(loop_config["config"]))
    context = ray.train.get_context()                              # RAY
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()                          # RAY: the local GPU, not the rank
    if device.type == "cuda":
        torch.cuda.set_device(device)
    node = ray.get_runtime_context().get_node_id()                 # RAY: recorded in checkpoints
    worker = Worker(rank, world, device, node=f"{socket.gethostname()}/{node[:12]}")

    t0 = time.perf_counter()
    resume = resume_state(loop_config["run_folder"], ray.train.get_checkpoint(), rank, world)   # RAY
    ledger = Ledger.resumed((resume or {}).get("metrics", {}), read_ledger(loop_config["run_folder"]))
    ledger.add("resize" if resized(resume, worker) else "restore", time.perf_counter() - t0 if resume else 0.0)
    tracker = rank0_tracker(cfg, loop_config, resume) if rank == 0 else None

    def report(metrics: dict[str, float], folder: str | None, best: bool) -> None:
        name = f"{ckpt.PREFIX}{int(metrics['step']):010d}"
        if folder is not None:
            store_checkpoint(Path(folder), loop_config["run_folder"], name, best)
            if tracker is not None:
                tracker.persist()      # the metrics up to this checkpoint survive a kill of this rank
        ray.train.report(                                          # RAY: every rank, rank 0 with the marker
            metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None,
            checkpoint_dir_name=name)

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        if tracker is not None:
            tracker.log_metrics(metrics, step)
        if rank == 0 and goodput.key("compute") in metrics:    # what a restart will count as lost
            files.atomic_write(files.join(loop_config["run_folder"], LEDGER), json.dumps(metrics).encode())

    stop = files.join(loop_config["run_folder"], DATA_ERROR)
    try:
        if files.exists(stop):   # a retry would meet the same bad sample: fail at once, spend nothing
            raise DataError(files.read_bytes(stop).decode())
        result = run_worker(cfg, worker, report=report, log=log_metrics, resume=resume,
                            run_id=lambda: tracker.run_id if tracker else "",
                            wrap=lambda net, w: ray.train.torch.prepare_model(net),  # RAY: DDP
                            ledger=ledger, started=started)
        if tracker is not None and result.tally is not None:
            classes = dataset.open_dataset(cfg.data.root).classes
            tracker.log_dict(per_class_table(result.tally, classes), f"eval/val_{cfg.data.val_mode}_per_class.json")
    except DataError as e:
        files.atomic_write(stop, str(e).encode())
        raise
    finally:
        if tracker is not None:
            tracker.close()


def rank0_tracker(cfg: config_lib.Config, loop_config: dict[str, Any],
                  resume: dict[str, Any] | None) -> tracking.Tracker:
    """Rank 0's MLflow tracker: the driver's run (or the checkpoint's), and the run's journal."""
    tracker = tracking.Tracker(
        cfg.tracking.uri, cfg.tracking.experiment, cfg.run.name, loop_config["run_folder"],
        run_id=loop_config["run_id"] or (resume or {}).get("mlflow_run_id", ""),
        params=tracking.params_from(config_lib.flatten(cfg)), tags=loop_config["tags"],
        system_metrics=cfg.tracking.system_metrics, retry_s=cfg.tracking.retry_s,
        enabled=cfg.tracking.enabled, node_id=None, journal=True)
    tracker.connect()
    return tracker


def read_ledger(run_folder: str) -> dict[str, float]:
    """The goodput totals rank 0 last recorded in the run folder ({} before any), read by
    ``pipeline.goodput.read``. The driver checked the file before Ray started; one damaged since is
    ignored with a warning naming it: this attempt then counts none of the failed one's work as lost."""
    try:
        return goodput.read(run_folder, LEDGER)
    except StorageError as e:
        logging.getLogger(__name__).warning("%s; no work of the failed attempt is counted as lost", e)
        return {}


def store_checkpoint(folder: Path, run_folder: str, name: str, best: bool) -> None:
    """Put ``folder``'s checkpoint file into the run folder ourselves, atomically, as ``<name>/`` (and
    ``best/``), and leave only a small marker in ``folder`` for Ray to copy: Ray's copy writes files in
    place, so a full disk or a killed node could leave a cut-short checkpoint.pt under its final name."""
    src = folder / ckpt.FILENAME
    files.atomic_copy(src, files.join(run_folder, name, ckpt.FILENAME))
    if best:
        files.atomic_copy(src, files.join(run_folder, ckpt.BEST, ckpt.FILENAME))
    src.unlink()
    (folder / MARKER).write_text(f"{ckpt.FILENAME} of this folder was written by jobs/cluster/worker.py\n")


def worker_logging() -> None:
    """Ours at INFO; everything else that logs through the root logger (Ray Train prints a line per
    report there) at WARNING."""
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("pipeline", "jobs"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def per_class_table(tally, classes: list[dict]) -> dict[str, list]:
    """Columns of the final validation's per-class top-1 accuracy (MLflow shows it as a table)."""
    acc = tally.per_class_accuracy().tolist()
    names = {c.get("index"): c for c in classes}
    return {"index": list(range(len(acc))),
            "wnid": [names.get(i, {}).get("wnid", "") for i in range(len(acc))],
            "name": [names.get(i, {}).get("name", "") for i in range(len(acc))],
            "images": tally.class_total.tolist(),
            "top1_acc": [None if a != a else round(a, 6) for a in acc]}
