"""Helpers for the preprocessing tests: the build call and ways to look at what it wrote.

The sample they run on (fixtures ``odd_source``, ``built``, ``odd_manifest`` in conftest.py): 4 classes,
10 train + 4 val images per class with every oddity, sides 96-160 px, shard size 8, built once per session;
every image that decodes has one box (``preprocessing.synthetic``).
"""
from __future__ import annotations

import tarfile
from pathlib import Path

from storage.dataformat import BOX_EXT, HISTORY_JSON, read_info
from preprocessing.shards import EXTENSIONS
from preprocessing.sources import IMAGE_EXTENSIONS
from preprocessing.writer import preprocess

SHARD = 8
SIZES = (96, 160)


def build(source, out, **kw):
    lines: list[str] = []
    kw = {"shard_size": SHARD, "seed": 0, "progress": False, **kw}
    summary = preprocess(source, out, log=lines.append, **kw)
    return summary, "\n".join(lines)


def snapshot(out: Path) -> dict[str, bytes]:
    """Every shard, index, manifest and dataset.json of OUT, by relative path (not history.json: it
    records when and from where, which differs between equal builds)."""
    files = [p for p in out.rglob("*") if p.is_file() and not p.relative_to(out).parts[0].startswith(".")
             and p.name != HISTORY_JSON]
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(files)}


def mtimes(out: Path, pattern: str = "*.tar") -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(out.glob(pattern))}


def image_files(root: Path, split: str) -> set[str]:
    """The inputs of ``split``: files with an image extension, hidden ones excepted."""
    return {p.relative_to(root).as_posix() for p in (root / split).rglob("*")
            if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS) and not p.name.startswith(".")}


def shard_samples(out: Path, split: str) -> list[dict]:
    """Every sample of every shard of ``split``, in order: {key, shard, cls, jpg, key_member, lbl} and
    ``box`` (the member's bytes) for a sample with boxes. Asserts each sample's members are exactly
    ``box`` (optional, first), then ``EXTENSIONS`` in order."""
    info = read_info(out)
    samples = []
    for shard in info["splits"][split]["shards"]:
        with tarfile.open(out / shard) as tf:
            groups: list[list] = []
            for m in tf.getmembers():
                key = m.name.split(".")[0]
                if not groups or groups[-1][0].name.split(".")[0] != key:
                    groups.append([])
                groups[-1].append(m)
            for group in groups:
                key = group[0].name.split(".")[0]
                exts = [m.name.split(".", 1)[1] for m in group]
                assert exts in (list(EXTENSIONS), [BOX_EXT, *EXTENSIONS]), (shard, key, exts)
                data = {m.name.split(".", 1)[1]: tf.extractfile(m).read() for m in group}
                data["key_member"] = data.pop("key")
                samples.append({**data, "key": key, "shard": shard})
    return samples


class Killed(RuntimeError):
    pass


def crash_after(n: int):
    """A ``map_fn`` for ``preprocess`` that writes ``n`` shards, then dies as a killed run would."""
    def map_fn(fn, jobs):
        for i, job in enumerate(jobs):
            if i == n:
                raise Killed(f"simulated kill after {n} shards")
            yield fn(job)
    return map_fn
