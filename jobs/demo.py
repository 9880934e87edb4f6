"""The whole pipeline on a laptop: ``make demo`` (``python -m jobs.demo``).

1. generate the embedded ILSVRC-shaped sample (10 classes of drawn shapes, real ImageNet wnids);
2. preprocess it into shards, exactly as ImageNet (``preprocessing.writer``);
3. train a small VGG (jobs/configs/demo.yaml: net A at width 1/8, 64 px crops, S in [64, 128]) with two
   Ray workers on the CPU (DDP over gloo), logging to a local MLflow store (SQLite);
4. evaluate the best checkpoint on the validation split (centre crop and dense, ``jobs.evaluate``);
5. print the validation error and the command that opens the MLflow UI.

Everything lands in ``--out`` (default ``demo-out/``); the sample and the shards are reused when they
are already there, each run of the demo trains a new run (``demo-<time>``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from pipeline import config as config_lib

CONFIG = Path(__file__).parent / "configs" / "demo.yaml"
EXPERIMENT = "vgg-demo"   # the demo's MLflow experiment and registered model (make ui-check looks for both)


def prepare_data(out: Path, classes: int, train_per_class: int, val_per_class: int) -> Path:
    """The sample's shards in ``out/data`` (generated and written once, then reused)."""
    from preprocessing import synthetic, writer

    data = out / "data"
    if (data / "dataset.json").is_file():
        print(f"[1-2/5] sample data already in {data}")
        return data
    t = time.perf_counter()
    source = synthetic.generate(out / "source", classes=classes, train_per_class=train_per_class,
                                val_per_class=val_per_class, seed=0, size_range=(96, 192))
    print(f"[1/5] generated the sample: {classes} classes, {train_per_class} train and {val_per_class} val "
          f"images each, in {source} ({time.perf_counter() - t:.1f} s)")
    t = time.perf_counter()
    writer.preprocess(source, data, shard_size=500, seed=0, workers=min(2, os.cpu_count() or 1),
                      progress=False, log=lambda message: None)
    print(f"[2/5] preprocessed into shards in {data} ({time.perf_counter() - t:.1f} s)")
    return data


def start(args) -> tuple[Path, Path]:
    """Both demos' first steps: a bad ``--set`` fails before any work, then ``--out`` and the sample's
    shards in it; returns (out, data)."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    config_lib.load(CONFIG, args.set)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return out, prepare_data(out, args.classes, args.train_per_class, args.val_per_class)


def run_config(data: Path, out: Path, name: str, overrides: list[str]) -> config_lib.Config:
    """demo.yaml pointed at the demo's folders: its data, run storage and MLflow (SQLite) in ``out``."""
    return config_lib.load(CONFIG, [f"data.root={data}", f"run.storage_path={out / 'runs'}", f"run.name={name}",
                                    f"tracking.uri=sqlite:///{out / 'mlflow.db'}", f"tracking.experiment={EXPERIMENT}",
                                    f"tracking.register_model={EXPERIMENT}", *overrides])


def ui_link(db: Path, run_id: str) -> str:
    """The run's page in the MLflow UI, in its model-training view: MLflow 3's UI opens an experiment
    in its GenAI view unless the link asks (the experiment's kind tag is not enough for it)."""
    from mlflow.tracking import MlflowClient

    exp = MlflowClient(f"sqlite:///{db}").get_run(run_id).info.experiment_id if run_id else "0"
    return f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out", help="working folder (default: demo-out)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=60)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override jobs/configs/demo.yaml, e.g. --set schedule.epochs=5")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation job")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    began = time.perf_counter()
    out, data = start(args)

    from jobs import train

    db = out / "mlflow.db"
    name = time.strftime("demo-%Y%m%d-%H%M%S")
    cfg = run_config(data, out, name, args.set)
    t = time.perf_counter()
    print(f"[3/5] training {cfg.model.name} (width {cfg.model.width}) for {cfg.schedule.epochs} epochs on "
          f"{cfg.run.workers} Ray CPU workers, run {name} ...", flush=True)
    summary = train.train(cfg)
    m = summary["metrics"]
    chance = 1 - 1 / args.classes
    print(f"[3/5] trained in {time.perf_counter() - t:.0f} s: validation top-1 error {m['val/top1_err']:.1%} "
          f"(top-5 {m['val/top5_err']:.1%}) after {int(m['epoch'])} epochs; chance is {chance:.0%}")

    best = None
    if not args.no_eval:
        from jobs import evaluate

        t = time.perf_counter()
        print("[4/5] evaluating the best checkpoint on the validation split (centre crop and dense) ...", flush=True)
        res = evaluate.main(["--run", summary["run_folder"], "--mode", "center,dense", "--scales", "single",
                             "--workers", str(cfg.run.worker_range()[0]), "--out", str(out / "eval" / name),
                             "--tracking-uri", f"sqlite:///{db}", "--quiet"])
        best = min(res["rows"], key=lambda r: r["top-1 err %"])
        print(f"[4/5] evaluated in {time.perf_counter() - t:.0f} s")

    top1, how = (best["top-1 err %"] / 100, f"best checkpoint, {best['mode']} at Q = {best['test Q']}") if best \
        else (m["val/top1_err"], "last epoch, centre crop")
    print(f"\n[5/5] done in {time.perf_counter() - began:.0f} s. Validation top-1 error {top1:.1%} ({how}; "
          f"chance {chance:.0%}).")
    print(f"Checkpoints: {summary['run_folder']}")
    print(f"MLflow run {summary['mlflow_run_id']}; open the UI with:\n"
          f"  {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri sqlite:///{db} --host 127.0.0.1 --port 5000\n"
          f"  then browse {ui_link(db, summary['mlflow_run_id'])}")
    if top1 > chance - 0.4:
        print(f"the net did not learn enough: {top1:.1%} is not far below chance ({chance:.0%})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from jobs import cli

    sys.exit(cli.run(main))
