"""One rank's training data over epochs, at whatever worker count the run has now
(docs/pipeline.md, "Resizing").

An epoch is read one of two ways:

- **streamed**: DALI's reader splits the training split over the W ranks itself
  (``pipeline.loader.TrainLoader``: ranks rotate over contiguous ranges epoch by epoch, and a restart at
  the same W resumes bit-identically from DALI's checkpoint). Used whenever W divides the global batch
  and the epoch starts at its beginning.
- **planned**: ``pipeline.epoch_plan`` cuts the samples not yet trained on this epoch into one chunk per
  rank, each rank its share of the global batch. Used for the rest of an epoch after the worker count
  changed (and after any restart inside a planned epoch), and for every epoch when W does not divide
  the global batch.

Either way every rank records the keys it trained on this epoch; a checkpoint keeps their union, which
is what a resumed run at another W leaves out. ``Epochs`` looks like a ``TrainLoader`` to the loop:
``for batch in loader`` yields the rest of the current epoch; ``epoch`` and ``step`` are absolute.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterator

from pipeline import epoch_plan
from pipeline.batch import Batch
from pipeline.loader import TrainLoader, training_split
from storage.dataset import open_dataset

class Epochs:
    """The training batches of rank ``rank`` of ``world``, from epoch ``epoch`` on, its share of
    ``global_batch`` each step. ``trained`` are the keys the run trained on in ``epoch`` before now
    (the checkpoint's ``epoch_keys``); ``state`` a saved ``state()`` to resume from bit-identically
    (same world size, a streamed epoch), else None."""

    def __init__(self, cfg, global_batch: int, rank: int, world: int, device_id: int | None = None,
                 seed: int = 0, *, epoch: int = 0, trained: frozenset[str] = frozenset(),
                 state: str | None = None, boxes: bool = False):
        self.cfg, self.global_batch, self.rank, self.world = cfg, global_batch, rank, world
        self.device_id, self.seed, self.boxes = device_id, seed, boxes
        self.before = trained
        if state is not None:
            saved = json.loads(state)
            self.base, self.kind = int(saved["base"]), "stream"
            self.loader = self._streamed(saved["loader"])
        else:
            self.base = epoch
            self.loader = self._open()

    # --- where the run is: absolute epoch, steps of the whole epoch -------------------------------

    @property
    def epoch(self) -> int:
        return self.base + self.loader.epoch

    @property
    def step(self) -> int:
        return self._steps_before() + self.loader.step

    def __len__(self) -> int:
        return self._steps_before() + len(self.loader)

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    @property
    def fingerprint(self) -> str:
        return self.loader.fingerprint

    def position(self) -> float:
        """Epochs done, as a fraction: the x axis a person reads a loss curve by."""
        return self.epoch + self.step / len(self) if len(self) else float(self.epoch)

    def _steps_before(self) -> int:
        # the steps of this epoch before the loader started: every one trained a whole global batch
        return len(self.before) // self.global_batch

    # --- the batches ----------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        if self.loader.step >= len(self.loader):     # the current epoch is over: on to the next one
            self.before = frozenset()
            if self.kind == "plan" or not self.world_divides():
                self.base = self.epoch + 1
                self.loader = self._open()           # a streamed loader moves on by itself
        yield from self.loader

    def trained(self) -> list[str]:
        """The keys this rank trained on in the current epoch since the loader started (the run's
        before that are ``before``, alike on every rank); empty once the epoch is over."""
        return [] if self.loader.step >= len(self.loader) else list(self.loader.trained)

    def world_divides(self) -> bool:
        return self.global_batch % self.world == 0

    def state(self) -> str:
        return json.dumps({"kind": self.kind, "base": self.base,
                           "loader": self.loader.state() if self.kind == "stream" else None})

    # --- the loader of an epoch --------------------------------------------------------------------

    def _open(self) -> TrainLoader:
        """The current epoch's loader: streamed from its start when W divides the global batch and
        nothing of it is trained yet, else planned over what is left of it."""
        if not self.before and self.world_divides():
            self.kind = "stream"
            return self._streamed(None)
        self.kind = "plan"
        return self._planned()

    def _streamed(self, state: str | None) -> TrainLoader:
        return TrainLoader(self.cfg, self.global_batch // self.world, self.rank, self.world, self.device_id,
                           seed=self.seed + self.base, state=state, boxes=self.boxes)

    def _planned(self) -> TrainLoader:
        folder = Path(tempfile.mkdtemp(prefix="vgg-epoch-plan-"))
        split = training_split(open_dataset(self.cfg.root), self.cfg.train_split, self.boxes)
        seed = (self.seed * 1_000_003 + self.base * 7_919 + len(self.before)) % (2**31 - 1)
        try:
            p = epoch_plan.plan(split, self.before, self.world, self.rank, self.global_batch, seed, folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if p.steps == 0:
            shutil.rmtree(folder, ignore_errors=True)
            raise ValueError(f"epoch {self.base}: {p.remaining} samples are left untrained, fewer than one "
                             f"global batch ({self.global_batch})")   # epochs that small are refused up front
        loader = TrainLoader(self.cfg, p.batch_size, 0, 1, self.device_id, seed=seed + self.rank,
                             boxes=self.boxes, split=p.split)
        weakref.finalize(loader, shutil.rmtree, str(folder), True)   # DALI reads the copies until then
        return loader
