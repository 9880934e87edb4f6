"""The Ray side of the jobs (the only place, with the entry points, that imports Ray): this module
connects and reads the cluster's nodes; ``ranks`` runs a pass's W ranks as Ray tasks, ``trainer`` is
Ray Train's side of a training run, ``worker`` the training worker on each rank.

The one way the jobs connect to Ray: the cluster ``RAY_ADDRESS`` names (``ray job submit`` sets
it, or a user does), else a local Ray for this command alone, its node registered as 127.0.0.1 and
its dashboard on 127.0.0.1 (README "Security" says what still listens beyond the loopback).

A local Ray dies with its driver: a small watchdog process kills whatever of the session outlives
the driver, and the next local start reaps what a killed watchdog left. Without this, a SIGKILLed
driver leaves Ray's DashboardAgent and RuntimeEnvAgent behind (~230 MB): they notice the raylet's
death, then block for 60 s trying to report it to the dead GCS, deaf to SIGTERM meanwhile."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

MARKER = "vgg-driver.json"  # in a local session's folder: which driver started it
_REPO = Path(__file__).resolve().parent.parent
_WATCH = "import sys; from jobs.cluster import watch; watch(sys.argv[1])"
_watchdogs: list[subprocess.Popen] = []  # they outlive the driver on purpose: no "still running" warning


def connect(num_cpus: int | None = None, runtime_env: dict | None = None, address: str | None = None) -> None:
    """``ray.init`` once per process. ``num_cpus`` sizes a local Ray (at least this machine's cores);
    it is ignored on a cluster, whose nodes declare their own."""
    import ray  # RAY

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
        return
    from ray._common.utils import get_default_ray_temp_dir  # RAY: where ray.init puts the session

    reap(Path(get_default_ray_temp_dir()))
    if not os.environ.get("VGG_VERBOSE"):   # a local Ray turns token auth on by itself, and says so each time
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # The dashboard serves Ray's state API: without it, Ray Train's PlacementGroupCleaner cannot
    # see its controller and warns "Failed to query Ray Train Controller actor state" every second.
    context = ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_cpus or 0), include_dashboard=True,
                       dashboard_host="127.0.0.1", runtime_env=runtime_env, logging_level=logging.WARNING,
                       _node_ip_address="127.0.0.1")
    _guard(Path(context.address_info["session_dir"]))


def _guard(session: Path) -> None:
    """Record who started ``session`` and start its watchdog, in a session of its own so that a
    Ctrl-C or a kill of the driver's process group does not take it down first. The watchdog writes
    what it killed (or its traceback) to the session's logs."""
    marker = session / MARKER
    marker.write_text(json.dumps({"session_dir": str(session), **identity(os.getpid())}))
    with open(session / "logs" / "vgg-watchdog.log", "w") as log:
        # stderr stays the driver's: should the watchdog ever reap, the driver's terminal says so
        _watchdogs.append(subprocess.Popen(
            [sys.executable, "-c", _WATCH, str(marker)],
            cwd=_REPO, stdin=subprocess.DEVNULL, stdout=log, start_new_session=True))


def watch(marker: str, poll_s: float = 0.5) -> None:
    """The watchdog: wait for the driver to end, then kill what is left of its session."""
    record = json.loads(Path(marker).read_text())
    while _alive(record):
        time.sleep(poll_s)
    killed = _reap_session(Path(marker))
    print("driver gone; killed", killed, flush=True)
    if killed:   # a driver that shut its Ray down leaves nothing: only a reap is worth a line on its terminal
        print(f"vgg watchdog: driver pid {record['driver']} has ended; killed the {len(killed)} processes left "
              f"of its local Ray session {Path(marker).parent} (logs/vgg-watchdog.log there)", file=sys.stderr,
              flush=True)


def reap(temp_dir: Path) -> list[int]:
    """Kill every process of each local session under ``temp_dir`` whose driver is gone; returns
    their pids. Sessions without a marker (a cluster from ``ray start``, another project's), of a
    live driver, or whose marker another user wrote are never touched."""
    killed = []
    for marker in temp_dir.glob(f"session_*/{MARKER}"):
        try:
            record = json.loads(marker.read_text())
            if marker.stat().st_uid != os.getuid():
                continue
        except (OSError, ValueError):
            continue  # being written by a driver starting right now, or already reaped
        if not _alive(record):
            killed += _reap_session(marker)
    return killed


def identity(pid: int) -> dict:
    """What tells the process ``pid`` from a later one that reuses its pid: its start in clock ticks
    since boot (``/proc/<pid>/stat``), which no clock or boot-time adjustment moves, and its command
    line. psutil's ``create_time()`` adds the boot time each reader takes from ``/proc/stat``, and that
    moves by a second now and then, so two processes can disagree on it."""
    proc = psutil.Process(pid)
    return {"driver": pid, "start_ticks": _start_ticks(pid), "started": proc.create_time(),
            "cmdline": proc.cmdline()}


def _start_ticks(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (after the parenthesised name, which may hold spaces)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None   # not Linux, or gone
    return int(stat[stat.rindex(")") + 2:].split()[19])


def _alive(record: dict) -> bool:
    """Whether the driver ``record`` (from :func:`identity`) still runs: same pid, same start, same
    command line, not a zombie. Without tick counts (not Linux) starts within 2 s are the same."""
    try:
        proc = psutil.Process(record["driver"])
        ticks, then = _start_ticks(proc.pid), record.get("start_ticks")
        same_start = ticks == then if ticks is not None and then is not None \
            else abs(proc.create_time() - record["started"]) < 2.0
        same = same_start and proc.cmdline() == record.get("cmdline", proc.cmdline())
        return same and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True   # a process we may not read is not ours to declare gone


def _reap_session(marker: Path) -> list[int]:
    """Kill the processes of the session ``marker`` lies in (never a folder the marker names, which
    anyone could write). SIGKILL: the agents' SIGTERM handler waits for their 60 s report to end."""
    procs = members(str(marker.parent))
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):   # gone already: what we wanted
            proc.kill()
    deadline = time.monotonic() + 10
    while any(map(_running, procs)) and time.monotonic() < deadline:
        time.sleep(0.05)
    marker.unlink(missing_ok=True)
    return [p.pid for p in procs]


def _running(proc: psutil.Process) -> bool:
    """A zombie has ended: whoever adopted it (init, a container's first process) has yet to reap it."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def members(session_dir: str) -> list[psutil.Process]:
    """This user's processes of one session, but this one."""
    found = []
    for proc in psutil.process_iter(["uids"]):
        try:
            mine = proc.info["uids"] is not None and proc.info["uids"].real == os.getuid()
            if mine and proc.pid != os.getpid() and _member(proc, session_dir):
                found.append(proc)
        except psutil.Error:
            continue  # gone meanwhile, or a process we may not read
    return found


def _member(proc: psutil.Process, session_dir: str) -> bool:
    """Ray's servers (GCS, raylet, dashboard, monitors) name the session folder in a ``--flag=``;
    the agents, dashboard modules and workers, whose command lines and environments Ray overwrites
    with a title, hold its log files open, as do the processes they start on their stdout or
    stderr (open files are listed by their resolved paths). Someone's ``tail -f`` of a session log is
    none of these."""
    args, inside, real = proc.cmdline(), session_dir + "/", os.path.realpath(session_dir) + "/"
    if any(a.startswith("--") and (a.endswith("=" + session_dir) or "=" + inside in a) for a in args):
        return True
    if args[1:] == ["-c", _WATCH, inside + MARKER]:
        return True  # its watchdog
    titled = bool(args) and args[0].startswith(("ray::", "ray-dashboard-"))
    return any(f.path.startswith(real) and (titled or f.fd in (1, 2)) for f in proc.open_files())


# ---------------------------------------------------------------------------------------------------
# Inside a Ray job: what `ray job submit` handed this driver
# ---------------------------------------------------------------------------------------------------

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"   # set by Ray's job supervisor for the job's entrypoint


def job_config() -> dict:
    """The Ray job's runtime_env and metadata when this process is a submitted job's entrypoint
    (``ray job submit`` or ``jobs.submit``); empty otherwise."""
    try:
        config = json.loads(os.environ.get(JOB_CONFIG_ENV, "") or "{}")
    except ValueError:
        return {}
    return config if isinstance(config, dict) else {}


def in_working_dir_copy() -> bool:
    """Whether this driver runs in Ray's temporary copy of the project (a job's ``working_dir``),
    which Ray deletes when it cleans up: nothing durable may be written relative to it."""
    return bool((job_config().get("runtime_env") or {}).get("working_dir"))


def job_commit() -> str:
    """The commit the job's submitter recorded in its metadata (``jobs.submit`` does; plain
    ``ray job submit --metadata-json '{"git_commit": "..."}'``), else ""."""
    commit = (job_config().get("metadata") or {}).get("git_commit", "")
    return commit if isinstance(commit, str) else ""


# ---------------------------------------------------------------------------------------------------
# Will the workers ever fit?
# ---------------------------------------------------------------------------------------------------

def live_nodes() -> list[dict[str, float]]:
    """What each live node of the connected cluster offers when idle."""
    import ray  # RAY

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def local_node(num_cpus: int) -> list[dict[str, float]]:
    """What the local Ray :func:`connect` would start offers, without starting it."""
    import torch

    return [{"CPU": float(max(os.cpu_count() or 1, num_cpus)), "GPU": float(torch.cuda.device_count())}]


def available(need: dict[str, float]) -> dict[str, float]:
    """What the connected cluster has free right now, of the resources in ``need``."""
    import ray  # RAY

    free = ray.available_resources()
    return {k: free.get(k, 0.0) for k in need}


def places(nodes: list[dict[str, float]], need: dict[str, float]) -> list[int]:
    """How many workers needing ``need`` each node could hold, were it idle."""
    return [int(min(node.get(k, 0.0) / v for k, v in need.items() if v > 0)) for node in nodes]


def check_fits(workers: int, need: dict[str, float], strategy: str, nodes: list[dict[str, float]]) -> str:
    """"" when ``workers`` workers of ``need`` each can be placed on ``nodes`` under Ray's placement
    ``strategy``; else why they never can."""
    per_node = places(nodes, need)
    fits = {"STRICT_PACK": max(per_node, default=0) >= workers,
            "STRICT_SPREAD": sum(n >= 1 for n in per_node) >= workers}.get(strategy, sum(per_node) >= workers)
    if fits:
        return ""
    totals = {k: sum(node.get(k, 0.0) for node in nodes) for k in need}
    offer = ", ".join(f"{k} {totals[k]:g}" for k in need)
    return (f"{workers} worker(s) of {', '.join(f'{k} {v:g}' for k, v in need.items())} each "
            f"({strategy}) can never be placed: the cluster's {len(nodes)} node(s) offer {offer} in all, and "
            f"{sum(per_node)} worker(s) at most")
