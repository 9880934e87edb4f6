"""Training: the per-worker loop in one process, then `python -m jobs.train` on a real two-node Ray
cluster (token authentication, 2 CPU workers over gloo) logging to a real `mlflow server` process.

The Ray tests start the cluster once (``ray start --head`` and a second ``ray start --address`` node,
each with a custom resource so STRICT_SPREAD puts one worker on each) and kill exactly the processes
they started (their process groups) at the end. Failures are real: a worker process calls
``os._exit(1)`` mid-run, the driver gets SIGKILL, the MLflow server is stopped mid-run.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from jobs import tracking
from pipeline import checkpoint as ckpt
from pipeline import config
from pipeline.train_loop import Worker, run_worker

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY_TEMP_ROOT = Path("/tmp/ray-train-tests")


# ---------------------------------------------------------------------------------------------------
# Processes: a Ray cluster, MLflow servers, training drivers
# ---------------------------------------------------------------------------------------------------

def free_port(start: int = 0) -> int:
    """A free TCP port on 127.0.0.1: the first from ``start`` up, or any when start is 0."""
    for port in (range(start, start + 200) if start else [0]):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port from {start}")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_group(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL, to the process group this test started (start_new_session=True)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            if sig == signal.SIGTERM:
                time.sleep(1)  # let the group's children go too
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


@pytest.fixture(scope="module")
def ray_cluster():
    """A head (resource node_a) and a second node (node_b) on this machine, token auth on. (Ray
    registers the machine's address whatever --node-ip-address says; the token keeps others out.)"""
    RAY_TEMP_ROOT.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="t", dir=RAY_TEMP_ROOT))  # short: Ray's unix sockets live here
    port = free_port(6391)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats"]
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--port", str(port), "--include-dashboard=false",
         "--temp-dir", str(temp), "--ray-client-server-port", str(free_port()),
         "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
         "--resources", json.dumps({"node_a": 1}), *common],
        env=env, start_new_session=True, stdout=open(temp / "head.log", "w"), stderr=subprocess.STDOUT)
    procs = [head]
    try:
        wait_for(lambda: "Ray runtime started" in (temp / "head.log").read_text(), 120, "the Ray head", proc=head)
        node = subprocess.Popen(
            [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{port}",
             "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
             "--resources", json.dumps({"node_b": 1}), *common],
            env=env, start_new_session=True, stdout=open(temp / "node.log", "w"), stderr=subprocess.STDOUT)
        procs.append(node)
        wait_for(lambda: "Ray runtime started" in (temp / "node.log").read_text(), 120, "the second Ray node",
                 proc=node)
        # RAY_ADDRESS: jobs.train connects to this cluster instead of starting its own.
        yield {"address": f"127.0.0.1:{port}", "env": {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, "temp": temp}
    finally:
        for p in reversed(procs):
            stop_group(p)
        shutil.rmtree(temp, ignore_errors=True)


class MlflowServer:
    """A real ``mlflow server`` (SQLite backend, artifacts proxied) on 127.0.0.1."""

    def __init__(self, root: Path, port: int = 0):
        self.root, self.port = root, port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            start_new_session=True, stdout=open(self.root / "server.log", "a"), stderr=subprocess.STDOUT)
        wait_for(self.healthy, 180, f"mlflow server on {self.uri}", interval=1, proc=self.proc)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)


@pytest.fixture
def mlflow_server(tmp_path):
    """A factory: ``mlflow_server(port=0)`` starts a server this test may also stop."""
    servers = []

    def start(port: int = 0) -> MlflowServer:
        servers.append(MlflowServer(tmp_path / f"mlflow-{len(servers)}", port).start())
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def shared_mlflow(tmp_path_factory):
    """One server for the tests that never stop it (each uses its own experiment)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-shared")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def learnable_dataset(tmp_path_factory) -> Path:
    """The demo's sample, smaller: 10 classes, 60 train and 10 val images each, 96-192 px."""
    from preprocessing import synthetic, writer

    root = tmp_path_factory.mktemp("learnable")
    source = synthetic.generate(root / "source", classes=10, train_per_class=60, val_per_class=10, seed=1,
                                size_range=(96, 192))
    writer.preprocess(source, root / "data", shard_size=500, seed=0, progress=False, log=lambda m: None)
    return root / "data"


