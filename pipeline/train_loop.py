"""The per-worker training loop in plain torch, readable top to bottom like torchvision's references.

``run_worker`` is what every data-parallel worker runs: ``setup`` builds the run (the net, its
optimizer, the DALI loaders, and where training stands: fresh, or a checkpoint's progress, RNG and
data position), then ``fit`` loops: train to the next checkpoint (``train_one_epoch``) → at an
epoch's end validate (``evaluate``) and step the plateau schedule → save, until the schedule or
``run.max_steps`` says stop. It imports neither Ray nor MLflow: the caller passes the rank, the world
size, the device and two callables, ``log(metrics, step)`` (rank 0's metrics, stepped by images seen)
and ``report(metrics, checkpoint_dir, best)`` (called by every rank at each checkpoint; rank 0 passes
the folder holding ``checkpoint.pt``, the others None). jobs/train.py binds them to ray.train.report
and MLflow; a test binds them to lists. ``torch.distributed`` must be initialised when world_size > 1.

The paper's recipe (section 3.1) with its defaults from pipeline/config.py: SGD, momentum 0.9, weight
decay 5e-4 on weights only (see docs/training.md), dropout 0.5, global batch 256 split evenly across
workers, lr 1e-2 divided by 10 when validation top-1 error stops improving (at most 3 times), 74 epochs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from pipeline import checkpoint as ckpt
from pipeline import config as config_lib
from pipeline import epoch_plan, faults, localise, scoring
from pipeline.ddp import apply_grad_compression
from pipeline.goodput import Ledger
from pipeline.epochs import Epochs
from pipeline.loader import EvalLoader
from pipeline.schedule import decay_metrics, improved, plateau_step, should_stop
from pipeline.step import StepOptions, layout, prepare, sgd, train_step
from pipeline.task import Task, Validation, all_reduce, freeze, task_for
from pipeline.train_state import Progress, restore, save
from pipeline.worker import Log, Report, Worker

__all__ = ["Log", "Report", "Result", "Run", "Worker", "fit", "run_worker", "setup"]

log_ = logging.getLogger("pipeline.train_loop")


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
    counts: torch.Tensor                 # (2,) Task.counts: top-1, top-5 misses; or box IoU, box misses
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


def log_window(w: Window, *, step: int, lr: float, loader: Epochs, worker: Worker, global_batch: int,
               log: Log, console: Throttle, total_steps: int = 0, task: Task = task_for()) -> None:
    """Rank 0 logs the window's train loss, the task's two rates (top-1/top-5 error, or box IoU and box
    error), images/s, data-wait fraction (over all ranks: every rank takes part in the reduction, a
    CPU-GPU sync point), the epoch as a fraction, so charts can put epochs on their x axis, and the
    worker count (``run/workers``: a resize shows on the charts); its console line adds the time to
    ``total_steps``."""
    images = torch.tensor([w.images], device=worker.device, dtype=torch.float32)
    loss, a, b, n = all_reduce(torch.cat([w.loss[None], w.counts, images]), worker.world_size).tolist()
    seconds = time.perf_counter() - w.start
    if worker.rank != 0:
        return
    (name_a, name_b) = task.count_names
    log({"train/loss": loss / n, name_a: a / n, name_b: b / n, "lr": lr,
         "train/images_per_s": n / seconds, "train/data_wait_frac": w.data_s / seconds,
         "epoch": loader.position(), "run/workers": worker.world_size}, step * global_batch)
    if console.due():
        eta = max(0, total_steps - step) * seconds / (n / global_batch)
        log_.info("epoch %d, step %d/%d: train loss %.4f, %s %.3f, %.0f img/s, data wait %.0f %%, ETA %s, "
                  "%d workers", loader.epoch + 1, loader.step, len(loader), loss / n, name_a.split("/")[1], a / n,
                  n / seconds, 100 * w.data_s / seconds, duration(eta), worker.world_size)


def duration(seconds: float) -> str:
    """'1 h 02 min', '3 min 05 s', '42 s': how long, for people."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def train_one_epoch(run: Run, max_batches: int | None = None) -> int:
    """Train on the rest of the loader's current epoch, or on ``max_batches`` of it; returns the global
    optimizer step count. Every ``run.log_every_steps`` steps rank 0 logs (``log_window``), its goodput
    ledger first: that needs no other rank, so it is recorded even when another rank has just died."""
    net, optimizer, loader, opts, worker, log, ledger, task = (run.net, run.optimizer, run.loader, run.opts,
                                                              run.worker, run.log, run.ledger, run.task)
    step, global_batch, log_every = run.prog.step, run.cfg.run.global_batch_size, run.cfg.run.log_every_steps
    total_steps = min(n for n in (run.cfg.schedule.epochs * len(loader), run.cfg.run.max_steps) if n)
    # this rank's share of the global batch over an even share: 1.0 unless the workers split it unevenly
    weight = loader.batch_size * worker.world_size / global_batch
    net.train()
    w = Window.new(worker.device)
    console = Throttle(CONSOLE_EVERY_S)
    batches = iter(loader)
    done = 0
    mark = None             # when the last batch arrived: from then to the next request is compute
    while max_batches is None or done < max_batches:
        t0 = time.perf_counter()
        if mark is not None:   # the step, and at log points the sync that waits for the device
            ledger.add("compute", t0 - mark)
        batch = next(batches, None)
        mark = time.perf_counter()
        if batch is None:
            mark = None
            break
        w.data_s += mark - t0
        ledger.add("data_wait", mark - t0)
        images = layout(batch.images.to(worker.device, non_blocking=True), opts)
        labels = batch.labels.to(worker.device, non_blocking=True)
        loss, out = train_step(net, optimizer, images, labels, opts.amp_dtype,
                               loss_fn=partial(part_loss, task, labels, batch.boxes), weight=weight,
                               micro_batch=run.cfg.run.micro_batch_size)
        w.loss += loss * labels.shape[0]
        w.counts += task.counts(out, labels, batch.boxes)
        w.images += labels.shape[0]
        step, done = step + 1, done + 1
        faults.trained(worker.rank, worker.world_size, loader.epoch, step, batch.keys)
        faults.after_step(worker.rank, step)
        if step % log_every == 0:
            if worker.rank == 0:
                log(ledger.metrics(), step * global_batch)
            log_window(w, step=step, lr=optimizer.param_groups[0]["lr"], loader=loader, worker=worker,
                       global_batch=global_batch, log=log, console=console, total_steps=total_steps, task=task)
            w = Window.new(worker.device)
    if mark is not None:
        ledger.add("compute", time.perf_counter() - mark)
    return step


