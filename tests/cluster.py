"""Driving ``python -m jobs.train`` in the training tests: --set overrides for a few seconds of
training, the process started against the session's Ray cluster, and what to read back from the run
folder and the MLflow server. The processes themselves come from tests/conftest.py's fixtures."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline import checkpoint as ckpt
from pipeline import faults
from storage import files
from services import stop_group
from tiny import tiny_sets

REPO = Path(__file__).resolve().parents[1]


def small(dataset: Path, storage: Path, name: str, uri: str, **over) -> list[str]:
    """--set overrides for a few seconds of training: net A at width 1/16 on 32 px crops, 2 workers,
    global batch 16 (3 steps per epoch on the 48-image sample), every step logged."""
    sets = tiny_sets(dataset, **{
        "model.name": "A", "model.num_classes": 0, "run.workers": 2, "run.global_batch_size": 16,
        "run.storage_path": storage, "run.name": name, "run.log_every_steps": 1, "run.keep_last": 2,
        "schedule.epochs": 2, "schedule.patience": 100, "tracking.uri": uri, "tracking.experiment": name,
        "tracking.retry_s": 1.0, "tracking.system_metrics": False, "tracking.log_model": False, **over})
    out = []
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def train_proc(cluster, args: list[str], log: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.train", *args], cwd=REPO,
                            env={**cluster["env"], **env}, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def gate(path: Path, step: int) -> dict[str, str]:
    """Let the workers finish steps up to ``step``, then hold them (pipeline/faults.py); the env that
    points them at the gate file."""
    files.atomic_write(path, f"{step}\n".encode())
    return {faults.GATE_ENV: str(path)}


def run_train(cluster, args: list[str], log: Path, timeout: float = 400, **env) -> str:
    return succeeded(train_proc(cluster, args, log, **env), log, timeout)


def succeeded(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    """Wait for ``proc`` (then stop its group whatever happened), assert it exited 0; its output."""
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        stop_group(proc)
    text = log.read_text()
    assert rc == 0, text[-6000:]
    return text


def checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{ckpt.PREFIX}*/{ckpt.FILENAME}"))


def only_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def steps_of(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def submit_job(cluster, args: list[str], cwd: Path, log: Path, timeout: float = 300) -> str:
    """``python -m jobs.submit`` from ``cwd`` to the cluster's Jobs API, waiting for the job to end
    (the nodes share this machine's environment: --python is this interpreter); its output."""
    proc = subprocess.Popen([sys.executable, "-m", "jobs.submit", "--address", cluster["dashboard"],
                             "--python", sys.executable, *args], cwd=cwd, env=cluster["env"],
                            stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)
    return succeeded(proc, log, timeout)
