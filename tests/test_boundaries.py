"""Hostile inputs at the training run's boundaries, each refused (or recovered) in words: a parent net
of another model (``model.init_from``), a damaged MLflow metric journal, a damaged goodput record, a
checkpoint file that is not whole. A refusal is one ``error:`` line naming the file, exit status 2,
no traceback, before Ray starts (``jobs.cluster.connect`` fails the test if it is called)."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model
from jobs import cli
from jobs import cluster
from jobs import train as J
from jobs import tracking
from jobs.cluster import worker as W
from jobs.tracking import journal
from pipeline import checkpoint as ckpt
from pipeline import config, goodput
from pipeline.errors import CheckpointError
from pipeline.task import task_for
from pipeline.train_loop import initial_weights
from tiny import run_checkpoint, tiny_config, tiny_sets

REPO = Path(__file__).resolve().parents[1]
CLASSES = 4                      # the sample dataset's


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")
    monkeypatch.setattr(cluster, "connect", refuse)


def args_for(dataset, storage, **over) -> list[str]:
    sets = tiny_sets(dataset, **{"model.num_classes": 0, "run.workers": 2, "run.global_batch_size": 16,
                                 "run.storage_path": storage, "run.name": "run", "schedule.epochs": 2,
                                 "tracking.enabled": "false", **over})
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")] + ["--dry-run"]


def one_error_line(code: int, stderr: str) -> str:
    """The refusal's line, once the exact shape of a refusal is asserted."""
    err = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    return err[0]


def dry_run(args: list[str]) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "jobs.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stderr


def parent_checkpoint(folder: Path, dataset, name: str, classes: int = CLASSES, **over) -> tuple[Path, dict]:
    """A finished run's ``best/checkpoint.pt`` of net ``name`` in the tiny setup, as the loop writes it."""
    cfg = tiny_config(dataset, **{"model.name": name, "model.num_classes": classes, **over})
    return folder, run_checkpoint(cfg, classes, folder, seed=3)


# ---------------------------------------------------------------------------------------------------
# model.init_from: every tensor, by name and shape, before Ray
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reinit", [False, True], ids=["keep-head", "reinit-head"])
def test_a_parent_of_another_model_is_refused_listing_every_mismatch(reinit, sample_dataset, tmp_path, no_ray, capsys):
    """An A run from a D checkpoint: D's 32 tensors against A's 22. Without ``reinit_head`` the A
    net's FC8 would load, with it every other tensor still must: refused either way, naming the count
    and the first tensors, where ``--dry-run`` used to say yes (and the run failed in a Ray worker)."""
    parent, _ = parent_checkpoint(tmp_path / "D-run", sample_dataset, "D")
    code = cli.run(J.main, args_for(sample_dataset, tmp_path / "runs", **{"model.init_from": parent,
                                                                          "model.reinit_head": str(reinit).lower()}))
    line = one_error_line(code, capsys.readouterr().err)
    assert f"model.init_from {parent}/best/{ckpt.FILENAME} does not fit net A" in line
    got, want = ({k: v.shape for k, v in model.build(n, CLASSES, width=0.0625, image_size=32).state_dict().items()
                  if not (reinit and k in model.HEAD_KEYS)} for n in ("D", "A"))
    differ = sum(got.get(k) != shape for k, shape in want.items()) + len(set(got) - set(want))
    assert differ > 20 and f"{differ} tensors differ (" in line, line
    assert "features.3.weight" in line and "and " in line and "more)" in line
    assert ("but FC8 (model.reinit_head)" in line) == reinit


def test_a_refused_parent_is_one_line_from_the_command_too(sample_dataset, tmp_path):
    parent, _ = parent_checkpoint(tmp_path / "D-run", sample_dataset, "D")
    line = one_error_line(*dry_run(args_for(sample_dataset, tmp_path / "runs", **{"model.init_from": parent})))
    assert "does not fit net A" in line and "tensors differ" in line


def test_a_parent_of_the_same_model_with_a_new_head_copies_all_but_fc8_and_says_how_many(sample_dataset, tmp_path,
                                                                                       caplog):
    """A (10 classes) -> A (4 classes) with ``reinit_head``: 20 of 22 tensors, FC8 left as built."""
    parent, weights = parent_checkpoint(tmp_path / "A10", sample_dataset, "A", classes=10)
    cfg = tiny_config(sample_dataset, **{"model.num_classes": CLASSES, "model.reinit_head": "true",
                                         "model.init_from": ckpt.resolve(parent)})
    torch.manual_seed(0)
    net = ckpt.build_model(cfg, CLASSES)
    fresh_fc8 = net.state_dict()["classifier.6.weight"].clone()
    task_for("classes").check_parent(cfg, weights, str(parent), net)      # the driver's check passes
    with caplog.at_level(logging.INFO, logger="pipeline.train_loop"):
        initial_weights(net, cfg, task_for("classes"))
    got = net.state_dict()
    for k, v in weights.items():
        if k not in model.HEAD_KEYS:
            assert torch.equal(got[k], v), k
    assert torch.equal(got["classifier.6.weight"], fresh_fc8)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("initialised")]
    assert said == [f"initialised 20 of 22 tensors, every weight but FC8 (new) from {ckpt.resolve(parent)}"]


