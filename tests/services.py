"""Processes the tests start and stop: free ports, waiting with a deadline, killing a process group,
a real ``mlflow server``. Plain functions, so every test file uses the same ones."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


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


def group_gone(pgid: int, timeout: float) -> bool:
    """Wait until no process is left in group ``pgid``, for ``timeout`` seconds at most."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


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
                group_gone(proc.pid, 1.0)  # let the group's children go too, for a second at most
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


class MlflowServer:
    """A real ``mlflow server`` (SQLite backend, artifacts proxied, job execution off: no worker
    processes) on 127.0.0.1."""

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
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            start_new_session=True, stdout=open(self.root / "server.log", "a"), stderr=subprocess.STDOUT)
        wait_for(self.healthy, 180, f"mlflow server on {self.uri}", interval=0.25, proc=self.proc)
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
