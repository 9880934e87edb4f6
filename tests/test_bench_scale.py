"""``python -m jobs.bench scale``: the result file's shape at a small N (the fast stages, each in its own
child process as the bench runs them), and the summary's exponents and goals from two such files.
No timing is asserted: the figures are whatever this machine measures."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.bench import scale, scale_summary

REPO = Path(__file__).resolve().parents[1]
N = 1000                          # imagenet_shape's smallest tree: one image a class
# merge is left out: jobs.bench.merge at ImageNet's box density takes CPU-minutes even on a few images
FAST = ["generate", "preprocess", "report", "rerun", "index", "loader_val", "gather", "rerun_added"]


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("scale")
    out = work / "result.json"
    scale.main(["--images", str(N), "--work", str(work / "work"), "--out", str(out), "--stages", ",".join(FAST)])
    return json.loads(out.read_text()), work


def test_every_chosen_stage_has_its_figures_or_a_skip_reason(result):
    doc, work = result
    assert doc["images"] == N and list(doc["stages"]) == FAST
    for name, fig in doc["stages"].items():
        assert "error" not in fig, (name, fig["error"], (work / "work" / "logs" / f"{name}.log"))
        if "skipped" in fig:
            assert isinstance(fig["skipped"], str) and fig["skipped"]
            continue
        assert fig["seconds"] > 0 and fig["cpu_s"] > 0 and fig["peak_rss_mb"] > 0, name
    assert len(doc["load_avg_start"]) == 3 and len(doc["load_avg_end"]) == 3
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["cpu"]
    assert doc["stages"]["generate"]["found_complete"] is False and doc["stages"]["generate"]["train"] == N


def test_the_stages_measure_what_they_name(result):
    doc, work = result
    s = doc["stages"]
    stored = json.loads((work / "work" / "out" / "dataset.json").read_text())["splits"]
    assert s["preprocess"]["images"] == stored["train"]["num_samples"] + stored["val"]["num_samples"] - s[
        "rerun_added"]["images_added"]
    assert s["preprocess"]["children_cpu_s"] > 0         # the two workers' CPU, apart from the driver's
    assert s["rerun_added"]["images_added"] == s["rerun_added"]["source_new_train"] + s["rerun_added"]["source_new_val"]
    assert s["gather"]["images"] == stored["val"]["num_samples"] - s["rerun_added"]["source_new_val"]
    assert [r["samples"] for r in s["loader_val"]["ranks"]] == [s["gather"]["images"]] * 2
    assert s["index"]["entries"] == s["preprocess"]["images"]
    # SOURCE is as generate left it: no added file remains, and the marker of the added images is gone
    source = Path(doc["source"])
    assert not (source / ".imagenet-shape-added.json").exists()
    assert not list((source / "train").glob("n99999999*"))
    goals = {g["goal"]: g for g in doc["goals"]}
    assert goals["rerun / first preprocess"]["figure"] == pytest.approx(
        s["rerun"]["seconds"] / s["preprocess"]["seconds"])
    assert goals["warm dry run (s)"]["met"] is None      # not run here: no figure, nothing judged


def _at(doc: dict, images: int, factor: float) -> dict:
    """``doc`` as if measured at ``images`` with every stage's seconds and CPU seconds times ``factor``."""
    other = copy.deepcopy(doc)
    other["images"] = images
    for fig in other["stages"].values():
        for key in ("seconds", "cpu_s"):
            if key in fig:
                fig[key] *= factor
    return other


def test_summary_computes_the_exponents_and_the_goals(result, tmp_path, capsys):
    doc, _ = result
    small, large = _at(doc, 100_000, 1.0), _at(doc, scale_summary.FULL, 1.0)
    large["stages"]["rerun"]["seconds"] = large["stages"]["preprocess"]["seconds"] * 0.5   # far over 1 %
    large["stages"]["report"]["seconds"] = small["stages"]["report"]["seconds"] * (scale_summary.FULL / 100_000) ** 2
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for p, d in zip(paths, (large, small)):            # out of order on purpose: sorted by N
        p.write_text(json.dumps(d))
    summary = scale.main(["--summary", *map(str, paths)])
    rows = {r["stage"]: r for r in summary["rows"]}
    assert summary["images"] == [100_000, scale_summary.FULL]
    assert rows["preprocess"]["exponent"] == pytest.approx(0.0, abs=1e-9)
    assert rows["report"]["exponent"] == pytest.approx(2.0)
    start = doc["stages"]["loader_val"]["start_s_per_rank_max"]   # a stage's inner figure: a row of its own
    assert rows["loader_val (start per rank)"]["seconds"] == [start, start]
    goals = {g["goal"]: g for g in summary["goals"]}
    assert goals[f"report growth exponent (wall) 100,000 -> {scale_summary.FULL:,}"]["met"] is False
    assert goals[f"preprocess growth exponent (wall) 100,000 -> {scale_summary.FULL:,}"]["met"] is True
    assert goals[f"preprocess growth exponent (CPU) 100,000 -> {scale_summary.FULL:,}"]["applies"] is True
    assert goals["rerun / first preprocess"]["met"] is False
    assert not any(g["goal"].startswith(("generate", "merge ")) and "exponent" in g["goal"] for g in summary["goals"])
    table = capsys.readouterr().out
    assert "| report |" in table and "MISSED" in table and f"s @ {scale_summary.FULL:,}" in table


def test_exponent_is_the_log_ratio():
    assert scale_summary.exponent(2.0, 20.0, 10, 100) == pytest.approx(1.0)
    assert scale_summary.exponent(1.0, 8.0, 1, 2) == pytest.approx(math.log(8) / math.log(2))
    assert scale_summary.exponent(None, 1.0, 1, 2) is None


@pytest.mark.parametrize("argv, names", [(["--images", "10", "--stages", "preprocess,nope"], "nope"),
                                         (["--summary", "/nonexistent/x.json"], "/nonexistent/x.json"),
                                         ([], "--images")])
def test_bad_options_are_one_error_line_and_no_result(argv, names, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "jobs.bench", "scale", *argv, "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], proc.stderr
    assert not out.exists()
