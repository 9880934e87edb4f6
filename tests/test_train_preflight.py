"""The training driver checks everything it can before Ray starts: each bad input below ends as one
``error:`` line naming the key, file or folder, exit status 2, within seconds, and Ray is never
started (``jobs.cluster.connect`` fails the test if it is called). ``--dry-run`` says what would happen."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model
from jobs import cli
from jobs import cluster
from jobs import train as J
from pipeline import checkpoint as ckpt
from tiny import tiny_sets


def args_for(dataset, storage, **over) -> list[str]:
    sets = tiny_sets(dataset, **{"model.num_classes": 0, "run.workers": 2, "run.global_batch_size": 16,
                                 "run.storage_path": storage, "run.name": "pre", "schedule.epochs": 2,
                                 "tracking.enabled": "false", **over})
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")
    monkeypatch.setattr(cluster, "connect", refuse)


@pytest.fixture
def places(tmp_path, sample_dataset):
    """Folders the cases point at: a file, an empty folder, a dataset with one shard cut short."""
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "empty").mkdir()
    cut = tmp_path / "cut"
    shutil.copytree(sample_dataset, cut)
    shard = sorted(cut.glob("train-*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:-4096])
    torch.save(model.build("A", num_classes=10, width=0.0625, image_size=32).state_dict(), tmp_path / "tv.pth")
    return tmp_path


CASES = [  # (id, overrides; {tmp} is the test's folder, what the error line must name)
    ("negative-lr", {"optim.lr": -1}, "optim.lr"),
    ("negative-epochs", {"schedule.epochs": -1}, "schedule.epochs"),
    ("zero-epochs", {"schedule.epochs": 0}, "schedule.epochs"),
    ("batch-larger-than-dataset", {"run.global_batch_size": 64}, "run.global_batch_size"),
    ("fewer-images-than-workers", {"run.global_batch_size": 1}, "more workers than images"),
    ("elastic-without-retries", {"run.workers": "1-2"}, "run.max_failures is 0"),
    ("unknown-model", {"model.name": "F"}, "model.name"),
    ("crop-larger-than-scale", {"data.crop_size": 96}, "data.scale_min"),
    ("missing-data-root", {"data.root": "{tmp}/nowhere"}, "nowhere/dataset.json"),
    ("data-root-is-a-file", {"data.root": "{tmp}/a-file"}, "a-file"),
    ("data-root-not-preprocessed", {"data.root": "{tmp}/empty"}, "empty/dataset.json"),
    ("shard-cut-short", {"data.root": "{tmp}/cut"}, "train-"),
    ("storage-under-a-file", {"run.storage_path": "{tmp}/a-file/runs"}, "run.storage_path"),
    ("no-room-for-checkpoints", {"run.keep_last": 10 ** 7}, "run.keep_last"),
    ("must-resume-nothing", {"run.resume": "must"}, "run.resume"),
    ("missing-parent", {"model.init_from": "{tmp}/no-parent"}, "no-parent"),
    ("parent-with-other-classes", {"model.init_from": "{tmp}/tv.pth"}, "model.reinit_head"),
    ("a-gpu-on-this-cpu-machine", {"run.use_gpu": "true"}, "run.use_gpu"),
]


@pytest.mark.parametrize("case, over, names", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_error_line_before_ray(case, over, names, places, sample_dataset, no_ray, capsys):
    over = {k: str(v).format(tmp=places) for k, v in over.items()}
    code = cli.run(J.main, args_for(sample_dataset, places / "runs", **over))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert names in err[0]


def test_resume_never_refuses_a_run_with_checkpoints(sample_dataset, tmp_path, no_ray, capsys):
    folder = tmp_path / "runs" / "pre"
    cfg, _ = J.resolve(J.config_lib.load(None, args_for(sample_dataset, tmp_path / "runs")[1::2]))
    state = {"model": ckpt.build_model(cfg, 4).state_dict(), "config": J.config_lib.dump(cfg), "num_classes": 4}
    ckpt.save_checkpoint(ckpt.weights_only(state), folder / "checkpoint_0000000003" / ckpt.FILENAME)
    assert cli.run(J.main, args_for(sample_dataset, tmp_path / "runs", **{"run.resume": "never"})) == 2
    err = capsys.readouterr().err
    assert "run.resume=never" in err and "checkpoint_0000000003" in err


def test_dry_run_says_what_would_happen_and_starts_nothing(sample_dataset, tmp_path, no_ray):
    proc = subprocess.run([sys.executable, "-m", "jobs.train", *args_for(sample_dataset, tmp_path / "runs"), "--dry-run"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "new run 'pre'" in proc.stdout
    assert "48 training images, 3 steps per epoch at global batch 16" in proc.stdout
    assert "run.name: pre" in proc.stdout or "name: pre" in proc.stdout        # the resolved config
    assert not (tmp_path / "runs" / "pre").exists() or not any((tmp_path / "runs" / "pre").iterdir())



def test_a_gpu_asked_of_a_cpu_only_cluster_is_one_error_line_and_no_mlflow_run(ray_cluster, shared_mlflow,
                                                                             sample_dataset, tmp_path):
    """Ray would wait for a GPU node forever (and Ray Train time out every minute); the driver asks
    the cluster what its nodes can ever offer before any MLflow run exists."""
    from cluster import small

    args = small(sample_dataset, tmp_path / "runs", "gpu-ask", shared_mlflow.uri, **{"run.use_gpu": "true"})
    proc = subprocess.run([sys.executable, "-m", "jobs.train", *args], cwd=Path(__file__).resolve().parents[1],
                          env=ray_cluster["env"], capture_output=True, text=True, timeout=120)
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-3000:]
    assert "run.use_gpu" in err[0] and "GPU 0 in all" in err[0] and "2 node(s)" in err[0], err
    assert "Traceback" not in proc.stderr
    exp = shared_mlflow.client().get_experiment_by_name("gpu-ask")
    assert exp is None or shared_mlflow.client().search_runs([exp.experiment_id]) == []
