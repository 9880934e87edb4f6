"""Train a VGG with Ray Train: ``python -m jobs.train --config jobs/configs/<experiment>.yaml [--set a.b=c]``.

The same command runs on a laptop (a local Ray for this command alone, node address and dashboard on
127.0.0.1; README "Security" says what still listens beyond the loopback), on a cluster it is submitted to
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
- Localisation (``model.head: scr | pcr``, ``jobs/configs/loc-*.yaml``): the same path; the net takes
  every weight but FC8 from its classification parent and validates by protocol (a), ``val/loc_err``
  (docs/training.md, "Localisation").
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs import cluster, tracking
from jobs.cluster import trainer
from jobs.driver import preflight, resume
from jobs.tracking import outputs
from jobs.tracking import results as tracking_results
from pipeline import checkpoint as ckpt
from pipeline import config as config_lib
from pipeline import goodput
from storage import dataset, files
from storage.files import StorageError

log = logging.getLogger("jobs.train")
WALL = goodput.WALL    # the wall time of every command that trained this run


# ---------------------------------------------------------------------------------------------------
# Resolving the config: everything a worker needs, concrete
# ---------------------------------------------------------------------------------------------------

def run_folder(cfg: config_lib.Config) -> str:
    return f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"


def resolve(cfg: config_lib.Config) -> tuple[config_lib.Config, dict[str, str]]:
    """(the config with every path absolute, num_classes from dataset.json and init_from a checkpoint
    location; tags naming the parent run). This resolved config is what MLflow and checkpoints keep."""
    data = dataclasses.replace(cfg.data, root=str(Path(cfg.data.root).resolve()))
    ds = dataset.open_dataset(data.root)
    classes = ds.num_classes
    if cfg.model.num_classes and cfg.model.num_classes != classes:
        raise config_lib.ConfigError(f"model.num_classes {cfg.model.num_classes} but {data.root}/dataset.json "
                                     f"has {classes} classes (0 reads it from there)")
    storage = cfg.run.storage_path if files.is_uri(cfg.run.storage_path) else str(Path(cfg.run.storage_path).resolve())
    uri = tracking.resolve_uri(cfg.tracking.uri) if cfg.tracking.enabled else cfg.tracking.uri
    cfg = dataclasses.replace(cfg, data=data, run=dataclasses.replace(cfg.run, storage_path=storage),
                              tracking=dataclasses.replace(cfg.tracking, uri=uri))
    tags = {"dataset_fingerprint": ds.fingerprint, "run_folder": run_folder(cfg)}
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
        parent = spec[len("runs:/"):].strip("/")
        tags = tracking_results.get_run(parent, cfg.tracking.uri).data.tags
        location = tags.get("checkpoint") or tags.get("run_folder")
        if not location:
            raise FileNotFoundError(f"model.init_from {spec}: the run has no 'checkpoint' or 'run_folder' tag")
    elif files.is_uri(spec) or os.path.isabs(spec) or os.path.exists(spec):
        location = spec if files.is_uri(spec) else str(Path(spec).resolve())
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
# The driver
# ---------------------------------------------------------------------------------------------------

def final_weights(folder: str) -> Path | None:
    """The best checkpoint's weights without the optimizer, as a file to log: loadable with
    ``pipeline.checkpoint.model_from_checkpoint``."""
    try:
        state = ckpt.load_checkpoint(folder, "best")
    except FileNotFoundError:
        return None
    path = Path(tempfile.mkdtemp(prefix="vgg-weights-")) / ckpt.FILENAME
    ckpt.save_checkpoint(ckpt.weights_only(state), path)
    return path


def train(cfg: config_lib.Config, dry_run: bool = False) -> dict[str, Any]:
    """Run, resume or complete the training ``cfg`` describes; returns its summary. Everything the
    driver can check is checked before Ray starts (jobs/driver/resume.py, jobs/driver/preflight.py)."""
    started = time.perf_counter()
    preflight.check_working_dir(cfg, cluster.in_working_dir_copy())
    cfg, tags = resolve(cfg)
    folder = run_folder(cfg)
    plan = resume.plan(cfg, folder, tags["dataset_fingerprint"])
    preflight.check_records(folder, training=plan.kind != "complete")
    facts = preflight.check_data(cfg)
    if plan.kind == "new":
        preflight.check_parent(cfg)
    if plan.kind != "complete":
        preflight.check_storage(cfg, folder, preflight.checkpoint_bytes(cfg, plan.checkpoint))
    print(resume.describe(plan, cfg), flush=True)
    summary = {"run_folder": folder, "plan": plan.kind, "tracking_uri": cfg.tracking.uri, "metrics": {},
               "train_images": facts.train_images, "steps_per_epoch": facts.steps_per_epoch}
    trainer.check_resources(cfg)
    if dry_run:
        return {**summary, "config": config_lib.dump(cfg)}
    tags = {"git_commit": commit(), **tags}
    tags["mlflow.source.git.commit"] = tags["git_commit"]
    tracker = tracking.Tracker(cfg.tracking.uri, cfg.tracking.experiment, cfg.run.name, folder,
                               params=tracking.params_from(config_lib.flatten(cfg)), tags=tags,
                               retry_s=cfg.tracking.retry_s, enabled=cfg.tracking.enabled)
    run_id = connect_run(tracker, cfg, folder, (plan.state or {}).get("mlflow_run_id", ""))
    if plan.changed:
        tracker.set_tags({f"resume.step{plan.step}.changed": resume.describe(plan, cfg)})
    if plan.kind == "complete":
        summary["metrics"] = dict(plan.state.get("metrics", {}))
    else:
        try:
            summary.update(trainer.fit(cfg, folder, run_id, tags))
        except Exception as e:
            record_wall(folder, time.perf_counter() - started)
            tracker.replay()
            tracker.close("FAILED")
            preflight.explain_failure(cfg, folder, plan, e)
            raise
        log_goodput(tracker, folder, record_wall(folder, time.perf_counter() - started))
    return {**summary, **finish(cfg, folder, tracker)}


def commit() -> str:
    """The code's commit: ``$GIT_COMMIT``, the checkout's HEAD, else what the Ray job's submitter put
    in its metadata (a ``working_dir`` copy has no .git); "unknown", said aloud, when none knows."""
    found = tracking.git_commit(Path(__file__).parent)
    if found == "unknown":
        found = cluster.job_commit() or found
    if found == "unknown":
        print("note: the run's git_commit is 'unknown': this copy of the project has no .git; submit with "
              "python -m jobs.submit, or pass ray job submit --metadata-json '{\"git_commit\": \"<sha>\"}'",
              flush=True)
    return found


def record_wall(folder: str, seconds: float) -> float:
    """Add this command's wall time to the run's (every command that trained it); returns the total.
    The driver checked the file before Ray started; one damaged since is replaced, with a warning
    naming it, so this command's time is never lost (pipeline/goodput.py)."""
    try:
        before = goodput.read(folder, WALL).get("wall_s", 0.0)
    except StorageError as e:
        log.warning("%s; replaced by this command's %.1f s (the earlier commands' wall time is lost)", e, seconds)
        before = 0.0
    total = before + seconds
    files.atomic_write(files.join(folder, WALL), json.dumps({"wall_s": total}).encode())
    return total


