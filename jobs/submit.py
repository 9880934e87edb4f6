"""Submit a training run to a Ray cluster through Ray's Jobs API:
``python -m jobs.submit [--address URL] train --config jobs/configs/A-256.yaml --set data.root=shards``.

What it adds to ``ray job submit --working-dir . -- python -m jobs.train ...`` (docs/cluster.md):

- Paths are resolved here, before the job leaves. The job runs in Ray's temporary copy of the project
  on the head node, where a relative ``data.root``, ``run.storage_path``, ``model.init_from`` or SQLite
  ``tracking.uri`` would name something inside that copy (gone at cleanup), so each is made absolute
  against the submitting folder, exactly as ``jobs.train`` run here would read it, and sent as a
  ``--set``. A relative ``data.root`` that does not exist here is refused. The config file itself
  travels with the project: it must lie inside the project folder and not be git-ignored.
- The code: the project folder is the job's ``working_dir`` (what .gitignore and .rayignore exclude,
  and .git, stay here). Its commit, with ``+dirty`` when tracked files differ from it, is set as
  ``GIT_COMMIT=...`` in front of the entrypoint (the run's ``git_commit`` tag; jobs.train forwards it to
  its workers, and Ray refuses a key set both there and in the job's runtime_env ``env_vars``) and
  kept in the job's metadata.
- The dependencies: by default the nodes already have them (a container image or an environment built
  from pyproject.toml on every node, the way a cluster gets Ray itself); ``--python`` names that
  environment's interpreter when it is not the nodes' ``python``; ``--uv`` asks Ray to install the
  project's requirements into a per-job environment on each node instead.

By default it follows the job's log until the job ends and exits 0 only if it succeeded (like
``ray job submit``); ``--no-wait`` returns once the job is accepted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from jobs import cli
from jobs import tracking
from pipeline import config as config_lib
from storage import files

REPO = Path(__file__).resolve().parent.parent
JOBS = ("train",)   # the entry points whose arguments this wrapper knows how to make cluster-ready
DEFAULT_ADDRESS = "http://127.0.0.1:8265"   # the dashboard's (Jobs API's) default; on a cluster via ssh -L
EXCLUDES = [".git"]  # besides .gitignore/.rayignore: the history is not needed to run, only its commit


# ---------------------------------------------------------------------------------------------------
# Making a training command cluster-ready
# ---------------------------------------------------------------------------------------------------

def config_in_project(path: str, here: Path) -> str:
    """The config file's path inside the project folder (how the job, running in Ray's copy of that
    folder, finds it); refuses one that would not travel with the job."""
    file = (here / path).resolve()
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: no such file (looked for {file})")
    if not file.is_relative_to(REPO):
        raise cli.UsageError(f"--config {path} lies outside the project folder {REPO}, which is all the job "
                              f"takes along; copy it under {REPO / 'jobs' / 'configs'} and submit that")
    rel = str(file.relative_to(REPO))
    ignored = subprocess.run(["git", "check-ignore", "-q", rel], cwd=REPO, capture_output=True).returncode == 0
    if ignored:
        raise cli.UsageError(f"--config {path} is git-ignored, so Ray does not upload it with the project; "
                              f"move it out of the ignored folder (e.g. to jobs/configs/)")
    return rel


def local_path(value: str, here: Path) -> str | None:
    """``value`` made absolute against ``here`` when it is a relative local path; None when it is
    already absolute or a URI (s3://, gs://, ...), which mean the same on every node."""
    if not value or files.is_uri(value) or os.path.isabs(value):
        return None
    return str((here / value).resolve())


def path_overrides(cfg: config_lib.Config, here: Path) -> dict[str, str]:
    """``section.key -> absolute value`` for every config value that names a place relative to the
    submitting folder, resolved the way ``jobs.train`` resolves it when run in that folder."""
    out = {}
    root = local_path(cfg.data.root, here)
    if root is not None:
        if not Path(root).exists():
            raise config_lib.ConfigError(
                f"data.root {cfg.data.root!r} is relative, so it is read against this folder: {root} does not "
                f"exist here. Give the data's path on the cluster's shared storage, e.g. "
                f"--set data.root=/mnt/shared/imagenet-shards")
        out["data.root"] = root
    storage = local_path(cfg.run.storage_path, here)
    if storage is not None:
        out["run.storage_path"] = storage
    # jobs.train's rule: an existing path is a checkpoint, anything else a run name in run.storage_path
    init = cfg.model.init_from
    if init and not init.startswith("runs:/") and os.path.exists(here / init):
        out["model.init_from"] = local_path(init, here) or init
    if cfg.tracking.enabled:   # tracking.uri, else $MLFLOW_TRACKING_URI here, else sqlite:///<here>/mlflow.db
        out["tracking.uri"] = tracking.resolve_uri(cfg.tracking.uri)
    return {k: v for k, v in out.items() if v != _get(cfg, k)}


def _get(cfg: config_lib.Config, key: str) -> str:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def train_entrypoint(argv: list[str], here: Path, python: str, commit: str) -> tuple[str, config_lib.Config]:
    """The job's shell command for ``jobs.train argv`` (the config read and checked here first, so a
    mistake fails now, not on the cluster) and the config it will run."""
    from jobs import train

    args = train.parse(argv)
    command = [python, "-m", "jobs.train"]
    if args.config:
        command += ["--config", config_in_project(args.config, here)]
    overrides = list(args.set)
    cfg = config_lib.load(here / args.config if args.config else None, overrides)
    overrides += [f"{k}={v}" for k, v in path_overrides(cfg, here).items()]
    cfg = config_lib.load(here / args.config if args.config else None, overrides)
    for item in overrides:
        command += ["--set", item]
    if args.dry_run:
        command.append("--dry-run")
    return f"GIT_COMMIT={shlex.quote(commit)} {shlex.join(command)}", cfg


# ---------------------------------------------------------------------------------------------------
# The job: code, commit, dependencies
# ---------------------------------------------------------------------------------------------------

def requirements() -> list[str]:
    """The project's runtime requirements, as installed here (pyproject.toml's ``dependencies``)."""
    from importlib import metadata

    try:
        reqs = metadata.requires("vgg-at-scale") or []
    except metadata.PackageNotFoundError as e:
        raise cli.UsageError("--uv reads the project's requirements from its installed metadata: "
                              "install the project first (make install, or pip install -e .)") from e
    return [r for r in reqs if "extra ==" not in r]


def runtime_env(python: str = "", uv: bool = False) -> dict:
    """Ray's runtime environment for the job: the project folder as working_dir, and how the nodes
    get the dependencies (see the module's docstring)."""
    env: dict = {"working_dir": str(REPO), "excludes": list(EXCLUDES)}
    if python:
        env["py_executable"] = python             # the workers too, not only the driver
    if uv:
        env["uv"] = {"packages": requirements()}  # installed once per node and cached by Ray
    return env


def check_address(address: str) -> None:
    """``--address`` is the Jobs API's URL (``http(s)://host:port``) or a ``host:port`` Ray reads as
    one; anything else is one error line here, not Ray's traceback later."""
    from urllib.parse import urlsplit

    url = urlsplit(address if "://" in address else f"http://{address}")
    try:
        port = url.port
    except ValueError:
        port = -1
    if url.scheme not in ("http", "https") or not url.hostname or port == -1 or " " in address:
        raise cli.UsageError(f"--address {address!r}: not the cluster's Jobs API URL; give http://host:port "
                             f"(default {DEFAULT_ADDRESS}) or host:port")


def client(address: str):
    """Ray's Jobs API client; it sends Ray's token itself when RAY_AUTH_MODE=token."""
    from ray.job_submission import JobSubmissionClient    # RAY

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError) as e:
        raise cli.UsageError(f"no Ray Jobs API at {address} ({str(e).splitlines()[0]}); start the cluster, "
                              f"open the tunnel (ssh -L 8265:127.0.0.1:8265 head) or give --address / "
                              f"RAY_ADDRESS, with RAY_AUTH_MODE=token and the cluster's token") from e


