"""Training on a cluster: `python -m jobs.train` on a real two-node Ray cluster (token authentication,
2 CPU workers over gloo) logging to a real `mlflow server` process, and the tracker on its own against
a server that dies. The loop without Ray is in test_train_loop.py.

The Ray tests share one cluster for the session (tests/conftest.py: ``ray start --head`` and a second
``ray start --address`` node, each with a custom resource so STRICT_SPREAD puts one worker on each),
killed at the end of the session (exactly the process groups it started). Failures are real: a worker
process calls ``os._exit(1)`` mid-run, the driver gets SIGKILL, the MLflow server is stopped mid-run.
"""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from cluster import REPO, checkpoints, gate, only_run, run_train, small, steps_of, train_proc
from jobs import tracking
from pipeline import checkpoint as ckpt
from services import free_port, stop_group, wait_for


@pytest.fixture(scope="module")
def learnable_dataset(tmp_path_factory) -> Path:
    """The demo's sample, smaller: 10 classes, 60 train and 10 val images each, 96-192 px."""
    from preprocessing import synthetic, writer

    root = tmp_path_factory.mktemp("learnable")
    source = synthetic.generate(root / "source", classes=10, train_per_class=60, val_per_class=10, seed=1,
                                size_range=(96, 192))
    writer.preprocess(source, root / "data", shard_size=500, seed=0, progress=False, log=lambda m: None)
    return root / "data"


# ---------------------------------------------------------------------------------------------------
# The tracker against a real server
# ---------------------------------------------------------------------------------------------------

def test_tracker_never_blocks_on_a_dead_server_and_skips_replayed_steps(shared_mlflow, tmp_path):
    down = tracking.Tracker(f"http://127.0.0.1:{free_port()}", "exp", "t", str(tmp_path / "down"), retry_s=0.5)
    start = time.monotonic()
    assert down.connect() == ""               # nobody listens: no run, no exception
    down.log_metrics({"train/loss": 1.0}, 16)  # queued, not sent
    assert not down.flush(timeout=2)          # gives up after its deadline, says so
    assert time.monotonic() - start < 30
    folder = str(tmp_path / "runs" / "t")
    t = tracking.Tracker(shared_mlflow.uri, "tracker", "t", folder, params={"optim.lr": "0.01", "long": "x" * 7000})
    for step in (16, 32, 48):
        t.log_metrics({"train/loss": step / 10}, step)
    assert t.flush(timeout=60)
    t.close()
    run = shared_mlflow.client().get_run(t.run_id)
    assert tracking.read_run_id(folder) == t.run_id
    assert run.data.params["optim.lr"] == "0.01" and len(run.data.params["long"]) == tracking.MAX_PARAM_VALUE
    # A restarted worker replays steps 32..80: only 64 and 80 are new.
    again = tracking.Tracker(shared_mlflow.uri, "tracker", "t", folder)
    assert again.connect() == t.run_id        # found through the run id file
    for step in (32, 48, 64, 80):
        again.log_metrics({"train/loss": step / 100}, step)
    again.close("FINISHED")
    history = shared_mlflow.client().get_metric_history(t.run_id, "train/loss")
    assert sorted(m.step for m in history) == [16, 32, 48, 64, 80]
    assert {m.step: m.value for m in history}[32] == 3.2  # first write wins
    assert shared_mlflow.client().get_run(t.run_id).info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------------
# jobs.train on a two-node Ray cluster
# ---------------------------------------------------------------------------------------------------