def log_goodput(tracker: tracking.Tracker, folder: str, wall_s: float) -> None:
    """The goodput ledger of the finished run, as metrics and as a table (pipeline/goodput.py)."""
    state = ckpt.load_checkpoint(folder, "latest")
    ledger = goodput.Ledger.from_metrics(state.get("metrics", {}))
    fraction = goodput.goodput(ledger, wall_s)
    tracker.log_metrics({"goodput/wall_s": wall_s, "goodput/fraction": fraction}, state["images_seen"])
    tracker.call("log goodput", lambda c: c.log_table(tracker.run_id, data=goodput.summary(ledger, wall_s),
                                                      artifact_file="goodput.json"))
    log.info("goodput %.1f%% of %.0f s: %s", 100 * fraction, wall_s,
             ", ".join(f"{k} {v:.0f} s" for k, v in ledger.seconds.items()))


def connect_run(tracker: tracking.Tracker, cfg: config_lib.Config, folder: str, checkpoint_run_id: str) -> str:
    """The MLflow run id. Reachable: the run (found through the id file, or created). Unreachable:
    the id a previous attempt left (the id file, else its checkpoint), so the workers log into that
    run once the server is back."""
    if not cfg.tracking.enabled:
        return ""
    run_id = tracker.connect() or tracking.read_run_id(folder) or checkpoint_run_id
    tracker.run_id = run_id
    if tracker.connect():
        tracker.log_text(config_lib.dump(cfg), "config.yaml")
        tracker.call("log dataset", lambda c: outputs.log_dataset(c, tracker.run_id, cfg.data.root))
    return run_id


def finish(cfg: config_lib.Config, folder: str, tracker: tracking.Tracker) -> dict[str, Any]:
    """The run's last words to MLflow: the best weights as an artifact (registered once, if asked),
    its tags, and every metric point the journal still holds; FINISHED only once all are delivered."""
    tracker.replay()
    best = final_weights(folder)
    if tracker.connect():
        best_file = ckpt.resolve(folder, "best") if best else ""
        tracker.set_tags({"checkpoint": best_file, "run_folder": folder})
        tracker.log_text(config_lib.dump(cfg), "config.yaml")
        tracker.call("log dataset", lambda c: outputs.log_dataset(c, tracker.run_id, cfg.data.root))
        if best is not None:
            tracker.log_artifact(best, "model")
        if best is not None and (cfg.tracking.log_model or cfg.tracking.register_model):
            tracker.call("log model", lambda c: outputs.log_model(
                c, cfg.tracking.uri, tracker.run_id, best_file, cfg.tracking.register_model))
    delivered = tracker.close("FINISHED")
    return {"mlflow_run_id": tracker.run_id, "delivered": delivered}


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Every config key, its default and meaning: python -m jobs.config")
    p.add_argument("--config", help="experiment YAML (jobs/configs/*.yaml); default: the paper's defaults")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set run.workers=4 --set optim.lr=1e-3")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything, print the resolved config and what would happen, start nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg = config_lib.load(args.config, args.set)
    summary = train(cfg, dry_run=args.dry_run)
    if args.dry_run:
        print(summary["config"], end="")
        print(f"{summary['train_images']:,} training images, {summary['steps_per_epoch']:,} steps per epoch "
              f"at global batch {cfg.run.global_batch_size}; run folder {summary['run_folder']}")
        return 0
    m = summary["metrics"]
    print(f"run folder: {summary['run_folder']}")
    if "val/loc_err" in m:
        print(f"validation (centre crop, the ground-truth class's box): localisation error {m['val/loc_err']:.4f} "
              f"after {int(m['epoch'])} epochs")
    if "val/top1_err" in m:
        print(f"validation ({cfg.data.val_mode}): top-1 error {m['val/top1_err']:.4f}, "
              f"top-5 error {m['val/top5_err']:.4f} after {int(m['epoch'])} epochs")
    print(f"MLflow run: {summary['mlflow_run_id'] or '(tracking server unreachable)'} at {summary['tracking_uri']}")
    return 0  # undelivered metric points are not lost: the tracker said where they wait


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.run(main))
