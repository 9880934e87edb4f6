"""Training without Ray: the per-worker loop (`pipeline.train_loop.run_worker`) in one process on the
sample shards (checkpoints, bit-identical resume, max_steps, conv-ReLU fusion, errors), the
experiment configs, and `jobs.train`'s command line and run resolution. The Ray cluster and MLflow
server tests are in test_train.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs import tracking
from pipeline import checkpoint as ckpt
from pipeline import config
from pipeline.train_loop import Worker, run_worker
from tiny import Recorder, tiny_config

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------
# The loop in one process (no Ray)
# ---------------------------------------------------------------------------------------------------

def one_process_cfg(dataset, **over) -> config.Config:
    return tiny_config(dataset, **{"model.num_classes": 4, "run.workers": 1, "run.global_batch_size": 8,
                                   "run.log_every_steps": 2, "schedule.epochs": 2, **over})


def test_loop_trains_validates_and_checkpoints_in_one_process(sample_dataset, caplog):
    caplog.set_level("INFO", logger="pipeline.train_loop")
    cfg = one_process_cfg(sample_dataset, **{"run.checkpoint_every_steps": 4})
    rec = Recorder()
    result = run_worker(cfg, Worker(), report=rec.report, log=rec.log, run_id=lambda: "run-x")
    # A progress line in the log at the first log point of each stretch, then at most every 30 s.
    progress = [m.split(":")[0] for m in (r.getMessage() for r in caplog.records) if ", step " in m]
    assert progress[0] == "epoch 1, step 2/6" and "epoch 2, step 2/6" in progress and len(progress) <= 6
    # 48 images / batch 8 = 6 steps per epoch; step checkpoints at 4 and 8 (12 is an epoch's end).
    assert [m["step"] for m, _, _ in rec.reported] == [4, 6, 8, 12]
    assert [m["epoch"] for m, _, _ in rec.reported] == [0, 1, 1, 2]
    state = rec.reported[-1][1]
    assert state["mlflow_run_id"] == "run-x" and state["images_seen"] == 12 * 8 and state["step_in_epoch"] == 0
    assert rec.reported[2][1]["step_in_epoch"] == 2
    assert state["dataset_fingerprint"] == json.loads((sample_dataset / "dataset.json").read_text())["fingerprint"]
    assert config.load(None).model != ckpt.config_of(state).model  # the resolved config, not the defaults
    assert rec.reported[1][2] is True  # the first validation is always a new best
    # Train metrics every 2 steps, stepped by images seen; validation once per epoch.
    train_steps = [s for s, m in rec.logged if "train/loss" in m]
    assert train_steps == [16, 32, 48, 64, 80, 96]
    val = [m for _, m in rec.logged if "val/top1_err" in m]
    assert len(val) == 2 and all(0 <= m["val/top1_err"] <= 1 and m["val/top5_err"] <= m["val/top1_err"] for m in val)
    first_train = next(m for _, m in rec.logged if "train/loss" in m)
    assert {"train/top1_err", "train/top5_err", "lr", "train/images_per_s", "train/data_wait_frac",
            "epoch"} <= set(first_train)
    # The goodput ledger at every log point, growing (pipeline/goodput.py).
    ledgers = [m for _, m in rec.logged if "goodput/compute_s" in m]
    assert len(ledgers) == len(train_steps) and ledgers[-1]["goodput/compute_s"] > ledgers[0]["goodput/compute_s"] > 0
    assert state["metrics"]["goodput/validation_s"] > 0 and state["metrics"]["goodput/startup_s"] > 0
    assert result.tally.n == 32  # every validation image once
    assert result.metrics["val/top1_err"] == val[-1]["val/top1_err"]


def test_resume_mid_epoch_gives_bit_identical_weights(sample_dataset):
    """Training 9 steps straight equals training 5, checkpointing, and resuming for 4 more: the
    optimizer, schedule, RNG (dropout) and DALI data position all come back."""
    straight = Recorder()
    run_worker(one_process_cfg(sample_dataset, **{"run.max_steps": 9}), Worker(), report=straight.report,
               log=straight.log)
    first = Recorder()
    run_worker(one_process_cfg(sample_dataset, **{"run.max_steps": 5}), Worker(), report=first.report, log=first.log)
    saved = first.reported[-1][1]
    assert saved["step"] == 5 and saved["epoch"] == 0 and saved["step_in_epoch"] == 5
    second = Recorder()
    run_worker(one_process_cfg(sample_dataset, **{"run.max_steps": 9}), Worker(), report=second.report,
               log=second.log, resume=saved)
    a, b = straight.reported[-1][1], second.reported[-1][1]
    assert a["step"] == b["step"] == 9 and a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # Without restoring the data position the weights differ: the check above can fail.
    third = Recorder()
    fresh_data = {**saved, "workers": [{**saved["workers"][0], "data": None}]}
    run_worker(one_process_cfg(sample_dataset, **{"run.max_steps": 9}), Worker(), report=third.report,
               log=third.log, resume=fresh_data)
    c = third.reported[-1][1]
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def trained_weights(dataset, steps: int = 3, **over) -> dict:
    """Weights after ``steps`` steps, without dropout (compiled code draws its masks from another
    generator)."""
    rec = Recorder()
    run_worker(one_process_cfg(dataset, **{"run.max_steps": steps, "model.dropout": 0.0, **over}), Worker(),
               report=rec.report, log=rec.log)
    return rec.reported[-1][1]["model"]


@pytest.fixture(scope="module")
def plain_weights(sample_dataset):
    """The plain run's weights after 1 and after 3 steps."""
    return trained_weights(sample_dataset, 1), trained_weights(sample_dataset, 3)


