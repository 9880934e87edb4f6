"""Evaluation jobs on the sample shards: exactly-once sharding across 1-3 workers (plain and Ray),
ensembles of checkpoints, every protocol side by side on a trained tiny model, the results table and
its MLflow child run on a real server, transfer features, the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline import config as C
from pipeline import evaluate as E
from storage.dataset import stored_labels
from pipeline.sharding import shard_range


@pytest.fixture(scope="module")
def trained(sample_dataset, data_config, tmp_path_factory):
    """A tiny A (width 1/16, crop 64, S in [64, 128]) trained for a few steps with plain torch on the
    sample through the DALI training loader, saved as a real checkpoint. Returns the checkpoint folder."""
    from pipeline.loader import TrainLoader

    cfg = C.Config(model=C.ModelConfig(name="A", width=1 / 16, num_classes=4, init="glorot", dropout=0.0),
                   data=data_config(sample_dataset))
    C.validate(cfg)
    torch.manual_seed(0)
    net = ckpt.build_model(cfg, 4).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loader = TrainLoader(cfg.data, 16, 0, 1, seed=0)
    for _ in range(3):                                   # 3 epochs of 3 steps
        for b in loader:
            loss = torch.nn.functional.cross_entropy(net(b.images), b.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    folder = tmp_path_factory.mktemp("run") / "A-tiny"
    ckpt.save_checkpoint({"format": ckpt.FORMAT, "model": net.state_dict(), "config": C.dump(cfg),
                          "num_classes": 4, "mlflow_run_id": "", "step": 9}, folder / "best" / ckpt.FILENAME)
    return folder


def run_eval(tmp_path, *args, name="out"):
    from jobs import evaluate as J

    return J.main(["--out", str(tmp_path / name), "--quiet", "--no-mlflow", "--batch-size", "5", *args])


def test_exactly_once_on_1_2_3_workers_and_the_same_figures(trained, sample_dataset, tmp_path):
    stored = stored_labels(sample_dataset, "val")
    assert len(stored) == 32  # 5 shards of <= 7: divisible by neither 2 nor 3 workers
    table = None
    for w in (1, 2, 3):
        res = run_eval(tmp_path, "--run", str(trained), "--mode", "dense", "--scales", "64,96",
                       "--workers", str(w), "--no-ray", name=f"w{w}")
        shares = res["shares"]
        assert len(shares) == w
        keys = [k for s in shares for k in s.keys]
        assert len(keys) == len(set(keys)) == 32 and set(keys) == set(stored)
        assert [len(s.keys) for s in shares] == [b - a for a, b in (shard_range(32, w, r) for r in range(w))]
        for s in shares:
            assert s.labels.tolist() == [stored[k] for k in s.keys]
        assert all(r["images"] == 32 for r in res["rows"])
        # The sharding changes nothing but who computes what: identical tables.
        table = table or res["rows"]
        assert res["rows"] == table


def test_a_broken_sharding_is_caught_before_any_figure(trained, tmp_path, monkeypatch):
    from jobs.passes import front as J

    real = J.loader_batches

    def rank1_reads_rank0(data, batch, rank, world, device_id, boxes, q):
        return real(data, batch, 0 if rank == 1 else rank, world, device_id, boxes, q)

    monkeypatch.setattr(J, "loader_batches", rank1_reads_rank0)
    with pytest.raises(E.DuplicateKeyError, match=r"not exactly once: 10 duplicated .* 11 missing"):
        run_eval(tmp_path, "--run", str(trained), "--mode", "center", "--scales", "64", "--workers", "3",
                 "--no-ray")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=f"/tmp/ray-eval-{os.getpid()}",
                 log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_ray_workers_evaluate_each_image_exactly_once(trained, sample_dataset, tmp_path, ray_cluster):
    local = run_eval(tmp_path, "--run", str(trained), "--mode", "dense", "--scales", "64,96", "--workers", "1",
                     "--no-ray", name="local")
    res = run_eval(tmp_path, "--run", str(trained), "--mode", "dense", "--scales", "64,96", "--workers", "3",
                   name="ray")
    counts = [len(s.keys) for s in res["shares"]]
    assert counts == [10, 11, 11]
    keys = [k for s in res["shares"] for k in s.keys]
    assert sorted(keys) == sorted(stored_labels(sample_dataset, "val"))
    assert res["rows"] == local["rows"]
    assert (tmp_path / "ray" / "results.md").read_text() == (tmp_path / "local" / "results.md").read_text()


def test_an_ensemble_of_a_checkpoint_with_itself_equals_it(trained, tmp_path):
    one = run_eval(tmp_path, "--run", str(trained), "--mode", "both", "--scales", "64", "--no-ray", name="one")
    two = run_eval(tmp_path, "--run", str(trained), "--run", str(trained), "--mode", "both", "--scales", "64",
                   "--no-ray", name="two")
    strip = [{k: v for k, v in r.items() if k != "config"} for r in one["rows"]]
    assert [{k: v for k, v in r.items() if k != "config"} for r in two["rows"]] == strip
    assert two["rows"][0]["config"] == "A (w=0.0625) + A (w=0.0625)"
    for row in one["shares"][0].top:
        torch.testing.assert_close(one["shares"][0].top[row], two["shares"][0].top[row])


def member(folder: Path, root, s_min: int, s_max: int, seed: int, classes: int = 4, fingerprint=None) -> str:
    """A tiny random-weight checkpoint (width 1/32, crop 32) trained, says its config, at S in [s_min, s_max]."""
    cfg = C.load(None, [f"data.root={root}", "model.width=0.03125", f"model.num_classes={classes}",
                        "model.init=glorot", "data.crop_size=32", f"data.scale_min={s_min}",
                        f"data.scale_max={s_max}", "data.decode=cpu", "data.threads=1"])
    torch.manual_seed(seed)
    state = {"model": ckpt.build_model(cfg, classes).state_dict(), "config": C.dump(cfg), "num_classes": classes}
    if fingerprint is not None:
        state["dataset_fingerprint"] = fingerprint
    return ckpt.save_checkpoint(ckpt.weights_only(state), folder / f"{seed}" / ckpt.FILENAME)


def test_ensemble_members_trained_at_different_s_are_each_evaluated_at_their_own_q(
        sample_dataset, tmp_path, monkeypatch):
    """Two nets, one trained at S = 64 (Q in {32, 64, 96}), one at S in [32, 64] (Q in {32, 48, 64}):
    each runs at its own Qs only, and the table names both sets. (How the rows are combined is
    checked on exact posteriors in test_eval_protocols.py.)"""
    fixed = member(tmp_path, sample_dataset, 64, 64, seed=1)
    jittered = member(tmp_path, sample_dataset, 32, 64, seed=2)
    sig = {round(float(ckpt.load_checkpoint(c)["model"]["features.0.weight"].sum()), 4): name
           for c, name in ((fixed, "fixed"), (jittered, "jittered"))}
    seen = {"fixed": set(), "jittered": set()}
    real = E.posteriors_at_scale

    def spy(nets, images, p, dense_nets=None):
        (net,) = nets                                  # an ensemble at different Qs runs one net at a time
        seen[sig[round(float(net.features[0].weight.sum()), 4)]].add(min(images.shape[-2:]))
        return real(nets, images, p, dense_nets)

    monkeypatch.setattr(E, "posteriors_at_scale", spy)
    res = run_eval(tmp_path, "--run", fixed, "--run", jittered, "--mode", "dense", "--no-ray", "--workers", "2",
                   name="ensemble")
    assert seen == {"fixed": {32, 64, 96}, "jittered": {32, 48, 64}}
    columns = [(r["config"], r["train S"], r["test Q"], r["images"]) for r in res["rows"]]
    assert columns == [("A (w=0.03125)", "64", "32,64,96", 32), ("A (w=0.03125)", "[32;64]", "32,48,64", 32),
                       ("A (w=0.03125) + A (w=0.03125)", "64 / [32;64]", "32,64,96 / 32,48,64", 32)]
    assert "32,64,96 / 32,48,64" in (tmp_path / "ensemble" / "results.md").read_text()
    from jobs.passes.classify import metric_key

    assert [metric_key(r["mode"], r["row"], "top1_error") for r in res["rows"]] == [
        "dense/net1/q32-64-96/top1_error", "dense/net2/q32-48-64/top1_error", "dense/ensemble/top1_error"]
    assert sorted(k for s in res["shares"] for k in s.keys) == sorted(stored_labels(sample_dataset, "val"))


@pytest.mark.parametrize("what, other, names", [
    ("classes", dict(classes=5), "the number of classes"),
    ("dataset", dict(fingerprint="another-dataset"), "different datasets"),
])
def test_ensemble_members_must_share_classes_and_dataset(sample_dataset, tmp_path, capsys, what, other, names):
    from jobs import cli
    from jobs import evaluate as J
    from jobs.cli import UsageError

    a = member(tmp_path, sample_dataset, 64, 64, seed=1)               # its fingerprint: the sample's
    b = member(tmp_path, sample_dataset, 64, 128, seed=2, **other)
    argv = ["--run", a, "--run", b, "--no-ray", "--no-mlflow", "--out", str(tmp_path / "x")]
    with pytest.raises(UsageError, match=names):
        J.main(argv)
    assert cli.run(J.main, argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ensemble members") and names in err[0]


def test_demo_model_center_dense_multicrop_both(trained, sample_dataset, tmp_path, capsys):
    """The protocols side by side on the trained tiny model (figures printed; the tiny sample makes
    them noisy, so only relations that must hold are asserted)."""
    res = run_eval(tmp_path, "--run", str(trained), "--mode", "all", "--no-ray", name="all")
    out = capsys.readouterr().out
    rows = {(r["mode"], r["test Q"]): r for r in res["rows"]}
    assert set(rows) == {(m, q) for m in ("center", "dense", "multicrop", "both")
                         for q in ("64", "96", "128", "64,96,128")}   # auto: [Smin, mid, Smax] = 64, 96, 128
    for r in rows.values():
        assert r["images"] == 32 and r["train S"] == "[64;128]"
        assert 0 <= r["top-5 err %"] <= r["top-1 err %"] <= 100
        assert r["top-5 err %"] == 0  # 4 classes: the label is always among the top 5
    # Per-class accuracy, weighted by class size, is 1 - top-1 error.
    counts = torch.bincount(torch.tensor(list(stored_labels(sample_dataset, "val").values())), minlength=4)
    for (mode, q), acc in res["per_class"].items():
        assert (acc * counts).sum().item() / 32 == pytest.approx(1 - rows[(mode, q)]["top-1 err %"] / 100, abs=1e-4)
    # The printed table and the files agree.
    md = (tmp_path / "all" / "results.md").read_text()
    assert md in out and md.count("\n") == 2 + 16
    csv_lines = (tmp_path / "all" / "results.csv").read_text().splitlines()
    assert csv_lines[0] == "config,train S,test Q,mode,top-1 err %,top-5 err %,images" and len(csv_lines) == 17
    import csv

    per_class = list(csv.DictReader((tmp_path / "all" / "per_class.csv").open()))
    assert [r["images"] for r in per_class] == [str(int(n)) for n in counts]
    assert per_class[0]["wnid"] == "n01440764" and len(per_class[0]) == 4 + 16


@pytest.fixture(scope="module")
def mlflow_server(shared_mlflow):
    """The session's real MLflow tracking server (tests/conftest.py; nothing here stops it); its URI."""
    return shared_mlflow.uri


