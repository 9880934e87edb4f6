"""Train a VGG with Ray Train: ``python -m jobs.train --config jobs/configs/<experiment>.yaml [--set a.b=c]``.

The same command runs on a laptop (a local Ray, no dashboard, its node address 127.0.0.1; README
"Security" says what still listens beyond the loopback), on a cluster it is submitted to
(``ray job submit --address ... --working-dir . -- python -m jobs.train ...``: Ray sets RAY_ADDRESS),
or against a running cluster (``RAY_ADDRESS=host:6379 python -m jobs.train ...``).

- Workers: ``run.workers`` Ray Train workers, DDP over NCCL (GPU) or gloo (CPU), each running
  ``pipeline.train_loop.run_worker`` on DALI shard <world rank> of <world size>.
- Storage: ``<run.storage_path>/<run.name>/`` (a local folder or a URI such as s3://bucket/runs) holds
  Ray's ``checkpoint_<step>/`` folders (the last ``run.keep_last``), ``best/`` (the best validation
  top-1 error) and ``mlflow_run_id``.
- Resuming: rerunning the same command with the same ``run.name`` resumes from the latest checkpoint
  (epoch, step, optimizer, schedule, RNG, data position) into the same MLflow run; a fresh start needs
  a new name. Worker failures are retried ``run.max_failures`` times from the latest checkpoint.
- ``model.init_from``: the parent's weights (the paper's A -> deeper nets, S=256 -> S=384 -> [256, 512]):
  a run name in the same storage (``A-256``), a checkpoint path or URI, or ``runs:/<MLflow run id>``.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from jobs import tracking
from pipeline import checkpoint as ckpt
from pipeline import config as config_lib
from pipeline import dataset

log = logging.getLogger("jobs.train")
# Environment forwarded from the driver to the Ray workers: the tests' fault knobs and MLflow client
# settings. Credentials (MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN) are deliberately not forwarded:
# a runtime env is visible in Ray's dashboard; set them on every node instead (docs/cluster.md).
FORWARD_PREFIXES = ("VGG_", "MLFLOW_HTTP_", "MLFLOW_SYSTEM_METRICS_", "MLFLOW_TRACKING_INSECURE_TLS",
                    "MLFLOW_TRACKING_SERVER_CERT_PATH", "GIT_COMMIT")


# ---------------------------------------------------------------------------------------------------
# Resolving the config: everything a worker needs, concrete
# ---------------------------------------------------------------------------------------------------

def is_uri(location: str) -> bool:
    return "://" in location


def run_folder(cfg: config_lib.Config) -> str:
    return f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"


def resolve(cfg: config_lib.Config) -> tuple[config_lib.Config, dict[str, str]]:
    """(the config with every path absolute, num_classes from dataset.json and init_from a checkpoint
    location; tags naming the parent run). This resolved config is what MLflow and checkpoints keep."""
    data = dataclasses.replace(cfg.data, root=str(Path(cfg.data.root).resolve()))
    info = dataset.read_info(data.root)
    classes = dataset.num_classes(data.root, info)
    if cfg.model.num_classes and cfg.model.num_classes != classes:
        raise config_lib.ConfigError(f"model.num_classes {cfg.model.num_classes} but {data.root}/dataset.json "
                                     f"has {classes} classes (0 reads it from there)")
    storage = cfg.run.storage_path if is_uri(cfg.run.storage_path) else str(Path(cfg.run.storage_path).resolve())
    uri = tracking.resolve_uri(cfg.tracking.uri) if cfg.tracking.enabled else cfg.tracking.uri
    cfg = dataclasses.replace(cfg, data=data, run=dataclasses.replace(cfg.run, storage_path=storage),
                              tracking=dataclasses.replace(cfg.tracking, uri=uri))
    tags = {"dataset_fingerprint": info.get("fingerprint", ""), "run_folder": run_folder(cfg)}
    location, parent = resolve_init_from(cfg)
    if location:
        tags.update(init_from=cfg.model.init_from, parent_checkpoint=location)
        if parent:
            tags["parent_run_id"] = parent
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=classes,
                                                             init_from=location))
    return cfg, tags


def resolve_init_from(cfg: config_lib.Config) -> tuple[str, str]:
    """(checkpoint location, parent MLflow run id or "") for ``model.init_from``: ``runs:/<id>`` (the
    parent run's ``checkpoint``/``run_folder`` tag), a bare run name (``<storage>/<name>``), or a path
    or URI. The location is checked now, so a missing parent fails before any worker starts."""
    spec = cfg.model.init_from
    if not spec:
        return "", ""
    parent = ""
    if spec.startswith("runs:/"):
        from mlflow.tracking import MlflowClient

        parent = spec[len("runs:/"):].strip("/")
        tags = MlflowClient(cfg.tracking.uri).get_run(parent).data.tags
        location = tags.get("checkpoint") or tags.get("run_folder")
        if not location:
            raise FileNotFoundError(f"model.init_from {spec}: the run has no 'checkpoint' or 'run_folder' tag")
    elif is_uri(spec) or os.path.isabs(spec) or os.path.exists(spec):
        location = spec if is_uri(spec) else str(Path(spec).resolve())
    else:  # a run name in the same storage
        location = f"{cfg.run.storage_path.rstrip('/')}/{spec}"
    file = ckpt.resolve(location, "best")       # raises FileNotFoundError naming what it looked for
    if not parent:
        for folder in (location, file.rsplit("/", 1)[0], file.rsplit("/", 2)[0]):
            try:
                parent = tracking.read_run_id(folder)
            except OSError:
                parent = ""
            if parent:
                break
    return location, parent


# ---------------------------------------------------------------------------------------------------
# The Ray Train worker: pipeline.train_loop.run_worker with Ray's report / get_checkpoint / prepare_model
# ---------------------------------------------------------------------------------------------------

def upload(local_file: str | Path, destination: str) -> None:
    """Copy a file into storage: atomically on a local filesystem (temp name + rename); on object
    stores a single PUT is atomic already."""
    if is_uri(destination):
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(destination)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with open(local_file, "rb") as src, fs.open_output_stream(path) as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        return
    dest = Path(destination)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.copyfile(local_file, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)


def resume_state(folder: str, checkpoint, rank: int, world: int) -> dict[str, Any] | None:
    """The checkpoint to resume from: the newest complete one in the run folder. That is Ray's
    latest registered one (``checkpoint``, which lives there) or newer: Ray registers a reported
    checkpoint some time after its files land, so a driver killed in between would otherwise lose
    it. Rank 0 chooses; every rank loads the same file."""
    import torch.distributed as dist

    if rank == 0:
        state = ckpt.latest_loadable(folder)
        if state is None and checkpoint is not None:
            with checkpoint.as_directory() as local:
                state = ckpt.load_checkpoint(local)
        if world > 1:
            dist.broadcast_object_list([state["path"] if state is not None else None], src=0)
        return state
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return ckpt.load_checkpoint(box[0]) if box[0] else None


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray                                                     # RAY
    import ray.train                                               # RAY
    import ray.train.torch                                         # RAY

    from pipeline.train_loop import Worker, run_worker

    # Ours at INFO; everything else that logs through the root logger (Ray Train prints a line per
    # report there) at WARNING.
    logging.getLogger().setLevel(logging.WARNING)
    for name in ("pipeline", "jobs"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    cfg = config_lib.from_dict(config_lib.Config, yaml.safe_load(loop_config["config"]))
    context = ray.train.get_context()                              # RAY
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()                          # RAY: the local GPU, not the rank
    if device.type == "cuda":
        torch.cuda.set_device(device)
    node = ray.get_runtime_context().get_node_id()                 # RAY: recorded in checkpoints
    worker = Worker(rank, world, device, node=f"{socket.gethostname()}/{node[:12]}")

    resume = resume_state(loop_config["run_folder"], ray.train.get_checkpoint(), rank, world)   # RAY

    tracker = None
    if rank == 0:
        tracker = tracking.Tracker(
            cfg.tracking.uri, cfg.tracking.experiment, cfg.run.name, loop_config["run_folder"],
            run_id=loop_config["run_id"] or (resume or {}).get("mlflow_run_id", ""),
            params=tracking.params_from(config_lib.flatten(cfg)), tags=loop_config["tags"],
            system_metrics=cfg.tracking.system_metrics, retry_s=cfg.tracking.retry_s,
            enabled=cfg.tracking.enabled, node_id=None)
        tracker.connect()

    def report(metrics: dict[str, float], folder: str | None, best: bool) -> None:
        if folder is not None and best:
            upload(Path(folder) / ckpt.FILENAME, f"{loop_config['run_folder']}/{ckpt.BEST}/{ckpt.FILENAME}")
        ray.train.report(                                          # RAY: every rank, rank 0 with the files
            metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None,
            checkpoint_dir_name=f"{ckpt.PREFIX}{int(metrics['step']):010d}")

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        if tracker is not None:
            tracker.log_metrics(metrics, step)

    try:
        result = run_worker(cfg, worker, report=report, log=log_metrics, resume=resume,
                            run_id=lambda: tracker.run_id if tracker else "",
                            wrap=lambda net, w: ray.train.torch.prepare_model(net))  # RAY: DDP
        if tracker is not None and result.tally is not None:
            classes = dataset.read_info(cfg.data.root).get("classes", [])
            tracker.log_dict(per_class_table(result.tally, classes), f"eval/val_{cfg.data.val_mode}_per_class.json")
    finally:
        if tracker is not None:
            tracker.close()


def per_class_table(tally, classes: list[dict]) -> dict[str, list]:
    """Columns of the final validation's per-class top-1 accuracy (MLflow shows it as a table)."""
    acc = tally.per_class_accuracy().tolist()
    names = {c.get("index"): c for c in classes}
    return {"index": list(range(len(acc))),
            "wnid": [names.get(i, {}).get("wnid", "") for i in range(len(acc))],
            "name": [names.get(i, {}).get("name", "") for i in range(len(acc))],
            "images": tally.class_total.tolist(),
            "top1_acc": [None if a != a else round(a, 6) for a in acc]}


# ---------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------

def scaling_config(cfg: config_lib.Config):
    from ray.train import ScalingConfig                            # RAY

    resources = {"CPU": cfg.run.cpus_per_worker}
    if cfg.run.use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=cfg.run.workers, use_gpu=cfg.run.use_gpu, resources_per_worker=resources,
                         placement_strategy=cfg.run.placement_strategy)


