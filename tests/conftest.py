"""Shared fixtures: a tiny ILSVRC-shaped sample written by the real preprocessing, built once per session.

``sample_source``   SOURCE folder from ``preprocessing.synthetic.generate`` (4 classes, 12 train and
                    8 val images per class, sides 96-160 px).
``sample_dataset``  its shards, indexes, manifests and dataset.json from ``preprocessing.writer``
                    (shard_size 7: 7 train shards for 48 images, 5 val shards for 32, so shard counts
                    divide by neither 2 nor 3 ranks while the train split divides into global
                    batches of 2 x 8 and 3 x 4).
``data_config``     factory: ``data_config(root, **overrides)`` -> DataConfig sized for tests
                    (crop 64, S in [64, 128], CPU decode, 2 threads, float32 NCHW).
``odd_source``      the preprocessing tests' sample with every oddity (tests/odd_sample.py)
``built``           (out, summary, log) of preprocessing it with shard size 8
``odd_manifest``    {split: manifest rows} of ``built``
Treat the session-scoped folders as read-only; copy them (``shutil.copytree``) to break them.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from services import BIN, MlflowServer, free_port, stop_group, wait_for

RAY_TEMP_ROOT = Path("/tmp/ray-train-tests")


def pytest_configure(config):
    """The shard-hash cache of this session's processes (Ray workers included) in a folder of its own,
    not the user's ~/.cache."""
    os.environ["VGG_SHARD_CACHE"] = str(Path(tempfile.mkdtemp(prefix="vgg-test-cache-")) / "shards.json")
    # Tiny nets on 2 busy cores: one thread per process is faster than two fighting (and than DALI's).
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(items):
    """The tests on the session's Ray cluster (``ray_cluster`` below) run last, in their files' order:
    the cluster then starts after the other tests instead of taxing them while it idles (its dozen
    processes poll: about a tenth of a core)."""
    items.sort(key=on_session_cluster)   # stable: every other test keeps its place


def on_session_cluster(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.get("ray_cluster", ()) if info is not None else ()
    return bool(defs) and defs[-1].scope == "session"   # not a file's own ray_cluster (test_evaluate.py)


SAMPLE_CLASSES = 4
SAMPLE_TRAIN_PER_CLASS = 12
SAMPLE_VAL_PER_CLASS = 8
SAMPLE_SHARD_SIZE = 7


@pytest.fixture
def node_cache(tmp_path, monkeypatch) -> Path:
    """This test's own node cache (shard hashes, index and manifest verdicts, boxed indexes), never the
    session's or the user's."""
    from storage import shard_check

    path = tmp_path / "cache" / "shards.json"
    monkeypatch.setenv(shard_check.CACHE_ENV, str(path))
    return path


@pytest.fixture(scope="session")
def sample_source(tmp_path_factory) -> Path:
    from preprocessing import synthetic

    return Path(synthetic.generate(tmp_path_factory.mktemp("sample") / "source", classes=SAMPLE_CLASSES,
                                   train_per_class=SAMPLE_TRAIN_PER_CLASS, val_per_class=SAMPLE_VAL_PER_CLASS,
                                   oddities=False, seed=0, size_range=(96, 160)))


@pytest.fixture(scope="session")
def sample_dataset(sample_source, tmp_path_factory) -> Path:
    from preprocessing import writer

    out = tmp_path_factory.mktemp("sample-shards")
    writer.preprocess(sample_source, out, shard_size=SAMPLE_SHARD_SIZE, seed=0, progress=False,
                      log=lambda message: None)
    return Path(out)


@pytest.fixture(scope="session")
def data_config():
    from pipeline.config import DataConfig

    def make(root, **overrides) -> DataConfig:
        base = dict(root=str(root), crop_size=64, scale_min=64, scale_max=128, decode="cpu", threads=2,
                    prefetch=2, shuffle_buffer=64)
        base.update(overrides)
        return DataConfig(**base)

    return make


@pytest.fixture(scope="session")
def odd_source(tmp_path_factory) -> Path:
    from odd_sample import SIZES
    from preprocessing import synthetic

    return synthetic.generate(tmp_path_factory.mktemp("odd") / "source", classes=4, train_per_class=10,
                              val_per_class=4, oddities=True, seed=0, size_range=SIZES)


@pytest.fixture(scope="session")
def built(odd_source, tmp_path_factory):
    from odd_sample import build

    out = tmp_path_factory.mktemp("built") / "out"
    summary, log = build(odd_source, out)
    return out, summary, log


@pytest.fixture
def odd_manifest(built):
    from storage.dataformat import read_manifest

    return {s: read_manifest(built[0], s).to_pylist() for s in ("train", "val")}


# ---------------------------------------------------------------------------------------------------
# Processes for the training tests (tests/test_train*.py): one two-node Ray cluster and one MLflow
# server for the whole session, and servers a test may stop. Helpers to drive them: tests/cluster.py.
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def ray_cluster():
    """A head (resource node_a) and a second node (node_b) on this machine, token auth on. (Ray
    registers the machine's address whatever --node-ip-address says; the token keeps others out.)"""
    RAY_TEMP_ROOT.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="t", dir=RAY_TEMP_ROOT))  # short: Ray's unix sockets live here
    port, dashboard = free_port(6391), free_port()
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: Ray Train's controller takes each worker's report (its queue
    # holds one) only when it polls, every 2 s by default, so a run that reports more often than that
    # waits for it at every checkpoint. Drivers (and jobs, from the nodes) pass it on to the controller.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats"]
    # At the end, SIGTERM stops a node at once: by default `ray start --block` first drains it for up
    # to 30 s (the head took 10 s of every session's teardown), which buys nothing here.
    node_env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--port", str(port), "--include-dashboard=true",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
         "--temp-dir", str(temp), "--ray-client-server-port", str(free_port()),
         "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
         "--resources", json.dumps({"node_a": 1}), *common],
        env=node_env, start_new_session=True, stdout=open(temp / "head.log", "w"), stderr=subprocess.STDOUT)
    procs = [head]
    try:
        wait_for(lambda: "Ray runtime started" in (temp / "head.log").read_text(), 120, "the Ray head", proc=head)

        def add_node() -> subprocess.Popen:
            """One more node with node_b's resources (the elastic test replaces the node it kills)."""
            log = temp / f"node-{len(procs)}.log"
            node = subprocess.Popen(
                [str(BIN / "ray"), "start", "--address", f"127.0.0.1:{port}",
                 "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
                 "--resources", json.dumps({"node_b": 1}), *common],
                env=node_env, start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT)
            procs.append(node)
            wait_for(lambda: "Ray runtime started" in log.read_text(), 120, "the second Ray node", proc=node)
            return node

        node = add_node()
        # RAY_ADDRESS: jobs.train connects to this cluster instead of starting its own.
        # dashboard: the Jobs API's URL (ray.job_submission, jobs.submit)
        # nodes: the second node's process (its group is the node: raylet and workers), add_node another
        yield {"address": f"127.0.0.1:{port}", "env": {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, "temp": temp,
               "dashboard": f"http://127.0.0.1:{dashboard}", "nodes": [node], "add_node": add_node}
    finally:
        for p in procs:                 # both nodes stop together, not one after the other
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            stop_group(p)
        shutil.rmtree(temp, ignore_errors=True)


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


@pytest.fixture(scope="session")
def shared_mlflow(tmp_path_factory):
    """One server for the tests that never stop it (each uses its own experiment)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-shared")).start()
    yield server
    server.stop()
