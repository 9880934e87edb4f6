"""What a training run leaves in MLflow besides metrics, as MLflow 3 users expect to find it:

- its experiment, tagged for model training (``mlflow.experimentKind``, so the UI opens its model
  training view) and, with a SQLite or file store, its artifacts beside ``run.storage_path``
  (``<storage>/mlflow-artifacts``) instead of the working folder of whichever process created it; a
  tracking server keeps them in its own artifact store;
- the dataset as the run's input: name, digest = the dataset fingerprint, source, counts per split,
  and the preprocessing history;
- the best weights as an MLflow PyTorch model in the ``pt2`` format (``torch.export``: loading it runs
  no pickled code), with its signature, class names, head (class scores or boxes: what its output
  means) and the preprocessing it expects, its validation
  errors attached (as the logged model's tags), and registered when ``tracking.register_model`` names a model.
Each is done once per run, whatever the number of reruns (the run's tags say what is there).
"""
from __future__ import annotations

import json
from pathlib import Path

from storage import files

KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
MODEL_URI_TAG = "model_uri"


def artifact_location(tracking_uri: str, storage_path: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside the run storage for a database or file
    store; None (the server's own store) for a tracking server."""
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    base = storage_path if files.is_uri(storage_path) else Path(storage_path).resolve().as_uri()
    return f"{base.rstrip('/')}/mlflow-artifacts/{experiment}"


def experiment_id(client, name: str, tracking_uri: str, storage_path: str) -> str:
    """The experiment's id, creating it (tagged, with its artifact location) when missing."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, artifact_location=artifact_location(tracking_uri, storage_path, name),
                                        tags={KIND_TAG: KIND})
    if exp.tags.get(KIND_TAG) != KIND:
        client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    return exp.experiment_id


def log_dataset(client, run_id: str, root: str) -> None:
    """The dataset as the run's training input, once."""
    from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    from storage import dataformat as fmt

    if client.get_run(run_id).inputs.dataset_inputs:
        return
    info = fmt.read_info(root)
    profile = {"splits": {s: e.get("num_samples") for s, e in info.get("splits", {}).items()},
               "classes": len(info.get("classes", [])),
               "history": [{k: h.get(k) for k in ("when", "source", "added", "git_commit") if k in h}
                           for h in fmt.read_history(root)]}

    class ShardDataset(MetaDataset):
        def to_dict(self):
            return {**super().to_dict(), "profile": json.dumps(profile)}

    # A local folder matches two registered source kinds (file: and bare paths): name the first, or
    # MLflow warns that it is ambiguous.
    local = [s for s in get_registered_sources() if s.__name__ == "LocalArtifactDatasetSource"][:1]
    source = resolve_dataset_source(str(root), candidate_sources=None if files.is_uri(root) else local)
    dataset = ShardDataset(source, name=Path(root).name, digest=info["fingerprint"][:36])
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(),
                                                     tags=[InputTag("mlflow.data.context", "training")])])


def log_model(client, tracking_uri: str, run_id: str, checkpoint: str, register: str = "") -> str:
    """The checkpoint's net as an MLflow PyTorch model of the run (once); returns its model URI."""
    import mlflow
    import numpy as np
    import torch

    from pipeline import checkpoint as ckpt
    from pipeline import config as config_lib
    from storage import dataset
    from pipeline.task import task_for

    tags = client.get_run(run_id).data.tags
    if tags.get(MODEL_URI_TAG):
        return tags[MODEL_URI_TAG]
    net, cfg = ckpt.model_from_checkpoint(checkpoint)
    state = ckpt.load_checkpoint(checkpoint)
    ds = dataset.open_dataset(cfg.data.root)
    crop = cfg.data.crop_size
    metadata = {"head": cfg.model.head, "output": task_for(cfg.model.head).output,
                "classes": [c["wnid"] for c in ds.classes],
                "class_names": [c.get("name", "") for c in ds.classes],
                "input": f"(N, 3, {crop}, {crop}) float32 RGB, 0-255 minus mean_rgb, centre crop of the "
                         f"image rescaled to shorter side test_scale",
                "mean_rgb": list(ds.stats().mean_rgb),
                "test_scale": config_lib.test_scale(cfg.data), "crop": crop,
                "dataset_fingerprint": state.get("dataset_fingerprint", "")}
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        # A batch of 2 in the example: torch.export fixes a dimension of size 1, and the model must
        # take any batch. The requirements are given, not inferred (inferring runs the model again).
        model = mlflow.pytorch.log_model(
            net, name="model", input_example=np.zeros((2, 3, crop, crop), np.float32), metadata=metadata,
            serialization_format="pt2", registered_model_name=register or None,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"])
        # The model's val errors as its own metrics (the model page's table, and "best/..." in the run:
        # under their own names, so the run's val/ curves get no second point at a step they logged).
        errors = {k: float(v) for k, v in state.get("metrics", {}).items() if k.startswith("val/")}
        if errors:
            mlflow.set_logged_model_tags(model.model_id, {k: f"{v:.6f}" for k, v in errors.items()})
            mlflow.log_metrics({f"best/{k}": v for k, v in errors.items()}, step=int(state.get("images_seen", 0)),
                               model_id=model.model_id)
    client.set_tag(run_id, MODEL_URI_TAG, model.model_uri)
    return model.model_uri