def follow(jobs_client, job_id: str, poll_s: float = 2.0) -> int:
    """Print the job's log as it grows until the job ends; 0 if it succeeded, else 1."""
    from ray.job_submission import JobStatus             # RAY

    shown = 0
    while True:
        status = jobs_client.get_job_status(job_id)
        text = jobs_client.get_job_logs(job_id)
        print(text[shown:], end="", flush=True)
        shown = len(text)
        if status.is_terminal():
            break
        time.sleep(poll_s)
    info = jobs_client.get_job_info(job_id)
    print(f"job {job_id} {status.value}" + (f": {info.message}" if info.message else ""), flush=True)
    missing = missing_dependency(text) if status != JobStatus.SUCCEEDED else ""
    if missing:
        print(f"error: the job's Python has no {missing!r}: the nodes lack the project's dependencies; name the "
              f"interpreter that has them with --python /path/to/venv/bin/python, or let Ray install them with "
              f"--uv (docs/cluster.md)", file=sys.stderr, flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def missing_dependency(log: str) -> str:
    """The top-level module a job's log says it could not import ("" if none): the usual sign of
    nodes whose ``python`` is not the project's environment."""
    found = re.findall(r"ModuleNotFoundError: No module named '([\w.]+)'", log)
    return found[-1].split(".")[0] if found else ""


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="e.g. python -m jobs.submit train --config jobs/configs/A-256.yaml "
                                       "--set data.root=/mnt/shared/imagenet-shards")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
                   or DEFAULT_ADDRESS, help="the cluster's Jobs API (dashboard) URL; default as `ray job submit`: "
                   f"$RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else {DEFAULT_ADDRESS}")
    p.add_argument("--python", default="",
                   help="the interpreter on the nodes that has the project's dependencies (default: the nodes' "
                        "`python`); it runs the driver and, as Ray's py_executable, the workers")
    p.add_argument("--uv", action="store_true",
                   help="have Ray install the project's requirements on each node (runtime_env uv) instead of "
                        "using the nodes' own environment")
    p.add_argument("--submission-id", default="", help="the job's id (default: <run name>-<time>)")
    p.add_argument("--no-wait", action="store_true", help="return once the job is accepted")
    p.add_argument("--print-only", action="store_true",
                   help="print the entrypoint and runtime environment, submit nothing")
    p.add_argument("job", help=f"the entry point to run: {', '.join(JOBS)}")
    p.add_argument("args", nargs=argparse.REMAINDER, help="its arguments, as for python -m jobs.<job>")
    args = p.parse_args(argv)
    if args.job not in JOBS:
        raise cli.UsageError(f"job {args.job!r}: this wrapper submits {', '.join(JOBS)}; submit other entry "
                              f"points with `ray job submit` and absolute paths (docs/cluster.md)")
    if args.python and args.uv:
        raise cli.UsageError("--python and --uv both say where the dependencies come from: give one")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    check_address(args.address)
    here = Path.cwd()
    commit = tracking.git_commit(REPO)
    entrypoint, cfg = train_entrypoint(args.args, here, args.python or "python", commit)
    env = runtime_env(args.python, args.uv)
    sid = args.submission_id or f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    metadata = {"git_commit": commit, "run_name": cfg.run.name, "submitted_from": str(here)}
    if args.print_only:
        print(json.dumps({"entrypoint": entrypoint, "runtime_env": env, "metadata": metadata,
                          "submission_id": sid}, indent=2))
        return 0
    if cfg.tracking.enabled and cfg.tracking.uri.startswith("sqlite:"):
        print(f"note: MLflow store {cfg.tracking.uri} is a file: every node must see it at that path "
              f"(one machine, or shared storage); a cluster wants a server (docs/cluster.md)", flush=True)
    jobs_client = client(args.address)
    try:
        job_id = jobs_client.submit_job(entrypoint=entrypoint, runtime_env=env, metadata=metadata,
                                        submission_id=sid)
    except RuntimeError as e:   # the Jobs API's answer, e.g. a submission id already taken
        raise cli.UsageError(f"the cluster at {args.address} refused the job: {str(e).splitlines()[0]}") from e
    print(f"submitted job {job_id} to {args.address} (commit {commit}): {entrypoint}", flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs --follow {job_id} --address {args.address}")
        return 0
    return follow(jobs_client, job_id)


if __name__ == "__main__":
    sys.exit(cli.run(main))
