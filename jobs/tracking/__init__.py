"""The MLflow side of the jobs (the only place, with the entry points, that imports MLflow): this module is
the tracker of a training run; ``journal`` keeps what the server did not take, ``outputs`` the
experiment, dataset input and logged model, ``results`` the results runs of passes.

MLflow for training runs: one run per training, and a tracking server that never stops training.

- The URI: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.
- One run per training, however often Ray restarts the workers or the driver is rerun: the run id is
  kept in ``<storage>/<name>/mlflow_run_id`` (the driver reads it back) and in every checkpoint.
- Metrics are stepped by images seen. MLflow keeps every value logged, even at a step it already has,
  so a step replayed after a restart is *skipped*: the tracker asks the run for each metric's last
  step when it connects and drops anything at or before it (the replay recomputes the same values).
- The server may be down at the start or go away mid-run: the tracker warns once, buffers metrics,
  retries every ``tracking.retry_s`` seconds from a background thread, and carries on. Training never
  blocks on it and never fails because of it. What is still undelivered goes to the run's journal
  (jobs/tracking/journal.py) before every checkpoint and at the end, and the run is FINISHED only once every
  point is delivered (else tag ``mlflow_pending_points`` says how many wait in the journal).
"""
from __future__ import annotations

import logging
import os
import queue
import subprocess
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from jobs.tracking import journal
from jobs.tracking import outputs
from storage import files

log = logging.getLogger("jobs.tracking")  # the logger keeps its public name

RUN_ID_FILE = "mlflow_run_id"
PENDING_TAG = "mlflow_pending_points"   # metric points still in the run's journal
MAX_PARAMS_PER_CALL = 100     # MLflow's MAX_PARAMS_TAGS_PER_BATCH
MAX_PARAM_VALUE = 6000        # MLflow's MAX_PARAM_VAL_LENGTH
LARGE_BUFFER = 100_000        # metric values buffered while the server is away: worth one warning
# Fail fast and let the tracker retry later, instead of the client's default of 7 retries with
# exponential backoff and a 120 s timeout (minutes of blocking per call while a server is down).
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def configured_uri(configured: str = "") -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the SQLite store in the working folder, as
    given (relative paths stay relative)."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI", "") or "sqlite:///mlflow.db"


def resolve_uri(configured: str = "") -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store in the working folder.
    A relative ``sqlite:///`` path is made absolute, so Ray workers (whose working folder differs)
    write to the same file."""
    uri = configured_uri(configured)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def params_from(flat: dict[str, Any]) -> dict[str, str]:
    """MLflow params from a flattened config: strings within MLflow's value limit."""
    out = {}
    for key, value in flat.items():
        text = str(value)
        out[key] = text if len(text) <= MAX_PARAM_VALUE else text[:MAX_PARAM_VALUE - 3] + "..."
    return out