def test_mlflow_child_run_of_the_training_run(trained, tmp_path, mlflow_server, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    exp = client.create_experiment("train-exp")
    # A training run as jobs/train.py leaves it: tagged with its run folder (best/ checkpoint inside).
    parent = client.create_run(exp, run_name="A-tiny", tags={"run_folder": str(trained)}).info.run_id
    from jobs import evaluate as J
    from jobs.passes.members import resolve_member

    started = time.time()
    res = J.main(["--run", parent, "--mode", "both", "--scales", "64,96", "--no-ray", "--workers", "2",
                  "--quiet", "--batch-size", "5", "--out", str(tmp_path / "ml2")])
    took_ms = (time.time() - started) * 1000
    child = client.get_run(res["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent
    # Its duration is the evaluation's, not the few milliseconds of logging at the end.
    assert 0.8 * took_ms <= child.info.end_time - child.info.start_time <= took_ms + 1000
    assert child.info.experiment_id == exp and child.info.status == "FINISHED"
    both = [r for r in res["rows"] if r["mode"] == "both" and r["test Q"] == "64,96"][0]
    assert child.data.metrics["both/q64-96/top1_error"] == pytest.approx(both["top-1 err %"] / 100)
    assert child.data.metrics["top1_error"] == pytest.approx(both["top-1 err %"] / 100)
    assert len([k for k in child.data.metrics if k.endswith("top1_error")]) == 1 + 9  # 3 modes x 3 Q-sets
    assert child.data.params["scales"] == "64,96" and child.data.params["images"] == "32"
    arts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"results.csv", "results.md", "per_class.csv", "results_table.json"} <= arts
    import mlflow.artifacts

    got = mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path="results.csv",
                                              tracking_uri=mlflow_server)
    assert Path(got).read_text() == (tmp_path / "ml2" / "results.csv").read_text()
    # A run that only holds its checkpoint as an artifact: downloaded, then evaluated.
    other = client.create_run(exp, run_name="artifact-only").info.run_id
    client.log_artifact(other, str(trained / "best" / ckpt.FILENAME), "best")
    member = resolve_member(other, mlflow_server)
    assert member.parent_run_id == other and member.checkpoint.endswith(ckpt.FILENAME)


def test_features_job_writes_l2_normalised_penultimate_features(trained, sample_dataset, tmp_path):
    import pyarrow.parquet as pq

    from jobs import features

    paths = [features.main(["--run", str(trained), "--out", str(tmp_path / f"f{w}.parquet"), "--scales", "64,96",
                            "--workers", str(w), "--no-ray", "--quiet", "--batch-size", "5"]) for w in (1, 3)]
    t = pq.read_table(paths[0])
    assert t.schema.field("feature").type.list_size == 4096 // 16
    keys, labels = t.column("key").to_pylist(), t.column("label").to_pylist()
    stored = stored_labels(sample_dataset, "val")
    assert keys == sorted(stored) and labels == [stored[k] for k in keys]
    f = torch.tensor(t.column("feature").combine_chunks().flatten().to_numpy()).reshape(len(keys), -1)
    norms = f.norm(dim=1)
    assert ((norms - 1).abs() < 1e-4).float().mean() > 0.9   # an all-zero FC7 (dead ReLUs) stays zero
    assert (f >= 0).all()                                    # after FC7's ReLU
    assert pq.read_table(paths[1]).equals(t)                 # 3 workers write the same file


def test_cli_help_names_the_protocols():
    out = subprocess.run([sys.executable, "-m", "jobs.evaluate", "--help"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[1]).stdout
    for word in ("--mode", "--scales", "--no-flip", "--workers", "multicrop", "mlflow.parentRunId"):
        assert word in out