def part_loss(task: Task, labels: torch.Tensor, boxes: torch.Tensor | None, out: torch.Tensor,
              part: slice) -> torch.Tensor:
    """The task's loss of the images ``part`` of a batch (all of it, or one accumulation step's)."""
    return task.loss(out, labels[part], None if boxes is None else boxes[part])


# ---------------------------------------------------------------------------------------------------
# Setup: the net, its optimizer, the loaders and where training stands
# ---------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """Everything ``fit`` needs, built once by ``setup``."""
    cfg: config_lib.Config
    worker: Worker
    opts: StepOptions
    net: nn.Module                       # the module to call: wrapped for data parallelism, maybe compiled
    optimizer: torch.optim.Optimizer
    loader: Epochs
    val_loader: EvalLoader
    prog: Progress
    report: Report
    log: Log
    run_id: Callable[[], str]
    ledger: Ledger = field(default_factory=Ledger)
    task: Task = field(default_factory=task_for)


def default_wrap(net: nn.Module, worker: Worker) -> nn.Module:
    """DDP when there is more than one worker (gloo on CPU, NCCL on GPU: whatever the group uses)."""
    if worker.world_size == 1:
        return net
    ids = [worker.device.index] if worker.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(net, device_ids=ids)


def initial_weights(net: nn.Module, cfg: config_lib.Config, task: Task) -> None:
    """The parent's weights, when ``model.init_from`` names one (a checkpoint location resolved by the
    job, or a bare state_dict such as torchvision's), as the task takes them (``Task.load_parent``);
    then the task's start (``Task.start``: ``model.box_bias``)."""
    if cfg.model.init_from:
        weights, path = ckpt.load_weights(cfg.model.init_from)
        log_.info("initialised %s from %s", task.load_parent(net, cfg, weights), path)
    task.start(net, cfg, lambda: localise.mean_box_cxcywh(cfg.data.root, cfg.data.train_split))


