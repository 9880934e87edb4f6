"""What an output folder remembers between runs: the options and classes that built it
(``OUT/.preprocess/state.json``) and the history of runs that changed it (``OUT/history.json``).

A rerun takes every option it is not given from ``state.json``; an option given with another value than
the recorded one is an error naming it (the shards already written were cut and shuffled with the
recorded ones). Classes found in SOURCE that OUT lacks are appended after the recorded ones, so an
existing class index never changes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from preprocessing import boxfiles
from preprocessing import manifest as mf
from preprocessing.lock import LOCK
from preprocessing.plan import STATE_DIR, normal_shard_size, read_plan
from preprocessing.sources import ClassInfo, Layout, discover
from storage import dataformat as fmt
from storage.dataformat import DataError
from storage.files import TMP_PREFIX, write_if_changed

STATE = "state.json"
DEFAULTS = {"seed": 0, "shard_size": 1000, "max_side": None}
FLAGS = {"seed": "--seed", "shard_size": "--shard-size", "max_side": "--max-side"}


@dataclass(frozen=True)
class Options:
    seed: int
    shard_size: int | str  # a sample count, or "<bytes>B"
    max_side: int | None
    splits: tuple[str, ...] | None  # this run's; None: found in SOURCE (train and val where present)
    record_splits: tuple[str, ...] | None  # what state.json keeps for the next run without --split

    def recorded(self) -> dict:
        """dataset.json's ``options``."""
        return {"shard_size": self.shard_size, "max_side": self.max_side}


def state_path(out: Path) -> Path:
    return out / STATE_DIR / STATE


