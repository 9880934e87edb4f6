"""Where a run's artifacts go and how its experiment is marked (jobs/tracking/outputs.py), for the two
kinds of tracking URI users have: a SQLite file (no server) and a tracking server. The logged model
and the dataset input are checked on a real training run in test_train.py."""
from __future__ import annotations

from pathlib import Path

from jobs.tracking import outputs
from jobs import tracking


def log_a_file(uri: str, storage: Path, experiment: str) -> tracking.Tracker:
    tracker = tracking.Tracker(uri, experiment, "r", str(storage / "r"), retry_s=1.0)
    assert tracker.connect()
    assert tracker.log_text("resolved config\n", "config.yaml")
    tracker.close("FINISHED")
    return tracker


def test_with_a_sqlite_store_artifacts_go_beside_the_run_storage(tmp_path, monkeypatch):
    """Not into ./mlruns of whichever process created the experiment (a Ray job's temporary folder)."""
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    storage = tmp_path / "runs"
    tracker = log_a_file(f"sqlite:///{tmp_path / 'mlflow.db'}", storage, "sqlite-exp")
    found = list((storage / "mlflow-artifacts" / "sqlite-exp").rglob("config.yaml"))
    assert len(found) == 1 and found[0].read_text() == "resolved config\n"
    assert not any(elsewhere.iterdir())                      # nothing in the working folder
    client = tracker._client
    exp = client.get_experiment_by_name("sqlite-exp")
    assert exp.tags[outputs.KIND_TAG] == outputs.KIND
    assert exp.artifact_location == (storage / "mlflow-artifacts" / "sqlite-exp").resolve().as_uri()


def test_with_a_server_artifacts_go_to_its_artifact_store(shared_mlflow, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = tmp_path / "runs"
    log_a_file(shared_mlflow.uri, storage, "server-exp")
    found = list((shared_mlflow.root / "artifacts").rglob("config.yaml"))
    assert any(p.read_text() == "resolved config\n" for p in found)
    assert not (storage / "mlflow-artifacts").exists() and not (tmp_path / "mlruns").exists()
    exp = shared_mlflow.client().get_experiment_by_name("server-exp")
    assert exp.tags[outputs.KIND_TAG] == outputs.KIND


def test_an_existing_experiment_is_marked_for_model_training(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("old")                    # as an earlier version made it
    assert outputs.experiment_id(client, "old", uri, str(tmp_path)) == old
    assert client.get_experiment(old).tags[outputs.KIND_TAG] == outputs.KIND