def build_net(cfg: config_lib.Config, worker: Worker, opts: StepOptions, resume: dict[str, Any] | None,
              wrap: Callable[[nn.Module, Worker], nn.Module]) -> tuple[nn.Module, torch.optim.Optimizer]:
    """(the module to call, its optimizer): the checkpoint's weights, else the parent's or fresh ones
    (seeded alike on every rank), on the device, prepared by ``pipeline.step.prepare``."""
    torch.manual_seed(cfg.run.seed)            # the same initial weights on every rank
    net = ckpt.build_model(cfg, cfg.model.num_classes)
    if resume is not None:
        net.load_state_dict(resume["model"])
    else:
        initial_weights(net, cfg, task_for(cfg.model.head))
    if freeze(net, cfg.model.train_layers):                 # before DDP and the optimizer see the net
        log_.info("model.train_layers %s: the convolutions are frozen", cfg.model.train_layers)
    net = net.to(worker.device)

    def distribute(n: nn.Module) -> nn.Module:
        wrapped = wrap(n, worker)
        if isinstance(wrapped, nn.parallel.DistributedDataParallel):
            apply_grad_compression(wrapped, cfg.run.grad_compression)
        return wrapped

    train_net = prepare(net, opts, wrap=distribute)
    # ``prepare`` changes the net in place and keeps its parameter objects, so these are the ones trained.
    optimizer = sgd(net, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.decay_bias,
                    cfg.optim.nesterov, fused=cfg.optim.fused and worker.device.type == "cuda")
    return train_net, optimizer


def setup(cfg: config_lib.Config, worker: Worker, *, report: Report, log: Log,
          resume: dict[str, Any] | None = None, run_id: Callable[[], str] = lambda: "",
          wrap: Callable[[nn.Module, Worker], nn.Module] = default_wrap) -> Run:
    """Build the run of ``cfg`` as ``worker``, fresh or from ``resume`` (see ``run_worker``)."""
    batch = epoch_plan.batches(cfg.run.global_batch_size, worker.world_size)[worker.rank]
    opts = step_options(cfg, worker.device)
    if worker.device.type == "cpu":
        # The worker's CPU share, not every core: oversubscribed OpenMP threads spin against each other
        # and against DALI's.
        torch.set_num_threads(max(1, cfg.run.cpus_per_worker))
    net, optimizer = build_net(cfg, worker, opts, resume, wrap)
    torch.manual_seed(cfg.run.seed * 1000 + worker.rank)   # dropout differs per rank
    prog, data_state, trained = restore(resume, optimizer, worker, cfg.optim.lr)
    task = task_for(cfg.model.head)
    # Without a data position (a fresh run, another world size) the epoch's order comes from the seed
    # and the epoch, so a resumed run does not replay epoch 0's order (pipeline/epochs.py).
    loader = Epochs(cfg.data, cfg.run.global_batch_size, worker.rank, worker.world_size, worker.device_id,
                    seed=cfg.run.seed, epoch=prog.epoch, trained=trained, state=data_state, boxes=task.boxes)
    if resume is not None and resume.get("dataset_fingerprint", "") != loader.fingerprint:
        raise ValueError(f"{cfg.data.root}: its dataset fingerprint {loader.fingerprint!r} is not the one "
                         f"this run was trained on ({resume.get('dataset_fingerprint')!r}); resume on the "
                         f"same shards, or start a new run.name")
    val_loader = EvalLoader(cfg.data, cfg.data.eval_batch_size or batch, worker.rank, worker.world_size,
                            worker.device_id, mode=cfg.data.val_mode, boxes=task.boxes)
    return Run(cfg, worker, opts, net, optimizer, loader, val_loader, prog, report, log, run_id, task=task)


# ---------------------------------------------------------------------------------------------------
# Fit: the epoch loop
# ---------------------------------------------------------------------------------------------------

@dataclass
class Result:
    """What ``run_worker`` returns: the last metrics and the last classification validation's counts
    (None when nothing was validated in this call, e.g. a rerun of a finished run, or for a box head)."""
    metrics: dict[str, float]
    tally: scoring.Tally | None = None