def prepare(out: Path, source, given: dict, splits, log) -> tuple[Options, Layout]:
    """Resolve this run's options against OUT's record, list SOURCE with OUT's classes first, and
    record the result in state.json (written only when it changes). ``given``: option -> value, None
    when not given."""
    if given["max_side"] is not None and given["max_side"] < 16:
        raise DataError(f"--max-side {given['max_side']}: must be at least 16 pixels")
    given = {**given, "shard_size": None if given["shard_size"] is None else normal_shard_size(given["shard_size"])}
    path = state_path(out)
    have = json.loads(path.read_text()) if path.is_file() else None
    if have is None:
        _refuse_foreign(out)
        opts = Options(*(DEFAULTS[k] if given[k] is None else given[k] for k in FLAGS),
                       tuple(splits) if splits else None, tuple(splits) if splits else None)
        known = None
    else:
        opts = _against_record(out, have, given, splits)
        known = [ClassInfo(*c[:3]) for c in have["classes"]]
    layout = discover(source, opts.splits, known)
    boxfiles.attach(layout)
    if have is not None:
        _refuse_another_source(out, layout, have)
    for note in layout.notes:
        log(note)
    if layout.new_classes and known:
        log(f"classes: {len(layout.new_classes)} new, appended after the {len(known)} that {out} has: "
            + ", ".join(f"{c.index} {c.wnid} ({c.name})" for c in layout.new_classes[:10])
            + (" ..." if len(layout.new_classes) > 10 else ""))
    state = {"format": fmt.FORMAT, "seed": opts.seed, "options": opts.recorded(),
             "splits": list(opts.record_splits) if opts.record_splits else None,
             "classes": [[c.index, c.wnid, c.name] for c in layout.classes],
             "source": have.get("source", str(layout.root)) if have else str(layout.root)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_if_changed(path, (json.dumps(state, indent=1) + "\n").encode())
    return opts, layout


def _against_record(out: Path, have: dict, given: dict, splits) -> Options:
    if have.get("format") != fmt.FORMAT:
        raise DataError(f"{state_path(out)}: format {have.get('format')!r}; this version writes format "
                        f"{fmt.FORMAT}. Use a fresh OUT folder")
    recorded = {"seed": have["seed"], **have["options"]}
    conflicts = [f"{FLAGS[k]} {given[k]} (OUT has {recorded[k]})" for k in FLAGS
                 if given[k] is not None and given[k] != recorded[k]]
    if conflicts:
        raise DataError(f"{out} was built with other options ({state_path(out)}): {', '.join(conflicts)}. "
                        "Leave an option out to reuse the recorded value, or write to a fresh OUT folder")
    # --split picks the splits this run updates; without it, the ones OUT was built with. A rerun
    # without --split updates every split an explicit --split ever added.
    old = tuple(have["splits"]) if have.get("splits") else None
    use = tuple(splits) if splits else old
    keep = tuple(sorted(set(old) | set(use))) if old else None
    return Options(recorded["seed"], recorded["shard_size"], recorded["max_side"], use, keep)


def _refuse_foreign(out: Path) -> None:
    """An OUT without state.json must hold nothing but our own lock and temp files."""
    foreign = [p.name for p in out.iterdir()
               if not p.name.startswith((TMP_PREFIX, LOCK)) and p.name != STATE_DIR]
    if foreign:
        hint = " (it has a dataset.json but no .preprocess state)" if fmt.DATASET_JSON in foreign else ""
        raise DataError(f"{out} is not empty and was not written by this tool{hint}: it holds "
                        f"{', '.join(sorted(foreign)[:5])}; use an empty or new OUT folder")


def _refuse_another_source(out: Path, layout: Layout, have: dict) -> None:
    """SOURCE may move (inputs are matched by their path relative to it), but one that shares no file
    with OUT's plans is another dataset: adding it would only report every old file as gone."""
    planned = set()
    for split in layout.splits:
        planned |= {r["source"] for r in read_plan(out, split)}
    current = {i.source for inputs in layout.splits.values() for i in inputs}
    if planned and not planned & current:
        raise DataError(f"{layout.root} holds none of the {len(planned)} files that {out} was built from "
                        f"({have.get('source')}); is it the same dataset? Use a fresh OUT folder for another one")


# ---- history.json ----------------------------------------------------------------------------------------

def lineage(out: Path, prev: dict | None, info: dict, opts: Options, layout: Layout, git_commit: str):
    """(history with this run appended, its run number). Class entries of ``info`` get the run that
    added them. A run that publishes nothing new (same fingerprint as the last entry) adds no entry."""
    history = fmt.read_history(out)
    if prev is not None and not history:  # built before history.json existed
        history = [{"run": 0, "when": None, "note": "written before history.json existed",
                    "fingerprint": prev.get("fingerprint")}]
    if history and history[-1].get("fingerprint") == info["fingerprint"]:
        run = history[-1]["run"]  # recorded by a run killed before it published dataset.json
    else:
        run = len(history)
    before = {c["wnid"]: c.get(fmt.CLASS_RUN, 0) for c in (prev or {}).get("classes", [])}
    for c in info["classes"]:
        c[fmt.CLASS_RUN] = before.get(c["wnid"], run)
    if run == len(history):
        history.append(_entry(run, prev, info, opts, layout, git_commit))
    return history


def _entry(run: int, prev: dict | None, info: dict, opts: Options, layout: Layout, git_commit: str) -> dict:
    old = (prev or {}).get("splits", {})
    added = {}
    for split, s in info["splits"].items():
        o = old.get(split, {})
        now = {"inputs": s["inputs"], "stored": s["num_samples"], **s["counts"], "shards": len(s["shards"])}
        was = {"inputs": o.get("inputs", 0), "stored": o.get("num_samples", 0), **o.get("counts", {}),
               "shards": len(o.get("shards", []))}
        added[split] = {k: v - was.get(k, 0) for k, v in now.items()}
    return {"run": run, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": str(layout.root), "options": {"seed": opts.seed, **opts.recorded(),
                                                    "splits": list(opts.splits) if opts.splits else None},
            "git_commit": git_commit, "tool_version": mf.tool_version(),
            "classes_added": [c["wnid"] for c in info["classes"] if c[fmt.CLASS_RUN] == run],
            "added": added, "fingerprint": info["fingerprint"]}


def write_history(out: Path, history: list[dict]) -> None:
    write_if_changed(fmt.history_path(out), (json.dumps(history, indent=1) + "\n").encode())