def git_commit(cwd: str | Path = ".") -> str:
    """HEAD's commit, "+dirty" when the tree has changes; "unknown" outside a git checkout (e.g. a
    ``ray job submit --working-dir`` copy); ``$GIT_COMMIT`` wins when set."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


# ---------------------------------------------------------------- the run id file in Ray storage

def read_run_id(run_folder: str) -> str:
    """The MLflow run id kept in ``<run folder>/mlflow_run_id``, or ""."""
    path = files.join(run_folder, RUN_ID_FILE)
    return files.read_bytes(path).decode().strip() if files.exists(path) else ""


def write_run_id(run_folder: str, run_id: str) -> None:
    """Atomically: a crash mid-write must not leave an empty id, which would start a second run."""
    files.atomic_write(files.join(run_folder, RUN_ID_FILE), run_id.encode() + b"\n")


# ---------------------------------------------------------------- the tracker

class Tracker:
    """One MLflow run, created or resumed lazily; every call is safe while the server is away.

    ``run_id``: the run to resume ("" = read ``run_folder``'s id file, else create one named
    ``run_name`` with ``params`` and ``tags``). Metric logging is queued and sent by a background
    thread; ``flush``/``close`` wait for it with a deadline.
    """

    def __init__(self, uri: str, experiment: str, run_name: str, run_folder: str, run_id: str = "",
                 params: dict[str, str] | None = None, tags: dict[str, str] | None = None,
                 system_metrics: bool = False, retry_s: float = 30.0, enabled: bool = True,
                 node_id: str | None = None, journal: bool = False):
        for k, v in CLIENT_ENV.items():
            os.environ.setdefault(k, v)
        # One warning per outage is ours to give; urllib3 would add one per connection attempt.
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        self.uri, self.experiment, self.run_name, self.run_folder = uri, experiment, run_name, run_folder
        self.run_id = run_id
        self.params, self.tags = params or {}, tags or {}
        self.system_metrics, self.retry_s, self.enabled, self.node_id = system_metrics, retry_s, enabled, node_id
        self._client = None
        self._last_step: dict[str, int] = {}   # per metric key: the last step the run already has
        self._connected_once = False
        self._down_since: float | None = None
        self._next_try = 0.0
        self._warned = False
        self._monitor = None
        self._pending: deque[journal.Point] = deque()
        self.dropped: dict[str, int] = {}      # metric -> NaN or infinite values not logged
        self._owns_journal = False             # this tracker read the journal, so it rewrites it
        if journal and enabled:
            self.replay()
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()          # one MLflow call at a time (the client is not thread-safe)

    # -- connection -------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """Run ``fn`` against the server; on a failure warn (once per outage) and say so."""
        if not self.enabled:
            return False, None
        if self._down_since is not None and time.monotonic() < self._next_try:
            return False, None  # still inside the back-off after a failure
        with self._lock:
            try:
                result = fn()
            except Exception as e:  # the server's failures come as many types; none may stop training
                self._went_down(what, e)
                return False, None
        if self._down_since is not None:
            log.warning("MLflow tracking server %s is reachable again after %.0f s", self.uri,
                        time.monotonic() - self._down_since)
            self._down_since = None
            if self._monitor is not None:  # its thread ends when it cannot reach the server
                self._monitor.finish()
                self._start_monitor()
        return True, result

    def _went_down(self, what: str, error: Exception) -> None:
        self._next_try = time.monotonic() + self.retry_s
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("MLflow tracking server %s unreachable (%s: %s); training continues, metrics "
                        "are buffered and retried every %.0f s", self.uri, what,
                        str(error).splitlines()[0][:300], self.retry_s)

    def connect(self) -> str:
        """Find or create the run; returns its id, or "" while the server is away."""
        if not self.enabled:
            return ""
        if self._connected_once:
            return self.run_id
        ok, run_id = self._call("start run", self._connect)
        return run_id if ok else ""

    def _connect(self) -> str:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        run_id = self.run_id or read_run_id(self.run_folder)
        if run_id:
            try:
                run = client.get_run(run_id)
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("MLflow run %s (from %s) is not on %s: starting a new run", run_id,
                            self.run_folder, self.uri)
                run_id = ""
        if run_id:
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            self._last_step = last_steps(client, run)
        else:
            storage = self.run_folder.rstrip("/").rsplit("/", 1)[0]
            exp_id = outputs.experiment_id(client, self.experiment, self.uri, storage)
            run = client.create_run(exp_id, run_name=self.run_name, tags=self.tags)
            run_id = run.info.run_id
            items = list(self.params.items())
            for i in range(0, len(items), MAX_PARAMS_PER_CALL):
                client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + MAX_PARAMS_PER_CALL]])
            write_run_id(self.run_folder, run_id)
            log.info("MLflow run %s created in experiment %r at %s", run_id, self.experiment, self.uri)
        self._client, self.run_id, self._connected_once = client, run_id, True
        if self.system_metrics:
            self._start_monitor()
        return run_id

    def _start_monitor(self) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as e:  # psutil (CPU, memory) / nvidia-ml-py (GPU) are optional
            log.info("MLflow system metrics off: %s", e)
            self.system_metrics = False
            return
        try:
            monitor = SystemMetricsMonitor(self.run_id, resume_logging=True, node_id=self.node_id,
                                           tracking_uri=self.uri)
            monitor.start()
        except Exception as e:  # optional telemetry: it must never cost the run its connection
            log.warning("MLflow system metrics not started: %s", e)
            return
        self._monitor = monitor

    # -- metrics ----------------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue ``metrics`` at ``step`` (images seen); never blocks on the server. A value that is no
        number is a ``TypeError`` naming it; a NaN or infinite one is dropped with a warning
        (jobs/tracking/journal.py says why)."""
        if not self.enabled:
            return
        now, points = int(time.time() * 1000), []
        for k, v in metrics.items():
            value = journal.number(k, v)
            if value is not None:
                points.append((k, value, now, int(step)))
                continue
            self.dropped[k] = self.dropped.get(k, 0) + 1
            if self.dropped[k] == 1:
                log.warning("MLflow: metric %s is %s at step %d: not logged (MLflow and the run's journal keep "
                            "finite values only; later ones are counted at the end)", k, v, int(step))
        self._queue.put(points)
        if self._thread is None:
            self._thread = threading.Thread(target=self._sender, name="mlflow-tracker", daemon=True)
            self._thread.start()

    def _sender(self) -> None:
        while not self._stop.is_set():
            try:
                new = self._queue.get(timeout=1.0)
            except queue.Empty:
                new = []  # a second without new metrics: still retry what is buffered
            self._pending.extend(new)
            if len(self._pending) >= LARGE_BUFFER and not self._warned:
                self._warned = True
                log.warning("MLflow: %d metric values buffered while %s is unreachable; they are kept "
                            "(in memory, and in the run's journal at each checkpoint)", LARGE_BUFFER, self.uri)
            self._send_pending()

    def _send_pending(self) -> bool:
        """Send what is buffered; True when nothing is left."""
        while not self._queue.empty():
            self._pending.extend(self._queue.get_nowait())
        if not self._pending:
            return True
        if not self.connect():
            return False
        from mlflow.entities import Metric

        head = min(1000, len(self._pending))  # MLflow's MAX_METRICS_PER_BATCH
        batch, newest = [], dict(self._last_step)
        for m in list(self._pending)[:head]:  # each key's steps once: a replay, or one value logged twice
            if m[3] > newest.get(m[0], -1):
                batch.append(m)
                newest[m[0]] = m[3]
        if batch:
            ok, _ = self._call("log metrics", lambda: self._client.log_batch(
                self.run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in batch]))
            if not ok:
                return False
        for _ in range(head):
            self._pending.popleft()
        for k, _, _, s in batch:
            self._last_step[k] = max(self._last_step.get(k, -1), s)
        return not self._pending

    def flush(self, timeout: float = 30.0) -> bool:
        """Send everything queued, retrying until ``timeout``; True when all went."""
        if not self.enabled:
            return True
        deadline = time.monotonic() + timeout
        while True:
            self._next_try = min(self._next_try, time.monotonic())  # retry now, not in retry_s
            if self._thread is not None:
                self._stop.set()
                self._thread.join()
                self._thread = None
                self._stop.clear()
            if self._send_pending():
                return True
            if time.monotonic() >= deadline:
                log.warning("MLflow: %d metric values could not be sent to %s yet", len(self._pending), self.uri)
                return False
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    # -- the journal ------------------------------------------------------------------------------

    def replay(self) -> None:
        """Take over the run's journal: its points go before anything buffered since."""
        self._pending.extendleft(reversed(journal.read(self.run_folder)))
        self._owns_journal = True

    def undelivered(self) -> list[journal.Point]:
        queued = [p for batch in list(self._queue.queue) for p in batch]
        return list(self._pending) + queued

    def persist(self) -> None:
        """Write what is undelivered to the journal (a checkpoint is about to be reported)."""
        if self.enabled:
            journal.write(self.run_folder, self.undelivered())
            self._owns_journal = True

    # -- everything else is synchronous and returns whether it reached the server ---------------

    def set_tags(self, tags: dict[str, str]) -> bool:
        if not self.connect():
            return False
        return self._call("set tags", lambda: [self._client.set_tag(self.run_id, k, str(v))
                                               for k, v in tags.items()])[0]

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        if not self.connect():
            return False
        return self._call("log artifact", lambda: self._client.log_artifact(self.run_id, str(path),
                                                                            artifact_path))[0]

    def log_text(self, text: str, artifact_file: str) -> bool:
        if not self.connect():
            return False
        return self._call("log text", lambda: self._client.log_text(self.run_id, text, artifact_file))[0]

    def log_dict(self, data: dict, artifact_file: str) -> bool:
        if not self.connect():
            return False
        return self._call("log dict", lambda: self._client.log_dict(self.run_id, data, artifact_file))[0]

    def call(self, what: str, fn: Callable[[Any], Any]) -> tuple[bool, Any]:
        """(reached the server, ``fn(client)``'s result) for what has no method here: one call, no
        retry, never an exception (the server's failures are warned about once per outage)."""
        if not self.connect():
            return False, None
        return self._call(what, lambda: fn(self._client))

    def close(self, status: str | None = None, timeout: float | None = None) -> bool:
        """Flush metrics, stop system metrics, and set the run's status (FINISHED / FAILED) if given.
        Returns whether every point was delivered. If not, they stay in the journal, the run keeps
        its RUNNING status instead of FINISHED, and a tag says how many points are pending. The flush
        retries for ``timeout`` (default: three retry periods, at most 30 s): the journal keeps the
        rest, so there is no point in holding the process longer."""
        delivered = self.flush(min(30.0, 3 * self.retry_s) if timeout is None else timeout)
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        if self._owns_journal:
            self.persist()
        if self.dropped:
            log.warning("MLflow: non-finite values not logged: %s",
                        ", ".join(f"{k} {n} time{'s' if n > 1 else ''}" for k, n in sorted(self.dropped.items())))
        pending = len(self.undelivered())
        self._next_try = min(self._next_try, time.monotonic())   # the tag is tried even inside a back-off
        if pending:
            log.warning("MLflow: %d metric points wait in %s; run the same command again once %s is "
                        "reachable to deliver them", pending, journal.path(self.run_folder), self.uri)
            self.set_tags({PENDING_TAG: str(pending)})
        elif self._owns_journal and self.connect():
            self.set_tags({PENDING_TAG: "0"})
        if status and self.connect() and not (pending and status == "FINISHED"):
            self._call("end run", lambda: self._client.set_terminated(self.run_id, status))
        elif pending and self.connect():   # whatever ended it before (a fluent start_run), it waits
            self._call("keep running", lambda: self._client.update_run(self.run_id, status="RUNNING"))
        return delivered and not pending


def last_steps(client, run) -> dict[str, int]:
    """Per metric key, the largest step the run already holds (MLflow's latest value is the one
    with the largest step). ``run.data`` carries them without reading whole metric histories."""
    objs = getattr(run.data, "_metric_objs", None)
    if objs is not None:
        return {m.key: m.step for m in objs}
    return {k: max(m.step for m in client.get_metric_history(run.info.run_id, k)) for k in run.data.metrics}
