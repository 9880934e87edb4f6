"""Submitting training to a cluster: ``python -m jobs.submit train ...`` through Ray's Jobs API.

The first tests read what the wrapper would send (``--print-only``) and the mistakes it refuses
before anything leaves; the last submits a real job to the session's two-node Ray cluster (token
auth, Jobs API on the head's dashboard, 127.0.0.1) from a folder outside the project, with a relative
config path and a relative data.root, logging to the session's real MLflow server.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import REPO, checkpoints, only_run, small, steps_of, submit_job
from jobs import cli
from jobs import submit
from jobs import tracking
from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError
from services import BIN, free_port

DEMO = REPO / "jobs" / "configs" / "demo.yaml"


def printed(capsys, argv: list[str]) -> dict:
    assert submit.main(["--print-only", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_relative_paths_are_resolved_against_the_submitting_folder(tmp_path, monkeypatch, capsys, sample_dataset):
    here = tmp_path / "me"
    shutil.copytree(sample_dataset, here / "shards")
    (here / "parent").mkdir()
    monkeypatch.chdir(here)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = printed(capsys, ["train", "--config", os.path.relpath(DEMO, here), "--set", "data.root=shards",
                           "--set", "model.init_from=parent", "--set", "run.name=rel"])
    sets = job["entrypoint"].split("--set ")[1:]
    final = {s.split("=", 1)[0]: s.split("=", 1)[1].strip() for s in sets}    # the last --set of a key wins
    commit = tracking.git_commit(REPO)
    assert job["entrypoint"].startswith(f"GIT_COMMIT={commit} python -m jobs.train --config jobs/configs/demo.yaml ")
    assert final["data.root"] == str(here / "shards")
    assert final["run.storage_path"] == str(here / "runs")                       # demo.yaml's, made absolute
    assert final["model.init_from"] == str(here / "parent")                      # an existing path: a checkpoint
    assert final["tracking.uri"] == f"sqlite:///{here / 'mlflow.db'}"             # jobs.train's default, here
    env = job["runtime_env"]
    assert env["working_dir"] == str(REPO) and ".git" in env["excludes"]
    assert job["metadata"]["git_commit"] == commit and "env_vars" not in env
    assert "py_executable" not in env and "uv" not in env                       # the nodes' own environment


def test_absolute_paths_uris_and_run_names_are_sent_as_given(tmp_path, monkeypatch, capsys, sample_dataset):
    monkeypatch.chdir(tmp_path)
    job = printed(capsys, ["--python", "/opt/vgg/bin/python", "train", "--set", f"data.root={sample_dataset}",
                           "--set", "run.storage_path=s3://bucket/runs", "--set", "model.init_from=A-256",
                           "--set", "tracking.uri=http://mlflow.internal:5000"])
    assert " /opt/vgg/bin/python -m jobs.train --set " in job["entrypoint"]
    assert job["entrypoint"].count("--set ") == 4                                # nothing added
    assert job["runtime_env"]["py_executable"] == "/opt/vgg/bin/python"


def test_uv_puts_the_projects_requirements_in_the_runtime_env(tmp_path, monkeypatch, capsys, sample_dataset):
    monkeypatch.chdir(tmp_path)
    job = printed(capsys, ["--uv", "train", "--set", f"data.root={sample_dataset}"])
    names = {p.split(">")[0].split("<")[0].split("[")[0].strip() for p in job["runtime_env"]["uv"]["packages"]}
    assert {"torch", "nvidia-dali-cuda120", "ray", "mlflow", "pyarrow"} <= names
    assert not names & {"pytest", "scipy"}                                       # the dev extra stays out


@pytest.mark.parametrize("argv, cls, names", [
    (["train", "--set", "data.root=nowhere"], ConfigError, "does not exist here"),
    (["train", "--config", "elsewhere.yaml"], cli.UsageError, "outside the project folder"),
    (["train", "--config", "missing.yaml"], FileNotFoundError, "missing.yaml"),
    (["evaluate", "--run", "x"], cli.UsageError, "ray job submit"),
    (["--uv", "--python", "python3", "train"], cli.UsageError, "give one"),
    (["train", "--set", "run.workers=0"], ConfigError, "run.workers"),
])
def test_mistakes_are_refused_before_the_job_leaves(tmp_path, monkeypatch, argv, cls, names):
    (tmp_path / "elsewhere.yaml").write_text("run:\n  workers: 2\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cls, match=names):
        submit.main(["--print-only", *argv])


def test_no_cluster_at_the_address_is_one_error_line_and_status_2(tmp_path, sample_dataset):
    address = f"http://127.0.0.1:{free_port()}"                                  # nobody listens there
    proc = subprocess.run([sys.executable, "-m", "jobs.submit", "--address", address, "train",
                           "--set", f"data.root={sample_dataset}", "--set", "tracking.uri=http://127.0.0.1:1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no Ray Jobs API at " + address), proc.stderr


def test_a_job_submitted_with_relative_paths_finds_its_data_and_records_the_commit(
        ray_cluster, shared_mlflow, sample_dataset, tmp_path):
    """From a folder outside the project: the config named relative to it, the data and the run
    storage relative to it. The job runs in Ray's copy of the project on the head node, one Ray Train
    worker on each node, and logs into the MLflow server with the submitting tree's commit."""
    here = tmp_path / "me"
    shutil.copytree(sample_dataset, here / "shards")
    expected = tracking.git_commit(REPO)
    args = ["--config", os.path.relpath(DEMO, here),
            *small(Path("shards"), Path("runs"), "submitted", shared_mlflow.uri,
                   **{"run.placement_strategy": "STRICT_SPREAD", "schedule.epochs": 1})]
    text = submit_job(ray_cluster, ["train", *args], cwd=here, log=tmp_path / "submit.log")

    assert f"(commit {expected})" in text and "--config jobs/configs/demo.yaml" in text
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", expected)
    client = shared_mlflow.client()
    run = only_run(client, "submitted")
    assert run.info.status == "FINISHED"
    assert run.data.tags["git_commit"] == expected != "unknown"
    assert run.data.params["data.root"] == str(here / "shards")                  # not Ray's copy of the project
    assert run.data.params["run.storage_path"] == str(here / "runs")
    assert steps_of(client, run.info.run_id, "train/loss") == [16, 32, 48]       # it read its 48 images
    saved = [ckpt.load_checkpoint(p) for p in checkpoints(here / "runs" / "submitted")]
    assert saved and saved[-1]["mlflow_run_id"] == run.info.run_id
    assert saved[-1]["workers"][0]["node"] != saved[-1]["workers"][1]["node"]    # both nodes took part
    uploaded = list(Path(ray_cluster["temp"]).glob("session_*/runtime_resources/working_dir_files/*/jobs/submit.py"))
    assert uploaded, "the project was not unpacked as the job's working_dir"
    assert not (uploaded[0].parent.parent / ".git").exists() and not (uploaded[0].parent.parent / ".venv").exists()


