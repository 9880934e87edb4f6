"""Re-read every shard of OUT against its manifest: counts, member order, tar headers, DALI index,
labels, box members (the manifest's boxes, inside the stored image) and box counts, sha256 of every
JPEG and of the whole shard and its index (when dataset.json records them), and a full decode of
every JPEG. ``python -m jobs.preprocess verify OUT``. It reads what dataset.json lists, and the
manifest rows it counts, so it can run while a writer adds to OUT."""
from __future__ import annotations

import hashlib
import io
import struct
import tarfile
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from preprocessing.check import DECODE_ERRORS, jpeg_structure
from preprocessing.shards import BLOCK, EXTENSIONS
from storage import dataformat as fmt


class Problem(NamedTuple):
    split: str
    shard: str  # "" when the problem is not in one shard
    key: str  # "" when the problem is not in one sample
    message: str

    def __str__(self) -> str:
        where = " ".join(x for x in (self.shard, f"key {self.key}" if self.key else "") if x)
        return f"{self.split}: {where + ': ' if where else ''}{self.message}"


def verify(out, workers: int = 1, decode: bool = True, progress: bool = False) -> list[Problem]:
    """Every problem found, in shard order (at most the first one per shard); [] when OUT is sound.
    ``progress``: a bar over the stored images, shard by shard. The manifest stays in Arrow (Python
    dicts of ImageNet's 1.28 M rows would be most of the driver's memory); each worker gets its
    shard's rows as a small Arrow table of the columns it compares."""
    from tqdm import tqdm

    out = Path(out)
    info = fmt.read_info(out)
    problems, splits = [], []
    for split, s in info["splits"].items():
        table = fmt.read_manifest(out, split, _COLUMNS, info=info)
        problems += _check_manifest(split, s, table)
        digests = {k: _recorded(split, s, k, problems) for k in (fmt.SHARDS_SHA256, fmt.INDEXES_SHA256)}
        splits.append((split, s, table, _shard_rows(table), *digests.values()))
    total = sum(len(groups.get(shard, ())) for _, s, _, groups, *_ in splits for shard in s["shards"])
    jobs = _jobs(str(out), splits, decode)
    bar = tqdm(total=total, unit="img", disable=not progress, dynamic_ncols=True)
    shards = sum(len(s["shards"]) for _, s, *_ in splits)
    with bar:
        if workers > 1 and shards > 1:
            with get_context("spawn").Pool(min(workers, shards)) as pool:
                # imap keeps shard order: "first" is stable; it takes jobs as workers free up, so only
                # a few shards' tables exist at once
                found = [_counted(p, bar) for p in pool.imap(_verify_job, jobs)]
        else:
            found = [_counted(_verify_job(j), bar) for j in jobs]
    return problems + [p for p, _ in found if p is not None]


# What a worker compares (``_verify_shard``) and ``_check_manifest`` counts: not source, wnid, reason.
_COLUMNS = ["key", "label", "shard", "status", "width", "height", "bytes", "sha256", *fmt.BOX_COLUMNS]
_WORKER_COLUMNS = ["key", "label", "width", "height", "bytes", "sha256", "boxes"]


def _shard_rows(table: pa.Table) -> dict[str, np.ndarray]:
    """{shard: the row numbers naming it, in manifest order} (rows without a shard left out)."""
    enc = pc.dictionary_encode(table.column("shard").combine_chunks())
    codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.argsort(codes, kind="stable")  # stable: each shard's rows keep the manifest's order
    bounds = np.searchsorted(codes[order], np.arange(len(enc.dictionary) + 1))
    return {name: order[bounds[k]:bounds[k + 1]] for k, name in enumerate(enc.dictionary.to_pylist())}


def _jobs(out: str, splits: list, decode: bool):
    """Each shard's job in dataset.json's order, its rows taken from the manifest only when asked for."""
    for split, s, table, groups, digests, idx_digests in splits:
        cols = table.select(_WORKER_COLUMNS)
        for shard, digest, idx_digest in zip(s["shards"], digests, idx_digests):
            rows = cols.take(pa.array(groups.get(shard, np.zeros(0, np.int64))))
            yield out, split, shard, rows, decode, digest, idx_digest


