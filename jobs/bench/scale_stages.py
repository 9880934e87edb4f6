"""The stages of ``python -m jobs.bench scale``, each run as a user runs it: its entry point (or, for a
stage without one, the measured call of ``jobs.bench.scale_child``) in a child process, whose wall
time, CPU time and peak RSS (driver and children apart) become the stage's figures."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from storage import dataformat as fmt

REPO = Path(__file__).resolve().parents[2]
LOADER_BATCH = 32     # images per rank's first batch: small, so the figure is the start, not decoding
WORLD = 2             # ranks of the loader and gather stages (two processes on one node)


@dataclass
class Ctx:
    """Where one bench run works: SOURCE, OUT, its logs and result files, N, seed, workers."""
    work: Path
    source: Path
    images: int
    seed: int = 0
    workers: int = 2
    merge_images: int = 128
    profile: tuple[str, ...] = ()    # stages whose driver runs under cProfile (logs/<stage>.prof)

    @property
    def out(self) -> Path:
        return self.work / "out"

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    @property
    def node_cache(self) -> Path:
        """The shard-check cache of this bench's 'node': fresh for a cold start, kept for a warm one."""
        return self.work / "node-cache" / "shards.json"


def start_child(ctx: Ctx, name: str, how: str, what: str, args: list[str], env: dict | None = None):
    """Start ``scale_child`` for one measured process; returns (Popen, result file, start time)."""
    ctx.logs.mkdir(parents=True, exist_ok=True)
    result = ctx.logs / f"{name}.rusage.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "VGG_SHARD_CACHE": str(ctx.node_cache), **(env or {})}
    if any(name == p or name.startswith(p + "_rank") for p in ctx.profile):
        env["SCALE_PROFILE"] = str(ctx.logs / f"{name}.prof")
    env.pop("RAY_ADDRESS", None)   # the checks before Ray, on this node: never a remote cluster
    with open(ctx.logs / f"{name}.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.bench.scale_child", str(result), how, what, *args],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, result, time.perf_counter()


def finish_child(ctx: Ctx, name: str, started) -> dict:
    """Wait for the child (``os.wait4``: its rusage with everything it waited for) and read its figures."""
    proc, result, t0 = started
    _, status, ru = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    inner = json.loads(result.read_text()) if result.is_file() else {}
    figures = {"seconds": seconds, "cpu_s": ru.ru_utime + ru.ru_stime,
               "peak_rss_mb": (inner.get("driver") or {}).get("peak_rss_mb"),
               "peak_rss_from": (inner.get("driver") or {}).get("peak_rss_from"),
               "tree_peak_rss_mb": ru.ru_maxrss * 1024 / 1e6}
    children = inner.get("children") or {}
    if children.get("cpu_s"):
        figures.update(children_cpu_s=children["cpu_s"], children_peak_rss_mb=children["peak_rss_mb"])
    if proc.returncode != 0:
        tail = (ctx.logs / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:]
        figures["error"] = f"exit status {proc.returncode}: " + " | ".join(tail)
    if isinstance(inner.get("result"), dict):
        figures.update(inner["result"])
    return figures


def measure(ctx: Ctx, name: str, how: str, what: str, args: list[str], env: dict | None = None) -> dict:
    """One child, started and waited for."""
    return finish_child(ctx, name, start_child(ctx, name, how, what, args, env))


def call(ctx: Ctx, name: str, fn: str, **kwargs) -> dict:
    return measure(ctx, name, "call", fn, [json.dumps(kwargs)])


def stored_images(ctx: Ctx) -> int:
    return sum(s["num_samples"] for s in fmt.read_info(ctx.out)["splits"].values())


# ----------------------------------------------------------------------------- the stages

def generate(ctx: Ctx) -> dict:
    return call(ctx, "generate", "source", root=str(ctx.source), images=ctx.images, seed=ctx.seed,
                workers=ctx.workers)


def preprocess(ctx: Ctx) -> dict:
    shutil.rmtree(ctx.out, ignore_errors=True)
    fig = _preprocess(ctx, "preprocess", [f"--seed={ctx.seed}"])
    if "error" not in fig:
        fig["images"] = stored_images(ctx)
        fig["images_per_cpu_s"] = fig["images"] / fig["cpu_s"]
        fig["images_per_s"] = fig["images"] / fig["seconds"]
    return fig


def _preprocess(ctx: Ctx, name: str, extra: list[str]) -> dict:
    return measure(ctx, name, "module", "jobs.preprocess",
                   [str(ctx.source), str(ctx.out), f"--workers={ctx.workers}", "--no-progress", *extra])


def verify(ctx: Ctx) -> dict:
    return measure(ctx, "verify", "module", "jobs.preprocess", ["verify", str(ctx.out), f"--workers={ctx.workers}"])


def report(ctx: Ctx) -> dict:
    return measure(ctx, "report", "module", "jobs.preprocess", ["report", str(ctx.out)])


def rerun(ctx: Ctx) -> dict:
    return _preprocess(ctx, "rerun", [])


def rerun_added(ctx: Ctx) -> dict:
    """1 % new train images and one new class (``imagenet_shape.add_new``), preprocessed, then taken
    away from SOURCE again (``remove_new``) so the bench can be repeated."""
    from preprocessing import imagenet_shape

    before = stored_images(ctx)
    added = imagenet_shape.add_new(ctx.source, fraction=0.01, seed=ctx.seed + 1)
    try:
        fig = _preprocess(ctx, "rerun_added", [])
    finally:
        imagenet_shape.remove_new(ctx.source)
    fig["images_added"] = stored_images(ctx) - before
    return {**fig, **{f"source_new_{k}": v for k, v in added.items() if isinstance(v, int)}}


