"""The per-worker training loop in plain torch, readable top to bottom like torchvision's references.

``run_worker`` is what every data-parallel worker runs: build the net, the optimizer and the DALI
loaders, then ``train_one_epoch`` / ``evaluate`` / plateau rule / checkpoint until the schedule says
stop. It imports neither Ray nor MLflow: the caller passes the rank, the world size, the device and two
callables, ``log(metrics, step)`` (rank 0's metrics, stepped by images seen) and
``report(metrics, checkpoint_dir, best)`` (called by every rank at each checkpoint; rank 0 passes the
folder holding ``checkpoint.pt``, the others None). jobs/train.py binds them to ray.train.report and
MLflow; a test binds them to lists. ``torch.distributed`` must be initialised when world_size > 1.

The paper's recipe (section 3.1) with its defaults from pipeline/config.py: SGD, momentum 0.9, weight
decay 5e-4 on weights only (see docs/training.md), dropout 0.5, global batch 256 split evenly across
workers, lr 1e-2 divided by 10 when validation top-1 error stops improving (at most 3 times), 74 epochs.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import model
from pipeline import checkpoint as ckpt
from pipeline import config as config_lib
from pipeline import evaluate as eval_lib
from pipeline import scoring
from pipeline.ddp import apply_grad_compression
from pipeline.loader import EvalLoader, TrainLoader
from pipeline.schedule import Plateau, improved, plateau_step, should_stop
from pipeline.step import StepOptions, prepare, sgd, train_step
from pipeline.train_state import Progress, save

log_ = logging.getLogger("pipeline.train_loop")

Log = Callable[[dict[str, float], int], None]                  # (metrics, images seen)
Report = Callable[[dict[str, float], "str | None", bool], None]  # (metrics, checkpoint folder, is best)
# Test knobs (tests/test_train.py), never set otherwise: "<rank>:<step>:<marker file>" makes that rank
# exit (os._exit(1), a real process death) right after that optimizer step, once (the marker file
# records that it happened); a number of seconds slows every step down, to time outside events.
EXIT_AT_ENV = "VGG_TEST_EXIT_AT"
STEP_DELAY_ENV = "VGG_TEST_STEP_DELAY_S"


@dataclass(frozen=True)
class Worker:
    """Where this copy of the loop runs."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    node: str = ""                       # the node's name or id, recorded in checkpoints

    @property
    def device_id(self) -> int | None:
        """DALI's device: the *local* CUDA index, or None for DALI's CPU-only mode."""
        return self.device.index if self.device.type == "cuda" else None


def step_options(cfg: config_lib.Config, device: torch.device) -> StepOptions:
    """bf16 autocast, channels_last and cuDNN autotuning on GPU, plain fp32 on CPU; conv-ReLU fusion
    where asked (on the CPU it is the same arithmetic, which is how the tests cover it)."""
    gpu = device.type == "cuda"
    return StepOptions(amp_dtype=torch.bfloat16 if gpu and cfg.run.amp else None,
                       channels_last=gpu and cfg.run.channels_last,
                       compile="default" if cfg.run.compile else "", cudnn_benchmark=gpu,
                       fuse_conv_relu=cfg.run.fuse_conv_relu)


# ---------------------------------------------------------------------------------------------------
# Training and validation of one epoch
# ---------------------------------------------------------------------------------------------------

@dataclass
class Window:
    """Running sums between two log points, kept on the device so no step waits for the host."""
    loss: torch.Tensor
    wrong: torch.Tensor                  # (2,) top-1, top-5 misses
    images: int = 0
    data_s: float = 0.0                  # host time spent waiting for the loader
    start: float = field(default_factory=time.perf_counter)

    @classmethod
    def new(cls, device: torch.device) -> "Window":
        return cls(torch.zeros((), device=device), torch.zeros(2, device=device))


CONSOLE_EVERY_S = 30.0       # a progress line in the worker's log at most this often (and at an epoch's start)


class Throttle:
    """``due()`` is True the first time, then once ``every`` seconds have passed since it last was."""

    def __init__(self, every: float):
        self.every, self.last = every, None

    def due(self) -> bool:
        now = time.monotonic()
        if self.last is None or now - self.last >= self.every:
            self.last = now
            return True
        return False


