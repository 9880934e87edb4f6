"""The local Ray that jobs/cluster/__init__.py starts when no cluster is given: it does not outlive its driver
(a SIGKILLed driver's leftovers are reaped by its watchdog, or else at the next local start, and a
live driver's session is never touched), and a tiny training run prints no Ray Train
PlacementGroupCleaner warnings. Every Ray here lives in its own RAY_TMPDIR, so only processes of
these tests' sessions are looked at or killed."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from jobs import cluster
from tiny import tiny_sets

REPO = Path(__file__).resolve().parent.parent
DRIVER = "import time; from jobs import cluster; cluster.connect(num_cpus=1); print('ready', flush=True); time.sleep(600)"
SPAM = "Failed to query Ray Train Controller actor state"


@pytest.fixture
def ray_tmp():
    """A RAY_TMPDIR of this test's own, short (Ray's unix sockets live under it); whatever of its
    sessions is still running at the end is killed."""
    tmp = Path(tempfile.mkdtemp(prefix="rayreap-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    yield tmp, {**env, "RAY_TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    for session in (tmp / "ray").glob("session_2*"):
        for proc in cluster.members(str(session)):
            with contextlib.suppress(psutil.NoSuchProcess):   # gone already
                proc.kill()
    shutil.rmtree(tmp, ignore_errors=True)


def start_driver(env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def session_of(tmp: Path, driver: subprocess.Popen, log: Path, timeout: float = 180) -> str:
    """The session folder ``driver`` recorded, once its Ray is up."""
    deadline = time.monotonic() + timeout
    while "ready" not in log.read_text():
        assert driver.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    for marker in (tmp / "ray").glob(f"session_*/{cluster.MARKER}"):
        record = json.loads(marker.read_text())
        if record["driver"] == driver.pid:
            return record["session_dir"]
    raise AssertionError(f"driver {driver.pid} recorded no session")


def running(procs: list[psutil.Process]) -> list[str]:
    """Those still running (a zombie has ended; psutil.Process checks the pid was not reused)."""
    out = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):   # gone between listing and asking: not running
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{proc.pid} {proc.name()}")
    return out


def started(session: str, timeout: float = 60) -> list[psutil.Process]:
    """The session's processes, once its raylet has started both agents."""
    deadline = time.monotonic() + timeout
    while True:
        procs = cluster.members(session)
        names = {p.name() for p in procs}
        if {"raylet", "gcs_server", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names:
            return procs
        assert time.monotonic() < deadline, names
        time.sleep(0.5)


def settled(session: str, timeout: float = 15) -> list[str]:
    """Those of the session's processes still running after ``timeout``, or none once none are."""
    deadline = time.monotonic() + timeout
    while (left := running(cluster.members(session))) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def watchdog(procs: list[psutil.Process]) -> psutil.Process:
    [found] = [p for p in procs if "from jobs.cluster import watch" in " ".join(p.cmdline())]
    return found


def test_a_killed_driver_leaves_nothing_running_and_a_live_driver_is_left_alone(ray_tmp):
    tmp, env = ray_tmp
    dead, live = start_driver(env, tmp / "dead.log"), start_driver(env, tmp / "live.log")
    try:
        dead_session, live_session = session_of(tmp, dead, tmp / "dead.log"), session_of(tmp, live, tmp / "live.log")
        dead_procs, live_procs = started(dead_session), started(live_session)
        agents = {p.pid for p in dead_procs if p.name().startswith("ray::")}

        # Without its watchdog, the killed driver's agents outlive it (they block for 60 s) ...
        watchdog(dead_procs).kill()
        dead.kill()
        dead.wait()
        assert {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= {n.split()[1] for n in running(dead_procs)}
        # ... until the next local start reaps them (connect() calls reap() before ray.init), leaving
        # the live driver's session as it was.
        reaped = cluster.reap(tmp / "ray")
        assert running(dead_procs) == [] and cluster.members(dead_session) == []
        assert set(reaped) >= agents
        assert len(running(live_procs)) == len(live_procs) and live.poll() is None

        # With its watchdog, a killed driver's session ends at once.
        live.kill()
        live.wait()
        assert settled(live_session) == [] and running(live_procs) == []
        assert list((tmp / "ray").glob(f"session_*/{cluster.MARKER}")) == []
    finally:
        for driver in (dead, live):
            if driver.poll() is None:
                os.kill(driver.pid, signal.SIGKILL)
                driver.wait()


def test_a_tiny_local_training_run_prints_no_placement_group_cleaner_warnings(ray_tmp, sample_dataset, tmp_path):
    """Ray Train's PlacementGroupCleaner asks the state API, which the dashboard serves, whether
    the controller lives; without a dashboard it warns every second."""
    tmp, env = ray_tmp
    sets = tiny_sets(sample_dataset, **{
        "model.name": "A", "model.num_classes": 0, "run.workers": 1, "run.global_batch_size": 16,
        "run.storage_path": tmp_path / "runs", "run.name": "quiet", "schedule.epochs": 1,
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking.system_metrics": False})
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    out = subprocess.run([sys.executable, "-m", "jobs.train", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=400)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "validation (center)" in log and SPAM not in log
    [session] = (tmp / "ray").glob("session_2*")
    assert settled(str(session)) == []  # its watchdog outlives the driver by its last poll


MOVED_WATCH = ("import sys, psutil._pslinux as L; real = L.boot_time; L.boot_time = lambda: real() + 1.0; "
               "from jobs.cluster import watch; watch(sys.argv[1], poll_s=0.1)")


def test_a_live_driver_is_not_reaped_when_the_boot_time_moves(monkeypatch, tmp_path):
    """psutil's create_time() is the boot time (read from /proc/stat by each process) plus the
    start in ticks; the kernel's btime can move by a second during a run. A watchdog that saw its
    driver start a second later than the driver recorded must still know it for the same process."""
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    time.sleep(0.1)   # a later start, as a reused pid's would be (ticks are 10 ms)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        record = cluster.identity(driver.pid)
        real = psutil._pslinux.boot_time
        monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: real() + 1.0)
        assert psutil.Process(driver.pid).create_time() != record["started"]   # the move took effect
        assert cluster._alive(record)
        assert cluster._alive({k: v for k, v in record.items() if k != "start_ticks"})  # 2 s tolerance
        assert not cluster._alive({**record, "driver": other.pid})                 # a reused pid is not it
        assert not cluster._alive({**record, "cmdline": ["python", "else"]})

        # The real watchdog, in a process whose boot time is a second later, leaves the live driver's
        # session alone, then reaps it once the driver is gone and says so on the driver's terminal.
        session = tmp_path / "session_moved"
        (session / "logs").mkdir(parents=True)
        (session / cluster.MARKER).write_text(json.dumps({"session_dir": str(session), **record}))
        member = subprocess.Popen(["sleep", "600"], stdout=open(session / "logs" / "raylet.out", "w"))
        dog = subprocess.Popen([sys.executable, "-c", MOVED_WATCH, str(session / cluster.MARKER)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert dog.poll() is None, dog.communicate()
        assert (session / cluster.MARKER).exists() and member.poll() is None
        driver.kill()
        driver.wait()
        out, err = dog.communicate(timeout=30)
        assert dog.returncode == 0, err
        [line] = err.splitlines()
        assert f"driver pid {record['driver']} has ended" in line and str(session) in line
        assert not (session / cluster.MARKER).exists() and member.wait(timeout=10) == -9
    finally:
        for proc in (driver, other, *([member] if "member" in locals() else [])):
            proc.kill()
            proc.wait()
