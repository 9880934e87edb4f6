"""Ray Train's side of a training run: the workers' resources and runtime env, whether the cluster
can ever hold them (checked before any MLflow run exists), and the fit of ``train_loop_per_worker``
(``jobs.cluster.worker``) on ``run.workers`` workers."""
from __future__ import annotations

import os
from typing import Any

from jobs import cluster
from jobs.cluster.worker import DATA_ERROR, train_loop_per_worker
from pipeline import config as config_lib
from storage import files

# Environment forwarded from the driver to the Ray workers: the tests' fault knobs and MLflow client
# settings. Credentials (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN) are deliberately not forwarded:
# a runtime env is visible in Ray's dashboard; set them on every node instead (docs/cluster.md).
FORWARD_PREFIXES = ("VGG_", "MLFLOW_HTTP_", "MLFLOW_LOGGING_LEVEL", "MLFLOW_SYSTEM_METRICS_", "MLFLOW_TRACKING_INSECURE_TLS",
                    "MLFLOW_TRACKING_SERVER_CERT_PATH", "GIT_COMMIT")


def scaling_config(cfg: config_lib.Config):
    from ray.train import ScalingConfig                            # RAY

    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.use_gpu:
        resources["GPU"] = 1
    lo, hi = cfg.run.worker_range()
    # a range is Ray Train's elastic training: it starts with what is free (at least lo), and restarts
    # the group at another size when a worker is lost or nodes come back
    return ScalingConfig(num_workers=(lo, hi) if lo < hi else lo, use_gpu=cfg.run.use_gpu,  # RAY
                         resources_per_worker=resources, placement_strategy=cfg.run.placement_strategy)


def fit(cfg: config_lib.Config, folder: str, run_id: str, tags: dict[str, str]) -> dict[str, Any]:
    """Ray Train's fit of ``train_loop_per_worker`` on ``run.workers`` workers (a count, or a range)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig    # RAY
    from ray.train.torch import TorchTrainer                            # RAY

    files.remove(files.join(folder, DATA_ERROR))   # an earlier command's verdict on data since repaired
    cluster.connect(cfg.run.worker_range()[1] * cfg.run.cpus_per_worker, runtime_env())
    trainer = TorchTrainer(
        train_loop_per_worker,                                     # RAY: runs on every worker
        train_loop_config={"config": config_lib.dump(cfg), "run_id": run_id, "run_folder": folder, "tags": tags},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=cfg.run.storage_path,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_last),
            logging_config=LoggingConfig(log_level="WARNING")),  # Ray Train's per-report INFO lines off
    )
    result = trainer.fit()
    return {"metrics": dict(result.metrics or {}), "checkpoint": result.checkpoint.path if result.checkpoint else ""}


def runtime_env() -> dict | None:
    """The workers' runtime env: what the driver forwards (``FORWARD_PREFIXES``)."""
    forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES) and k not in job_env_vars()}
    return {"env_vars": forwarded} if forwarded else None


def worker_resources(cfg: config_lib.Config) -> dict[str, float]:
    return {"CPU": cfg.run.cpus_per_worker, **({"GPU": 1} if cfg.run.use_gpu else {})}


def check_resources(cfg: config_lib.Config) -> None:
    """Before any MLflow run exists: refuse workers the cluster can never hold (a GPU config on CPU
    nodes would otherwise wait forever), and say so when they fit but the nodes are busy. On a
    cluster (``RAY_ADDRESS``) this connects, also for --dry-run; a local Ray is judged unstarted.
    ``run.wait_for_nodes`` is for autoscaling clusters, whose nodes come once asked for."""
    (workers, most), need = cfg.run.worker_range(), worker_resources(cfg)   # an elastic run needs its fewest
    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    if on_cluster:
        cluster.connect(most * cfg.run.cpus_per_worker, runtime_env())
    nodes = cluster.live_nodes() if on_cluster else cluster.local_node(most * cfg.run.cpus_per_worker)
    problem = cluster.check_fits(workers, need, cfg.run.placement_strategy, nodes)
    if problem and not cfg.run.wait_for_nodes:
        hint = "set run.use_gpu=false, " if "GPU" in need and not any(n.get("GPU") for n in nodes) else ""
        raise config_lib.ConfigError(f"run.workers, run.cpus_per_worker, run.use_gpu: {problem}; {hint}lower them, "
                                     f"add nodes, or set run.wait_for_nodes=true on an autoscaling cluster")
    if problem:
        print(f"note: {problem}; waiting for the autoscaler (run.wait_for_nodes)", flush=True)
        return
    if not on_cluster:
        return
    free = cluster.available(need)
    if any(free[k] < v * workers for k, v in need.items()):
        print(f"note: the workers need {', '.join(f'{k} {v * workers:g}' for k, v in need.items())} and the "
              f"cluster has {', '.join(f'{k} {v:g}' for k, v in free.items())} free now: waiting for them",
              flush=True)


def job_env_vars() -> dict[str, str]:
    """The env_vars of the Ray job this driver runs in (``ray job submit`` / ``jobs.submit``): Ray
    refuses to merge a runtime env that sets one of them again, even to the same value."""
    return (cluster.job_config().get("runtime_env") or {}).get("env_vars") or {}