@pytest.mark.parametrize("option, message", [
    ("run.fuse_conv_relu", "conv + ReLU fused into one op: 8 pairs"),     # A's eight convs
    ("run.compile", "torch.compile, mode default"),
])
def test_step_options_train_the_same_weights_under_the_same_keys(sample_dataset, plain_weights, caplog, option,
                                                                 message):
    """Measured against how far steps 2 and 3 move each tensor: a variant that skipped them, or took a
    different step, would be as far off as that; rounding differences are far smaller (< 1e-4 of it
    measured here)."""
    caplog.set_level("INFO", logger="pipeline.step")
    weights = trained_weights(sample_dataset, 3, **{option: True})
    assert message in [r.getMessage() for r in caplog.records]
    one, three = plain_weights
    assert list(weights) == list(three)                                   # no _orig_mod. or other prefix
    for k in three:
        moved = (three[k] - one[k]).norm()
        assert moved > 0, k
        assert (weights[k] - three[k]).norm() < 0.01 * moved, k


def test_max_steps_on_an_epochs_last_step_validates_that_epoch_before_stopping(sample_dataset):
    """6 steps = exactly one epoch: the epoch is validated and checkpointed as finished, so a resume
    goes on with epoch 2 instead of skipping epoch 1's validation and miscounting epochs."""
    first = Recorder()
    run_worker(one_process_cfg(sample_dataset, **{"run.max_steps": 6}), Worker(), report=first.report, log=first.log)
    saved = first.reported[-1][1]
    assert saved["step"] == 6 and saved["epoch"] == 1 and saved["step_in_epoch"] == 0
    assert [m["epoch"] for _, m in first.logged if "val/top1_err" in m] == [1]
    second = Recorder()
    run_worker(one_process_cfg(sample_dataset, **{"run.max_steps": 12}), Worker(), report=second.report,
               log=second.log, resume=saved)
    assert second.reported[-1][1]["epoch"] == 2
    assert [m["epoch"] for _, m in second.logged if "val/top1_err" in m] == [2]