def connect_ray(cfg: config_lib.Config) -> None:
    """RAY_ADDRESS (set by ``ray job submit``, or by hand) names a running cluster; otherwise a local
    Ray just for this command, without the dashboard. (Ray's GCS and raylet listen on the node's
    address whatever one asks; Ray >= 2.59 protects a local cluster with a generated token.)"""
    import ray                                                     # RAY

    if ray.is_initialized():
        return
    forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES)}
    runtime_env = {"env_vars": forwarded} if forwarded else None
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:
        cpus = max(os.cpu_count() or 1, cfg.run.workers * cfg.run.cpus_per_worker)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env,
                 logging_level=logging.WARNING, _node_ip_address="127.0.0.1")


def final_weights(folder: str) -> Path | None:
    """The best checkpoint's weights without the optimizer, as a file to log: loadable with
    ``pipeline.checkpoint.model_from_checkpoint``."""
    try:
        state = ckpt.load_checkpoint(folder, "best")
    except FileNotFoundError:
        return None
    keep = ("format", "model", "config", "num_classes", "epoch", "step", "images_seen", "mlflow_run_id",
            "dataset_fingerprint", "metrics")
    path = Path(tempfile.mkdtemp(prefix="vgg-weights-")) / ckpt.FILENAME
    ckpt.save_checkpoint({k: state[k] for k in keep if k in state}, path)
    return path


