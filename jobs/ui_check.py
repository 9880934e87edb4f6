"""Look at the demo's runs in the MLflow UI as a person would: ``make ui-check`` (``python -m jobs.ui_check``).

1. makes sure ``demo-out/`` holds what a user of ``make demo`` looks at: two finished training runs
   of the experiment ``vgg-demo`` and a registered model (runs ``python -m jobs.demo`` with
   ``tracking.register_model`` as often as needed: about 90 s each);
2. starts ``mlflow ui`` on the demo's store, on 127.0.0.1 and a free port;
3. opens, in headless Chromium (Debian's ``chromium``; Playwright drives it, downloads no browser),
   the experiment, the newest run, the comparison of the two newest runs and the registered model;
4. fails, naming each, when the rendered pages lack what they should show: the runs, the params and
   metrics, the logged model, the dataset input and its digest, the registered model's versions;
5. saves each page as a PNG under ``<out>/ui-check/`` (``--images``; ``make ui-docs`` writes the README's
   pictures in ``docs/images/``, the only run that touches tracked files).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from jobs import cli

REPO = Path(__file__).resolve().parent.parent
EXPERIMENT, MODEL = "vgg-demo", "vgg-demo"
CHROMIUM = "/usr/bin/chromium"
# A fresh, quiet headless browser: no sandbox (root in a container), no GPU, nothing phoning home.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


# The page's text as a user scrolling through it sees it: long tables (the comparison's metrics)
# render only the rows in view, so every scrollable element is stepped through, then put back.
SCROLL_AND_READ = """async () => {
  const seen = [document.body.innerText];
  const boxes = [document.scrollingElement, ...document.querySelectorAll('*')].filter(
    e => e && e.scrollHeight > e.clientHeight + 8 && (e === document.scrollingElement ||
         /auto|scroll/.test(getComputedStyle(e).overflowY)));
  for (const e of boxes) {
    for (let y = 0; y < e.scrollHeight; y += Math.max(e.clientHeight / 2, 100)) {
      e.scrollTop = y;
      await new Promise(r => setTimeout(r, 100));
      seen.push(document.body.innerText);
    }
    e.scrollTop = 0;
  }
  return seen.join('\\n');
}"""
# MLflow's assistant panel opens by itself in a new browser and covers a third of each screenshot.
QUIET_UI = "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');" \
           "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"


@dataclass
class Page:
    """One view of the UI: its address (after ``#``), the screenshot's name and what it must show."""
    name: str
    route: str
    expect: list[str]
    missing: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# What the demo's store must hold
# ---------------------------------------------------------------------------------------------------

def store_facts(db: Path) -> dict | None:
    """The experiment, its two newest finished training runs (children, the evaluations, left out)
    and the registered model's newest version; None while any is missing."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not db.is_file():
        return None
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None
    runs = [r for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                          order_by=["attributes.start_time DESC"])
            if "mlflow.parentRunId" not in r.data.tags]
    try:
        versions = client.search_model_versions(f"name = '{MODEL}'")
    except MlflowException:
        versions = []
    if len(runs) < 2 or not versions:
        return None
    return {"experiment": exp, "runs": runs[:2], "version": max(versions, key=lambda v: int(v.version)),
            "client": client}


def ensure_demo(out: Path, tries: int = 2) -> dict:
    """``store_facts`` of ``out``, running the demo (registering its model) until they are there."""
    for _ in range(tries + 1):
        facts = store_facts(out / "mlflow.db")
        if facts is not None:
            return facts
        print(f"ui-check: {out} lacks two finished {EXPERIMENT} runs or a registered {MODEL}: running the demo",
              flush=True)
        subprocess.run([sys.executable, "-m", "jobs.demo", "--out", str(out),
                        "--set", f"tracking.register_model={MODEL}"], cwd=REPO, check=True)
    raise AssertionError(f"the demo ran {tries} times and {out} still lacks two runs and a registered model")


def expectations(facts: dict) -> list[Page]:
    """The four views and the text each must render (names, keys and values read from the store)."""
    exp, (new, old), version = facts["experiment"], facts["runs"], facts["version"]
    client = facts["client"]
    dataset = new.inputs.dataset_inputs[0].dataset if new.inputs.dataset_inputs else None
    data = [dataset.name, dataset.digest[:8]] if dataset else ["(no dataset input logged)"]
    models = client.search_logged_models([exp.experiment_id], filter_string=f"source_run_id = '{new.info.run_id}'")
    model = [m.name for m in models][:1] or ["(no logged model)"]
    names = [new.info.run_name, old.info.run_name]
    params = ["model.name", "data.crop_size", "optim.lr", "run.workers"]
    metrics = ["val/top1_err", "val/top5_err", "train/loss"]
    runs = json.dumps([new.info.run_id, old.info.run_id])
    return [
        # MLflow 3.17's UI ignores the experiment's mlflow.experimentKind tag: its GenAI / Model training
        # switch decides (GenAI for a new browser), so the link to give users carries the switch.
        Page("mlflow-experiment", f"/experiments/{exp.experiment_id}?workflowType=machine_learning",
             [EXPERIMENT, *names, *data, MODEL]),
        Page("mlflow-run", f"/experiments/{exp.experiment_id}/runs/{new.info.run_id}",
             [new.info.run_name, *params, *metrics, *data, *model, MODEL]),
        Page("mlflow-compare", f"/compare-runs?runs={urllib.parse.quote(runs)}"
                               f"&experiments={urllib.parse.quote(json.dumps([exp.experiment_id]))}",
             [*names, *params, *metrics]),
        Page("mlflow-model", f"/models/{MODEL}", [MODEL, f"Version {version.version}"]),
    ]


# ---------------------------------------------------------------------------------------------------
# The UI and the browser
# ---------------------------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(out: Path, port: int, log: Path) -> subprocess.Popen:
    """``mlflow ui`` on the demo's store, 127.0.0.1 only, run from ``out`` (so nothing lands in the
    repository), without MLflow's telemetry; returns once it answers /health."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri",
                             f"sqlite:///{out / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=out, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mlflow ui exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise AssertionError(f"mlflow ui did not answer on 127.0.0.1:{port} within 180 s")


