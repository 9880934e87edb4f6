"""What a training checkpoint holds and how every data-parallel rank contributes to it: the progress
(epoch, step, schedule, metrics), each rank's RNG state, data position and parameter digest, gathered
and written once by rank 0 (``pipeline.checkpoint`` lists the keys and writes the file), and read back
by ``restore`` on a resume. Used by pipeline/train_loop.py."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from pipeline import checkpoint as ckpt
from pipeline import config as config_lib
from pipeline import epoch_plan
from pipeline.schedule import Plateau
from pipeline.worker import Report, Worker

if TYPE_CHECKING:
    from pipeline.epochs import Epochs

log = logging.getLogger(__name__)


def param_digest(net: nn.Module) -> str:
    """sha256 of every parameter's bytes: equal on all ranks iff the replicas are identical."""
    h = hashlib.sha256()
    for name, p in ckpt.unwrap(net).state_dict().items():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def gather(obj: Any, world_size: int) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (a few KB per rank: RNG and data state)."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


@dataclass
class Progress:
    """Where training is; everything here goes into the checkpoint."""
    epoch: int = 0                        # epochs completed
    step: int = 0                         # optimizer steps completed
    schedule: Plateau | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def gather_to_first(obj: Any, world_size: int) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0 (None elsewhere): the epoch's keys, MBs at
    ImageNet's size, which only the writer needs."""
    if world_size == 1:
        return [obj]
    out = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def epoch_keys(loader: Epochs, world_size: int) -> str:
    """On rank 0, every key the run has trained on in the current epoch ("" once it is over)."""
    mine = loader.trained()
    ranks = gather_to_first(mine, world_size)
    if ranks is None or loader.step >= len(loader):
        return ""
    return epoch_plan.join_keys([*loader.before, *(k for keys in ranks for k in keys)])


def save(net: nn.Module, optimizer: torch.optim.Optimizer, loader: Epochs, prog: Progress, *,
         cfg: config_lib.Config, worker: Worker, report: Report, run_id: Callable[[], str],
         best: bool = False) -> None:
    """Gather every rank's RNG, data position and keys trained on this epoch, write ``checkpoint.pt``
    on rank 0, and report it (every rank calls ``report``; rank 0 with the folder)."""
    mine = {"rng": ckpt.rng_state(), "data": loader.state(), "node": worker.node,
            "param_digest": param_digest(net)}
    workers = gather(mine, worker.world_size)
    trained = epoch_keys(loader, worker.world_size)
    images_seen = prog.step * cfg.run.global_batch_size
    metrics = {**prog.metrics, "epoch": prog.epoch, "step": prog.step, "images_seen": images_seen}
    if worker.rank != 0:
        report(metrics, None, False)
        return
    folder = tempfile.mkdtemp(prefix="vgg-ckpt-")
    try:
        ckpt.save_checkpoint(ckpt.pack(
            model=ckpt.unwrap(net).state_dict(), optimizer=optimizer.state_dict(),
            schedule=prog.schedule.to_dict(), epoch=prog.epoch, step=prog.step,
            step_in_epoch=loader.step % len(loader), images_seen=images_seen, workers=workers,
            config=config_lib.dump(cfg), num_classes=cfg.model.num_classes, mlflow_run_id=run_id(),
            dataset_fingerprint=loader.fingerprint, metrics={k: float(v) for k, v in metrics.items()},
            epoch_keys=trained,
        ), Path(folder) / ckpt.FILENAME)
        report(metrics, folder, best)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def restore(state: dict[str, Any] | None, optimizer: torch.optim.Optimizer, worker: Worker,
            lr: float) -> tuple[Progress, str | None, frozenset[str]]:
    """(progress, this rank's data position, the keys trained on in the checkpoint's epoch) from a
    loaded checkpoint, with the optimizer's state and this rank's RNG put back; a fresh start at rate
    ``lr`` when ``state`` is None. The data position (and RNG) is None unless the checkpoint was taken
    by as many workers in a streamed epoch (``pipeline.epochs``): the rest of the epoch is then
    planned anew from the keys."""
    if state is None:
        return Progress(schedule=Plateau(lr=lr)), None, frozenset()
    optimizer.load_state_dict(state["optimizer"])
    prog = Progress(state["epoch"], state["step"], Plateau.from_dict(state["schedule"]),
                    dict(state.get("metrics", {})))
    trained = epoch_plan.split_keys(state.get("epoch_keys", ""))
    saved, data = state["workers"], None
    if len(saved) == worker.world_size and streamed(saved[worker.rank]["data"]):
        ckpt.set_rng_state(saved[worker.rank]["rng"])
        data = saved[worker.rank]["data"]
    elif "epoch_keys" not in state:
        log.warning("checkpoint predates the record of trained keys: epoch %d restarts its data from the "
                    "beginning", prog.epoch)
    else:
        log.info("checkpoint of %d workers, this run %d: epoch %d goes on with the samples it has not "
                 "trained on (%d trained so far)", len(saved), worker.world_size, prog.epoch, len(trained))
    log.info("rank %d resumes at epoch %d, step %d (lr %g)", worker.rank, prog.epoch, prog.step,
             prog.schedule.lr)
    return prog, data, trained


def streamed(data: Any) -> bool:
    """Whether a rank's saved data position is a streamed epoch's (DALI's own checkpoint)."""
    try:
        return json.loads(data)["kind"] == "stream"
    except (ValueError, TypeError, KeyError):
        return False