def test_from_a_checks_only_what_it_copies(sample_dataset, tmp_path):
    """``init_from_mode: a`` copies A's first four convs and its FCs into D: A's other tensors do not
    matter, those must be there with A's shapes (another width is refused, naming them)."""
    cfg = tiny_config(sample_dataset, **{"model.name": "D", "model.num_classes": CLASSES,
                                         "model.init_from_mode": "a"})
    with torch.device("meta"):
        net = ckpt.build_model(cfg, CLASSES)
    a = model.build("A", CLASSES, width=0.0625, image_size=32).state_dict()
    task_for("classes").check_parent(cfg, a, "A.pt", net)
    narrow = model.build("A", CLASSES, width=0.03125, image_size=32).state_dict()   # FC8's bias alone fits
    with pytest.raises(config.ConfigError, match=r"\"from A\" copies .*: 13 tensors differ \(features\.0\.weight"):
        task_for("classes").check_parent(cfg, narrow, "A.pt", net)


# ---------------------------------------------------------------------------------------------------
# The MLflow metric journal
# ---------------------------------------------------------------------------------------------------

GOOD = [["train/loss", 1.5, 1_700_000_000_000, 16], ["lr", 0.01, 1_700_000_000_000, 16]]


def journal_with(folder: Path, bad: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / journal.JOURNAL).write_text(json.dumps(GOOD[0]) + "\n" + bad + "\n" + json.dumps(GOOD[1]) + "\n")


@pytest.mark.parametrize("bad, says", [
    ('["train/loss", "abc", 1700000000000, 32]', "line 2: value 'abc' of 'train/loss' is not a finite number"),
    ('["train/loss", 1.4, 17000', "line 2: not JSON"),
], ids=["poisoned", "truncated"])
def test_a_damaged_journal_is_one_error_line_before_ray(bad, says, sample_dataset, tmp_path, no_ray, capsys):
    journal_with(tmp_path / "runs" / "run", bad)
    line = one_error_line(cli.run(J.main, args_for(sample_dataset, tmp_path / "runs")), capsys.readouterr().err)
    assert str(tmp_path / "runs" / "run" / journal.JOURNAL) in line and says in line, line
    assert "move the file aside (its 2 good points will then not reach MLflow)" in line


def test_a_truncated_journal_is_one_line_from_the_command_too(sample_dataset, tmp_path):
    journal_with(tmp_path / "runs" / "run", '["train/loss", 1.4, 17000')
    line = one_error_line(*dry_run(args_for(sample_dataset, tmp_path / "runs")))
    assert journal.JOURNAL in line and "line 2" in line


def tracker_for(tmp_path, **kw) -> tracking.Tracker:
    return tracking.Tracker(f"sqlite:///{tmp_path}/mlflow.db", "boundaries", "run", str(tmp_path / "runs" / "run"),
                            retry_s=0.2, **kw)


def test_a_value_that_is_no_number_is_refused_where_it_is_logged_and_a_nan_is_dropped_by_name(tmp_path, caplog):
    tracker = tracker_for(tmp_path)
    with pytest.raises(TypeError, match="metric 'train/loss': 'abc' is not a number"):
        tracker.log_metrics({"train/loss": "abc"}, 16)
    with caplog.at_level(logging.WARNING, logger="jobs.tracking"):
        tracker.log_metrics({"train/loss": math.nan, "lr": 0.01}, 16)
        tracker.log_metrics({"train/loss": math.inf}, 32)
        assert tracker.close("FINISHED", timeout=30)
    said = [r.getMessage() for r in caplog.records]
    assert any("metric train/loss is nan at step 16: not logged" in s for s in said), said
    assert any("non-finite values not logged: train/loss 2 times" in s for s in said), said
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracker.uri)
    assert [m.value for m in client.get_metric_history(tracker.run_id, "lr")] == [0.01]
    assert client.get_metric_history(tracker.run_id, "train/loss") == []


