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

from PIL import Image

from preprocessing import manifest as mf
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
    ``progress``: a bar over the stored images, shard by shard."""
    from tqdm import tqdm

    out = Path(out)
    info = fmt.read_info(out)
    problems, jobs = [], []
    for split, s in info["splits"].items():
        rows = fmt.read_manifest(out, split, info=info).to_pylist()
        problems += _check_manifest(split, s, rows)
        by_shard: dict[str, list[dict]] = {}
        for r in rows:
            if r["shard"] is not None:
                by_shard.setdefault(r["shard"], []).append(r)
        digests = {k: _recorded(split, s, k, problems) for k in (fmt.SHARDS_SHA256, fmt.INDEXES_SHA256)}
        for shard, digest, idx_digest in zip(s["shards"], *digests.values()):
            jobs.append((str(out), split, shard, by_shard.get(shard, []), decode, digest, idx_digest))
    bar = tqdm(total=sum(len(j[3]) for j in jobs), unit="img", disable=not progress, dynamic_ncols=True)
    with bar:
        if workers > 1 and len(jobs) > 1:
            with get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                # imap keeps shard order: "first" is stable
                found = [_counted(p, j, bar) for p, j in zip(pool.imap(_verify_job, jobs), jobs)]
        else:
            found = [_counted(_verify_job(j), j, bar) for j in jobs]
    return problems + [p for p in found if p is not None]


def _recorded(split: str, s: dict, key: str, problems: list[Problem]) -> list[str | None]:
    """dataset.json's sha256 list ``key`` of a split, one per shard (None where it records none: a
    dataset written before it, or a list of the wrong length, which is a problem)."""
    digests = s.get(key) or [None] * len(s["shards"])
    if len(digests) != len(s["shards"]):
        problems.append(Problem(split, "", "", f"dataset.json lists {len(s['shards'])} shards but "
                                               f"{len(digests)} {key}"))
        return [None] * len(s["shards"])
    return digests


def _counted(problem: Problem | None, job, bar) -> Problem | None:
    bar.update(len(job[3]))
    if problem is not None:
        bar.set_postfix_str(f"problem in {job[2]}")
    return problem


def _check_manifest(split: str, s: dict, rows: list[dict]) -> list[Problem]:
    out = []
    c = mf.counts(rows)
    if c != s["counts"] or len(rows) != s.get("inputs", len(rows)):
        out.append(Problem(split, "", "", f"manifest counts {c} ({len(rows)} rows) differ from dataset.json "
                                          f"{s['counts']}"))
    if len(rows) - c["quarantined"] != s["num_samples"]:
        out.append(Problem(split, "", "", f"manifest has {len(rows) - c['quarantined']} stored rows, "
                                          f"dataset.json num_samples {s['num_samples']}"))
    if mf.box_counts(rows) != s.get(fmt.SPLIT_BOXES):
        out.append(Problem(split, "", "", f"manifest box counts {mf.box_counts(rows)} differ from dataset.json "
                                          f"{s.get(fmt.SPLIT_BOXES)}"))
    seen = set()
    for r in rows:
        if r["key"] in seen:
            out.append(Problem(split, r["shard"] or "", r["key"], "key appears twice in the manifest"))
        seen.add(r["key"])
        stored = r["status"] != "quarantined"
        if stored and r["shard"] not in s["shards"]:
            out.append(Problem(split, r["shard"] or "", r["key"], "stored row names a shard not in dataset.json"))
        if not stored and (r["shard"] is not None or r["sha256"] is not None):
            out.append(Problem(split, r["shard"] or "", r["key"], "quarantined row names a shard"))
    return out


def _verify_job(job) -> Problem | None:
    out, split, shard, rows, decode, digest, idx_digest = job
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
