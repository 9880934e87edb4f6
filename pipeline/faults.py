"""Fault injection for the tests, and only for them: each hook is called from one line of production
code and does nothing unless its ``VGG_TEST_*`` variable is set (tests/test_train.py,
tests/test_checkpoint.py set them in the processes they start). Never set them otherwise."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import BinaryIO

EXIT_AT_ENV = "VGG_TEST_EXIT_AT"           # "<rank>:<step>:<marker file>": that rank dies after that step, once
GATE_ENV = "VGG_TEST_STEP_GATE"            # a file holding the last step a rank may finish before it waits
CRASH_ENV = "VGG_TEST_CRASH_DURING_SAVE"   # any value: a checkpoint write dies halfway
CRASH_EXIT = 17
KEYS_ENV = "VGG_TEST_KEYS_DIR"             # a folder: every rank appends the keys of each step it trains


def after_step(rank: int, step: int) -> None:
    """Hold the step until the test allows it, or end the process the way a dying node does
    (``os._exit``: no cleanup), once: the marker file records that it happened, so the retried worker
    carries on."""
    if os.environ.get(GATE_ENV):
        _wait_at_gate(Path(os.environ[GATE_ENV]), step)
    spec = os.environ.get(EXIT_AT_ENV)
    if not spec:
        return
    r, s, marker = spec.split(":", 2)
    if int(r) == rank and int(s) == step and not os.path.exists(marker):
        Path(marker).write_text(f"rank {rank} exited at step {step}\n")
        os._exit(1)


def trained(rank: int, world: int, epoch: int, step: int, keys: list[str]) -> None:
    """Append "<time> <epoch> <step> <world> <keys...>" to this process's file in ``KEYS_ENV``'s folder:
    the per-rank record the tests count samples by (a step redone after a restart appears again, later)."""
    folder = os.environ.get(KEYS_ENV)
    if folder:
        with open(Path(folder) / f"rank{rank}-of-{world}-pid{os.getpid()}.log", "a") as f:
            f.write(f"{time.time():.6f} {epoch} {step} {world} {' '.join(keys)}\n")


def _wait_at_gate(gate: Path, step: int, poll_s: float = 0.05) -> None:
    """Wait until ``gate`` allows ``step``: a test sets when outside events happen by the step, not by
    the clock, so a loaded machine cannot run past them. The file is rewritten atomically by the test."""
    while step > int(gate.read_text() or 0):
        time.sleep(poll_s)


def during_write(f: BinaryIO) -> None:
    """Cut the file being written to half its length, make that durable, and die mid-write."""
    if os.environ.get(CRASH_ENV):
        f.flush()
        f.truncate(f.tell() // 2)
        os.fsync(f.fileno())
        os._exit(CRASH_EXIT)
