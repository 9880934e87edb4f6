"""Long runs you can trust (docs/training.md, "What survives what"), on the session's two-node Ray
cluster with real faults: rank 0 killed while the tracking server is away, resumes asked for on
purpose, a disk that fills up mid-run (a real tmpfs). The driver SIGKILL and the server stopped until
the end are in test_train.py."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cluster import REPO, checkpoints, gate, only_run, run_train, small, train_proc
from pipeline import checkpoint as ckpt
from services import free_port, stop_group, wait_for
from test_train import assert_every_point_once

DEMO = ["--config", str(REPO / "jobs/configs/demo.yaml")]


def test_rank0_killed_during_an_outage_loses_no_metric_point(ray_cluster, mlflow_server, sample_dataset, tmp_path):
    """No server at all while training; rank 0 dies after step 7 and the group resumes from the
    step-6 checkpoint. The points rank 0 had buffered up to that checkpoint were in the journal: once
    the server is up, the same command again delivers every point exactly once and finishes the run."""
    port, storage, marker = free_port(), tmp_path / "runs", tmp_path / "rank0-exited"
    args = [*DEMO, *small(sample_dataset, storage, "outage", f"http://127.0.0.1:{port}",
                          **{"schedule.epochs": 4, "run.checkpoint_every_steps": 2, "run.max_failures": 1})]
    text = run_train(ray_cluster, args, tmp_path / "train.log", timeout=400,
                     VGG_TEST_EXIT_AT=f"0:7:{marker}")
    assert marker.is_file() and "resumes at epoch 2, step 6" in text, text[-3000:]
    assert (storage / "outage" / "mlflow_journal.jsonl").is_file()

    server = mlflow_server(port)
    again = run_train(ray_cluster, args, tmp_path / "again.log", timeout=120)
    assert "is complete" in again
    run = only_run(server.client(), "outage")
    assert run.info.status == "FINISHED" and run.data.params["run.name"] == "outage"
    assert_every_point_once(server.client(), run, steps=12, log_every=1, epochs=4, batch=16)


def test_resume_is_on_purpose(ray_cluster, shared_mlflow, sample_dataset, tmp_path):
    """A finished run: another model is refused (one error line naming the key, the run stays
    FINISHED); more epochs are applied, printed and recorded; the same command again says the run is
    complete and exits 0 without starting Ray."""
    storage = tmp_path / "runs"
    args = [*DEMO, *small(sample_dataset, storage, "purpose", shared_mlflow.uri)]
    run_train(ray_cluster, args, tmp_path / "first.log")
    client = shared_mlflow.client()
    run_id = only_run(client, "purpose").info.run_id

    refused = subprocess.run([sys.executable, "-m", "jobs.train", *args, "--set", "model.name=B", "--set", "optim.lr=0.02"],
                             cwd=REPO, env=ray_cluster["env"], capture_output=True, text=True, timeout=120)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), refused.stderr
    assert "model.name" in lines[0] and "optim.lr" in lines[0] and "run.name" in lines[0]
    assert client.get_run(run_id).info.status == "FINISHED"

    longer = run_train(ray_cluster, [*args, "--set", "schedule.epochs=3"], tmp_path / "longer.log")
    assert "with changed schedule.epochs 2 -> 3" in longer
    assert ckpt.load_checkpoint(storage / "purpose", "latest")["epoch"] == 3
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "schedule.epochs 2 -> 3" in run.data.tags["resume.step6.changed"]

    again = run_train(ray_cluster, [*args, "--set", "schedule.epochs=3"], tmp_path / "again.log", timeout=60)
    assert "is complete: epoch 3, step 9" in again and "Ray" not in again


@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MiB tmpfs (root can mount here, and so can CI: the same kind of machine)."""
    where = tmp_path / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(where)], check=True)
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_disk_full_mid_run_leaves_every_checkpoint_whole_and_says_so(ray_cluster, sample_dataset, small_disk,
                                                                      tmp_path):
    """Another process fills the disk after the second checkpoint, leaving room for half of one: the
    next checkpoint cannot be written, the run stops with one error line naming the storage and the
    space, and every checkpoint file under its final name loads."""
    storage = small_disk / "runs"
    args = [*DEMO, *small(sample_dataset, storage, "full", "", **{
        "schedule.epochs": 12, "run.checkpoint_every_steps": 1, "run.keep_last": 8,   # Ray deletes none
        "tracking.enabled": "false"})]
    held = gate(tmp_path / "gate", 2)       # the workers wait after step 2 until the disk is full
    proc = train_proc(ray_cluster, args, tmp_path / "train.log", **held)
    try:
        wait_for(lambda: len(checkpoints(storage / "full")) >= 2, 300, "two checkpoints", proc=proc)
        one = checkpoints(storage / "full")[-1].stat().st_size
        free = subprocess.run(["df", "--output=avail", "-B1", str(small_disk)], capture_output=True,
                              text=True).stdout.split()[-1]
        (small_disk / "filler").write_bytes(b"\0" * max(0, int(free) - one // 2))   # room for half of one
        gate(tmp_path / "gate", 36)
        rc = proc.wait(timeout=300)
    finally:
        stop_group(proc)
    text = (tmp_path / "train.log").read_text()
    assert rc == 2, text[-4000:]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(storage) in errors[0] and "full" in errors[0] and "MiB" in errors[0]
    driver = [line for line in text.splitlines() if "RayTrainWorker" not in line and "(Train" not in line]
    assert not [line for line in driver if "Traceback" in line]     # the workers' own say why, in Ray's log
    saved = sorted(storage.rglob(ckpt.FILENAME))
    assert len(saved) >= 2
    for path in saved:                                   # nothing cut short under a final name
        assert ckpt.load_checkpoint(path)["format"] == ckpt.FORMAT
    assert not [p for p in storage.rglob("*") if p.name.startswith(".tmp-")]