def misses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(2,) count of top-1 and top-5 misses in a batch, on the device (no sync)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices        # (N, 5)
    hit = top == labels[:, None]
    return torch.stack([(~hit[:, 0]).sum(), (~hit.any(dim=1)).sum()]).float()


def all_reduce(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(t)
    return t


def train_one_epoch(net: nn.Module, optimizer: torch.optim.Optimizer, loader: TrainLoader, *, step: int,
                    opts: StepOptions, worker: Worker, global_batch: int, log: Log, log_every: int,
                    max_batches: int | None = None) -> int:
    """Train on the rest of the loader's current epoch, or on ``max_batches`` of it; returns the global
    optimizer step count. Every ``log_every`` steps rank 0 logs train loss, top-1/top-5 error, the
    learning rate, images/s and the fraction of time spent waiting for data (all ranks take part in
    the reduction, a CPU-GPU sync point once per ``log_every`` steps)."""
    net.train()
    w = Window.new(worker.device)
    console = Throttle(CONSOLE_EVERY_S)
    batches = iter(loader)
    done = 0
    while max_batches is None or done < max_batches:
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        w.data_s += time.perf_counter() - t0
        images = batch.images.to(worker.device, non_blocking=True)
        if opts.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = batch.labels.to(worker.device, non_blocking=True)
        loss, logits = train_step(net, optimizer, images, labels, opts.amp_dtype)
        w.loss += loss * labels.shape[0]
        w.wrong += misses(logits, labels)
        w.images += labels.shape[0]
        step, done = step + 1, done + 1
        _test_knobs(worker.rank, step)
        if step % log_every == 0:
            sums = all_reduce(torch.cat([w.loss[None], w.wrong, torch.tensor([w.images], device=worker.device,
                                                                           dtype=torch.float32)]),
                              worker.world_size).tolist()   # sync point
            seconds = time.perf_counter() - w.start
            if worker.rank == 0:
                n = sums[3]
                log({"train/loss": sums[0] / n, "train/top1_err": sums[1] / n, "train/top5_err": sums[2] / n,
                     "lr": optimizer.param_groups[0]["lr"], "train/images_per_s": n / seconds,
                     "train/data_wait_frac": w.data_s / seconds}, step * global_batch)
                if console.due():
                    log_.info("epoch %d, step %d/%d: train loss %.4f, top-1 err %.3f, %.0f img/s, data wait %.0f%%",
                              loader.epoch + 1, loader.step, len(loader), sums[0] / n, sums[1] / n, n / seconds,
                              100 * w.data_s / seconds)
            w = Window.new(worker.device)
    return step


@torch.no_grad()
def evaluate(net: nn.Module, loader: EvalLoader, *, worker: Worker, num_classes: int, mode: str,
             amp_dtype: torch.dtype | None) -> tuple[scoring.Tally, float]:
    """Validation over every rank's share, exactly once: (Tally of top-1/top-5 misses and per-class
    counts summed over ranks, mean negative log posterior). ``mode`` "center": the net on the centre
    crop at Q; "dense": the fully convolutional net on the whole image at Q, averaged with its flip."""
    net.eval()
    tally, nll = scoring.Tally(num_classes), torch.zeros((), dtype=torch.float64)
    protocol = eval_lib.Protocol(modes=("dense",), scales=(loader.scale,), crop=loader.crop,
                                 amp_dtype=amp_dtype) if mode == "dense" else None
    for batch in loader:
        images = batch.images.to(worker.device, non_blocking=True)
        if mode == "dense":
            p = eval_lib.posteriors_at_scale([net], list(images), protocol)["dense"]
        else:
            with torch.autocast(worker.device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                p = scoring.posteriors(net(images))
        labels = batch.labels.to(p.device)
        tally.add(scoring.topk(p, 5), labels)
        nll += -torch.log(p.gather(1, labels[:, None]).clamp_min(1e-12)).sum().double().cpu()
    net.train()
    counts = torch.cat([torch.tensor([tally.n, tally.top1_wrong, tally.top5_wrong], dtype=torch.long),
                        tally.class_total, tally.class_correct]).to(worker.device)
    counts = all_reduce(counts, worker.world_size).cpu()
    loss = all_reduce(nll.to(worker.device), worker.world_size).item()
    k = num_classes
    total = scoring.Tally(k, int(counts[0]), int(counts[1]), int(counts[2]), counts[3:3 + k], counts[3 + k:])
    return total, loss / max(total.n, 1)


@dataclass
class Result:
    """What ``run_worker`` returns: the last metrics and the last validation's counts (None when
    nothing was validated in this call, e.g. a rerun of a finished run)."""
    metrics: dict[str, float]
    tally: scoring.Tally | None = None


def _test_knobs(rank: int, step: int) -> None:
    if os.environ.get(STEP_DELAY_ENV):
        time.sleep(float(os.environ[STEP_DELAY_ENV]))
    spec = os.environ.get(EXIT_AT_ENV)
    if not spec:
        return
    r, s, marker = spec.split(":", 2)
    if int(r) == rank and int(s) == step and not os.path.exists(marker):
        Path(marker).write_text(f"rank {rank} exited at step {step}\n")
        os._exit(1)


# ---------------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------------

def default_wrap(net: nn.Module, worker: Worker) -> nn.Module:
    """DDP when there is more than one worker (gloo on CPU, NCCL on GPU: whatever the group uses)."""
    if worker.world_size == 1:
        return net
    ids = [worker.device.index] if worker.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(net, device_ids=ids)


def initial_weights(net: nn.Module, cfg: config_lib.Config) -> None:
    """The parent's weights, when ``model.init_from`` names one (a checkpoint location, resolved by
    the job): all of them (S=384 from S=256, multi-scale from S=384) or the paper's "from A" subset."""
    if not cfg.model.init_from:
        return
    parent = ckpt.load_checkpoint(cfg.model.init_from, "best")
    if cfg.model.init_from_mode == "a":
        copied = model.init_from_a(net, parent["model"])
        log_.info("initialised %d tensors from A at %s", len(copied), parent["path"])
    else:
        net.load_state_dict(parent["model"])
        log_.info("initialised every weight from %s", parent["path"])


def run_worker(cfg: config_lib.Config, worker: Worker, *, report: Report, log: Log,
               resume: dict[str, Any] | None = None, run_id: Callable[[], str] = lambda: "",
               wrap: Callable[[nn.Module, Worker], nn.Module] = default_wrap) -> Result:
    """Train (or resume) one run of ``cfg`` as ``worker``.

    ``resume`` is a loaded checkpoint dict (``pipeline.checkpoint.load_checkpoint``): the model,
    optimizer, schedule, epoch, step, this rank's RNG and data position come from it. ``cfg`` must be
    resolved (``model.num_classes`` > 0, ``model.init_from`` a location). ``wrap`` turns the net into
    its data-parallel form (jobs/train.py passes Ray's prepare_model). ``run_id()`` is the MLflow
    run id to keep in checkpoints (it may become known mid-run, when the server comes back).
    """
    if cfg.run.global_batch_size % worker.world_size:
        raise ValueError(f"run.global_batch_size {cfg.run.global_batch_size} does not split evenly "
                         f"across {worker.world_size} workers")
    batch = cfg.run.global_batch_size // worker.world_size
    opts = step_options(cfg, worker.device)
    if worker.device.type == "cpu":
        # The worker's CPU share, not every core: oversubscribed OpenMP threads spin against each other
        # and DALI's (measured here: 0.5 s per step with 2 threads on 2 busy cores, 0.02 s with 1).
        torch.set_num_threads(max(1, cfg.run.cpus_per_worker))
    torch.manual_seed(cfg.run.seed)            # the same initial weights on every rank
    net = ckpt.build_model(cfg, cfg.model.num_classes)
    if resume is not None:
        net.load_state_dict(resume["model"])
    else:
        initial_weights(net, cfg)
    net = net.to(worker.device)
    if opts.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = sgd(net, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.decay_bias,
                    cfg.optim.nesterov, fused=cfg.optim.fused and worker.device.type == "cuda")
    ddp = wrap(net, worker)
    if isinstance(ddp, nn.parallel.DistributedDataParallel):
        apply_grad_compression(ddp, cfg.run.grad_compression)
    train_net = prepare(ddp, StepOptions(compile=opts.compile, cudnn_benchmark=opts.cudnn_benchmark,
                                         fuse_conv_relu=opts.fuse_conv_relu))
    torch.manual_seed(cfg.run.seed * 1000 + worker.rank)   # dropout differs per rank

    prog = Progress(schedule=Plateau(lr=cfg.optim.lr))
    data_state = None
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        prog = Progress(resume["epoch"], resume["step"], Plateau.from_dict(resume["schedule"]),
                        dict(resume.get("metrics", {})))
        saved = resume["workers"]
        if len(saved) == worker.world_size:
            ckpt.set_rng_state(saved[worker.rank]["rng"])
            data_state = saved[worker.rank]["data"]
        else:
            log_.warning("checkpoint has %d workers' data positions, this run %d: epoch %d restarts its "
                         "data from the beginning", len(saved), worker.world_size, prog.epoch)
        log_.info("rank %d resumes at epoch %d, step %d (lr %g)", worker.rank, prog.epoch, prog.step,
                  prog.schedule.lr)
    # Without a data position (a fresh run, or another world size) the epoch's order comes from the
    # seed: offset it by the epoch so a resumed run does not replay epoch 0's order.
    loader = TrainLoader(cfg.data, batch, worker.rank, worker.world_size, worker.device_id,
                         seed=cfg.run.seed + (prog.epoch if data_state is None else 0), state=data_state)
    if resume is not None and resume.get("dataset_fingerprint", "") != loader.fingerprint:
        raise ValueError(f"{cfg.data.root}: its dataset fingerprint {loader.fingerprint!r} is not the one "
                         f"this run was trained on ({resume.get('dataset_fingerprint')!r}); resume on the "
                         f"same shards, or start a new run.name")
    val_loader = EvalLoader(cfg.data, cfg.data.eval_batch_size or batch, worker.rank, worker.world_size,
                            worker.device_id, mode=cfg.data.val_mode)
    common = dict(cfg=cfg, worker=worker, global_batch=cfg.run.global_batch_size, report=report,
                  run_id=run_id, fingerprint=loader.fingerprint)
    every, max_steps = cfg.run.checkpoint_every_steps, cfg.run.max_steps
    tally = None
    if max_steps and prog.step >= max_steps:
        return Result(prog.metrics)

    while not should_stop(prog.schedule, prog.epoch, cfg.schedule):
        for group in optimizer.param_groups:
            group["lr"] = prog.schedule.lr
        epoch_start = time.perf_counter()
        # Train to the next step checkpoint (or max_steps), save, go on, until the epoch ends.
        while True:
            limits = [n - prog.step for n in (_next_multiple(prog.step, every), max_steps) if n]
            prog.step = train_one_epoch(train_net, optimizer, loader, step=prog.step, opts=opts, worker=worker,
                                        global_batch=cfg.run.global_batch_size, log=log,
                                        log_every=cfg.run.log_every_steps, max_batches=min(limits, default=None))
            if loader.step == len(loader):       # the epoch is over: validate, then its checkpoint
                break
            save(train_net, optimizer, loader, prog, **common)
            if max_steps and prog.step >= max_steps:
                return Result(prog.metrics, tally)
        epoch_s = time.perf_counter() - epoch_start
        tally, val_loss = evaluate(ckpt.unwrap(train_net), val_loader, worker=worker,
                                   num_classes=cfg.model.num_classes, mode=cfg.data.val_mode,
                                   amp_dtype=opts.amp_dtype)
        before = prog.schedule
        prog.schedule = plateau_step(before, tally.top1_error, prog.epoch, cfg.schedule)
        prog.epoch += 1
        prog.metrics = {"val/top1_err": tally.top1_error, "val/top5_err": tally.top5_error, "val/loss": val_loss,
                        "epoch_time_s": epoch_s, "lr_next": prog.schedule.lr,
                        "schedule/decays": prog.schedule.decays}
        if worker.rank == 0:
            log({**prog.metrics, "epoch": prog.epoch}, prog.step * cfg.run.global_batch_size)
            log_.info("epoch %d: val top-1 %.4f top-5 %.4f (%d images), %.1f s, next lr %g", prog.epoch,
                      tally.top1_error, tally.top5_error, tally.n, epoch_s, prog.schedule.lr)
        save(train_net, optimizer, loader, prog, best=improved(before, prog.schedule), **common)
        if max_steps and prog.step >= max_steps:  # landed on an epoch's last step: validated, saved
            break
    return Result(prog.metrics, tally)


def _next_multiple(step: int, every: int) -> int:
    """The next step after ``step`` that is a multiple of ``every`` (0 = never)."""
    return (step // every + 1) * every if every else 0
