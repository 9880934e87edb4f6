"""Hostile inputs to the readers of files and folders: a config that is a folder or not UTF-8, an OUT
that is a file, a folder where OUT's lock file belongs, and a writer whose lock another run took over.
Each ends as one ``error:`` line naming the path, exit status 2, no traceback (jobs/cli.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import cli
from jobs import preprocess as preprocess_job
from preprocessing import synthetic
from preprocessing import writer
from preprocessing.lock import LOCK, STALE_AFTER_S
from storage import dataformat as fmt

ROOT = Path(__file__).resolve().parent.parent


def one_error_line(main, argv: list[str], capsys) -> str:
    """Run ``main(argv)`` as the CLI does; its stderr must be one ``error:`` line, exit status 2."""
    rc = cli.run(main, argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


def train_main(argv):
    from jobs import train

    return train.main(argv)


def test_a_config_that_is_a_folder(tmp_path, capsys):
    line = one_error_line(train_main, ["--config", str(tmp_path), "--dry-run"], capsys)
    assert f"error: {tmp_path}: is a folder" in line


def test_a_config_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("run:\n  name: caf\u00e9\n".encode("latin-1"))
    line = one_error_line(train_main, ["--config", str(path), "--dry-run"], capsys)
    assert f"error: {path}: not a UTF-8 text file (byte 16" in line


@pytest.mark.parametrize("where", ["out", "parent"])
def test_preprocess_out_that_is_a_file(tmp_path, capsys, where):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    out = a_file if where == "out" else a_file / "shards"
    line = one_error_line(preprocess_job.main, [str(tmp_path), str(out), "--no-progress"], capsys)
    assert line.startswith(f"error: OUT {out}: not a folder")
    assert where == "out" or f"({a_file} is a file)" in line
    assert a_file.read_text() == "not a folder\n"


@pytest.mark.parametrize("break_lock", [False, True])
def test_a_folder_where_the_lock_belongs(tmp_path, capsys, break_lock):
    out = tmp_path / "out"
    (out / LOCK).mkdir(parents=True)
    argv = [str(tmp_path), str(out), "--workers", "1", "--no-progress"] + ["--break-lock"] * break_lock
    line = one_error_line(preprocess_job.main, argv, capsys)
    assert line == f"error: {out / LOCK} is a folder where the lock file belongs: remove it (rmdir {out / LOCK}) " \
                   "and run again"
    assert (out / LOCK).is_dir()  # left for the user: it is not ours to remove


# A second run on another pid takes the lock of a writer that stalled past the stale timeout, as
# preprocessing.writer does: take the lock, then remove the temporary files the stalled holder left.
TAKE_OVER = """
import os, sys
from pathlib import Path
from preprocessing.lock import Lock
from storage.files import remove_stale_temps
out = Path(sys.argv[1])
Lock(out, print).acquire()
print(os.getpid(), len(remove_stale_temps(out)))
"""


@pytest.mark.parametrize("when", ["mid-shard", "between shards"])
def test_a_writer_whose_lock_was_taken_over_says_so(tmp_path, capsys, monkeypatch, when):
    """'mid-shard': the shard's temporary tar is removed before its commit (ShardWriter.commit);
    'between shards': every shard commits, the check before publishing stops the run (Lock.check)."""
    source = synthetic.generate(tmp_path / "src", classes=2, train_per_class=4, val_per_class=0,
                                oddities=False, size_range=(32, 48))
    out = (tmp_path / "out").resolve()
    taker: list[subprocess.CompletedProcess] = []

    def take_over():
        old = time.time() - STALE_AFTER_S - 60
        os.utime(out / LOCK, (old, old))  # the holder (this process) stalled: no heartbeat for 16 minutes
        taker.append(subprocess.run([sys.executable, "-c", TAKE_OVER, str(out)], cwd=ROOT, capture_output=True,
                                    text=True, timeout=60, check=True))

    if when == "mid-shard":
        real_check, calls = writer._check, []

        def check_then_take_over(*args):
            calls.append(1)
            if len(calls) == 2:  # inside the first shard: its temporary tar exists, uncommitted
                take_over()
            return real_check(*args)

        monkeypatch.setattr(writer, "_check", check_then_take_over)
    else:
        real_process = writer.process_shard

        def process_then_take_over(job):
            r = real_process(job)
            if not taker:
                take_over()
            return r

        monkeypatch.setattr(writer, "process_shard", process_then_take_over)
    argv = [str(source), str(out), "--shard-size", "2", "--workers", "1", "--no-progress"]
    line = one_error_line(preprocess_job.main, argv, capsys)
    taker_pid, removed = map(int, taker[0].stdout.split()[-2:])
    holder = json.loads((out / LOCK).read_text())
    assert holder["pid"] == taker_pid != os.getpid()  # the taker's lock is left alone
    assert line.startswith(f"error: this run lost its lock on {out} to host {socket.gethostname()} "
                           f"pid {holder['pid']}, started {holder['started_at']} (lock file {out / LOCK}): "
                           "that run judged the lock stale"), line
    assert removed == (1 if when == "mid-shard" else 0)  # the stalled run's unfinished tar
    assert not fmt.info_path(out).exists()  # nothing published over the other run


def dry_run_argv(root, tmp_path) -> list[str]:
    sets = {"data.root": root, "run.storage_path": tmp_path / "runs", "tracking.enabled": "false",
            "run.global_batch_size": 4, "run.workers": 1}
    return ["--config", str(ROOT / "jobs/configs/demo.yaml"), "--dry-run",
            *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]


def test_a_dataset_json_counting_fewer_inputs_than_were_stored_is_one_line(sample_dataset, tmp_path, capsys):
    """dataset.json's 'inputs' decides which manifest rows count: one fewer would hide a stored
    sample from every exactly-once check. Refused before Ray, naming the manifest."""
    import shutil

    root = tmp_path / "fewer"
    shutil.copytree(sample_dataset, root)
    info = json.loads((root / "dataset.json").read_text())
    info["splits"]["val"]["inputs"] -= 1
    (root / "dataset.json").write_text(json.dumps(info))
    line = one_error_line(train_main, dry_run_argv(root, tmp_path), capsys)
    assert "val/manifest.parquet" in line and f"records num_samples {info['splits']['val']['num_samples']}" in line


def test_a_box_member_that_is_no_whole_number_of_boxes_is_named_before_dali(sample_dataset, tmp_path, capsys):
    """A 15-byte .box member (the index says so) would fail inside a DALI worker mid-epoch."""
    import shutil

    root = tmp_path / "box15"
    shutil.copytree(sample_dataset, root)
    idx = root / "val-000000.idx"
    head, first, *rest = idx.read_text().splitlines()
    f = first.split(" ")
    i = f.index("box")
    f[i + 2] = "15"
    idx.write_text("\n".join([head, " ".join(f), *rest]) + "\n")
    line = one_error_line(train_main, dry_run_argv(root, tmp_path), capsys)
    assert "val-000000.idx line 2" in line and "is 15 bytes, not a whole number of 16-byte boxes" in line
