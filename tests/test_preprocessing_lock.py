"""One writer at a time on OUT (preprocessing/lock.py), with real writer processes: a second writer is
refused while the first runs, a killed writer's lock is recovered, concurrent runs never leave a folder
that verify rejects, and readers see a consistent dataset while a run adds to it."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from odd_sample import snapshot
from preprocessing import synthetic
from preprocessing.lock import LOCK, STALE_AFTER_S, LockError
from preprocessing.verify import verify
from preprocessing.writer import preprocess
from storage import dataformat as fmt

ROOT = Path(__file__).resolve().parent.parent
SHARD = 7  # the session sample_dataset's shard size (conftest.py)

# A real writer that stops, holding OUT's lock, after its first shard: it touches FLAG and waits for GO.
HOLDING_WRITER = """
import sys, time, pathlib
from preprocessing.writer import preprocess
source, out, flag, go, seed = sys.argv[1:6]
def map_fn(fn, jobs):
    for i, job in enumerate(jobs):
        yield fn(job)
        if i == 0:
            pathlib.Path(flag).touch()
            while not pathlib.Path(go).exists():
                time.sleep(0.01)
preprocess(source, out, shard_size=7, seed=int(seed), progress=False, map_fn=map_fn)
"""


def holding_writer(source: Path, out: Path, tmp: Path, seed: int = 0) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDING_WRITER, str(source), str(out), str(tmp / "flag"),
                          str(tmp / "go"), str(seed)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 120
    while not (tmp / "flag").exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "the writer never reached its first shard"
        time.sleep(0.02)
    return p


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.preprocess", *map(str, args), "--workers", "1",
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_a_second_writer_is_refused_while_the_first_runs(sample_source, sample_dataset, tmp_path):
    out = tmp_path / "out"
    first = holding_writer(sample_source, out, tmp_path)
    holder = json.loads((out / LOCK).read_text())
    assert holder["pid"] == first.pid and holder["host"] == socket.gethostname() and holder["started_at"]
    second = cli(sample_source, out, "--shard-size", SHARD)
    line = one_error_line(second)
    assert f"being written by another preprocessing run: host {socket.gethostname()} pid {first.pid}" in line
    assert "--break-lock" in line
    (tmp_path / "go").touch()
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert not (out / LOCK).exists()  # released at the end
    assert verify(out) == [] and snapshot(out) == snapshot(sample_dataset)
    lines = []
    preprocess(sample_source, out, progress=False, log=lines.append)  # the lock is free again
    assert "nothing to do" in lines[-1]


def test_a_killed_writers_lock_is_recovered(sample_source, sample_dataset, tmp_path):
    out = tmp_path / "out"
    first = holding_writer(sample_source, out, tmp_path)
    first.kill()  # SIGKILL: no cleanup, the lock file stays
    first.wait()  # reaped: its pid is gone
    assert json.loads((out / LOCK).read_text())["pid"] == first.pid
    lines = []
    preprocess(sample_source, out, progress=False, log=lines.append)  # no options: the killed run's
    assert any(f"removed the lock of host {socket.gethostname()} pid {first.pid}" in line
               and f"its process {first.pid} is gone" in line for line in lines), lines
    assert not (out / LOCK).exists()
    assert verify(out) == [] and snapshot(out) == snapshot(sample_dataset)


def test_concurrent_writers_never_leave_a_folder_verify_rejects(sample_source, tmp_path):
    """Three writers with different seeds started together into one fresh OUT: one wins, the others
    stop with one error line (locked, or built with another seed), and the folder is sound."""
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "jobs.preprocess", str(sample_source), str(out), "--seed",
                               str(seed), "--shard-size", str(SHARD), "--workers", "1", "--no-progress"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (0, 1, 2)]
    results = []
    for seed, p in enumerate(procs):
        stdout, stderr = p.communicate(timeout=300)
        results.append((seed, subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)))
    winners = [seed for seed, r in results if r.returncode == 0]
    assert len(winners) == 1, [(r.returncode, r.stderr) for _, r in results]
    for seed, r in results:
        if r.returncode != 0:
            line = one_error_line(r)
            assert "being written by another preprocessing run" in line or f"--seed {seed} (OUT has" in line
    assert verify(out) == []
    info = fmt.read_info(out)
    assert info["seed"] == winners[0]
    keys = [r["key"] for s in info["splits"] for r in fmt.read_manifest(out, s).to_pylist()]
    assert len(keys) == len(set(keys)) == 80


def lock_file(out: Path, host: str, age_s: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK).write_text(json.dumps({"host": host, "pid": 1, "started_at": "earlier", "token": "x"}))
    t = time.time() - age_s
    os.utime(out / LOCK, (t, t))


def test_a_lock_from_another_host_is_stale_only_when_old_and_break_lock_removes_any(tmp_path):
    source = synthetic.generate(tmp_path / "s", classes=2, train_per_class=2, val_per_class=0, size_range=(32, 48))
    out, lines = tmp_path / "out", []
    lock_file(out, "elsewhere", 60)  # alive, as far as anyone here can tell
    with pytest.raises(LockError, match="being written by another preprocessing run: host elsewhere pid 1"):
        preprocess(source, out, progress=False, log=lines.append)
    preprocess(source, out, progress=False, log=lines.append, break_lock=True)
    assert any("removed the lock of host elsewhere pid 1" in line and "--break-lock" in line for line in lines)
    lock_file(out, "elsewhere", STALE_AFTER_S + 120)  # nobody refreshed it for 17 minutes
    preprocess(source, out, progress=False, log=lines.append)
    assert any("nobody has refreshed it for 17 minutes" in line for line in lines)
    assert not (out / LOCK).exists() and verify(out) == []


def test_readers_see_the_published_dataset_while_a_run_adds_to_it(sample_source, sample_dataset, tmp_path):
    """What a reader can meet mid-publication: new shards on disk and the new manifest, with the
    dataset.json from before (published last). It sees exactly the old dataset."""
    from storage import dataset

    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(sample_source, src)
    shutil.copytree(sample_dataset, out)
    old_json = (out / fmt.DATASET_JSON).read_bytes()
    old_rows = {s: fmt.read_manifest(out, s).to_pylist() for s in ("train", "val")}
    for p in sorted((src / "train").rglob("*_1.JPEG")):
        shutil.copy(p, p.with_name(p.stem + "00.JPEG"))  # 4 new files (_100), one per class
    preprocess(src, out, progress=False, log=lambda s: None)
    new_info = fmt.read_info(out)
    assert len(new_info["splits"]["train"]["shards"]) == 8 and fmt.read_manifest(out, "train").num_rows == 52
    (out / fmt.DATASET_JSON).write_bytes(old_json)  # the moment before dataset.json is replaced
    assert {s: fmt.read_manifest(out, s).to_pylist() for s in ("train", "val")} == old_rows
    assert verify(out, decode=False) == []
    train = dataset.load_split(out, "train")
    assert len(train.shards) == 7 and train.num_samples == 48
    assert set(dataset.stored_labels(out, "train")) == {r["key"] for r in old_rows["train"]}
