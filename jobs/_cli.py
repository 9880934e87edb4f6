"""How every entry point ends. A user's mistake (an unknown config key, a missing file, bad data, a
bad option value, a damaged checkpoint, a full disk) is one line on stderr naming what is wrong, and exit status 2
like argparse's own errors; anything else is a bug and keeps its traceback. ``main(argv)`` itself
still raises, so tests see the exception."""
from __future__ import annotations

import os
import sys
from typing import Callable

from pipeline.errors import CheckpointError
from pipeline.config import ConfigError
from storage.dataformat import DataError
from storage.files import StorageError


class UsageError(ValueError):
    """A command-line value argparse cannot check by itself (a range, a combination of options)."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, StorageError, UsageError, FileNotFoundError)


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