def _recorded(split: str, s: dict, key: str, problems: list[Problem]) -> list[str | None]:
    """dataset.json's sha256 list ``key`` of a split, one per shard (None where it records none: a
    dataset written before it, or a list of the wrong length, which is a problem)."""
    digests = s.get(key) or [None] * len(s["shards"])
    if len(digests) != len(s["shards"]):
        problems.append(Problem(split, "", "", f"dataset.json lists {len(s['shards'])} shards but "
                                               f"{len(digests)} {key}"))
        return [None] * len(s["shards"])
    return digests


def _counted(found: tuple[Problem | None, int], bar) -> tuple[Problem | None, int]:
    """``found``: a job's (problem, rows checked), the bar moved on by them."""
    problem, n = found
    bar.update(n)
    if problem is not None:
        bar.set_postfix_str(f"problem in {problem.shard}")
    return found


def _check_manifest(split: str, s: dict, table: pa.Table) -> list[Problem]:
    """dataset.json's counts against the manifest's columns, then each duplicate key and misplaced
    row in manifest order (only those rows become Python values)."""
    out = []
    n = table.num_rows
    c = _counts(table)
    if c != s["counts"] or n != s.get("inputs", n):
        out.append(Problem(split, "", "", f"manifest counts {c} ({n} rows) differ from dataset.json "
                                          f"{s['counts']}"))
    if n - c["quarantined"] != s["num_samples"]:
        out.append(Problem(split, "", "", f"manifest has {n - c['quarantined']} stored rows, "
                                          f"dataset.json num_samples {s['num_samples']}"))
    boxes = _box_counts(table)
    if boxes != s.get(fmt.SPLIT_BOXES):
        out.append(Problem(split, "", "", f"manifest box counts {boxes} differ from dataset.json "
                                          f"{s.get(fmt.SPLIT_BOXES)}"))
    twice, stray, quarantined = _row_problems(table, s["shards"])
    rows = table.select(["key", "shard"]).take(pa.array(np.flatnonzero(twice | stray | quarantined))).to_pylist()
    for i, r in zip(np.flatnonzero(twice | stray | quarantined), rows):
        for bad, message in ((twice, "key appears twice in the manifest"),
                             (stray, "stored row names a shard not in dataset.json"),
                             (quarantined, "quarantined row names a shard")):
            if bad[i]:
                out.append(Problem(split, r["shard"] or "", r["key"], message))
    return out


def _numpy(mask) -> np.ndarray:
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def _stored(table: pa.Table) -> np.ndarray:
    return ~_numpy(pc.equal(table.column("status"), "quarantined"))


def _counts(table: pa.Table) -> dict[str, int]:
    """``preprocessing.manifest.counts`` from the status column."""
    c = dict.fromkeys(fmt.STATUSES, 0)
    for v in pc.value_counts(table.column("status")).to_pylist():
        c[v["values"]] = v["counts"]
    return c