def _dry_run(ctx: Ctx, name: str) -> dict:
    sets = {"data.root": ctx.out, "data.decode": "cpu", "data.threads": 1, "data.crop_size": 32,
            "data.scale_min": 32, "data.scale_max": 64, "model.width": 0.0625, "model.num_classes": 0,
            "run.workers": WORLD, "run.global_batch_size": 64, "run.storage_path": ctx.work / "runs",
            "run.name": "scale", "tracking.enabled": "false"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")] + ["--dry-run"]
    return measure(ctx, name, "module", "jobs.train", args)


def dry_run_cold(ctx: Ctx) -> dict:
    """The first dry run on a node: every shard and index hashed (an empty ``VGG_SHARD_CACHE``)."""
    ctx.node_cache.unlink(missing_ok=True)
    ctx.node_cache.parent.mkdir(parents=True, exist_ok=True)
    return _dry_run(ctx, "dry_run_cold")


def dry_run_warm(ctx: Ctx) -> dict:
    return _dry_run(ctx, "dry_run_warm")


def _loader(ctx: Ctx, kind: str, boxes: bool) -> dict:
    """Both ranks' loaders started at once, in two processes, as the two workers of a node start."""
    name = f"loader_{kind}{'_boxes' if boxes else ''}"
    started = [start_child(ctx, f"{name}_rank{r}", "call", "loader_start",
                           [json.dumps({"root": str(ctx.out), "kind": kind, "rank": r, "world": WORLD,
                                        "batch": LOADER_BATCH, "boxes": boxes})]) for r in range(WORLD)]
    ranks = [finish_child(ctx, f"{name}_rank{r}", s) for r, s in enumerate(started)]
    fig = {"seconds": max(r["seconds"] for r in ranks), "cpu_s": sum(r["cpu_s"] for r in ranks),
           "peak_rss_mb": max(r["peak_rss_mb"] or 0 for r in ranks),
           "ranks": [{k: r.get(k) for k in ("seconds", "cpu_s", "start_s", "build_s", "first_batch_s", "peak_rss_mb",
                                            "samples", "error") if k in r} for r in ranks]}
    starts = [r.get("start_s") for r in ranks]
    fig["start_s_per_rank_max"] = max(starts) if None not in starts else None
    errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        fig["error"] = errors[0]
    return fig


def loader_train(ctx: Ctx) -> dict:
    return _loader(ctx, "train", boxes=False)


def loader_val(ctx: Ctx) -> dict:
    return _loader(ctx, "val", boxes=False)


def loader_train_boxes(ctx: Ctx) -> dict:
    return _loader(ctx, "train", boxes=True)


def loader_val_boxes(ctx: Ctx) -> dict:
    return _loader(ctx, "val", boxes=True)


def gather(ctx: Ctx) -> dict:
    return call(ctx, "gather", "gather_check", root=str(ctx.out), world=WORLD)


def merge(ctx: Ctx) -> dict:
    """Protocol (b)'s merging at ImageNet's box density (``jobs.bench.merge.measure``), where it exists."""
    if not (REPO / "jobs" / "bench" / "merge.py").is_file():
        return {"skipped": "jobs/bench/merge.py (measure) is not in this checkout"}
    val = fmt.read_info(ctx.out)["splits"].get("val", {}).get("num_samples", ctx.merge_images)
    return call(ctx, "merge", "merge", images=min(val, ctx.merge_images), seed=ctx.seed)


def mlflow(ctx: Ctx) -> dict:
    """The dataset logged as a training run's input, to a local ``mlflow server`` this stage starts."""
    server = MlflowServer(ctx.work / "mlflow").start()
    try:
        fig = call(ctx, "mlflow", "log_dataset", root=str(ctx.out), uri=server.uri)
    finally:
        server.stop()
    return {**fig, "server_start_s": server.start_s}


def index(ctx: Ctx) -> dict:
    cache = ctx.work / "node-cache" / "index-bench.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    return call(ctx, "index", "index_check", root=str(ctx.out), cache=str(cache), warm_rounds=3)


# The order they run in: what changes OUT (1 % new) last, so every other stage sees what preprocess wrote.
STAGES = {f.__name__: f for f in (generate, preprocess, verify, report, rerun, dry_run_cold, dry_run_warm,
                                  index, loader_train, loader_val, loader_train_boxes, loader_val_boxes,
                                  gather, merge, mlflow, rerun_added)}


class MlflowServer:
    """A local ``mlflow server`` (SQLite backend, proxied artifacts, no job workers) on 127.0.0.1."""

    def __init__(self, root: Path):
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc, self.start_s = None, None

    def start(self, timeout: float = 180) -> "MlflowServer":
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{self.root}/mlflow.db", "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True,
            stdout=open(self.root / "server.log", "w"), stderr=subprocess.STDOUT)
        while not self._healthy():
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"mlflow server did not start; see {self.root / 'server.log'}")
            time.sleep(0.5)
        self.start_s = time.perf_counter() - t0
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM to the server's process group (its own session), SIGKILL if it lingers."""
        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):   # SIGKILL also takes its workers left behind
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None
