"""What an output folder remembers between runs: the options and classes that built it
(``OUT/.preprocess/state.json``) and the history of runs that changed it (``OUT/history.json``).

A rerun takes every option it is not given from ``state.json``; an option given with another value than
the recorded one is an error naming it (the shards already written were cut and shuffled with the
recorded ones). Classes found in SOURCE that OUT lacks are appended after the recorded ones, so an
existing class index never changes.

Annotation files are inputs too: state.json and each history entry record every file's sha256, and a
run whose annotations give an image OUT already planned other boxes than it was planned with is
refused, naming the file, before anything is written (shards are never rewritten; a resumed run must
not mix two versions). Annotations that appear for an image planned without one are left out of its
shard, and the run warns (``report``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from preprocessing import boxfiles
from preprocessing import manifest as mf
from preprocessing.annotations import NO_ANNOTATION, box_digest
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
    have = read_state(out)
    if have is None:
        _refuse_foreign(out)
        opts = Options(*(DEFAULTS[k] if given[k] is None else given[k] for k in FLAGS),
                       tuple(splits) if splits else None, tuple(splits) if splits else None)
        known = None
    else:
        opts = _against_record(out, have, given, splits)
        known = [ClassInfo(*c[:3]) for c in have["classes"]]
    layout = discover(source, opts.splits, known)
    read = boxfiles.attach(layout)
    if have is not None:
        _refuse_another_source(out, layout, have)
    layout.notes += _check_annotations(out, layout, read, have)
    for note in layout.notes:
        log(note)
    if layout.new_classes and known:
        log(f"classes: {len(layout.new_classes)} new, appended after the {len(known)} that {out} has: "
            + ", ".join(f"{c.index} {c.wnid} ({c.name})" for c in layout.new_classes[:10])
            + (" ..." if len(layout.new_classes) > 10 else ""))
    state = {"format": fmt.FORMAT, "seed": opts.seed, "options": opts.recorded(),
             "splits": list(opts.record_splits) if opts.record_splits else None,
             "classes": [[c.index, c.wnid, c.name] for c in layout.classes],
             "source": have.get("source", str(layout.root)) if have else str(layout.root),
             "annotations": _annotation_record(have, layout, read)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_if_changed(path, (json.dumps(state, indent=1) + "\n").encode())
    return opts, layout


def read_state(out: Path) -> dict | None:
    """OUT's state.json, or None when it has none. A damaged one is a DataError naming it."""
    path = state_path(out)
    if not path.is_file():
        return None
    try:
        have = json.loads(path.read_bytes())
        why = _state_problem(have)
    except (ValueError, RecursionError) as e:  # not JSON or UTF-8, a number past 4300 digits, nested too deep
        why = str(e)[:200]
    if why:
        raise DataError(f"{path} is damaged ({why}); it records the options and classes {out} was built with, "
                        f"and a run cannot resume or add to {out} without it: restore it from a copy, or "
                        "rebuild into a fresh OUT (the shards, manifests and dataset.json there are untouched)")
    return have


def _state_problem(have) -> str:
    """What makes a parsed state.json unusable ("" if nothing). Another format is _against_record's."""
    if not isinstance(have, dict):
        return f"a JSON {type(have).__name__}, not an object"
    if have.get("format") != fmt.FORMAT:
        return ""
    options, classes = have.get("options"), have.get("classes")
    if type(have.get("seed")) is not int or not isinstance(options, dict) or not isinstance(classes, list):
        return "no seed, options or classes"
    if not {"shard_size", "max_side"} <= options.keys():
        return "options without shard_size or max_side"
    size, side = options["shard_size"], options["max_side"]
    if not (type(size) is int and size >= 1 or isinstance(size, str)) or not (side is None or type(side) is int):
        return f"options shard_size {size!r} or max_side {side!r} not a count (or '<bytes>B') and a side or null"
    if not all(isinstance(c, list) and len(c) >= 3 and type(c[0]) is int and isinstance(c[1], str)
               and isinstance(c[2], str) for c in classes):
        return "a class that is not [index, wnid, name]"
    splits = have.get("splits")
    if not (splits is None or isinstance(splits, list) and all(isinstance(s, str) for s in splits)):
        return "splits not a list of names"
    annotations = have.get("annotations", {})
    if not isinstance(annotations, dict) or not all(
            isinstance(a, dict) and isinstance(a.get("file"), str) and isinstance(a.get("sha256"), str)
            for a in annotations.values()):
        return "annotations not {split: {file, sha256}}"
    return ""


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


