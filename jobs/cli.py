"""What every entry point shares: how it ends, and the options of a sharded pass over a split.

How every entry point ends. A user's mistake (an unknown config key, a missing file, bad data, a
bad option value, a damaged checkpoint, a full disk) is one line on stderr naming what is wrong, and exit status 2
like argparse's own errors; anything else is a bug and keeps its traceback. ``main(argv)`` itself
still raises, so tests see the exception."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from pipeline.errors import CheckpointError, ConfigError
from storage.dataformat import DataError
from storage.files import StorageError


class UsageError(ValueError):
    """A command-line value argparse cannot check by itself (a range, a combination of options)."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, StorageError, UsageError, FileNotFoundError)


def positive(text: str) -> int:
    """argparse type for counts (timed iterations, images, workers): a rate over zero iterations means nothing."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    # MLflow's INFO lines (database migrations, "View run at ...") only when asked for, with
    # MLFLOW_LOGGING_LEVEL=INFO; it reads the variable when it is first imported.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    try:
        result = main(argv)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:   # `... | head` closed the pipe: no traceback; stdout to nowhere for the exit flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return result if isinstance(result, int) else 0


MAX_SCALE = 1024    # a test Q above it is refused: dense maps grow as Q^2 (the paper's largest Q is 768)


def pass_parser() -> argparse.ArgumentParser:
    """The options every sharded pass over a split takes (a parent parser); their names are the
    fields of ``jobs.passes.front.PassOptions``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--data", default="", help="dataset root (default: the run's data.root)")
    p.add_argument("--split", default="", help="split (default: the run's data.val_split)")
    p.add_argument("--scales", default="auto", help="auto (paper's 3 Q for the train S) | single | 256,384,512; "
                   f"each Q from the training crop to {MAX_SCALE}; 256/352,384: each net its own set")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="do not average with horizontally flipped views")
    p.add_argument("--workers", type=int, default=1, help="workers, each one DALI shard of the split")
    p.add_argument("--no-ray", dest="use_ray", action="store_false",
                   help="run the workers' shares one by one in this process")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (DALI mixed decode, bf16)")
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--tracking-uri", default="", help="MLflow, for run ids (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p