def test_resume_on_another_dataset_is_an_error_naming_the_fingerprint(sample_dataset):
    first = Recorder()
    run_worker(one_process_cfg(sample_dataset, **{"run.max_steps": 2}), Worker(), report=first.report, log=first.log)
    # another world size drops the data position, the path on which the loader cannot check it itself
    other = {**first.reported[-1][1], "dataset_fingerprint": "not-this-one", "workers": []}
    with pytest.raises(ValueError, match="fingerprint .* is not the one this run was trained on"):
        run_worker(one_process_cfg(sample_dataset, **{"run.max_steps": 4}), Worker(), report=Recorder().report,
                   log=Recorder().log, resume=other)


def test_init_from_a_and_dense_validation(sample_dataset, tmp_path):
    """D starts from a trained A (the paper's first four convs and the FCs) and validates densely."""
    a = Recorder()
    run_worker(one_process_cfg(sample_dataset, **{"schedule.epochs": 1}), Worker(), report=a.report, log=a.log)
    ckpt.save_checkpoint(a.reported[-1][1], tmp_path / "A-run" / "best" / ckpt.FILENAME)
    d = Recorder()
    cfg = one_process_cfg(sample_dataset, **{"model.name": "D", "model.init_from": tmp_path / "A-run",
                                             "model.init_from_mode": "a", "data.val_mode": "dense",
                                             "schedule.epochs": 1, "optim.lr": 1e-9})
    result = run_worker(cfg, Worker(), report=d.report, log=d.log)
    a_state, d_state = a.reported[-1][1]["model"], d.reported[-1][1]["model"]
    # (a near-zero lr keeps the copied tensors where A left them)
    for a_key, d_key in [("features.0", "features.0"), ("features.3", "features.5"), ("features.6", "features.10"),
                         ("features.8", "features.12"), ("classifier.6", "classifier.6")]:
        torch.testing.assert_close(d_state[f"{d_key}.weight"], a_state[f"{a_key}.weight"], atol=1e-6, rtol=0)
    assert not torch.equal(d_state["features.2.weight"][:, :, 0], torch.zeros_like(d_state["features.2.weight"][:, :, 0]))
    assert result.tally.n == 32 and 0 <= result.metrics["val/top1_err"] <= 1  # dense: every image once


def test_init_from_a_bare_state_dict_with_a_new_head(sample_dataset, tmp_path):
    """A torchvision-style weights file (a bare state_dict, 10 classes) starts a 4-class run: every
    layer but FC8 comes from it, FC8 is a fresh layer of the new size."""
    import model

    parent = model.build("A", num_classes=10, width=0.0625, image_size=32).state_dict()
    torch.save(parent, tmp_path / "vgg11-10-classes.pth")
    rec = Recorder()
    cfg = one_process_cfg(sample_dataset, **{"model.init_from": tmp_path / "vgg11-10-classes.pth",
                                             "model.reinit_head": True, "run.max_steps": 1, "optim.lr": 1e-9})
    run_worker(cfg, Worker(), report=rec.report, log=rec.log)
    got = rec.reported[-1][1]["model"]
    for key in ("features.0.weight", "features.8.bias", "classifier.0.weight", "classifier.3.weight"):
        torch.testing.assert_close(got[key], parent[key], atol=1e-6, rtol=0)
    assert got["classifier.6.weight"].shape[0] == 4 != parent["classifier.6.weight"].shape[0]


# ---------------------------------------------------------------------------------------------------
# Configs and the command line
# ---------------------------------------------------------------------------------------------------

def test_every_experiment_config_loads_and_the_chains_are_expressed():
    files = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    cfgs = {f.stem: config.load(f) for f in files}
    paper = {"A-256", "A-LRN-256", "B-256", "C-256", "D-256", "E-256", "C-384", "D-384", "E-384",
             "C-256-512", "D-256-512", "E-256-512"}
    assert paper <= set(cfgs) and "demo" in cfgs
    for name in paper:
        assert cfgs[name].run.name == name and cfgs[name].run.use_gpu and cfgs[name].run.compile
    # A -> D(256) -> D(384) -> D([256, 512]): each names its parent's run; the parent exists.
    for net in "CDE":
        assert (cfgs[f"{net}-256"].model.init_from, cfgs[f"{net}-256"].model.init_from_mode) == ("A-256", "a")
        assert cfgs[f"{net}-384"].model.init_from == f"{net}-256" and cfgs[f"{net}-384"].optim.lr == 1e-3
        assert (cfgs[f"{net}-384"].data.scale_min, cfgs[f"{net}-384"].data.scale_max) == (384, 384)
        ms = cfgs[f"{net}-256-512"]
        assert ms.model.init_from == f"{net}-384" and (ms.data.scale_min, ms.data.scale_max) == (256, 512)
    assert cfgs["A-256"].model.init_from == "" and cfgs["A-256"].optim.lr == 1e-2
    for c in cfgs.values():
        assert not c.model.init_from or c.model.init_from in cfgs


