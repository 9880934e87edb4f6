"""README's commands, run as written: every line of the first block under "The path of the data, as
commands", in a fresh folder where README's relative paths (sample/, shards/, runs/, jobs/configs/)
mean what they say, with a local Ray and MLflow in SQLite as a newcomer would have. About 3 minutes."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TITLE = "## The path of the data, as commands"


def readme_commands() -> list[str]:
    """The first bash block of README's data-path section, one command a line, comments cut."""
    section = (REPO / "README.md").read_text().split(TITLE, 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_every_command_of_the_readmes_data_path_runs_as_written(tmp_path):
    commands = readme_commands()
    assert len(commands) >= 8 and all(c.startswith("python -m jobs.") for c in commands), commands
    (tmp_path / "jobs").symlink_to(REPO / "jobs")          # jobs/configs/... as README names them
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    for command in commands:
        argv = shlex.split(command)
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        # the command's own tracebacks start a line; Ray's actors' come prefixed "(Actor pid=...)"
        assert not any(line.startswith("Traceback") for line in proc.stderr.splitlines()), proc.stderr[-3000:]
    # what they were meant to leave: shards, both runs' best weights, both evaluations' tables
    assert (tmp_path / "shards" / "dataset.json").is_file()
    for run in ("small-cpu", "small-pcr"):
        assert list((tmp_path / "runs" / run).glob("best/*.pt")), run
    tables = [p.parent.name for p in tmp_path.glob("eval-*/results.md")]
    assert len(tables) == 2 and sum(t.startswith("eval-loc-") for t in tables) == 1, tables