def small(dataset: Path, storage: Path, name: str, uri: str, **over) -> list[str]:
    """--set overrides for a few seconds of training: net A at width 1/16 on 32 px crops, 2 workers,
    global batch 16 (3 steps per epoch on the 48-image sample), every step logged."""
    sets = {"data.root": dataset, "data.crop_size": 32, "data.scale_min": 32, "data.scale_max": 64,
            "data.decode": "cpu", "data.threads": 1, "data.shuffle_buffer": 64,
            "model.name": "A", "model.width": 0.0625, "model.init": "kaiming", "model.num_classes": 0,
            "run.workers": 2, "run.global_batch_size": 16, "run.storage_path": storage, "run.name": name,
            "run.log_every_steps": 1, "run.keep_last": 2, "schedule.epochs": 2, "schedule.patience": 100,
            "tracking.uri": uri, "tracking.experiment": name, "tracking.retry_s": 1.0,
            "tracking.system_metrics": False, **over}
    out = []
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def train_proc(cluster, args: list[str], log: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.train", *args], cwd=REPO,
                            env={**cluster["env"], **env}, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def run_train(cluster, args: list[str], log: Path, timeout: float = 400, **env) -> str:
    proc = train_proc(cluster, args, log, **env)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        stop_group(proc)
    text = log.read_text()
    assert rc == 0, text[-6000:]
    return text


def checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{ckpt.PREFIX}*/{ckpt.FILENAME}"))


def only_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def steps_of(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


# ---------------------------------------------------------------------------------------------------
# The loop in one process (no Ray)
# ---------------------------------------------------------------------------------------------------

def one_process_cfg(dataset, **over) -> config.Config:
    sets = {"data.root": dataset, "data.crop_size": 32, "data.scale_min": 32, "data.scale_max": 64,
            "data.decode": "cpu", "data.threads": 1, "data.shuffle_buffer": 64, "model.width": 0.0625,
            "model.init": "kaiming", "model.num_classes": 4, "run.workers": 1, "run.global_batch_size": 8,
            "run.log_every_steps": 2, "schedule.epochs": 2, **over}
    return config.load(None, [f"{k}={v}" for k, v in sets.items()])


class Recorder:
    def __init__(self):
        self.logged, self.reported = [], []

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def report(self, metrics, folder, best):
        state = ckpt.load_checkpoint(folder) if folder else None
        self.reported.append((dict(metrics), state, best))


def test_loop_trains_validates_and_checkpoints_in_one_process(sample_dataset):
    cfg = one_process_cfg(sample_dataset, **{"run.checkpoint_every_steps": 4})
    rec = Recorder()
    result = run_worker(cfg, Worker(), report=rec.report, log=rec.log, run_id=lambda: "run-x")
    # 48 images / batch 8 = 6 steps per epoch; step checkpoints at 4 and 8 (12 is an epoch's end).
    assert [m["step"] for m, _, _ in rec.reported] == [4, 6, 8, 12]
    assert [m["epoch"] for m, _, _ in rec.reported] == [0, 1, 1, 2]
    state = rec.reported[-1][1]
    assert state["mlflow_run_id"] == "run-x" and state["images_seen"] == 12 * 8 and state["step_in_epoch"] == 0
    assert rec.reported[2][1]["step_in_epoch"] == 2
    assert state["dataset_fingerprint"] == json.loads((sample_dataset / "dataset.json").read_text())["fingerprint"]
    assert config.load(None).model != ckpt.config_of(state).model  # the resolved config, not the defaults
    assert rec.reported[1][2] is True  # the first validation is always a new best
    # Train metrics every 2 steps, stepped by images seen; validation once per epoch.
    train_steps = [s for s, m in rec.logged if "train/loss" in m]
    assert train_steps == [16, 32, 48, 64, 80, 96]
    val = [m for _, m in rec.logged if "val/top1_err" in m]
    assert len(val) == 2 and all(0 <= m["val/top1_err"] <= 1 and m["val/top5_err"] <= m["val/top1_err"] for m in val)
    assert {"train/top1_err", "train/top5_err", "lr", "train/images_per_s", "train/data_wait_frac"} <= set(rec.logged[0][1])
    assert result.tally.n == 32  # every validation image once
    assert result.metrics["val/top1_err"] == val[-1]["val/top1_err"]


def test_resume_mid_epoch_gives_bit_identical_weights(sample_dataset):
    """Training 9 steps straight equals training 5, checkpointing, and resuming for 4 more: the
    optimizer, schedule, RNG (dropout) and DALI data position all come back."""
    straight = Recorder()
    run_worker(one_process_cfg(sample_dataset, **{"run.max_steps": 9}), Worker(), report=straight.report,
               log=straight.log)
    first = Recorder()
    run_worker(one_process_cfg(sample_dataset, **{"run.max_steps": 5}), Worker(), report=first.report, log=first.log)
    saved = first.reported[-1][1]
    assert saved["step"] == 5 and saved["epoch"] == 0 and saved["step_in_epoch"] == 5
    second = Recorder()
    run_worker(one_process_cfg(sample_dataset, **{"run.max_steps": 9}), Worker(), report=second.report,
               log=second.log, resume=saved)
    a, b = straight.reported[-1][1], second.reported[-1][1]
    assert a["step"] == b["step"] == 9 and a["epoch"] == b["epoch"] == 1
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # Without restoring the data position the weights differ: the check above can fail.
    third = Recorder()
    fresh_data = {**saved, "workers": [{**saved["workers"][0], "data": None}]}
    run_worker(one_process_cfg(sample_dataset, **{"run.max_steps": 9}), Worker(), report=third.report,
               log=third.log, resume=fresh_data)
    c = third.reported[-1][1]
    assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def test_conv_relu_fusion_trains_the_same_weights_under_the_same_keys(sample_dataset, caplog):
    caplog.set_level("INFO", logger="pipeline.step")
    runs = []
    for fuse in (False, True):
        rec = Recorder()
        run_worker(one_process_cfg(sample_dataset, **{"run.max_steps": 3, "run.fuse_conv_relu": fuse}), Worker(),
                   report=rec.report, log=rec.log)
        runs.append(rec.reported[-1][1]["model"])
    assert [r.getMessage() for r in caplog.records if "fused" in r.getMessage()] == [
        "conv + ReLU fused into one op: 8 pairs"]                        # A's eight convs, fused run only
    plain, fused = runs
    assert list(plain) == list(fused)
    for k in plain:
        torch.testing.assert_close(fused[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)


def test_max_steps_on_an_epochs_last_step_validates_that_epoch_before_stopping(sample_dataset):
    """6 steps = exactly one epoch: the epoch is validated and checkpointed as finished, so a resume
    goes on with epoch 2 instead of skipping epoch 1's validation and miscounting epochs."""
    first = Recorder()
    run_worker(one_process_cfg(sample_dataset, **{"run.max_steps": 6}), Worker(), report=first.report, log=first.log)
    saved = first.reported[-1][1]
    assert saved["step"] == 6 and saved["epoch"] == 1 and saved["step_in_epoch"] == 0
    assert [m["epoch"] for _, m in first.logged if "val/top1_err" in m] == [1]
    second = Recorder()
    run_worker(one_process_cfg(sample_dataset, **{"run.max_steps": 12}), Worker(), report=second.report,
               log=second.log, resume=saved)
    assert second.reported[-1][1]["epoch"] == 2
    assert [m["epoch"] for _, m in second.logged if "val/top1_err" in m] == [2]


def test_resume_on_another_dataset_is_an_error_naming_the_fingerprint(sample_dataset):
    first = Recorder()
    run_worker(one_process_cfg(sample_dataset, **{"run.max_steps": 2}), Worker(), report=first.report, log=first.log)
    # another world size drops the data position, the path on which the loader cannot check it itself
    other = {**first.reported[-1][1], "dataset_fingerprint": "not-this-one", "workers": []}
    with pytest.raises(ValueError, match="fingerprint .* is not the one this run was trained on"):
        run_worker(one_process_cfg(sample_dataset, **{"run.max_steps": 4}), Worker(), report=Recorder().report,
                   log=Recorder().log, resume=other)


def test_init_from_a_and_dense_validation(sample_dataset, tmp_path):
    """D starts from a trained A (the paper's first four convs and the FCs) and validates densely."""
    a = Recorder()
    run_worker(one_process_cfg(sample_dataset, **{"schedule.epochs": 1}), Worker(), report=a.report, log=a.log)
    ckpt.save_checkpoint(a.reported[-1][1], tmp_path / "A-run" / "best" / ckpt.FILENAME)
    d = Recorder()
    cfg = one_process_cfg(sample_dataset, **{"model.name": "D", "model.init_from": tmp_path / "A-run",
                                             "model.init_from_mode": "a", "data.val_mode": "dense",
                                             "schedule.epochs": 1, "optim.lr": 1e-9})
    result = run_worker(cfg, Worker(), report=d.report, log=d.log)
    a_state, d_state = a.reported[-1][1]["model"], d.reported[-1][1]["model"]
    # (a near-zero lr keeps the copied tensors where A left them)
    for a_key, d_key in [("features.0", "features.0"), ("features.3", "features.5"), ("features.6", "features.10"),
                         ("features.8", "features.12"), ("classifier.6", "classifier.6")]:
        torch.testing.assert_close(d_state[f"{d_key}.weight"], a_state[f"{a_key}.weight"], atol=1e-6, rtol=0)
    assert not torch.equal(d_state["features.2.weight"][:, :, 0], torch.zeros_like(d_state["features.2.weight"][:, :, 0]))
    assert result.tally.n == 32 and 0 <= result.metrics["val/top1_err"] <= 1  # dense: every image once


def test_uneven_global_batch_is_an_error(sample_dataset):
    cfg = one_process_cfg(sample_dataset)
    with pytest.raises(ValueError, match="does not split evenly across 3 workers"):
        run_worker(cfg, Worker(world_size=3), report=None, log=None)


# ---------------------------------------------------------------------------------------------------
# Configs and the command line
# ---------------------------------------------------------------------------------------------------

def test_every_experiment_config_loads_and_the_chains_are_expressed():
    files = sorted((REPO / "jobs" / "configs").glob("*.yaml"))
    cfgs = {f.stem: config.load(f) for f in files}
    paper = {"A-256", "A-LRN-256", "B-256", "C-256", "D-256", "E-256", "C-384", "D-384", "E-384",
             "C-256-512", "D-256-512", "E-256-512"}
    assert paper <= set(cfgs) and "demo" in cfgs
    for name in paper:
        assert cfgs[name].run.name == name
    # A -> D(256) -> D(384) -> D([256, 512]): each names its parent's run; the parent exists.
    for net in "CDE":
        assert (cfgs[f"{net}-256"].model.init_from, cfgs[f"{net}-256"].model.init_from_mode) == ("A-256", "a")
        assert cfgs[f"{net}-384"].model.init_from == f"{net}-256" and cfgs[f"{net}-384"].optim.lr == 1e-3
        assert (cfgs[f"{net}-384"].data.scale_min, cfgs[f"{net}-384"].data.scale_max) == (384, 384)
        ms = cfgs[f"{net}-256-512"]
        assert ms.model.init_from == f"{net}-384" and (ms.data.scale_min, ms.data.scale_max) == (256, 512)
    assert cfgs["A-256"].model.init_from == "" and cfgs["A-256"].optim.lr == 1e-2
    for c in cfgs.values():
        assert not c.model.init_from or c.model.init_from in cfgs


def test_cli_help_names_the_options():
    out = subprocess.run([sys.executable, "-m", "jobs.train", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--config" in out.stdout and "--set" in out.stdout


def test_init_from_resolves_run_names_paths_and_mlflow_runs(sample_dataset, tmp_path):
    from jobs import train

    storage = tmp_path / "runs"
    ckpt.save_checkpoint({"format": 1, "model": {}}, storage / "A-256" / "best" / ckpt.FILENAME)
    tracking.write_run_id(str(storage / "A-256"), "f" * 32)
    base = ["model.num_classes=0", f"data.root={sample_dataset}", f"run.storage_path={storage}",
            "tracking.enabled=false"]
    cfg, tags = train.resolve(config.load(None, base + ["model.init_from=A-256"]))
    assert cfg.model.init_from == str(storage / "A-256") and tags["parent_run_id"] == "f" * 32
    assert cfg.model.num_classes == 4 and os.path.isabs(cfg.data.root)
    cfg, _ = train.resolve(config.load(None, base + [f"model.init_from={storage}/A-256/best/checkpoint.pt"]))
    assert cfg.model.init_from.endswith("best/checkpoint.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.resolve(config.load(None, base + ["model.init_from=B-256"]))
    # runs:/<id>: the parent run's run_folder tag (the store here is a SQLite file, no server needed).
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("x"), tags={"run_folder": str(storage / "A-256")})
    cfg, tags = train.resolve(config.load(None, base[:-1] + [f"tracking.uri={uri}",
                                                             f"model.init_from=runs:/{run.info.run_id}"]))
    assert cfg.model.init_from == str(storage / "A-256") and tags["parent_run_id"] == run.info.run_id


# ---------------------------------------------------------------------------------------------------
# The tracker against a real server
# ---------------------------------------------------------------------------------------------------

def test_tracker_never_blocks_on_a_dead_server_and_skips_replayed_steps(shared_mlflow, tmp_path):
    down = tracking.Tracker(f"http://127.0.0.1:{free_port()}", "exp", "t", str(tmp_path / "down"), retry_s=0.5)
    start = time.monotonic()
    assert down.connect() == ""               # nobody listens: no run, no exception
    down.log_metrics({"train/loss": 1.0}, 16)  # queued, not sent
    assert not down.flush(timeout=2)          # gives up after its deadline, says so
    assert time.monotonic() - start < 30
    folder = str(tmp_path / "runs" / "t")
    t = tracking.Tracker(shared_mlflow.uri, "tracker", "t", folder, params={"optim.lr": "0.01", "long": "x" * 7000})
    for step in (16, 32, 48):
        t.log_metrics({"train/loss": step / 10}, step)
    assert t.flush(timeout=60)
    t.close()
    run = shared_mlflow.client().get_run(t.run_id)
    assert tracking.read_run_id(folder) == t.run_id
    assert run.data.params["optim.lr"] == "0.01" and len(run.data.params["long"]) == tracking.MAX_PARAM_VALUE
    # A restarted worker replays steps 32..80: only 64 and 80 are new.
    again = tracking.Tracker(shared_mlflow.uri, "tracker", "t", folder)
    assert again.connect() == t.run_id        # found through the run id file
    for step in (32, 48, 64, 80):
        again.log_metrics({"train/loss": step / 100}, step)
    again.close("FINISHED")
    history = shared_mlflow.client().get_metric_history(t.run_id, "train/loss")
    assert sorted(m.step for m in history) == [16, 32, 48, 64, 80]
    assert {m.step: m.value for m in history}[32] == 3.2  # first write wins
    assert shared_mlflow.client().get_run(t.run_id).info.status == "FINISHED"


# ---------------------------------------------------------------------------------------------------
# jobs.train on a two-node Ray cluster
# ---------------------------------------------------------------------------------------------------

def test_two_nodes_learn_log_to_mlflow_and_survive_a_killed_worker(ray_cluster, shared_mlflow, learnable_dataset,
                                                                    tmp_path):
    """The demo's config, smaller: one worker per node, rank 1 dies mid-run (a real process exit),
    Ray restarts the group from the last checkpoint, the run finishes as one MLflow run, and the net
    learns: validation error far below chance (90 %)."""
    storage = tmp_path / "runs"
    marker = tmp_path / "rank1-exited"
    epochs, per_epoch, every = 24, 18, 5          # 600 images / global batch 32; log every 5 steps
    sets = {"data.root": learnable_dataset, "run.storage_path": storage, "run.name": "spread",
            "tracking.uri": shared_mlflow.uri, "tracking.experiment": "spread", "tracking.retry_s": 1,
            "tracking.register_model": "vgg-test", "schedule.epochs": epochs, "schedule.patience": 100,
            "run.log_every_steps": every, "run.checkpoint_every_steps": 9, "run.keep_last": 3,
            "run.max_failures": 1, "run.placement_strategy": "STRICT_SPREAD"}
    args = ["--config", str(REPO / "jobs/configs/demo.yaml")]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    text = run_train(ray_cluster, args, tmp_path / "train.log", timeout=500,
                     VGG_TEST_EXIT_AT=f"1:40:{marker}", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="2")
    folder = storage / "spread"

    # Rank 1 really died after step 40; the new group resumed from the step-36 checkpoint (the end
    # of epoch 2), or the one before when Ray had not registered 36 and its files were cut short.
    assert marker.is_file(), text[-3000:]
    resumed = {int(m) for m in re.findall(r"resumes at epoch \d+, step (\d+)", text)}
    assert resumed and resumed <= {27, 36}, resumed

    saved = [ckpt.load_checkpoint(p) for p in checkpoints(folder)]
    # Ray keeps the last 3 (plus, possibly, the one resumed from, if Ray had not registered it yet).
    assert [s["step"] for s in saved][-3:] == [414, 423, 432] and len(saved) <= 4
    assert saved[-1]["epoch"] == epochs and epochs * per_epoch == 432
    for s in saved:  # after every step the two replicas hold the same parameters
        assert len(s["workers"]) == 2 and s["workers"][0]["param_digest"] == s["workers"][1]["param_digest"]
    assert saved[-1]["workers"][0]["node"] != saved[-1]["workers"][1]["node"]  # one worker per node
    best = ckpt.load_checkpoint(folder, "best")
    # Chance is 0.9; 24 epochs on 600 images reach ~0.35 (the demo, 30 epochs, ~0.2).
    assert best["metrics"]["val/top1_err"] < 0.55, best["metrics"]

    client = shared_mlflow.client()
    run = only_run(client, "spread")
    assert tracking.read_run_id(str(folder)) == run.info.run_id == saved[-1]["mlflow_run_id"]
    assert run.info.status == "FINISHED" and run.info.run_id in text
    p = run.data.params
    assert (p["model.name"], p["model.width"], p["run.name"], p["model.num_classes"]) == ("A", "0.125", "spread", "10")
    assert p["data.root"] == str(learnable_dataset.resolve()) and p["run.workers"] == "2"
    tags = run.data.tags
    assert tags["dataset_fingerprint"] == saved[-1]["dataset_fingerprint"] != ""
    assert tags["git_commit"] != "" and tags["checkpoint"].endswith("best/checkpoint.pt")
    # Each logged step once, although steps 37-40 ran twice; stepped by images seen.
    assert steps_of(client, run.info.run_id, "train/loss") == [32 * s for s in range(every, epochs * per_epoch + 1, every)]
    assert steps_of(client, run.info.run_id, "val/top1_err") == [32 * per_epoch * e for e in range(1, epochs + 1)]
    assert {"lr", "train/top1_err", "train/top5_err", "train/images_per_s", "train/data_wait_frac",
            "epoch_time_s", "val/top5_err"} <= set(run.data.metrics)
    assert any(k.startswith("system/cpu") for k in run.data.metrics), sorted(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "model", "eval"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "model/checkpoint.pt", str(tmp_path))
    net, cfg = ckpt.model_from_checkpoint(local)
    assert cfg.run.name == "spread" and "optimizer" not in ckpt.load_checkpoint(local)
    assert [v.run_id for v in client.search_model_versions("name='vgg-test'")] == [run.info.run_id]


def test_killed_driver_rerun_resumes_into_the_same_run_while_mlflow_comes_and_goes(ray_cluster, mlflow_server,
                                                                                   sample_dataset, tmp_path):
    """MLflow is down when training starts, comes up mid-run (the run is created late), the driver is
    killed; the same command again resumes into the same MLflow run, and finishes although the server
    goes down once more. Afterwards the server holds one run whose steps appear once each."""
    port = free_port()
    storage = tmp_path / "runs"
    folder = storage / "chaos"
    args = ["--config", str(REPO / "jobs/configs/demo.yaml"),
            *small(sample_dataset, storage, "chaos", f"http://127.0.0.1:{port}", **{"schedule.epochs": 8})]
    slow = {"VGG_TEST_STEP_DELAY_S": "0.4"}       # 24 steps: long enough to act in between

    first = train_proc(ray_cluster, args, tmp_path / "first.log", **slow)
    try:
        wait_for(lambda: checkpoints(folder), 300, "the first checkpoint", proc=first)
        assert ckpt.load_checkpoint(folder, "latest")["mlflow_run_id"] == ""   # nobody to talk to yet
        server = mlflow_server(port)                                            # up mid-run
        run_id = wait_for(lambda: tracking.read_run_id(str(folder)), 120, "the run, created late", proc=first)
        wait_for(lambda: len(steps_of(server.client(), run_id, "train/loss")) >= 2, 60, "metrics", proc=first)
        os.killpg(first.pid, signal.SIGKILL)   # the driver, at once
        first.wait(timeout=60)
    finally:
        stop_group(first)
    killed_at = ckpt.load_checkpoint(folder, "latest")["step"]
    assert 0 < killed_at < 24
    assert "unreachable" in (tmp_path / "first.log").read_text()

    second = train_proc(ray_cluster, args, tmp_path / "second.log", **slow)   # the same command again
    try:
        wait_for(lambda: "resumes at epoch" in (tmp_path / "second.log").read_text(), 300, "the resume",
                 proc=second)
        before = len(steps_of(server.client(), run_id, "train/loss"))
        wait_for(lambda: len(steps_of(server.client(), run_id, "train/loss")) >= before + 2, 120,
                 "metrics from the resumed run", proc=second)
        server.stop()                                                           # down mid-run
        assert second.poll() is None, "training ended before the server went down: slow it down more"
        rc = second.wait(timeout=400)
    finally:
        stop_group(second)
    text = (tmp_path / "second.log").read_text()
    assert rc == 0, text[-5000:]
    resumed = {int(m) for m in re.findall(r"resumes at epoch \d+, step (\d+)", text)}
    assert resumed and min(resumed) >= killed_at, (resumed, killed_at)
    assert "unreachable" in text
    final = ckpt.load_checkpoint(folder, "latest")
    assert (final["epoch"], final["step"], final["mlflow_run_id"]) == (8, 24, run_id)

    server.start()                                   # the same store: one run, every step once
    run = only_run(server.client(), "chaos")
    assert run.info.run_id == run_id and run.data.params["run.name"] == "chaos"
    logged = steps_of(server.client(), run_id, "train/loss")
    assert logged == sorted(set(logged)) and len(logged) >= 4
    assert all(s % 16 == 0 for s in logged)