def test_cli_help_names_the_options():
    out = subprocess.run([sys.executable, "-m", "jobs.train", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--config" in out.stdout and "--set" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--set", "model.nam=A"], "error: unknown config key 'model.nam'; allowed: name, "),
    (["--config", "/nonexistent/A.yaml"], "error: [Errno 2] No such file or directory: '/nonexistent/A.yaml'"),
    (["--config", "BAD"], "error: BAD: not valid YAML"),
])
def test_a_users_mistake_is_one_line_and_status_2_not_a_traceback(tmp_path, args, message, capsys):
    from jobs import cli
    from jobs import train

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [\n")
    args = [str(bad) if a == "BAD" else a for a in args]
    assert cli.run(train.main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.replace("BAD", str(bad))) and "Traceback" not in err


def test_init_from_resolves_run_names_paths_and_mlflow_runs(sample_dataset, tmp_path):
    from jobs import train

    storage = tmp_path / "runs"
    ckpt.save_checkpoint({"format": 1, "model": {}}, storage / "A-256" / "best" / ckpt.FILENAME)
    tracking.write_run_id(str(storage / "A-256"), "f" * 32)
    base = ["model.num_classes=0", f"data.root={sample_dataset}", f"run.storage_path={storage}",
            "tracking.enabled=false"]
    cfg, tags = train.resolve(config.load(None, base + ["model.init_from=A-256"]))
    assert cfg.model.init_from == str(storage / "A-256") and tags["parent_run_id"] == "f" * 32
    assert cfg.model.num_classes == 4 and os.path.isabs(cfg.data.root)
    cfg, _ = train.resolve(config.load(None, base + [f"model.init_from={storage}/A-256/best/checkpoint.pt"]))
    assert cfg.model.init_from.endswith("best/checkpoint.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.resolve(config.load(None, base + ["model.init_from=B-256"]))
    # runs:/<id>: the parent run's run_folder tag (the store here is a SQLite file, no server needed).
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("x"), tags={"run_folder": str(storage / "A-256")})
    cfg, tags = train.resolve(config.load(None, base[:-1] + [f"tracking.uri={uri}",
                                                             f"model.init_from=runs:/{run.info.run_id}"]))
    assert cfg.model.init_from == str(storage / "A-256") and tags["parent_run_id"] == run.info.run_id


def test_run_id_file_is_replaced_atomically(tmp_path, monkeypatch):
    folder = str(tmp_path / "runs" / "A")
    tracking.write_run_id(folder, "a" * 32)
    assert tracking.read_run_id(folder) == "a" * 32

    def crash(*args):
        raise OSError("killed mid-write")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        tracking.write_run_id(folder, "b" * 32)
    assert tracking.read_run_id(folder) == "a" * 32          # the old id, whole, never an empty file
    monkeypatch.undo()
    tracking.write_run_id(folder, "b" * 32)
    assert tracking.read_run_id(folder) == "b" * 32



def test_throttle_is_due_first_then_once_per_interval(monkeypatch):
    from pipeline import train_loop

    now = [100.0]
    monkeypatch.setattr(train_loop.time, "monotonic", lambda: now[0])
    t = train_loop.Throttle(30.0)
    seen = []
    for step in range(8):
        seen.append(t.due())
        now[0] += 10.0
    assert seen == [True, False, False, True, False, False, True, False]