def steps_to_checkpoint(step: int, run_cfg: config_lib.RunConfig) -> int | None:
    """Steps from ``step`` to the next step checkpoint or ``max_steps``, whichever comes first (None:
    neither is set, train to the epoch's end)."""
    every, max_steps = run_cfg.checkpoint_every_steps, run_cfg.max_steps
    next_checkpoint = (step // every + 1) * every if every else 0
    return min((n - step for n in (next_checkpoint, max_steps) if n), default=None)


def fit(run: Run) -> Result:
    """Train to the next checkpoint; at an epoch's end validate it and step the schedule; save; until
    the schedule stops or ``run.max_steps`` steps are done. A stop at max_steps on an epoch's last step
    still validates that epoch, so a resume goes on with the next one."""
    cfg, prog, worker = run.cfg, run.prog, run.worker
    tally, epoch_start = None, time.perf_counter()
    while (not (cfg.run.max_steps and prog.step >= cfg.run.max_steps)
           and not should_stop(prog.schedule, prog.epoch, cfg.schedule)):
        for group in run.optimizer.param_groups:
            group["lr"] = prog.schedule.lr
        prog.step = train_one_epoch(run, max_batches=steps_to_checkpoint(prog.step, cfg.run))
        epoch_over = run.loader.step == len(run.loader)
        best = False
        if epoch_over:
            epoch_s = time.perf_counter() - epoch_start
            t0 = time.perf_counter()
            v = run.task.validate(ckpt.unwrap(run.net), run.val_loader, worker=worker,
                         num_classes=cfg.model.num_classes, mode=cfg.data.val_mode, amp_dtype=run.opts.amp_dtype)
            run.ledger.add("validation", time.perf_counter() - t0)
            before, tally = prog.schedule, v.tally
            # v.error: val top-1 error, or val localisation error for a box head (pipeline/task.py)
            prog.schedule = plateau_step(before, v.error, prog.epoch, cfg.schedule)
            prog.epoch += 1
            best = improved(before, prog.schedule)
            prog.metrics = {**v.metrics, "epoch_time_s": epoch_s, "lr_next": prog.schedule.lr,
                            "schedule/decays": prog.schedule.decays,
                            **decay_metrics(before, prog.schedule, prog.epoch, v.error)}
            log_epoch(run, v)
        t0 = time.perf_counter()
        prog.metrics = {**prog.metrics, **run.ledger.metrics()}      # the checkpoint carries the ledger
        save(run.net, run.optimizer, run.loader, prog, cfg=cfg, worker=worker, report=run.report,
             run_id=run.run_id, best=best)
        run.ledger.add("checkpoint", time.perf_counter() - t0)
        if epoch_over:
            epoch_start = time.perf_counter()
    return Result(prog.metrics, tally)


def log_epoch(run: Run, v: Validation) -> None:
    """Rank 0 logs the epoch's validation metrics, stepped by images seen, and a line in its log."""
    if run.worker.rank != 0:
        return
    prog = run.prog
    run.log({**prog.metrics, "epoch": prog.epoch}, prog.step * run.cfg.run.global_batch_size)
    log_.info("epoch %d: %s, %.1f s, next lr %g", prog.epoch, v.summary, prog.metrics["epoch_time_s"],
              prog.schedule.lr)


def run_worker(cfg: config_lib.Config, worker: Worker, *, report: Report, log: Log,
               resume: dict[str, Any] | None = None, run_id: Callable[[], str] = lambda: "",
               wrap: Callable[[nn.Module, Worker], nn.Module] = default_wrap,
               ledger: Ledger | None = None, started: float | None = None) -> Result:
    """Train (or resume) one run of ``cfg`` as ``worker``: ``fit(setup(...))``.

    ``resume`` is a loaded checkpoint dict (``pipeline.checkpoint.load_checkpoint``): the model,
    optimizer, schedule, epoch, step, this rank's RNG and data position come from it. ``cfg`` must be
    resolved (``model.num_classes`` > 0, ``model.init_from`` a location). ``wrap`` turns the net into
    its data-parallel form (jobs/train.py passes Ray's prepare_model). ``run_id()`` is the MLflow
    run id to keep in checkpoints (it may become known mid-run, when the server comes back).
    ``ledger`` is where the run's time went so far (``pipeline.goodput``; fresh when None); the time
    from ``started`` (a ``time.perf_counter()`` of the worker's start) to the first step is startup, or
    resize when ``resume`` was taken by another number of workers.
    """
    started = time.perf_counter() if started is None else started
    run = setup(cfg, worker, report=report, log=log, resume=resume, run_id=run_id, wrap=wrap)
    if ledger is not None:
        run.ledger = ledger
    run.ledger.add("resize" if resized(resume, worker) else "startup", time.perf_counter() - started)
    return fit(run)


def resized(resume: dict[str, Any] | None, worker: Worker) -> bool:
    """Whether this start resumes a checkpoint taken by another number of workers: its time to the
    first step (and its restore) is the goodput ledger's ``resize``."""
    return resume is not None and len(resume.get("workers", ())) != worker.world_size
