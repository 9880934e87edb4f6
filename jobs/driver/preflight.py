"""What the training driver checks before Ray starts, so that a mistake costs seconds, not a cluster
start: the dataset (every split it will read, sizes against the batch, shard checksums) and the
storage (reachable, writable, and room for ``run.keep_last`` + 2 checkpoints on a local disk). Each
failure is a user error (one ``error:`` line, exit 2) naming the key, file or folder. So are the
parent net (``model.init_from``, every tensor against the net) and the run folder's own records (the
MLflow metric journal, the goodput files)."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from jobs import tracking
from jobs.tracking import journal
from pipeline import config as config_lib
from pipeline import goodput
from pipeline.config import ConfigError
from pipeline.task import task_for
from storage import dataset, files
from storage.dataformat import DataError
from storage.files import StorageError

PROBE = ".write-probe"


@dataclass
class DataFacts:
    """What the run will read: for --dry-run and the driver's summary."""
    train_images: int
    val_images: int
    steps_per_epoch: int


def check_working_dir(cfg: config_lib.Config, in_copy: bool) -> None:
    """In a Ray job's ``working_dir`` (``ray job submit --working-dir .``) the folder is Ray's
    temporary copy of the project: a relative data, storage or MLflow location would be read from, or
    written into, that copy and deleted with it. Refuse such locations, naming each key."""
    if not in_copy:
        return
    relative = [key for key, value in local_places(cfg).items() if value and not Path(value).is_absolute()]
    if relative:
        raise ConfigError(
            f"{', '.join(relative)} {'is' if len(relative) == 1 else 'are'} relative, and this Ray job runs in Ray's "
            f"temporary copy of the project, deleted at cleanup: give absolute paths on shared storage "
            f"(e.g. --set data.root=/mnt/shared/imagenet-shards --set run.storage_path=/mnt/shared/runs "
            f"--set tracking.uri=http://mlflow-host:5000) or submit with python -m jobs.submit, which makes "
            f"them absolute for you")


def local_places(cfg: config_lib.Config) -> dict[str, str]:
    """``key -> local path`` for every config value that names a place on this machine's disk (URIs
    such as s3:// or http:// and MLflow run references are no local places)."""
    uri = tracking.configured_uri(cfg.tracking.uri)
    places = {"data.root": cfg.data.root,
              "run.storage_path": "" if files.is_uri(cfg.run.storage_path) else cfg.run.storage_path}
    if cfg.tracking.enabled:
        if uri.startswith("sqlite:///"):
            places["tracking.uri"] = uri[len("sqlite:///"):]
        elif uri.startswith("file:"):
            places["tracking.uri"] = uri[len("file:"):].removeprefix("//")
        elif "://" not in uri:
            places["tracking.uri"] = uri
    init = cfg.model.init_from
    if init and not init.startswith("runs:/") and not files.is_uri(init) and os.path.exists(init):
        places["model.init_from"] = init
    return places


def check_data(cfg: config_lib.Config) -> DataFacts:
    """Both splits resolve (shards, indexes, manifests), match their checksums, and the training split
    holds at least one global batch of the images the task trains on."""
    d = cfg.data
    ds = dataset.open_dataset(d.root)
    ds.split(d.train_split)                        # each checks its shards' sha256 (cached per node)
    val = ds.split(d.val_split)
    images = task_for(cfg.model.head).train_images(ds, d.train_split, d.val_split)
    batch = cfg.run.global_batch_size
    if images < batch:
        raise ConfigError(f"run.global_batch_size {batch} is larger than the {images} training "
                          f"images of {d.root} (split {d.train_split!r}); lower it")
    return DataFacts(images, val.num_samples, images // batch)


def check_parent(cfg: config_lib.Config) -> None:
    """A new run's ``model.init_from`` fits the net, as its task takes it (``Task.check_parent``)."""
    if not cfg.model.init_from:
        return
    import torch

    from pipeline import checkpoint as ckpt

    weights, path = ckpt.load_weights(cfg.model.init_from)
    with torch.device("meta"):     # shapes only, nothing allocated
        net = ckpt.build_model(cfg, cfg.model.num_classes)
    task_for(cfg.model.head).check_parent(cfg, weights, path, net)


def check_records(run_folder: str, training: bool) -> None:
    """The run folder's own records read back before Ray starts: the MLflow metric journal (every
    command delivers it, a complete run's too) and, when this command trains, the goodput files.
    A damaged one is one error line naming the file and how to go on (jobs/tracking/journal.py,
    pipeline/goodput.py)."""
    journal.read(run_folder)
    if training:
        goodput.check(run_folder)


def checkpoint_bytes(cfg: config_lib.Config, existing: str = "") -> int:
    """The size of one checkpoint: an existing one's, else the weights and the momentum buffers
    (float32) of the net the config builds, counted without allocating it."""
    if existing and not files.is_uri(existing):
        return Path(existing).stat().st_size
    import torch

    from pipeline import checkpoint as ckpt

    with torch.device("meta"):
        net = ckpt.build_model(cfg, cfg.model.num_classes)
    params = sum(p.numel() for p in net.parameters())
    return params * 4 * (2 if cfg.optim.momentum else 1) + (1 << 20)


def check_storage(cfg: config_lib.Config, run_folder: str, one_checkpoint: int) -> None:
    """The run folder can be created and written, and (locally) has room for keep_last + 2 checkpoints:
    the ones Ray keeps, the best, and the one being written."""
    probe = files.join(run_folder, PROBE)
    try:
        files.atomic_write(probe, b"")
        files.remove(probe)
    except OSError as e:
        raise StorageError(f"run.storage_path {cfg.run.storage_path}: cannot write the run folder "
                           f"{run_folder} ({e.strerror or e})") from None
    if files.is_uri(run_folder):
        return  # object stores report no free space
    need = (cfg.run.keep_last + 2) * one_checkpoint
    free = shutil.disk_usage(run_folder).free
    if free < need:
        raise StorageError(f"run.storage_path {cfg.run.storage_path}: {mib(free)} free, but run.keep_last "
                           f"{cfg.run.keep_last} + 2 checkpoints of {mib(one_checkpoint)} need {mib(need)}")


def explain_failure(cfg: config_lib.Config, run_folder: str, plan, error: Exception) -> None:
    """After the workers failed: a worker's DataError (bad data met in training), or a storage with no
    room left for another checkpoint, become user errors; the workers' tracebacks say the same, deep in
    Ray's report."""
    from jobs.cluster.worker import DATA_ERROR

    stop = files.join(run_folder, DATA_ERROR)
    if files.exists(stop):
        message = files.read_bytes(stop).decode()
        files.remove(stop)      # the next command tries again: the data may have been repaired
        raise DataError(message) from error
    if files.is_uri(run_folder) or not Path(run_folder).is_dir():
        return
    from pipeline import checkpoint as ckpt

    newest = ckpt.step_folders(run_folder)[:1]
    one = checkpoint_bytes(cfg, files.join(newest[0], ckpt.FILENAME) if newest else plan.checkpoint)
    free = shutil.disk_usage(run_folder).free
    if free < one:
        raise StorageError(f"run.storage_path {cfg.run.storage_path}: full ({mib(free)} free) while writing a "
                           f"checkpoint of {mib(one)}; the checkpoints already in {run_folder} are whole, "
                           f"free some space and run the same command again to resume") from error


def mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB"
