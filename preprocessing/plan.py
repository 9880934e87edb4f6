"""The plan of each split (``OUT/.preprocess/<split>.plan.parquet``) and its part files: which input goes
into which shard, and which shards are finished.

Inputs not in the plan yet form a new *generation*: ordered by a seeded hash (a global shuffle that no
library version can change) and cut into new shards numbered after the existing ones. A shard is
finished when its part file (``OUT/.preprocess/<split>/<shard>.json``, written last) matches the plan.

Each planned input also records the digest of its raw annotation when it was planned (``boxes_sha256``:
``annotations.box_digest``; null in plans written before it existed). Its shard is written with those
boxes, whenever that happens: ``state.prepare`` refuses a run whose annotations give a planned input
other boxes, and ``planned_boxes`` leaves out boxes that appeared after planning.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from preprocessing.annotations import NO_ANNOTATION, box_digest
from preprocessing.sources import Input
from storage.dataformat import DataError
from storage.files import atomic_write

STATE_DIR = ".preprocess"
PLAN_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("wnid", pa.string()),
                         ("label", pa.int32()), ("size", pa.int64()), ("mtime_ns", pa.int64()),
                         ("shard", pa.string()), ("gen", pa.int32()), ("boxes_sha256", pa.string())])


def parse_shard_size(value) -> tuple[str, int]:
    """``1000`` -> ("count", 1000); ``"256MB"`` -> ("bytes", 256e6) (of source bytes, before checking);
    ``"256000000B"`` (how OUT records a size) -> ("bytes", 256e6)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)([bB]?)\s*", str(value))
    if not m or int(m.group(1)) <= 0:
        raise DataError(f"--shard-size {value!r}: give a sample count (1000) or a size (256MB, 1GB)")
    if not m.group(2) and not m.group(3):
        return "count", int(m.group(1))
    return "bytes", int(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]


def normal_shard_size(value) -> int | str:
    """The recorded form of a shard size: the count, or ``"<bytes>B"``."""
    kind, n = parse_shard_size(value)
    return n if kind == "count" else f"{n}B"


def plan_path(out: Path, split: str) -> Path:
    return out / STATE_DIR / f"{split}.plan.parquet"


def read_plan(out: Path, split: str) -> list[dict]:
    p = plan_path(out, split)
    return pq.read_table(p).to_pylist() if p.is_file() else []


def update_plan(out: Path, split: str, inputs: list[Input], seed: int, shard_size, log, boxes: dict):
    """Add inputs the plan lacks as new shards, each with the digest of its raw annotation in ``boxes``
    ({source path: boxes}); report (never act on) removed and changed inputs."""
    plan = read_plan(out, split)
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
        for n, chunk in enumerate(chunks(new, shard_size)):
            shard = f"{split}-{first + n:06d}"
            added_shards.append(shard)
            for i in chunk:
                key = i.key if i.key not in keys else i.path_key
                if key in keys:
                    raise DataError(f"{split}: new file {i.source} maps to key {key!r}, already taken in "
                                    f"{out}; rename it or rebuild into a fresh OUT")
                keys.add(key)
                rows.append({"key": key, "source": i.source, "wnid": i.wnid, "label": i.label,
                             "size": i.size, "mtime_ns": i.mtime_ns, "shard": shard, "gen": gen,
                             "boxes_sha256": box_digest(boxes.get(i.source))})
        plan = plan + rows
        atomic_write(plan_path(out, split), plan_bytes(plan))
        verb = "planned" if gen == 0 else "added"
        span = added_shards[0] if len(added_shards) == 1 else f"{added_shards[0]}..{added_shards[-1]}"
        log(f"{split}: {verb} {len(new)} images in {len(added_shards)} shard"
            f"{'s' if len(added_shards) > 1 else ''} ({span})")
    if removed:
        log(f"{split}: {len(removed)} planned files are gone from SOURCE (kept in their shards; rebuild "
            f"into a fresh OUT to drop them): {', '.join(removed[:5])}{' ...' if len(removed) > 5 else ''}")
    if changed:
        log(f"{split}: {len(changed)} files changed since they were planned (their first version stays; "
            f"rebuild into a fresh OUT to take the new one): {', '.join(changed[:5])}"
            f"{' ...' if len(changed) > 5 else ''}")
    return plan, {"added": new, "removed": removed, "changed": changed}


def plan_bytes(rows: list[dict]) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=PLAN_SCHEMA), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def chunks(inputs: list[Input], shard_size) -> Iterable[list[Input]]:
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


def planned_boxes(rows: list[dict], boxes: dict) -> dict[str, list]:
    """{key: raw boxes} for a shard's job: the annotation of each planned input that had one when it was
    planned (its digest checked equal by ``state.prepare``), and of inputs planned before digests
    were recorded. An annotation that appeared later is left out, so the split stays as planned."""
    return {r["key"]: boxes[r["source"]] for r in rows
            if r["source"] in boxes and r.get("boxes_sha256") != NO_ANNOTATION}


def by_shard(plan: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in plan:
        out.setdefault(r["shard"], []).append(r)
    return out


def part_path(out: Path, split: str, shard: str) -> Path:
    return out / STATE_DIR / split / f"{shard}.json"


def done(out: Path, split: str, shard: str, keys: list[str]) -> bool:
    """A shard is finished when its part file (written last) matches the plan and its files exist."""
    p = part_path(out, split, shard)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        part = json.loads(f.readline())  # the header line only: a no-op rerun reads little
    if part["keys_sha256"] != keys_sha256(keys):
        return False
    if part["stored"] == 0:
        return True
    tar, idx = out / f"{shard}.tar", out / f"{shard}.idx"
    return tar.is_file() and tar.stat().st_size == part["tar_bytes"] and idx.is_file()


def keys_sha256(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def planned_rows(out: Path, split: str) -> int:
    """How many inputs the split's plan holds (0 without a plan), from the parquet footer only."""
    p = plan_path(out, split)
    return pq.read_metadata(p).num_rows if p.is_file() else 0


def read_part(out: Path, split: str, shard: str) -> dict:
    head, body = part_path(out, split, shard).read_text().splitlines()
    return {**json.loads(head), **json.loads(body)}