def test_the_pending_tag_counts_the_points_that_wait(tmp_path, monkeypatch):
    """A delivery refused while the server answers (the back-off would once have skipped the tag):
    ``mlflow_pending_points`` is the journal's point count; the next tracker delivers them and says 0."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path / "runs" / "run"
    folder.mkdir(parents=True)
    journal.write(str(folder), [tuple(p) for p in GOOD])
    real = MlflowClient.log_batch

    def refuse_metrics(self, run_id, metrics=(), *args, **kwargs):
        if metrics:
            raise RuntimeError("refused")
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", refuse_metrics)
    first = tracker_for(tmp_path, journal=True)
    first.log_metrics({"epoch": 1.0}, 48)
    assert not first.close("FINISHED", timeout=1)
    run = MlflowClient(first.uri).get_run(first.run_id)
    assert len(journal.read(str(folder))) == 3
    assert run.data.tags[tracking.PENDING_TAG] == "3" and run.info.status == "RUNNING"

    monkeypatch.setattr(MlflowClient, "log_batch", real)
    second = tracker_for(tmp_path, journal=True)
    assert second.close("FINISHED", timeout=30)
    run = MlflowClient(second.uri).get_run(first.run_id)
    assert run.data.tags[tracking.PENDING_TAG] == "0" and run.info.status == "FINISHED"
    assert not (folder / journal.JOURNAL).exists()
    assert {k: run.data.metrics[k] for k in ("train/loss", "lr", "epoch")} == {"train/loss": 1.5, "lr": 0.01,
                                                                               "epoch": 1.0}


# ---------------------------------------------------------------------------------------------------
# The goodput records
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text", [(goodput.WALL, '{"wall_s": 12.'), (goodput.LEDGER, '{"goodput/compute_s": "x"}')])
def test_a_damaged_goodput_record_is_one_error_line_before_ray(name, text, sample_dataset, tmp_path, no_ray, capsys):
    folder = tmp_path / "runs" / "run"
    folder.mkdir(parents=True)
    (folder / name).write_text(text)
    line = one_error_line(cli.run(J.main, args_for(sample_dataset, tmp_path / "runs")), capsys.readouterr().err)
    assert f"{folder / name}: damaged goodput record" in line and "Move it aside" in line, line
    assert goodput.LOSES[name] in line


def test_a_goodput_record_damaged_during_the_run_keeps_this_commands_wall_time(tmp_path, caplog):
    """After the driver's check, the file is recovered where it is read, with a warning naming it."""
    folder = tmp_path / "run"
    folder.mkdir()
    assert J.record_wall(str(folder), 5.0) == 5.0 and J.record_wall(str(folder), 2.5) == 7.5
    (folder / goodput.WALL).write_text("{not json")
    (folder / goodput.LEDGER).write_text("[]")
    with caplog.at_level(logging.WARNING):
        assert J.record_wall(str(folder), 4.0) == 4.0
        assert W.read_ledger(str(folder)) == {}
    said = " | ".join(r.getMessage() for r in caplog.records)
    assert f"{folder / goodput.WALL}: damaged goodput record" in said and "this command's 4.0 s" in said
    assert f"{folder / goodput.LEDGER}: damaged goodput record" in said
    assert goodput.read(str(folder), goodput.WALL) == {"wall_s": 4.0}


# ---------------------------------------------------------------------------------------------------
# Checkpoint files: pipeline/checkpoint.py reads every one
# ---------------------------------------------------------------------------------------------------

def small_cfg(name="A"):
    return config.load(None, [f"model.name={name}", "model.width=0.03125", "data.crop_size=32", "data.scale_min=32",
                              "data.scale_max=32", f"model.num_classes={CLASSES}"])


def weights_state() -> dict:
    """A whole weights-only checkpoint of net A (what a finished run logs)."""
    net = ckpt.build_model(small_cfg(), CLASSES)
    return ckpt.weights_only({"model": net.state_dict(), "config": config.dump(small_cfg()), "num_classes": CLASSES})


def without(state, key):
    return {k: v for k, v in state.items() if k != key}


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


CHECKPOINT_CASES = [  # (id, the state saved, what the error says besides the file)
    ("no-model", lambda: without(weights_state(), "model"), "no 'model' in it"),
    ("no-num-classes", lambda: without(weights_state(), "num_classes"), "no 'num_classes' in it"),
    ("config-not-yaml", lambda: {**weights_state(), "config": "model: [A, width\n  - :"}, "its config is not valid YAML"),
    ("another-models-weights", lambda: {**weights_state(), "model": ckpt.build_model(small_cfg("D"), CLASSES).state_dict()},
     "its weights are not those of the net"),
    ("num-classes-not-the-weights", lambda: {**weights_state(), "num_classes": 7}, "7 classes): 2 tensors differ"),
    ("num-classes-10-to-the-12", lambda: {**weights_state(), "num_classes": 10 ** 12},
     "classifier.6.weight (4, 128) for (1000000000000, 128)"),
    ("pickled-code", lambda: {**weights_state(), "x": Evil()}, "holds pickled Python objects (posix.system)"),
]


@pytest.mark.parametrize("make, says", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_a_checkpoint_that_is_not_whole_is_one_checkpoint_error_naming_the_file(make, says, tmp_path):
    path = tmp_path / "run" / "best" / ckpt.FILENAME
    path.parent.mkdir(parents=True)
    torch.save(make(), path)
    for read in (ckpt.load_checkpoint, ckpt.model_from_checkpoint, ckpt.load_weights):
        with pytest.raises(CheckpointError) as refused:
            read(tmp_path / "run")
        message = str(refused.value)
        assert message.startswith(f"{path}: ") and says in message and "\n" not in message, message
        assert "weights_only" not in message


def test_a_whole_weights_only_checkpoint_still_loads(tmp_path):
    path = ckpt.save_checkpoint(weights_state(), tmp_path / ckpt.FILENAME)
    net, cfg = ckpt.model_from_checkpoint(path)
    assert cfg.model.name == "A" and net.classifier[6].out_features == CLASSES
