"""The one front of every sharded pass over a split (classification and localisation evaluation,
features, transfer): the ``--run`` nets resolved and checked (``passes.members``), the split's data,
the pass run as W ranks (``cluster.ranks``), and every image checked to have been counted exactly
once with its manifest label before any figure is computed. A pass's results leave through
``passes.results``."""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from jobs.cli import UsageError
from jobs.cluster.ranks import run_ranks
from jobs.passes.members import Member, check_ensemble, resolve_member
from pipeline import config as config_lib
from pipeline import evaluate as E
from pipeline.batch import Batch
from storage.dataset import Dataset


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """How a pass runs; the fields are the options of ``cli.pass_parser``."""
    data: str = ""                # dataset root ("": the first net's data.root)
    split: str = ""               # split ("": the first net's data.val_split)
    scales: str = "auto"
    flip: bool = True
    workers: int = 1
    use_ray: bool = True
    gpu: bool = False
    cpus_per_worker: int = 1
    tracking_uri: str = ""
    quiet: bool = False

    def __post_init__(self):
        if self.workers < 1:
            raise UsageError(f"--workers must be >= 1, got {self.workers}")
        if not isinstance(self.scales, str) or not self.scales.strip():   # argparse turns --scales=-- into []
            raise UsageError(f"--scales {self.scales!r}: auto, single or comma-separated integers")

    @classmethod
    def of(cls, options: Mapping) -> "PassOptions":
        """The pass's own fields out of a mapping of every option an entry point parsed."""
        return cls(**{f.name: options[f.name] for f in dataclasses.fields(cls)})

    @property
    def threads(self) -> int:
        """torch threads of one Ray task (0: leave them, in-process)."""
        return self.cpus_per_worker if self.use_ray else 0

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.gpu else None


def tracking_uri(opts: PassOptions) -> str:
    return opts.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")


def open_members(specs: Iterable[str], opts: PassOptions) -> list[Member]:
    """The nets ``specs`` name, checked to form an ensemble (classes, crop, dataset)."""
    members = [resolve_member(spec, tracking_uri(opts)) for spec in specs]
    check_ensemble(members)
    return members


def results_uri(opts: PassOptions, first: config_lib.Config) -> str:
    """Where results runs go: the option or environment, else the first net's own tracking URI."""
    return tracking_uri(opts) or (first.tracking.uri if first.tracking.enabled else "")


def split_data(cfg: config_lib.Config, opts: PassOptions, split: str = "") -> config_lib.DataConfig:
    """The net's data config pointed at the pass's root and split, decoded for evaluation."""
    return dataclasses.replace(cfg.data, root=opts.data or cfg.data.root,
                               val_split=split or opts.split or cfg.data.val_split, layout="NCHW",
                               dtype="float32", decode="mixed" if opts.gpu else "cpu")


def open_split(ds: Dataset, data: config_lib.DataConfig, opts: PassOptions) -> dict[str, int]:
    """The split's stored {key: label}, its shards and indexes checked here in the driver before any
    rank reads them (a damaged shard is one error line, not a rank's traceback), and at least one
    image per worker."""
    ds.split(data.val_split)
    expected = ds.stored_labels(data.val_split)
    if opts.workers > len(expected):
        raise UsageError(f"--workers {opts.workers}: more than the {len(expected)} stored images of split "
                         f"{data.val_split!r}; each worker needs at least one")
    return expected


def run(work: Callable[..., object], opts: PassOptions, total: int, desc: str) -> list:
    """``work(rank, world, progress)`` on every rank of the pass (``cluster.ranks.run_ranks``)."""
    return run_ranks(work, opts.workers, total, opts.use_ray, opts.gpu, opts.cpus_per_worker, opts.quiet, desc)


def check_counted_once(shares: Iterable[tuple[list[str], torch.Tensor]], expected: dict[str, int]) -> None:
    """Before any figure: each stored image exactly once over the ranks' (keys, labels), each with
    the manifest's label."""
    shares = list(shares)
    E.check_exactly_once([E.ShareResult(keys, labels, {}) for keys, labels in shares], expected)
    for keys, labels in shares:
        wrong = [k for k, lbl in zip(keys, labels.tolist()) if expected[k] != lbl]
        if wrong:
            raise RuntimeError(f"labels from the shards differ from the manifest for keys {wrong[:5]}")


# ----------------------------------------------------------------------------- one rank's side

def prepare_rank(nets: list[nn.Module], data: config_lib.DataConfig, batch_size: int, rank: int, world: int,
                 use_gpu: bool, threads: int, boxes: bool = False) -> tuple[list[nn.Module], torch.device, Callable]:
    """One rank's setup for its share: its thread count, device, the nets in that device's memory
    format, and ``batches_at(Q)`` (with ``Batch.gt_boxes`` when ``boxes``). A Ray task with
    num_gpus=1 sees only its GPU, as index 0."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    if use_gpu:  # channels_last weights make cuDNN run NHWC kernels (the bench measures this setting)
        nets = [n.to(memory_format=torch.channels_last) for n in nets]
    batches_at = functools.partial(loader_batches, data, batch_size, rank, world, 0 if use_gpu else None, boxes)
    return nets, device, batches_at


def loader_batches(data: config_lib.DataConfig, batch_size: int, rank: int, world: int,
                   device_id: int | None, boxes: bool, q: int) -> Iterable[Batch]:
    """This rank's share rescaled to Q by DALI, whole images grouped by size (one decode per image
    per scale); every protocol is cut from these in torch."""
    from pipeline.loader import EvalLoader

    yield from EvalLoader(data, batch_size, rank, world, device_id=device_id, mode="dense", scale=q, boxes=boxes)