def _row_problems(table: pa.Table, shards: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: its key appeared in an earlier row; stored but naming a shard dataset.json does not
    list; quarantined but naming a shard or a sha256."""
    codes = pc.dictionary_encode(table.column("key").combine_chunks(), null_encoding="encode").indices
    codes = codes.to_numpy(zero_copy_only=False).astype(np.int64)
    # dictionary codes are numbered by first appearance: a code no greater than an earlier one is a repeat
    twice = np.zeros(len(codes), bool)
    twice[1:] = codes[1:] <= np.maximum.accumulate(codes)[:-1]
    stored = _stored(table)
    listed = _numpy(pc.is_in(table.column("shard"), value_set=pa.array(shards, pa.string())))
    named = _numpy(pc.is_valid(table.column("shard"))) | _numpy(pc.is_valid(table.column("sha256")))
    return twice, stored & ~listed, ~stored & named


def _box_counts(table: pa.Table) -> dict[str, int] | None:
    """``preprocessing.manifest.box_counts`` from the box columns."""
    annotated = np.zeros(table.num_rows, bool)
    for col in fmt.BOX_COLUMNS:
        annotated |= _numpy(pc.is_valid(table.column(col)))
    if not annotated.any():
        return None
    stored = _stored(table)
    annotated &= stored

    def total(values) -> int:
        return int(np.asarray(pc.fill_null(values, 0).to_numpy(zero_copy_only=False))[annotated].sum())

    boxes = pc.list_value_length(table.column("boxes"))
    return {"images": int((_numpy(pc.greater(boxes, 0)) & annotated).sum()),
            "boxes": total(pc.divide(boxes, 4)),  # integer division, per row
            "clipped": total(table.column("boxes_clipped")),
            "rejected": total(pc.list_value_length(table.column("boxes_rejected"))),
            "annotated": int(annotated.sum()), "without": int(stored.sum() - annotated.sum())}


def _verify_job(job) -> tuple[Problem | None, int]:
    """(the shard's first problem or None, its manifest rows)."""
    out, split, shard, table, decode, digest, idx_digest = job
    rows = table.to_pylist()
    return _verify_rows(out, split, shard, rows, decode, digest, idx_digest), len(rows)


def _verify_rows(out: str, split: str, shard: str, rows: list[dict], decode: bool, digest: str | None,
                 idx_digest: str | None) -> Problem | None:
    try:
        # The samples first: a damaged sample is named by its key; the shard's own checksum then
        # catches what lies between samples (padding, the end blocks), the index's what the
        # per-sample check cannot see in it.
        return (_verify_shard(Path(out), split, shard, rows, decode)
                or _shard_digest(Path(out), split, shard, digest)
                or _shard_digest(Path(out), split, shard, idx_digest, index=True))
    except OSError as e:
        return Problem(split, shard, "", f"cannot read: {type(e).__name__}: {e}")


def _shard_digest(out: Path, split: str, shard: str, digest: str | None, index: bool = False) -> Problem | None:
    """The problem when the shard (``index``: its .idx) does not hash to ``digest``; None without one."""
    if digest is None:
        return None
    path = (out / shard).with_suffix(".idx") if index else out / shard
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != digest:
        what, key = (f"its index {path.name}", fmt.INDEXES_SHA256) if index else ("the shard", fmt.SHARDS_SHA256)
        return Problem(split, shard, "", f"sha256 of {what} is {h.hexdigest()}, dataset.json {key} says {digest}")
    return None


def _verify_shard(out: Path, split: str, shard: str, rows: list[dict], decode: bool) -> Problem | None:
    def bad(key, msg):
        return Problem(split, shard, key, msg)

    tar = out / shard
    idx = tar.with_suffix(".idx")
    if not rows:
        return bad("", "listed in dataset.json but no manifest row is stored in it")
    if not tar.is_file():
        return bad(rows[0]["key"], f"shard file {tar} is missing")
    try:
        index = fmt.parse_index(idx.read_text(encoding="ascii"), idx.name)
    except (OSError, ValueError) as e:
        return bad("", f"index {idx.name} is unreadable or invalid: {e}")
    if len(index) != len(rows):
        return bad("", f"index lists {len(index)} samples, the manifest {len(rows)}")
    size = tar.stat().st_size
    with open(tar, "rb") as f:
        pos = 0
        for row, entry in zip(rows, index):
            exts = ([fmt.BOX_EXT] if row.get("boxes") else []) + list(EXTENSIONS)
            content, pos = _read_sample(f, row["key"], exts, entry, pos, size)
            why = content if isinstance(content, str) else _sample_problem(row, content, decode)
            if why:
                return bad(row["key"], why)
        rest = f.read()
    if len(rest) < 2 * BLOCK:
        return bad(rows[-1]["key"], "truncated: the end-of-archive blocks after the last sample are missing")
    if rest.strip(b"\0"):
        return bad("", f"data after the last manifest sample (byte {pos}): a sample not in the manifest?")
    return None


def _read_sample(f, key: str, exts: list[str], entry: list, pos: int,
                 size: int) -> tuple[dict[str, bytes] | str, int]:
    """({extension: bytes} of the sample's members ``exts`` read at ``pos``, or what is wrong; the next
    position), checking each tar header against the index ``entry``."""
    names = [f"{key}.{e}" for e in exts]
    if [c[3] for c in entry] != names or [c[0] for c in entry] != exts:
        return f"index entry lists {[c[3] for c in entry]}, expected {names}", pos
    content = {}
    for ext, name, (_, ioff, isize, _) in zip(exts, names, entry):
        head = f.read(BLOCK)
        if len(head) < BLOCK:
            return f"truncated: the shard ends at byte {size}, in the header of {name}", pos
        try:
            member = tarfile.TarInfo.frombuf(head, "ascii", "strict")
        except tarfile.HeaderError as e:
            return f"bad tar header for {name} at byte {pos}: {e}", pos
        if member.name != name or not member.isreg():
            return f"member at byte {pos} is {member.name!r}, expected {name!r}", pos
        if ioff != pos + BLOCK or isize != member.size:
            return (f"index says {name} is at {ioff} ({isize} bytes), the tar has it at {pos + BLOCK} "
                    f"({member.size} bytes)"), pos
        data = f.read(member.size)
        if len(data) < member.size:
            return f"truncated: the shard ends at byte {size}, inside {name}", pos
        f.read(-member.size % BLOCK)
        pos += BLOCK + member.size + (-member.size % BLOCK)
        content[ext] = data
    return content, pos


def _sample_problem(row: dict, content: dict[str, bytes], decode: bool) -> str | None:
    """What is wrong with a sample's members against its manifest row, or None."""
    key, label = row["key"], row["label"]
    if content["cls"] != str(label).encode() or content["lbl"] != struct.pack("<i", label):
        return f"label members cls={content['cls']!r} lbl={content['lbl']!r}, manifest label {label}"
    if content["key"] != key.encode():
        return f"key member is {content['key']!r}"
    jpg = content["jpg"]
    if len(jpg) != row["bytes"] or hashlib.sha256(jpg).hexdigest() != row["sha256"]:
        return f"sha256 of {key}.jpg differs from the manifest (bytes {len(jpg)} vs {row['bytes']})"
    if fmt.BOX_EXT in content:
        why = _box_problem(content[fmt.BOX_EXT], row)
        if why:
            return why
    return _decode_problem(jpg, row) if decode else None


def _box_problem(data: bytes, row: dict) -> str | None:
    """Why the ``box`` member is not the manifest's boxes, each a box inside the stored image, or None."""
    name = f"{row['key']}.{fmt.BOX_EXT}"
    try:
        boxes = fmt.decode_boxes(data, name)
    except fmt.DataError as e:
        return str(e)
    if boxes.reshape(-1).tolist() != row["boxes"]:
        return f"{name} holds {boxes.reshape(-1).tolist()}, the manifest {row['boxes']}"
    w, h = row["width"], row["height"]
    for x1, y1, x2, y2 in boxes.tolist():
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
            return f"{name}: box {[x1, y1, x2, y2]} is not inside the stored {w}x{h} image with x1 < x2, y1 < y2"
    return None


def _decode_problem(jpg: bytes, row: dict) -> str | None:
    """Why the stored bytes are not a fully decodable baseline RGB JPEG of the manifest's size, or None."""
    try:
        im = Image.open(io.BytesIO(jpg), formats=("JPEG",))
        im.load()
    except DECODE_ERRORS as e:
        return f"full decode failed: {type(e).__name__}: {e}"
    info = jpeg_structure(jpg)
    if im.mode != "RGB" or info.sof not in (0xC0, 0xC1) or info.orientation not in (None, 1):
        return f"not a baseline RGB JPEG (mode {im.mode}, frame 0x{info.sof or 0:X}, EXIF orientation " \
               f"{info.orientation})"
    if im.size != (row["width"], row["height"]):
        return f"decoded size {im.size[0]}x{im.size[1]}, manifest {row['width']}x{row['height']}"
    return None