def ray_job_submit(cluster, sid: str, entrypoint: list[str], log: Path, *extra: str) -> tuple[str, str]:
    """Plain ``ray job submit --working-dir <project>`` (Ray's own CLI, no wrapper) to the session's
    cluster, waiting for the end; (the job's final status, its log)."""
    from ray.job_submission import JobSubmissionClient

    with open(log, "w") as out:
        subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--submission-id", sid,
                        "--working-dir", str(REPO), *extra, "--", *entrypoint], cwd=REPO, env=cluster["env"],
                       stdout=out, stderr=subprocess.STDOUT, timeout=400)
    client = JobSubmissionClient(cluster["dashboard"], headers={"Authorization": f"Bearer {cluster['env']['RAY_AUTH_TOKEN']}"})
    return str(client.get_job_status(sid)), client.get_job_logs(sid)


def test_plain_ray_job_submit_refuses_relative_places_and_keeps_absolute_ones_out_of_rays_copy(
        ray_cluster, shared_mlflow, sample_dataset, tmp_path):
    """The route docs/cluster.md shows: a relative data, storage or MLflow location is refused with
    one line naming the keys (it would land in Ray's temporary copy of the project); absolute ones
    train, and nothing durable lands in that copy; the commit comes from the job's metadata."""
    train = [sys.executable, "-m", "jobs.train", "--config", "jobs/configs/demo.yaml"]
    status, text = ray_job_submit(ray_cluster, "rel-places", [*train, "--set", "data.root=shards"], tmp_path / "rel.log")
    assert status == "FAILED", text
    [line] = [t for t in text.splitlines() if t.startswith("error:")]
    assert line.startswith("error: data.root, run.storage_path") and "relative" in line and "jobs.submit" in line
    assert "Traceback" not in text

    storage = tmp_path / "runs"
    args = small(sample_dataset, storage, "plain-job", shared_mlflow.uri, **{"schedule.epochs": 1})
    status, text = ray_job_submit(ray_cluster, "abs-places", [*train, *args], tmp_path / "abs.log",
                                  "--metadata-json", json.dumps({"git_commit": "f" * 40}))
    assert status == "SUCCEEDED", text[-4000:]
    run = only_run(shared_mlflow.client(), "plain-job")
    assert run.info.status == "FINISHED" and run.data.tags["git_commit"] == "f" * 40
    assert checkpoints(storage / "plain-job")
    copies = list(Path(ray_cluster["temp"]).glob("session_*/runtime_resources/working_dir_files/*"))
    assert copies, "the project was not unpacked as the job's working_dir"
    durable = [p for c in copies for pattern in ("**/mlflow.db", "**/checkpoint_*", "**/mlruns", "**/runs")
               for p in c.glob(pattern)]
    assert durable == [], durable


def test_a_job_on_nodes_without_the_dependencies_says_to_use_python_or_uv(ray_cluster, capsys):
    """A job whose Python lacks the project's packages (here the system's: no pyarrow) dies importing
    them; following it, the wrapper says what to do about it in one line."""
    from ray.job_submission import JobSubmissionClient

    # the token as a header: Ray reads its auth settings from the environment once per process
    client = JobSubmissionClient(ray_cluster["dashboard"],
                                 headers={"Authorization": f"Bearer {ray_cluster['env']['RAY_AUTH_TOKEN']}"})
    job = client.submit_job(entrypoint="/usr/bin/python3 -c 'import pyarrow'")
    assert submit.follow(client, job, poll_s=0.5) == 1
    out, err = capsys.readouterr()
    assert "ModuleNotFoundError" in out                                           # the job's own log, relayed
    [line] = [t for t in err.splitlines() if t.startswith("error:")]
    assert "no 'pyarrow'" in line and "--python" in line and "--uv" in line, line


def test_missing_dependency_reads_the_last_import_failure():
    assert submit.missing_dependency("x\nModuleNotFoundError: No module named 'pyarrow.lib'\n") == "pyarrow"
    assert submit.missing_dependency("Traceback ...\nValueError: bad\n") == ""