def test_two_nodes_learn_log_to_mlflow_and_survive_a_killed_worker(ray_cluster, shared_mlflow, learnable_dataset,
                                                                    tmp_path):
    """The demo's config, smaller: one worker per node, rank 1 dies mid-run (a real process exit),
    Ray restarts the group from the last checkpoint, the run finishes as one MLflow run, and the net
    learns: validation error far below chance (90 %)."""
    storage = tmp_path / "runs"
    marker = tmp_path / "rank1-exited"
    epochs, per_epoch, every = 24, 18, 5          # 600 images / global batch 32; log every 5 steps
    sets = {"data.root": learnable_dataset, "run.storage_path": storage, "run.name": "spread",
            "tracking.uri": shared_mlflow.uri, "tracking.experiment": "spread", "tracking.retry_s": 1,
            "tracking.register_model": "vgg-test", "schedule.epochs": epochs, "schedule.patience": 100,
            "run.log_every_steps": every, "run.checkpoint_every_steps": 9, "run.keep_last": 3,
            "run.max_failures": 1, "run.placement_strategy": "STRICT_SPREAD"}
    args = ["--config", str(REPO / "jobs/configs/demo.yaml")]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    text = run_train(ray_cluster, args, tmp_path / "train.log", timeout=500,
                     VGG_TEST_EXIT_AT=f"1:40:{marker}", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="2")
    folder = storage / "spread"

    # Rank 1 really died after step 40; the new group resumed from the step-36 checkpoint (the end
    # of epoch 2), or the one before when Ray had not registered 36 and its files were cut short.
    assert marker.is_file(), text[-3000:]
    resumed = {int(m) for m in re.findall(r"resumes at epoch \d+, step (\d+)", text)}
    assert resumed and resumed <= {27, 36}, resumed

    saved = [ckpt.load_checkpoint(p) for p in checkpoints(folder)]
    # Ray keeps the last 3 (plus, possibly, the one resumed from, if Ray had not registered it yet).
    assert [s["step"] for s in saved][-3:] == [414, 423, 432] and len(saved) <= 4
    assert saved[-1]["epoch"] == epochs and epochs * per_epoch == 432
    for s in saved:  # after every step the two replicas hold the same parameters
        assert len(s["workers"]) == 2 and s["workers"][0]["param_digest"] == s["workers"][1]["param_digest"]
    assert saved[-1]["workers"][0]["node"] != saved[-1]["workers"][1]["node"]  # one worker per node
    best = ckpt.load_checkpoint(folder, "best")
    # Chance is 0.9; 24 epochs on 600 images reach ~0.35 (the demo, 30 epochs, ~0.2).
    assert best["metrics"]["val/top1_err"] < 0.55, best["metrics"]

    client = shared_mlflow.client()
    run = only_run(client, "spread")
    assert tracking.read_run_id(str(folder)) == run.info.run_id == saved[-1]["mlflow_run_id"]
    assert run.info.status == "FINISHED" and run.info.run_id in text
    p = run.data.params
    assert (p["model.name"], p["model.width"], p["run.name"], p["model.num_classes"]) == ("A", "0.125", "spread", "10")
    assert p["data.root"] == str(learnable_dataset.resolve()) and p["run.workers"] == "2"
    tags = run.data.tags
    assert tags["dataset_fingerprint"] == saved[-1]["dataset_fingerprint"] != ""
    assert tags["git_commit"] != "" and tags["checkpoint"].endswith("best/checkpoint.pt")
    # Each logged step once, although steps 37-40 ran twice; stepped by images seen.
    assert steps_of(client, run.info.run_id, "train/loss") == [32 * s for s in range(every, epochs * per_epoch + 1, every)]
    assert steps_of(client, run.info.run_id, "val/top1_err") == [32 * per_epoch * e for e in range(1, epochs + 1)]
    assert {"lr", "train/top1_err", "train/top5_err", "train/images_per_s", "train/data_wait_frac",
            "epoch_time_s", "val/top5_err"} <= set(run.data.metrics)
    assert any(k.startswith("system/cpu") for k in run.data.metrics), sorted(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "model", "eval"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "model/checkpoint.pt", str(tmp_path))
    net, cfg = ckpt.model_from_checkpoint(local)
    assert cfg.run.name == "spread" and "optimizer" not in ckpt.load_checkpoint(local)
    assert [v.run_id for v in client.search_model_versions("name='vgg-test'")] == [run.info.run_id]
    assert_the_mlflow_model_is_the_checkpoint(shared_mlflow, run, net, cfg)
    assert_the_dataset_is_the_input(run, learnable_dataset)
    assert_the_ledger_counts_the_lost_work(client, run)


