"""What a run tells people: per split what was stored and its boxes, every entry under SOURCE accounted
for (kept, converted, resized, quarantined with its reason, or skipped), and warnings; and the full list
behind it (``python -m jobs.preprocess report OUT``: also every rejected box with its reason, and every
annotation row or object that could not be read).

Entries under SOURCE that are no input (label files, other extensions, hidden files, links that cannot
be followed) are kept per run in ``OUT/.preprocess/skipped.parquet``; quarantined inputs are manifest
rows.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing.annotations import is_duplicate
from preprocessing.plan import STATE_DIR
from preprocessing.sources import Layout
from storage import dataformat as fmt
from storage.dataformat import DataError
from storage.files import write_if_changed

SKIPPED = "skipped.parquet"
BOX_PROBLEMS = "box_problems.json"  # the last run's annotation rows or objects not used (unreadable, repeated)
SKIPPED_SCHEMA = pa.schema([("source", pa.string()), ("status", pa.string()), ("reason", pa.string())])
SHOWN = 10  # quarantined or skipped entries a run's summary shows


def skipped_path(out: Path) -> Path:
    return out / STATE_DIR / SKIPPED


def _write_skipped(out: Path, others: list[tuple[str, str, str]]) -> None:
    table = pa.Table.from_pylist([dict(zip(SKIPPED_SCHEMA.names, o)) for o in others], schema=SKIPPED_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_if_changed(skipped_path(out), sink.getvalue().to_pybytes())


def _rows(out: Path, split: str, info: dict, columns: list[str]) -> list[dict]:
    return fmt.read_manifest(out, split, columns=columns, info=info).to_pylist()


def summarize(out: Path, layout: Layout, changes: dict, written: dict, log) -> dict:
    """Log the run's summary; returns {split: counts} and {"SOURCE": accounting of SOURCE's entries}."""
    info = fmt.read_info(out)
    summary = {}
    for split in layout.splits:
        s = info["splits"][split]
        c = summary[split] = {"inputs": s["inputs"], "stored": s["num_samples"], **s["counts"],
                              "shards": len(s["shards"]), **{k: len(v) for k, v in changes[split].items()},
                              "shards_written": written.get(split, 0)}
        log(f"{split}: {c['inputs']} inputs -> {c['stored']} stored ({c['kept']} kept, {c['converted']} "
            f"converted, {c['resized']} resized), {c['quarantined']} quarantined; {c['shards']} shards, "
            f"{c['shards_written']} written this run")
        if fmt.SPLIT_BOXES in s:
            b = c["boxes"] = s[fmt.SPLIT_BOXES]
            log(f"{split}: boxes: {b['images']} of {c['stored']} stored images have boxes ({b['boxes']} boxes, "
                f"{b['clipped']} clipped into the image, {b['rejected']} rejected); {b['without']} have no "
                "annotation")
    _write_skipped(out, layout.others)
    _box_problems(out, layout, log)
    _warn_boxes_not_stored(out, layout, info, log)
    summary["SOURCE"] = _account(out, layout, info, log)
    _warn_classes_without_val(out, info, log)
    return summary


def _box_problems(out: Path, layout: Layout, log) -> None:
    """Log the annotation rows or objects not used, counted by kind (the first ``SHOWN`` of them), and
    keep them all for ``report``."""
    path = out / STATE_DIR / BOX_PROBLEMS
    if layout.boxes or path.is_file():
        write_if_changed(path, (json.dumps(layout.box_problems, indent=0) + "\n").encode())
    if layout.box_problems:
        repeated = sum(map(is_duplicate, layout.box_problems))
        log(f"annotations: {len(layout.box_problems) - repeated} rows or objects could not be read"
            + (f", {repeated} rows repeat an earlier row's image id" if repeated else "")
            + f" (all of them: python -m jobs.preprocess report {out}):")
        for line in layout.box_problems[:SHOWN]:
            log(f"  {line}")


def _warn_boxes_not_stored(out: Path, layout: Layout, info: dict, log) -> None:
    """Stored images that an annotation names but whose shard has no boxes: written before their
    annotation was there (or before preprocessing read boxes). Shards are never rewritten, so say so."""
    for split, boxes in layout.boxes.items():
        late = [r["source"] for r in _rows(out, split, info, ["source", "status", "boxes"])
                if r["status"] != "quarantined" and r["boxes"] is None and r["source"] in boxes]
        if late:
            log(f"warning: {split}: {len(late)} stored images have an annotation now but were written without "
                f"one (their shards stay as they are; rebuild into a fresh OUT to include their boxes): "
                + ", ".join(late[:5]) + (" ..." if len(late) > 5 else ""))


def _account(out: Path, layout: Layout, info: dict, log) -> dict:
    """Every entry under SOURCE now: the status of its manifest row, or skipped / quarantined."""
    entries = []  # (status, path, reason)
    for split, inputs in layout.splits.items():
        rows = {r["source"]: r for r in _rows(out, split, info, ["source", "status", "reason"])}
        entries += [(rows[i.source]["status"], i.source, rows[i.source]["reason"]) for i in inputs]
    entries += [(status, path, reason) for path, status, reason in layout.others]
    counts = dict.fromkeys((*fmt.STATUSES, "skipped"), 0)
    for status, _, _ in entries:
        counts[status] += 1
    log(f"SOURCE {layout.root}: {len(entries)} files: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    odd = sorted((e for e in entries if e[0] in ("quarantined", "skipped")), key=lambda e: (e[0], e[1]))
    if odd:
        log(f"quarantined or skipped ({min(SHOWN, len(odd))} of {len(odd)}; all of them: "
            f"python -m jobs.preprocess report {out}):")
        for status, path, reason in odd[:SHOWN]:
            log(f"  {status:<11}  {path}: {reason}")
    return {"files": len(entries), **counts}


def _warn_classes_without_val(out: Path, info: dict, log) -> None:
    """A class without validation images has no measurable val error: say so (a new class, typically)."""
    if "val" not in info["splits"]:
        return
    have = {r["label"] for r in _rows(out, "val", info, ["label", "status"]) if r["status"] != "quarantined"}
    missing = [c for c in info["classes"] if c["index"] not in have]
    if missing:
        log(f"warning: {len(missing)} of {len(info['classes'])} classes have no val images, so their val "
            "error cannot be measured: " + ", ".join(f"{c['index']} {c['wnid']} ({c['name']})" for c in missing[:10])
            + (" ..." if len(missing) > 10 else ""))


def report_lines(out) -> list[str]:
    """Every quarantined input (all splits) and every skipped or quarantined other entry of the last
    run's SOURCE, one a line, then the counts and the history of runs."""
    out = Path(out)
    info = fmt.read_info(out)
    lines, quarantined, rejected = [], 0, 0
    for split in info["splits"]:
        for r in _rows(out, split, info, ["source", "status", "reason", "boxes_rejected"]):
            if r["status"] == "quarantined":
                lines.append(f"quarantined  {r['source']}: {r['reason']}")
                quarantined += 1
            for why in r["boxes_rejected"] or []:
                lines.append(f"box rejected {r['source']}: {why}")
                rejected += 1
    for line in read_box_problems(out):
        lines.append(f"box {'repeated' if is_duplicate(line) else 'unreadable'} {line}")
    others = pq.read_table(skipped_path(out)).to_pylist() if skipped_path(out).is_file() else []
    lines += [f"{o['status']:<11}  {o['source']}: {o['reason']}" for o in others]
    skipped = sum(o["status"] == "skipped" for o in others)
    lines.append(f"{quarantined} quarantined inputs (manifests of {', '.join(info['splits'])}); "
                 f"{skipped} skipped and {len(others) - skipped} quarantined other entries of SOURCE "
                 f"(its listing by the last run)" + (f"; {rejected} rejected boxes" if rejected else ""))
    for split, s in info["splits"].items():
        if fmt.SPLIT_BOXES in s:
            b = s[fmt.SPLIT_BOXES]
            lines.append(f"{split}: {b['images']} of {s['num_samples']} stored images have boxes ({b['boxes']} "
                         f"boxes, {b['clipped']} clipped, {b['rejected']} rejected); {b['without']} have no "
                         "annotation")
    for h in fmt.read_history(out):
        added = ", ".join(f"{split} +{a.get('inputs', 0)} inputs" for split, a in h.get("added", {}).items())
        boxes = "".join(f"; {split} boxes from {Path(a['file']).name} sha256 {a['sha256'][:12]} ({len(a['shards'])} "
                        "new shards)" for split, a in h.get("annotations", {}).items())
        lines.append(f"run {h['run']}: {h.get('when') or h.get('note')}; {h.get('source', '')}; {added}; "
                     f"classes added {len(h.get('classes_added', []))}; git {h.get('git_commit', '?')}{boxes}")
    return lines


def read_box_problems(out: Path) -> list[str]:
    """The last run's annotation problems ([] when it had none). A damaged file is a DataError naming it."""
    path = out / STATE_DIR / BOX_PROBLEMS
    if not path.is_file():
        return []
    try:
        lines = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # not JSON or UTF-8, a number past 4300 digits, nested too deep
        lines = ValueError(str(e)[:200])
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        raise DataError(f"{path} is damaged ({lines if isinstance(lines, ValueError) else 'not a list of lines'}); "
                        f"rerun python -m jobs.preprocess SOURCE {out}, which writes it again")
    return lines