def look(base: str, pages: list[Page], images: Path, timeout_s: float = 60) -> None:
    """Open each page in headless Chromium, wait until its expected text is rendered (or the time is
    up), save a screenshot and record in ``page.missing`` what never appeared."""
    from playwright.sync_api import sync_playwright

    images.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ui-check-chromium-") as profile, sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS, viewport={"width": 1600, "height": 1000})
        browser.add_init_script(QUIET_UI)
        try:
            for page in pages:
                tab = browser.new_page()
                tab.goto(f"{base}/#{page.route}", wait_until="load")
                deadline = time.monotonic() + timeout_s
                while True:
                    text = tab.evaluate(SCROLL_AND_READ)
                    page.missing = [e for e in page.expect if e not in text]
                    if not page.missing or time.monotonic() > deadline:
                        break
                    tab.wait_for_timeout(1000)
                tab.screenshot(path=str(images / f"{page.name}.png"))
                tab.close()
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.ui_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out", help="the demo's folder (default: demo-out)")
    p.add_argument("--images", default="", help="where the screenshots go (default: <out>/ui-check; docs/images "
                                                  "only when asked, as make ui-docs does)")
    p.add_argument("--port", type=int, default=0, help="mlflow ui's port on 127.0.0.1 (default: a free one)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not Path(CHROMIUM).is_file():
        raise cli.UsageError(f"no {CHROMIUM}: apt-get update && apt-get install -y chromium chromium-driver")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    images = Path(args.images) if args.images else out / "ui-check"
    pages = expectations(ensure_demo(out))
    port = args.port or free_port()
    ui = start_ui(out, port, out / "mlflow-ui.log")
    try:
        look(f"http://127.0.0.1:{port}", pages, images)
    finally:
        ui.terminate()
        ui.wait(timeout=30)
    for page in pages:
        state = "ok" if not page.missing else "MISSING " + ", ".join(repr(m) for m in page.missing)
        print(f"{page.name:18} {images / (page.name + '.png')}: {state}")
    failed = [page.name for page in pages if page.missing]
    if failed:
        print(f"ui-check failed: {', '.join(failed)} lack what a user of the demo should see", file=sys.stderr)
        return 1
    print(f"ui-check passed: the experiment, a run, the comparison of two runs and the registered model "
          f"{MODEL} show their params, metrics, model and dataset")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