def assert_the_mlflow_model_is_the_checkpoint(server, run, net, cfg) -> None:
    """The registered MLflow model loads with mlflow.pytorch.load_model (no pickled code: pt2) and
    gives the best checkpoint's logits on a batch of any size."""
    import mlflow
    import torch

    mlflow.set_tracking_uri(server.uri)
    loaded = mlflow.pytorch.load_model(run.data.tags["model_uri"])
    x = torch.randn(3, 3, cfg.data.crop_size, cfg.data.crop_size)
    torch.testing.assert_close(loaded(x), net(x), rtol=1e-4, atol=1e-4)
    info = mlflow.models.get_model_info(run.data.tags["model_uri"])
    assert len(info.metadata["classes"]) == 10 and info.metadata["crop"] == cfg.data.crop_size
    assert len(info.metadata["mean_rgb"]) == 3 and info.metadata["test_scale"] > 0
    logged = mlflow.get_logged_model(info.model_id)
    best = ckpt.load_checkpoint(run.data.tags["checkpoint"])["metrics"]["val/top1_err"]
    assert float(logged.tags["val/top1_err"]) == pytest.approx(best, abs=1e-6)
    assert {m.key: m.value for m in logged.metrics}["best/val/top1_err"] == pytest.approx(best, abs=1e-6)


def assert_the_dataset_is_the_input(run, dataset_root: Path) -> None:
    import json

    from storage import dataformat as fmt

    (given,) = run.inputs.dataset_inputs
    info = fmt.read_info(dataset_root)
    assert given.dataset.digest == info["fingerprint"][:36] and given.dataset.name == dataset_root.name
    profile = json.loads(given.dataset.profile)
    assert profile["splits"] == {"train": 600, "val": 100} and profile["classes"] == 10
    assert [t.value for t in given.tags if t.key == "mlflow.data.context"] == ["training"]


def assert_the_ledger_counts_the_lost_work(client, run) -> None:
    """Rank 1 died after step 40: the steps since the checkpoint resumed from were done twice, and the
    ledger says so (goodput/lost_s > 0); every category is there, and goodput is a fraction."""
    m = run.data.metrics
    assert m["goodput/lost_s"] > 0 and m["goodput/compute_s"] > 0 and m["goodput/startup_s"] > 0
    assert m["goodput/restore_s"] > 0 and m["goodput/validation_s"] > 0 and m["goodput/checkpoint_s"] > 0
    assert 0 < m["goodput/fraction"] < 1
    total = sum(m[f"goodput/{c}_s"] for c in ("compute", "data_wait", "validation", "checkpoint", "startup",
                                               "restore", "resize", "lost"))
    assert total <= m["goodput/wall_s"] * 1.05     # the ledger cannot hold more time than passed
    table = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "goodput.json" in table


