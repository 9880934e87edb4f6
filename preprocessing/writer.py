"""Plan, write and resume shards: SOURCE -> OUT (docs/data-format.md, docs/preprocessing.md).

One run, holding OUT's lock (``preprocessing.lock``) from start to end:
1. resolve the options against OUT's record and list SOURCE, OUT's classes first (``state.prepare``);
2. per split, inputs not in the plan yet form a new generation of shards (``preprocessing.plan``); the
   plan is written (atomically) before any shard, so a killed run resumes the same plan;
3. every planned shard without a finished part file is a job: ``process_shard`` checks its images
   and their annotation boxes (``box_columns``), writes ``<shard>.tar`` then ``<shard>.idx`` then the
   part file (each temp + fsync + rename; the part file is the commit mark). Jobs run through
   ``map_fn``: in-process, a process pool, or Ray tasks;
4. publish: the manifests, then history.json, then dataset.json last (``_assemble``). A reader trusts
   only the shards dataset.json lists and reads the manifest rows it counts, so it never sees a shard
   in the making, even while a run adds to OUT.
Nothing in the output depends on the number of workers or the order in which shards finish.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from preprocessing import manifest as mf
from preprocessing import plan, report, state
from preprocessing.annotations import check_boxes
from preprocessing.check import check_image, quarantine
from preprocessing.lock import Lock
from preprocessing.shards import ShardWriter
from preprocessing.sources import Layout
from preprocessing.walk import problem_of
from storage import dataformat as fmt
from storage.dataformat import DataError
from storage.files import atomic_write, remove_stale_temps

MapFn = Callable[[Callable, Iterable], Iterable]


@dataclass
class ShardJob:
    split: str
    shard: str  # "<split>-NNNNNN"
    source: str  # SOURCE, absolute (shared storage when run as Ray tasks)
    out: str  # OUT, absolute
    rows: list[tuple[str, str, int, str]]  # (key, source path, label, wnid), in shard order
    max_side: int | None
    stats: bool  # accumulate colour statistics (train)
    # key -> its raw annotation boxes [(wnid, x1, y1, x2, y2)] in source pixels; keys absent: no annotation
    boxes: dict[str, list] = field(default_factory=dict)


def preprocess(source, out, splits=None, shard_size=None, seed: int | None = None, max_side: int | None = None,
               workers: int = 1, progress: bool = True, map_fn: MapFn | None = None,
               log: Callable[[str], None] = print, break_lock: bool = False, git_commit: str = "unknown") -> dict:
    """Write (or bring up to date) the shards, manifests, history.json and dataset.json of ``source``
    in ``out``. ``shard_size``, ``seed``, ``max_side`` and ``splits`` left None take OUT's recorded
    values (defaults 1000, 0, off; train and val where present); a given value that differs from the
    recorded one is a ``DataError``. ``git_commit`` (the project's) goes into history.json.

    Returns {split: {inputs, stored, kept, converted, resized, quarantined, shards, added, removed,
    changed, shards_written, and boxes (dataset.json's entry) for a split with annotations}} and
    {"SOURCE": {files, kept, converted, resized, quarantined, skipped}}.
    ``map_fn(fn, jobs)`` yields ``fn(job)`` for every job in any order (default: in-process for
    ``workers == 1``, else a pool of ``workers`` processes).
    """
    if workers < 1:
        raise DataError(f"--workers {workers}: must be at least 1")
    out = Path(out).resolve()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)  # the lock lives in OUT
    lock = Lock(out, log).acquire(break_lock)
    try:
        opts, layout = state.prepare(out, source, {"seed": seed, "shard_size": shard_size,
                                                   "max_side": max_side}, splits, log)
        return _update(out, opts, layout, lock, workers, progress, map_fn, log, git_commit)
    finally:
        lock.release()
        if created and not any(out.iterdir()):
            out.rmdir()  # refused before writing anything: leave no empty OUT behind


def _update(out: Path, opts: state.Options, layout: Layout, lock: Lock, workers: int, progress: bool,
            map_fn: MapFn | None, log, git_commit: str) -> dict:
    for d in (out, out / plan.STATE_DIR, *(out / plan.STATE_DIR / s for s in layout.splits)):
        removed = remove_stale_temps(d)
        if removed:
            log(f"removed {len(removed)} temp file(s) a killed run left in {d}")
    lock.check()
    jobs, changes = [], {}
    for split, inputs in layout.splits.items():
        boxes = layout.boxes.get(split, {})  # planned inputs' boxes are as planned: state.prepare checked
        rows, changes[split] = plan.update_plan(out, split, inputs, opts.seed, opts.shard_size, log, boxes)
        for shard, shard_rows in plan.by_shard(rows).items():
            if not plan.done(out, split, shard, [r["key"] for r in shard_rows]):
                jobs.append(ShardJob(split, shard, str(layout.root), str(out),
                                     [(r["key"], r["source"], r["label"], r["wnid"]) for r in shard_rows],
                                     opts.max_side, split == "train", plan.planned_boxes(shard_rows, boxes)))
    all_splits = sorted(p.name[: -len(".plan.parquet")] for p in (out / plan.STATE_DIR).glob("*.plan.parquet"))
    up_to_date = not jobs and _published(out, all_splits)
    written = _run(jobs, workers, progress, map_fn)
    if not up_to_date:
        lock.check()  # never publish over a writer that took OUT from us
        _assemble(out, layout, opts, all_splits, git_commit)
    summary = report.summarize(out, layout, changes, written, log)
    if up_to_date:
        log(f"nothing to do: {out} already holds every image of {layout.root}")
    return summary


def _published(out: Path, splits: list[str]) -> bool:
    """dataset.json lists every planned input of every split (a run killed before publishing had not)."""
    if not fmt.info_path(out).is_file():
        return False
    listed = fmt.read_info(out)["splits"]
    return all(s in listed and listed[s].get("inputs") == plan.planned_rows(out, s)
               and fmt.manifest_path(out, s).is_file() for s in splits)


def _run(jobs: list[ShardJob], workers: int, progress: bool, map_fn: MapFn | None) -> dict[str, int]:
    """Run the jobs with a progress bar in images/s; returns shards written per split."""
    from tqdm import tqdm

    written: dict[str, int] = {}
    if not jobs:
        return written
    total = sum(len(j.rows) for j in jobs)
    bar = tqdm(total=total, unit="img", disable=not progress, smoothing=0.1, dynamic_ncols=True)
    pool = None
    try:
        if map_fn is None and workers > 1:
            pool = get_context("spawn").Pool(min(workers, len(jobs)))
            results = pool.imap_unordered(process_shard, jobs)
        else:
            results = (map_fn or map)(process_shard, jobs)
        for r in results:
            written[r["split"]] = written.get(r["split"], 0) + 1
            bar.update(r["inputs"])
            bar.set_postfix_str(f"{r['shard']} quarantined {r['quarantined']}", refresh=False)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return written


def process_shard(job: ShardJob) -> dict:
    """Check every image of one planned shard; write its tar, index and part file. Idempotent: the
    same job always writes the same bytes. Returns a small summary (for progress)."""
    t0 = time.perf_counter()
    root, out = Path(job.source), Path(job.out)
    moments = mf.Moments()
    rows, stored = [], 0
    with ShardWriter(out / f"{job.shard}.tar") as tw:
        for key, src, label, wnid in job.rows:
            c = _check(root / src, label, wnid, job.max_side)
            row = {"key": key, "source": src, "label": label, "wnid": wnid, "shard": None,
                   "status": c.status, "reason": c.reason, "width": c.width, "height": c.height,
                   "bytes": 0, "sha256": None}
            if c.data is not None:
                box_bytes = b""
                if key in job.boxes:
                    row.update(box_columns(job.boxes[key], wnid, c))
                    box_bytes = fmt.encode_boxes(row["boxes"]) if row["boxes"] else b""
                tw.add(key, label, c.data, box_bytes)
                row.update(shard=f"{job.shard}.tar", bytes=len(c.data),
                           sha256=hashlib.sha256(c.data).hexdigest())
                stored += 1
                if job.stats:
                    moments.add_image(c.pixels)
            rows.append(row)
        if stored:
            tar_bytes, index, tar_sha256 = tw.commit()
            fmt.write_index(out / f"{job.shard}.idx", index)
            idx_sha256 = hashlib.sha256(fmt.index_text(index).encode("ascii")).hexdigest()  # write_index's bytes
        else:
            tar_bytes, tar_sha256, idx_sha256 = 0, None, None  # all quarantined: no tar (DALI rejects an empty one)
    # Part file: a header line (what plan.done reads), then the manifest rows and colour sums.
    head = {"shard": job.shard, "stored": stored, "tar_bytes": tar_bytes, "tar_sha256": tar_sha256,
            "idx_sha256": idx_sha256, "keys_sha256": plan.keys_sha256([r[0] for r in job.rows])}
    body = {"rows": rows, "moments": moments.to_json() if job.stats else None}
    part_path = plan.part_path(out, job.split, job.shard)
    part_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(part_path, (json.dumps(head) + "\n" + json.dumps(body) + "\n").encode())
    return {"split": job.split, "shard": job.shard, "inputs": len(rows), "stored": stored,
            "quarantined": len(rows) - stored, "seconds": time.perf_counter() - t0}


def box_columns(raw: list, wnid: str, c) -> dict:
    """The manifest's box columns of a stored image with an annotation: its boxes of class ``wnid``
    clipped into the source image (``check_boxes``) and scaled to the stored one when it was resized;
    every other box rejected with its reason, in the annotation's order. Values are float32, the box
    member's, so the manifest and the shard agree bit for bit."""
    w, h = c.resized_from or (c.width, c.height)
    sx, sy = c.width / w, c.height / h
    kept, rejected, clipped = [], [], 0
    for box in raw:
        if box[0] != wnid:  # the contract: every box of a sample is of the sample's class
            rejected.append(_describe(box, f"class {box[0]}, not the image's class {wnid}"))
            continue
        checked = check_boxes([box], w, h)
        for _, x1, y1, x2, y2 in checked.kept:
            kept += [float(np.float32(v)) for v in (x1 * sx, y1 * sy, x2 * sx, y2 * sy)]
        clipped += checked.clipped
        rejected += [_describe(b, why) for b, why in checked.rejected]
    return {"boxes": kept, "boxes_clipped": clipped, "boxes_rejected": rejected}


def _describe(box, why: str) -> str:
    wnid, *coords = box
    return f"{wnid} {' '.join(f'{v:g}' for v in coords)}: {why}"


def _check(path: Path, label: int, wnid: str, max_side: int | None):
    if label < 0:
        return quarantine(f"unknown class {wnid!r}" if wnid else "no label for this file")
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        if path.is_symlink():
            return quarantine(problem_of(path, e))
        return quarantine("missing from SOURCE when its shard was written")
    except OSError as e:
        return quarantine(problem_of(path, e))  # dangling or looping links among them
    return check_image(data, max_side)


def _assemble(out: Path, layout: Layout, opts: state.Options, splits: list[str], git_commit: str) -> None:
    """Publish: every split's manifest, then history.json, then dataset.json, from the plans and parts."""
    prev = fmt.read_info(out) if fmt.info_path(out).is_file() else None
    manifests, split_info, moments = _gather(out, splits)
    info = mf.dataset_info(layout.classes, opts.seed, opts.recorded(), split_info, manifests, moments.stats())
    history = state.lineage(out, prev, info, opts, layout, git_commit)
    for split, rows in manifests.items():
        fmt.write_manifest(out, split, rows)
    state.write_history(out, history)
    fmt.write_info(out, info)


def _gather(out: Path, splits: list[str]):
    """Manifest rows, dataset.json split entries and train colour moments from the plans and parts.

    The colour statistics come from the train split's first generation (the first build) and never
    change after it: a checkpoint evaluated on the grown dataset is fed the pixels it was trained on."""
    manifests, split_info, moments = {}, {}, mf.Moments()
    for split in splits:
        rows_plan = plan.read_plan(out, split)
        rows, shards, digests, idx_digests, gens = [], [], [], [], {}
        for shard, shard_rows in plan.by_shard(rows_plan).items():
            part = plan.read_part(out, split, shard)
            rows += part["rows"]
            if part["stored"]:
                shards.append(f"{shard}.tar")
                digests.append(part.get("tar_sha256"))
                idx_digests.append(part.get("idx_sha256"))
            if split == "train" and part["moments"] and part["moments"]["images"]:
                gens.setdefault(shard_rows[0]["gen"], []).append(part["moments"])
        for m in gens[min(gens)] if gens else []:
            moments.merge(m)
        manifests[split] = rows
        c = mf.counts(rows)
        split_info[split] = {"shards": shards, "num_samples": len(rows) - c["quarantined"],
                             "inputs": len(rows), "counts": c,
                             "source_fingerprint": mf.source_fingerprint(rows_plan)}
        if all(digests):  # parts written before shard checksums existed have none: leave it out
            split_info[split][fmt.SHARDS_SHA256] = digests
        if all(idx_digests):  # nor index checksums, for parts written before they existed
            split_info[split][fmt.INDEXES_SHA256] = idx_digests
        boxes = mf.box_counts(rows)
        if boxes is not None:  # only a split with annotations has the entry (readers go by it)
            split_info[split][fmt.SPLIT_BOXES] = boxes
    return manifests, split_info, moments
