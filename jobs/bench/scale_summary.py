"""The goals of ``python -m jobs.bench scale`` and its ``--summary`` table over several N.

Goals at one N (judged from one result file): the warm dry run within 30 s; every loader's start within
5 s per rank; a rerun with nothing new within 1 % of the first preprocess's wall time, one with 1 % new
images within 3 %; merging within 5 ms per image; at ImageNet's size (1,281,167) no entry point's
driver above 2 GB. Over several N: each stage's growth exponent log(t2/t1)/log(N2/N1) between the two
largest N, at most 1.1 (judged between 100,000 and 1,281,167).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

FULL = 1_281_167
EXPONENT_GOAL = 1.1
NOT_SCALED = ("generate", "merge")     # the source is not a goal; merging is timed per image, not at N


def _goal(name: str, figure, limit: float, unit: str, applies: bool = True) -> dict:
    met = None if figure is None else figure <= limit   # shown also where not judged
    return {"goal": name, "figure": figure, "limit": limit, "unit": unit, "applies": applies, "met": met}


def _fig(stages: dict, stage: str, key: str):
    value = stages.get(stage, {}).get(key)
    return value if isinstance(value, (int, float)) else None


def merge_ms(fig: dict):
    """The vectorised merge's ms per image from ``jobs.bench.merge.measure``'s figures (whatever its
    key names: the one naming the vectorised version, else the smallest ms-per-image figure)."""
    rates = {k: v for k, v in fig.items() if "ms" in k and isinstance(v, (int, float)) and "image" in k}
    vector = [v for k, v in rates.items() if "vector" in k]
    return vector[0] if vector else (min(rates.values()) if rates else None)


def goals_at(doc: dict) -> list[dict]:
    """Every goal one result file can judge (``met`` None where its figure is missing or it does not apply)."""
    s, n = doc["stages"], doc["images"]
    first = _fig(s, "preprocess", "seconds")
    out = [_goal("warm dry run (s)", _fig(s, "dry_run_warm", "seconds"), 30, "s")]
    for name in ("loader_train", "loader_val", "loader_train_boxes", "loader_val_boxes"):
        out.append(_goal(f"{name} start per rank (s)", _fig(s, name, "start_s_per_rank_max"), 5, "s"))
    for name, limit in (("rerun", 0.01), ("rerun_added", 0.03)):
        t = _fig(s, name, "seconds")
        out.append(_goal(f"{name} / first preprocess", t / first if t is not None and first else None, limit,
                         "fraction"))
    out.append(_goal("merge (ms/image)", merge_ms(s.get("merge", {})), 5, "ms"))
    drivers = {k: v["peak_rss_mb"] for k, v in s.items() if isinstance(v.get("peak_rss_mb"), (int, float))}
    worst = max(drivers, key=drivers.get) if drivers else None
    over = sorted((k for k, v in drivers.items() if v > 2000), key=drivers.get, reverse=True)
    out.append({**_goal("largest driver peak RSS (MB)", drivers.get(worst), 2000, "MB", applies=n >= FULL),
                "stage": ", ".join(over) if over else worst})
    return out


def exponent(t1, t2, n1: int, n2: int):
    if not (t1 and t2) or n1 == n2:
        return None
    return math.log(t2 / t1) / math.log(n2 / n1)


# Figures inside a stage that say more than its process's wall time (which includes Python's start and
# its imports): shown as rows of their own, "<stage>.<figure>", with their exponents.
INNER = {"start_s_per_rank_max": "start per rank", "cold_s": "cold check", "log_dataset_s": "log_dataset",
         "check_s": "exactly-once check"}


def _rows_of(docs: list[dict]) -> list[tuple[str, list[dict]]]:
    """(row name, that row's figures in each doc): every stage, then its INNER figures as
    {"seconds": value} rows."""
    stages = list(dict.fromkeys(k for d in docs for k in d["stages"]))
    out = []
    for stage in stages:
        figs = [d["stages"].get(stage, {}) for d in docs]
        out.append((stage, figs))
        for key, what in INNER.items():
            if any(key in f for f in figs):
                out.append((f"{stage} ({what})", [{"seconds": f.get(key), "skipped": f.get("skipped")} for f in figs]))
    return out


def summarize(paths: list[str]) -> dict:
    """The table's rows (stage x N: seconds, CPU s, driver RSS; exponents) and every goal met/missed."""
    docs = sorted((json.loads(Path(p).read_text()) for p in paths), key=lambda d: d["images"])
    ns = [d["images"] for d in docs]
    rows, goals = [], []
    for stage, figs in _rows_of(docs):
        row = {"stage": stage, "seconds": [_num(f, "seconds") for f in figs],
               "cpu_s": [_num(f, "cpu_s") for f in figs], "rss_mb": [_num(f, "peak_rss_mb") for f in figs],
               "skipped": [f.get("skipped") or f.get("error") for f in figs]}
        if len(docs) > 1:
            row["exponent"] = exponent(row["seconds"][-2], row["seconds"][-1], ns[-2], ns[-1])
            row["cpu_exponent"] = exponent(row["cpu_s"][-2], row["cpu_s"][-1], ns[-2], ns[-1])
            if stage.split(" ")[0] not in NOT_SCALED:    # wall (the goal) and CPU (steadier when shared)
                for key, what in (("exponent", "wall"), ("cpu_exponent", "CPU")):
                    if row[key] is None and key == "cpu_exponent":
                        continue
                    goals.append(_goal(f"{stage} growth exponent ({what}) {ns[-2]:,} -> {ns[-1]:,}", row[key],
                                       EXPONENT_GOAL, "", applies=ns[-1] >= FULL and ns[-2] >= 100_000))
        rows.append(row)
    return {"images": ns, "rows": rows, "goals": goals_at(docs[-1]) + goals}


def _num(fig: dict, key: str):
    v = fig.get(key)
    return v if isinstance(v, (int, float)) else None


def table(summary: dict) -> str:
    """Markdown: one row per stage, seconds and driver RSS (MB) at each N, the exponents; then the goals."""
    ns = summary["images"]
    head = ["stage"] + [f"s @ {n:,}" for n in ns] + [f"MB @ {n:,}" for n in ns] + ["exp (wall)", "exp (CPU)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["rows"]:
        secs = [_cell(v, skip) for v, skip in zip(r["seconds"], r["skipped"])]
        cells = [r["stage"], *secs, *map(_cell, r["rss_mb"]), _cell(r.get("exponent"), digits=2),
                 _cell(r.get("cpu_exponent"), digits=2)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| goal | figure | limit | met |", "|---|---|---|---|"]
    for g in summary["goals"]:
        met = {True: "met", False: "MISSED", None: "n/a"}[g["met"]]
        if not g["applies"]:
            met = f"{met} (not judged at this N)"
        lines.append(f"| {g['goal']}{' [' + g['stage'] + ']' if g.get('stage') else ''} | "
                      f"{_cell(g['figure'], digits=3)} | {g['limit']:g} | {met} |")
    return "\n".join(lines)


def _cell(v, skip=None, digits: int = 1) -> str:
    if v is None:
        return "skipped" if skip else "n/a"
    return f"{v:,.{digits}f}"
