"""MLflow runs a pass reads or writes besides training: the checkpoint a training run left (for
``--run <id>``), and the results run of an evaluation, nested under the training run it scored."""
from __future__ import annotations

import re
import time
from pathlib import Path

from jobs.tracking import outputs
from pipeline import checkpoint as ckpt

RUN_ID = re.compile(r"^(runs:/)?([0-9a-f]{32})/?$")
# Tags jobs/train.py puts on a training run: its best checkpoint (set at the end) and its run folder
# (set at the start), tried in this order.
CHECKPOINT_TAGS = ("checkpoint", "run_folder")


def run_id_of(spec: str) -> str:
    """The MLflow run id ``spec`` names (``runs:/<id>`` or 32 hex digits), else ""."""
    m = RUN_ID.match(spec.strip())
    return m.group(2) if m else ""


def get_run(run_id: str, tracking_uri: str):
    """The MLflow run ``run_id``; one that the server does not know (or a server that cannot be
    reached) is a FileNotFoundError naming it, not MLflow's traceback."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException as e:
        raise FileNotFoundError(f"MLflow run {run_id}: not found at {tracking_uri} "
                                f"({str(e).splitlines()[0][:200]})") from None


def checkpoint_of_run(run_id: str, tracking_uri: str) -> str:
    """Where the training run's checkpoint is: its ``checkpoint`` or ``run_folder`` tag (the best
    checkpoint there), else a ``checkpoint.pt`` artifact (downloaded). Raises naming what was tried."""
    run = get_run(run_id, tracking_uri)
    tried = []
    for tag in CHECKPOINT_TAGS:
        value = run.data.tags.get(tag)
        if value:
            tried.append(f"tag {tag}={value}")
            try:
                return ckpt.resolve(value)
            except FileNotFoundError:
                tried[-1] += " (no checkpoint there)"  # named in the error below if nothing else works
    try:
        return artifact_of_run(run_id, ckpt.FILENAME, tracking_uri)
    except FileNotFoundError:
        tried.append(f"artifacts named {ckpt.FILENAME}")
    raise FileNotFoundError(f"MLflow run {run_id}: no checkpoint found; tried {'; '.join(tried)}")


def artifact_of_run(run_id: str, name: str, tracking_uri: str) -> str:
    """The run's artifact called ``name`` (found up to 3 folders down), downloaded; raises naming it."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    found = _find_artifact(MlflowClient(tracking_uri), run_id, name)
    if not found:
        raise FileNotFoundError(f"MLflow run {run_id}: no artifact named {name}")
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=found, tracking_uri=tracking_uri)


def _find_artifact(client, run_id: str, name: str, path: str = "", depth: int = 3) -> str:
    """The first artifact called ``name``, preferring ``best/`` folders, at most ``depth`` down."""
    entries = client.list_artifacts(run_id, path or None)
    for e in sorted(entries, key=lambda e: (not e.is_dir, "best" not in e.path)):
        if not e.is_dir and e.path.rsplit("/", 1)[-1] == name:
            return e.path
    if depth:
        for e in sorted((e for e in entries if e.is_dir), key=lambda e: "best" not in e.path):
            found = _find_artifact(client, run_id, name, e.path, depth - 1)
            if found:
                return found
    return ""


def log_results_run(uri: str, parent_run_id: str, name: str, metrics: dict[str, float], params: dict, tags: dict,
                    files: list[Path], table: dict[str, list], note: str, experiment: str,
                    started_ms: int | None = None, storage: str = ".") -> str:
    """The MLflow run of one pass's results: nested under ``parent_run_id`` (tag
    ``mlflow.parentRunId``) when known, else top-level in ``experiment`` (with a SQLite store, its
    artifacts beside ``storage``); ``metrics``, ``params``, ``tags``, the ``files`` and ``table``
    (column -> values) as artifacts, ``note`` (the Markdown table) as the run's note. It starts at
    ``started_ms``, so its duration is the pass's. Returns its id."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    tags = dict(tags)
    if parent_run_id:
        exp_id = client.get_run(parent_run_id).info.experiment_id
        tags["mlflow.parentRunId"] = parent_run_id
    else:
        exp_id = outputs.experiment_id(client, experiment, uri, storage)
    rid = client.create_run(exp_id, start_time=started_ms, run_name=name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in params.items()],
                     tags=[RunTag("mlflow.note.content", note)])
    for f in files:
        client.log_artifact(rid, str(f))
    client.log_table(rid, data=table, artifact_file="results_table.json")
    client.set_terminated(rid, "FINISHED")
    return rid
