"""Plan, write and resume shards: SOURCE -> OUT (docs/data-format.md, docs/preprocessing.md).

One run, per split:
1. list the inputs (``sources.discover``) and compare them with the split's plan in ``OUT/.preprocess``;
2. inputs not in the plan yet form a new generation: ordered by a seeded hash (a global shuffle that no
   library version can change) and cut into new shards numbered after the existing ones; the plan is
   written (atomically) before any shard, so a killed run resumes the same plan;
3. every planned shard without a finished part file is a job: ``process_shard`` checks its images,
   writes ``<shard>.tar`` then ``<shard>.idx`` then the part file (each temp + fsync + rename; the part
   file is the commit mark). Jobs run through ``map_fn``: in-process, a process pool, or Ray tasks;
4. the manifest and ``dataset.json`` are assembled from the plan and the parts, in shard order.
Nothing in the output depends on the number of workers or the order in which shards finish.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing import manifest as mf
from preprocessing.check import check_image, quarantine
from preprocessing.shards import ShardWriter
from preprocessing.sources import Input, Layout, discover
from storage import dataformat as fmt
from storage.dataformat import DataError
from storage.files import atomic_write, remove_stale_temps

STATE_DIR = ".preprocess"
STATE = "state.json"
PLAN_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("wnid", pa.string()),
                         ("label", pa.int32()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
                         ("shard", pa.string()), ("gen", pa.int32())])
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


def parse_shard_size(value) -> tuple[str, int]:
    """``1000`` -> ("count", 1000); ``"256MB"`` -> ("bytes", 256e6) (of source bytes, before checking)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)([bB]?)\s*", str(value))
    if not m or int(m.group(1)) <= 0 or (m.group(3) and not m.group(2)):
        raise DataError(f"--shard-size {value!r}: give a sample count (1000) or a size (256MB, 1GB)")
    if not m.group(2):
        return "count", int(m.group(1))
    return "bytes", int(m.group(1)) * {"k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]


def preprocess(source, out, splits=None, shard_size=1000, seed: int = 0, max_side: int | None = None,
               workers: int = 1, progress: bool = True, map_fn: MapFn | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Write (or bring up to date) the shards, manifests and dataset.json of ``source`` in ``out``.

    Returns {split: {inputs, stored, kept, converted, resized, quarantined, shards, added, removed,
    changed, shards_written}}. ``map_fn(fn, jobs)`` yields ``fn(job)`` for every job in any order
    (default: in-process for ``workers == 1``, else a pool of ``workers`` processes).
    """
    kind, size = parse_shard_size(shard_size)
    if max_side is not None and max_side < 16:
        raise DataError(f"--max-side {max_side}: must be at least 16 pixels")
    if workers < 1:
        raise DataError(f"--workers {workers}: must be at least 1")
    layout = discover(source, splits)
    out = Path(out).resolve()
    state_dir = out / STATE_DIR
    options = {"shard_size": size if kind == "count" else f"{size}B", "max_side": max_side}
    _check_state(out, layout, seed, options, log)
    for note in layout.notes:
        log(note)
    for d in (out, state_dir, *(state_dir / s for s in layout.splits)):
        removed = remove_stale_temps(d)
        if removed:
            log(f"removed {len(removed)} temp file(s) a killed run left in {d}")

    jobs, changes = [], {}
    for split, inputs in layout.splits.items():
        plan, changes[split] = _update_plan(out, split, inputs, seed, shard_size, log)
        for shard, rows in _by_shard(plan).items():
            if not _done(out, split, shard, [r["key"] for r in rows]):
                jobs.append(ShardJob(split, shard, str(layout.root), str(out),
                                     [(r["key"], r["source"], r["label"], r["wnid"]) for r in rows],
                                     max_side, split == "train"))
    all_splits = sorted(p.name[: -len(".plan.parquet")] for p in state_dir.glob("*.plan.parquet"))
    # Removed and changed files are reported, never acted on: they do not make OUT out of date.
    up_to_date = (not jobs and not any(c["added"] for c in changes.values())
                  and (out / fmt.DATASET_JSON).is_file()
                  and all(fmt.manifest_path(out, s).is_file() for s in all_splits))
    written = _run(jobs, workers, progress, map_fn)
    if not up_to_date:
        _assemble(out, layout, seed, options, all_splits)
    info = fmt.read_info(out)
    summary = {}
    for split in layout.splits:
        s = info["splits"][split]
        summary[split] = {"inputs": s["inputs"], "stored": s["num_samples"], **s["counts"],
                          "shards": len(s["shards"]), **{k: len(v) for k, v in changes[split].items()},
                          "shards_written": written.get(split, 0)}
        c = summary[split]
        log(f"{split}: {c['inputs']} inputs -> {c['stored']} stored ({c['kept']} kept, {c['converted']} "
            f"converted, {c['resized']} resized), {c['quarantined']} quarantined; {c['shards']} shards, "
            f"{c['shards_written']} written this run")
        if c["quarantined"]:
            log(f"{split}: the quarantined files and why: rows with status 'quarantined' in "
                f"{fmt.manifest_path(out, split)}")
    if up_to_date:
        log(f"nothing to do: {out} already holds every image of {layout.root}")
    return summary


def _check_state(out: Path, layout: Layout, seed: int, options: dict, log) -> None:
    """Refuse an OUT that holds a different dataset (other classes, seed or options) or foreign files."""
    state_file = out / STATE_DIR / STATE
    classes = [[c.index, c.wnid, c.name] for c in layout.classes]
    want = {"format": fmt.FORMAT, "seed": seed, "options": options, "classes": classes}
    if state_file.is_file():
        have = json.loads(state_file.read_text())
        diffs = [k for k in want if have.get(k) != want[k]]
        if diffs:
            detail = "; ".join(f"{k}: OUT has {_short(have.get(k))}, this run has {_short(want[k])}"
                               for k in diffs)
            raise DataError(f"{out} holds a different dataset ({state_file}): {detail}. Use a fresh OUT "
                            "folder, or the options that built it")
        if have.get("source") != str(layout.root):
            # Same classes and options: compare by relative paths, so a moved SOURCE still resumes.
            log(f"note: {out} was built from {have.get('source')}; this run reads {layout.root}")
        return
    if out.exists():
        foreign = [p.name for p in out.iterdir() if not p.name.startswith(".tmp-") and p.name != STATE_DIR]
        if foreign:
            hint = " (it has a dataset.json but no .preprocess state)" if fmt.DATASET_JSON in foreign else ""
            raise DataError(f"{out} is not empty and was not written by this tool{hint}: it holds "
                            f"{', '.join(sorted(foreign)[:5])}; use an empty or new OUT folder")
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write(state_file, (json.dumps({**want, "source": str(layout.root)}, indent=1) + "\n").encode())


def _short(v) -> str:
    if isinstance(v, list) and len(v) > 3:
        return f"{len(v)} entries [{_short(v[0])}, ..., {_short(v[-1])}]"
    return json.dumps(v)


def _plan_path(out: Path, split: str) -> Path:
    return out / STATE_DIR / f"{split}.plan.parquet"


def _read_plan(out: Path, split: str) -> list[dict]:
    p = _plan_path(out, split)
    return pq.read_table(p).to_pylist() if p.is_file() else []


def _update_plan(out: Path, split: str, inputs: list[Input], seed: int, shard_size, log):
    """Add inputs the plan lacks as new shards; report (never act on) removed and changed inputs."""
    plan = _read_plan(out, split)
    planned = {r["source"]: r for r in plan}
    current = {i.source: i for i in inputs}
    new = [i for i in inputs if i.source not in planned]
    removed = [s for s in planned if s not in current]
    changed = [s for s, i in current.items() if s in planned
               and (planned[s]["size"], planned[s]["mtime_ns"], planned[s]["label"])
               != (i.size, i.mtime_ns, i.label)]
    added_shards = []
    if new:
        gen = max((r["gen"] for r in plan), default=-1) + 1
        # A seeded hash order is a uniform shuffle that depends on nothing but (seed, split, gen, path).
        new.sort(key=lambda i: hashlib.sha256(f"{seed}/{split}/{gen}/{i.source}".encode()).digest())
        keys = {r["key"] for r in plan}
        first = len({r["shard"] for r in plan})
        rows = []
        for n, chunk in enumerate(_chunks(new, shard_size)):
            shard = f"{split}-{first + n:06d}"
            added_shards.append(shard)
            for i in chunk:
                key = i.key if i.key not in keys else i.path_key
                if key in keys:
                    raise DataError(f"{split}: new file {i.source} maps to key {key!r}, already taken in "
                                    f"{out}; rename it or rebuild into a fresh OUT")
                keys.add(key)
                rows.append({"key": key, "source": i.source, "wnid": i.wnid, "label": i.label,
                             "size": i.size, "mtime_ns": i.mtime_ns, "shard": shard, "gen": gen})
        plan = plan + rows
        atomic_write(_plan_path(out, split), _plan_bytes(plan))
        verb = "planned" if gen == 0 else "added"
        log(f"{split}: {verb} {len(new)} images in {len(added_shards)} shards "
            f"({added_shards[0]}..{added_shards[-1]})")
    if removed:
        log(f"{split}: {len(removed)} planned files are gone from SOURCE (kept in their shards; rebuild "
            f"into a fresh OUT to drop them): {', '.join(removed[:5])}{' ...' if len(removed) > 5 else ''}")
    if changed:
        log(f"{split}: {len(changed)} files changed since they were planned (their first version stays; "
            f"rebuild into a fresh OUT to take the new one): {', '.join(changed[:5])}"
            f"{' ...' if len(changed) > 5 else ''}")
    return plan, {"added": new, "removed": removed, "changed": changed}


def _plan_bytes(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=PLAN_SCHEMA), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _chunks(inputs: list[Input], shard_size) -> Iterable[list[Input]]:
    kind, n = parse_shard_size(shard_size)
    chunk, size = [], 0
    for i in inputs:
        chunk.append(i)
        size += i.size
        if (kind == "count" and len(chunk) >= n) or (kind == "bytes" and size >= n):
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _by_shard(plan: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in plan:
        out.setdefault(r["shard"], []).append(r)
    return out


def _part_path(out: Path, split: str, shard: str) -> Path:
    return out / STATE_DIR / split / f"{shard}.json"


def _done(out: Path, split: str, shard: str, keys: list[str]) -> bool:
    """A shard is finished when its part file (written last) matches the plan and its files exist."""
    p = _part_path(out, split, shard)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        part = json.loads(f.readline())  # the header line only: a no-op rerun reads little
    if part["keys_sha256"] != _keys_sha256(keys):
        return False
    if part["stored"] == 0:
        return True
    tar, idx = out / f"{shard}.tar", out / f"{shard}.idx"
    return tar.is_file() and tar.stat().st_size == part["tar_bytes"] and idx.is_file()


def _keys_sha256(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def _read_part(out: Path, split: str, shard: str) -> dict:
    head, body = _part_path(out, split, shard).read_text().splitlines()
    return {**json.loads(head), **json.loads(body)}


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
    tar_path = out / f"{job.shard}.tar"
    with ShardWriter(tar_path) as tw:
        for key, src, label, wnid in job.rows:
            if label < 0:
                why = f"unknown class {wnid!r}" if wnid else "no label for this file"
                c = quarantine(why)
            else:
                try:
                    c = check_image((root / src).read_bytes(), job.max_side)
                except FileNotFoundError:
                    c = quarantine("missing from SOURCE when its shard was written")
                except OSError as e:
                    c = quarantine(f"unreadable: {type(e).__name__}: {e}")
            row = {"key": key, "source": src, "label": label, "wnid": wnid, "shard": None,
                   "status": c.status, "reason": c.reason, "width": c.width, "height": c.height,
                   "bytes": 0, "sha256": None}
            if c.data is not None:
                tw.add(key, label, c.data)
                row.update(shard=f"{job.shard}.tar", bytes=len(c.data),
                           sha256=hashlib.sha256(c.data).hexdigest())
                stored += 1
                if job.stats:
                    moments.add_image(c.pixels)
            rows.append(row)
        if stored:
            tar_bytes, index = tw.commit()
            fmt.write_index(out / f"{job.shard}.idx", index)
        else:
            tar_bytes = 0  # every input quarantined: no tar (DALI rejects an empty one)
    # Part file: a header line (what _done reads), then the manifest rows and colour sums.
    head = {"shard": job.shard, "stored": stored, "tar_bytes": tar_bytes,
            "keys_sha256": _keys_sha256([r[0] for r in job.rows])}
    body = {"rows": rows, "moments": moments.to_json() if job.stats else None}
    part_path = _part_path(out, job.split, job.shard)
    part_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(part_path, (json.dumps(head) + "\n" + json.dumps(body) + "\n").encode())
    return {"split": job.split, "shard": job.shard, "inputs": len(rows), "stored": stored,
            "quarantined": len(rows) - stored, "seconds": time.perf_counter() - t0}


def _assemble(out: Path, layout: Layout, seed: int, options: dict, splits: list[str]) -> None:
    """Write every split's manifest and dataset.json from the plans and part files."""
    manifests, split_info, moments = {}, {}, mf.Moments()
    for split in splits:
        plan = _read_plan(out, split)
        rows, shards = [], []
        for shard in _by_shard(plan):
            part = _read_part(out, split, shard)
            rows += part["rows"]
            if part["stored"]:
                shards.append(f"{shard}.tar")
            if split == "train":
                moments.merge(part["moments"])
        fmt.write_manifest(out, split, rows)
        manifests[split] = rows
        c = mf.counts(rows)
        split_info[split] = {"shards": shards, "num_samples": len(rows) - c["quarantined"],
                             "inputs": len(rows), "counts": c,
                             "source_fingerprint": mf.source_fingerprint(plan)}
    info = mf.dataset_info(layout.classes, seed, options, split_info, manifests, moments.stats())
    fmt.write_info(out, info)