# ---- annotation files ------------------------------------------------------------------------------------

def _check_annotations(out: Path, layout: Layout, read: dict, have: dict | None) -> list[str]:
    """Refuse when an annotation file gives an image of SOURCE that OUT planned (written or not) other
    boxes than the plan recorded, or none where it had some; returns notes on a file that changed
    harmlessly (rows of images not planned yet) and on images planned before digests were recorded."""
    recorded = (have or {}).get("annotations") or {}
    notes = []
    for split, inputs in layout.splits.items():
        boxes, present = layout.boxes.get(split, {}), {i.source for i in inputs}
        changed, gone, unknown = [], [], 0
        for r in read_plan(out, split):
            was = r.get("boxes_sha256")
            if r["source"] not in present:  # gone from SOURCE: reported by update_plan, kept in its shard
                continue
            if was is None:
                unknown += 1
            elif was != NO_ANNOTATION and was != box_digest(boxes.get(r["source"])):
                (changed if r["source"] in boxes else gone).append(r["source"])
        old, new = recorded.get(split), read.get(split)
        if changed or gone:
            raise DataError(_changed_boxes(out, layout, old, new, changed, gone))
        if old and old["sha256"] != (new or {}).get("sha256"):
            notes.append(f"{split}: " + (f"{new['file']} changed since {out} last read it" if new else
                                         f"{old['file']} is gone")
                         + "; every image already planned keeps the boxes it was planned with")
        if unknown and boxes:
            notes.append(f"{split}: {unknown} images were planned before their annotations were recorded in "
                         "the plan: a change to their boxes cannot be detected")
    return notes


def _changed_boxes(out: Path, layout: Layout, old: dict | None, new: dict | None, changed: list, gone: list) -> str:
    name = new["file"] if new else (f"{old['file']} (gone)" if old else "annotations (none found now)")
    since = f" (it had sha256 {old['sha256'][:16]}... when {out} last read it)" if old else ""
    return (f"{name}: {len(changed) + len(gone)} images that {out} already planned would get other boxes than they "
            f"were planned with ({len(changed)} changed, {len(gone)} no longer annotated; e.g. "
            f"{(changed or gone)[0]}){since}. Shards are never rewritten and a run must not mix two versions: put "
            f"the file back as it was, or rebuild into a fresh OUT to use it (python -m jobs.preprocess "
            f"{layout.root} NEW_OUT)")


def _annotation_record(have: dict | None, layout: Layout, read: dict) -> dict:
    """state.json's ``annotations``: {split: {file, sha256}} as this run read them, others as recorded."""
    record = dict((have or {}).get("annotations") or {})
    for split in layout.splits:
        if split in read:
            record[split] = read[split]
        else:
            record.pop(split, None)
    return dict(sorted(record.items()))


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
        annotations = (read_state(out) or {}).get("annotations") or {}  # what this run's prepare read
        history.append(_entry(run, prev, info, opts, layout, git_commit, annotations))
    return history


def _entry(run: int, prev: dict | None, info: dict, opts: Options, layout: Layout, git_commit: str,
           annotations: dict) -> dict:
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
            "added": added, "annotations": _built_with(annotations, layout, info, old),
            "fingerprint": info["fingerprint"]}


def _built_with(annotations: dict, layout: Layout, info: dict, old: dict) -> dict:
    """{split: {file, sha256, shards}}: the annotation file this run read and the shards it published.
    Their images' boxes are that file's (every planned image's were checked against it), except for
    images planned without an annotation that the file has now: those stay without boxes."""
    return {split: {**a, "shards": [s for s in info["splits"][split]["shards"]
                                    if s not in old.get(split, {}).get("shards", [])]}
            for split, a in annotations.items() if split in layout.splits and split in info["splits"]}


def write_history(out: Path, history: list[dict]) -> None:
    write_if_changed(fmt.history_path(out), (json.dumps(history, indent=1) + "\n").encode())