def test_killed_driver_rerun_resumes_into_the_same_run_while_mlflow_comes_and_goes(ray_cluster, mlflow_server,
                                                                                   sample_dataset, tmp_path):
    """MLflow is down when training starts, comes up mid-run (the run is created late), the driver is
    killed; the same command again resumes into the same MLflow run, and finishes although the server
    goes down once more. Afterwards the server holds one run whose steps appear once each."""
    port = free_port()
    storage = tmp_path / "runs"
    folder = storage / "chaos"
    args = ["--config", str(REPO / "jobs/configs/demo.yaml"),
            *small(sample_dataset, storage, "chaos", f"http://127.0.0.1:{port}", **{"schedule.epochs": 8})]
    held = gate(tmp_path / "gate", 3)   # 24 steps, 3 an epoch: each event happens at a known step

    first = train_proc(ray_cluster, args, tmp_path / "first.log", **held)
    try:
        wait_for(lambda: checkpoints(folder), 300, "the first checkpoint", proc=first)
        assert ckpt.load_checkpoint(folder, "latest")["mlflow_run_id"] == ""   # nobody to talk to yet
        server = mlflow_server(port)                                            # up mid-run
        gate(tmp_path / "gate", 9)
        run_id = wait_for(lambda: tracking.read_run_id(str(folder)), 120, "the run, created late", proc=first)
        wait_for(lambda: 16 * 9 in steps_of(server.client(), run_id, "train/loss"), 120, "metrics", proc=first)
        wait_for(lambda: ckpt.load_checkpoint(folder, "latest")["step"] == 9, 120, "checkpoint 9", proc=first)
        os.killpg(first.pid, signal.SIGKILL)   # the driver, at once, its workers held after step 10
        first.wait(timeout=60)
    finally:
        stop_group(first)
    assert "unreachable" in (tmp_path / "first.log").read_text()

    gate(tmp_path / "gate", 15)
    second = train_proc(ray_cluster, args, tmp_path / "second.log", **held)   # the same command again
    try:
        wait_for(lambda: 16 * 15 in steps_of(server.client(), run_id, "train/loss"), 300,
                 "metrics from the resumed run", proc=second)
        server.stop()                                                           # down mid-run
        gate(tmp_path / "gate", 24)
        rc = second.wait(timeout=400)
    finally:
        stop_group(second)
    text = (tmp_path / "second.log").read_text()
    assert rc == 0, text[-5000:]
    assert re.findall(r"resumes at epoch \d+, step (\d+)", text)[0] == "9"
    assert "unreachable" in text
    final = ckpt.load_checkpoint(folder, "latest")
    assert (final["epoch"], final["step"], final["mlflow_run_id"]) == (8, 24, run_id)

    assert "wait in" in text and (folder / "mlflow_journal.jsonl").is_file()   # undelivered, kept
    server.start()                                   # the same store: one run, every step once
    assert server.client().get_run(run_id).info.status == "RUNNING"   # not FINISHED while points wait
    again = run_train(ray_cluster, args, tmp_path / "third.log", timeout=120)   # the same command again
    assert "is complete" in again and "resume" not in again.split("is complete")[0].lower()
    run = only_run(server.client(), "chaos")
    assert run.info.run_id == run_id and run.data.params["run.name"] == "chaos"
    assert run.info.status == "FINISHED" and run.data.tags["mlflow_pending_points"] == "0"
    assert not (folder / "mlflow_journal.jsonl").exists()
    assert_every_point_once(server.client(), run, steps=24, log_every=1, epochs=8, batch=16)


TRAIN_KEYS = {"train/loss", "train/top1_err", "train/top5_err", "lr", "train/images_per_s", "train/data_wait_frac",
              "epoch", "run/workers", *(f"goodput/{c}_s" for c in ("compute", "data_wait", "validation", "checkpoint",
                                                                  "startup", "restore", "resize", "lost"))}
END_KEYS = {"goodput/wall_s", "goodput/fraction"}   # once, at the run's end


def assert_every_point_once(client, run, steps: int, log_every: int, epochs: int, batch: int) -> None:
    """As many points per key as an uninterrupted run logs, each at its own step (images seen): one
    per ``log_every`` steps for the training keys, one per epoch for the others."""
    assert TRAIN_KEYS <= set(run.data.metrics) and "val/top1_err" in run.data.metrics
    for key in run.data.metrics:
        logged = steps_of(client, run.info.run_id, key)
        if key in END_KEYS:
            assert logged == [batch * steps], key
        elif key in TRAIN_KEYS:
            assert logged == [batch * s for s in range(log_every, steps + 1, log_every)], key
        else:
            assert logged == [batch * steps // epochs * e for e in range(1, epochs + 1)], key