def train(cfg: config_lib.Config) -> dict[str, Any]:
    """Run (or resume) the training ``cfg`` describes; returns its summary."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig    # RAY
    from ray.train.torch import TorchTrainer                            # RAY

    cfg, tags = resolve(cfg)
    folder = run_folder(cfg)
    tags = {"git_commit": tracking.git_commit(Path(__file__).parent), **tags}
    tags["mlflow.source.git.commit"] = tags["git_commit"]
    tracker = tracking.Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.run.name, folder,
                               params=tracking.params_from(config_lib.flatten(cfg)), tags=tags,
                               retry_s=cfg.tracking.retry_s, enabled=cfg.tracking.enabled)
    run_id = ""
    if cfg.tracking.enabled:
        # Reachable: the run (found through the id file, or created). Unreachable: the id a previous
        # attempt left, so the workers log into that run once the server is back.
        run_id = tracker.connect() or tracking.read_run_id(folder) or _run_id_from_latest_checkpoint(folder)
        tracker.run_id = run_id
        if tracker.connect():
            tracker.log_text(config_lib.dump(cfg), "config.yaml")
    connect_ray(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config_lib.dump(cfg), "run_id": run_id, "run_folder": folder, "tags": tags},
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=cfg.run.storage_path,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_last),
            logging_config=LoggingConfig(log_level="WARNING")),  # Ray Train's per-report INFO lines off
    )
    try:
        result = trainer.fit()
    except Exception:
        tracker.close("FAILED")
        raise
    summary = {"run_folder": folder, "metrics": dict(result.metrics or {}),
               "checkpoint": result.checkpoint.path if result.checkpoint else ""}
    best = final_weights(folder)
    if tracker.connect():
        best_file = ckpt.resolve(folder, "best") if best else ""
        tracker.set_tags({"checkpoint": best_file or summary["checkpoint"], "run_folder": folder})
        tracker.log_text(config_lib.dump(cfg), "config.yaml")
        if best is not None:
            tracker.log_artifact(best, "model")
            if cfg.tracking.register_model:
                tracker.register_model(cfg.tracking.register_model, "model")
    tracker.close("FINISHED")
    summary["mlflow_run_id"] = tracker.run_id
    summary["tracking_uri"] = cfg.tracking.uri
    return summary


def _run_id_from_latest_checkpoint(folder: str) -> str:
    """The run id a checkpoint kept, when the id file is gone but checkpoints are not."""
    try:
        return ckpt.load_checkpoint(folder, "latest").get("mlflow_run_id", "")
    except FileNotFoundError:
        return ""


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML (jobs/configs/*.yaml); default: the paper's defaults")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set run.workers=4 --set optim.lr=1e-3")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg = config_lib.load(args.config, args.set)
    summary = train(cfg)
    m = summary["metrics"]
    print(f"run folder: {summary['run_folder']}")
    if "val/top1_err" in m:
        print(f"validation ({cfg.data.val_mode}): top-1 error {m['val/top1_err']:.4f}, "
              f"top-5 error {m['val/top5_err']:.4f} after {int(m['epoch'])} epochs")
    print(f"MLflow run: {summary['mlflow_run_id'] or '(tracking server unreachable)'} at {summary['tracking_uri']}")
    return 0


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.run(main))
