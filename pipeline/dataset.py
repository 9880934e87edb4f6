"""What the pipeline reads from a preprocessed dataset folder, checked before DALI sees it.

The format is ``storage.dataformat`` (docs/data-format.md). Every check here fails with a
``DataError`` that names the file, so a broken dataset never reaches DALI (which would otherwise read
garbage from a stale index, or hang on an empty shard list), and a shard whose bytes changed since
preprocessing is refused before it is read (``check_shards``).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage import dataformat as fmt
from storage.dataformat import DataError, read_info
from storage.files import atomic_write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stats:
    """Training-set colour statistics on the 0-255 scale (dataset.json ``stats``)."""
    mean_rgb: tuple[float, float, float]
    eigval: tuple[float, float, float]                 # RGB covariance eigenvalues (pixel^2), descending
    eigvec: tuple[tuple[float, float, float], ...]     # eigvec[i] is the unit eigenvector of eigval[i]


@dataclass(frozen=True)
class Split:
    """One split's shards, in dataset.json order, and the number of samples stored in them."""
    name: str
    shards: tuple[str, ...]       # absolute paths of the .tar files
    indexes: tuple[str, ...]      # absolute paths of their .idx files, same order
    num_samples: int


def load_stats(root: str | os.PathLike, info: dict | None = None) -> Stats:
    """The training mean RGB and RGB eigen-decomposition from dataset.json, validated."""
    info = read_info(root) if info is None else info
    path = fmt.info_path(root)
    stats = info.get("stats")
    if not stats:
        raise DataError(f"{path}: has no 'stats' (mean_rgb, rgb_eigval, rgb_eigvec); the pipeline "
                           "takes the mean subtraction and the colour shift from there. Re-run preprocessing "
                           "with the train split.")
    missing = [k for k in ("mean_rgb", "rgb_eigval", "rgb_eigvec") if stats.get(k) is None]
    if missing:
        raise DataError(f"{path}: 'stats' lacks {', '.join(missing)}")
    mean = np.asarray(stats["mean_rgb"], dtype=np.float64)
    val = np.asarray(stats["rgb_eigval"], dtype=np.float64)
    vec = np.asarray(stats["rgb_eigvec"], dtype=np.float64)
    if mean.shape != (3,) or val.shape != (3,) or vec.shape != (3, 3):
        raise DataError(f"{path}: stats need mean_rgb[3], rgb_eigval[3], rgb_eigvec[3][3]; got shapes "
                           f"{mean.shape}, {val.shape}, {vec.shape}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(val)) and np.all(np.isfinite(vec))):
        raise DataError(f"{path}: stats contain NaN or infinity")
    if np.any(val < -1e-6):
        raise DataError(f"{path}: rgb_eigval must be >= 0 (a covariance's eigenvalues), got {val.tolist()}")
    return Stats(mean_rgb=tuple(mean.tolist()), eigval=tuple(np.clip(val, 0, None).tolist()),
                 eigvec=tuple(tuple(row) for row in vec.tolist()))


def num_classes(root: str | os.PathLike, info: dict | None = None) -> int:
    info = read_info(root) if info is None else info
    return len(info.get("classes", []))


def load_split(root: str | os.PathLike, split: str, info: dict | None = None,
               build_missing_index: bool = True, check: bool = True) -> Split:
    """Resolve and check one split: every shard on disk, an index for each (built when missing),
    index sample counts summing to dataset.json's ``num_samples``, the manifest's shards all listed,
    and (``check``) every shard's bytes against its recorded sha256 (``check_shards``)."""
    root = Path(root).resolve()
    info = read_info(root) if info is None else info
    splits = info.get("splits", {})
    if split not in splits:
        raise DataError(f"{fmt.info_path(root)}: no split {split!r}; it has {', '.join(splits) or 'none'}")
    entry = splits[split]
    names = list(entry.get("shards", []))
    if not names:
        raise DataError(f"{fmt.info_path(root)}: split {split!r} lists no shards")
    _check_manifest_shards(root, split, names)
    shards, indexes, total = [], [], 0
    for name in names:
        tar = root / name
        if not tar.is_file():
            raise DataError(f"{tar}: shard of split {split!r} listed in dataset.json is missing on disk")
        idx = tar.with_suffix(".idx")
        if not idx.is_file():
            if not build_missing_index:
                raise DataError(f"{idx}: index of {tar.name} is missing")
            log.warning("%s: index missing, building it", idx)
            fmt.write_index(idx, fmt.scan_index_lines(tar))
        total += fmt.index_count(idx)
        shards.append(str(tar))
        indexes.append(str(idx))
    expected = int(entry.get("num_samples", -1))
    if total != expected:
        raise DataError(f"{root}: the {split!r} indexes count {total} samples but dataset.json says "
                           f"{expected}; an index is stale (delete the .idx files to rebuild them) or a "
                           "shard was rewritten")
    if check:
        check_shards(root, split, info)
    return Split(name=split, shards=tuple(shards), indexes=tuple(indexes), num_samples=total)


def stored_labels(root: str | os.PathLike, split: str) -> dict[str, int]:
    """key -> label of every sample stored in the split's shards (quarantined rows excluded)."""
    table = fmt.read_manifest(root, split, columns=["key", "label", "shard", "status"]).to_pydict()
    return {k: int(lbl) for k, lbl, shard, status in
            zip(table["key"], table["label"], table["shard"], table["status"])
            if shard is not None and status != "quarantined"}


def _check_manifest_shards(root: Path, split: str, listed: list[str]) -> None:
    """Every shard the manifest puts a sample in is one dataset.json lists (reads one column)."""
    import pyarrow.compute as pc

    path = fmt.manifest_path(root, split)
    column = fmt.read_manifest(root, split, columns=["shard"]).column("shard")
    in_manifest = {s for s in pc.unique(column).to_pylist() if s}
    unlisted = sorted(in_manifest - set(listed))
    if unlisted:
        raise DataError(f"{path}: samples stored in {', '.join(unlisted[:5])} which dataset.json does not "
                           f"list for split {split!r}")
    for name in sorted(in_manifest):
        if not (root / name).is_file():
            raise DataError(f"{root / name}: shard named in {path} is missing on disk")


# --- shard checksums: changed bytes are never trained on silently -----------------------------------

SHARDS_SHA256 = fmt.SHARDS_SHA256
CACHE_ENV = "VGG_SHARD_CACHE"
CACHE_FORMAT = 1
_HEX64 = re.compile(r"[0-9a-f]{64}")
_warned_unchecked: set[tuple[str, str]] = set()


def shard_cache_path() -> Path:
    """This node's cache of shard hashes: ``$VGG_SHARD_CACHE``, else
    ``${XDG_CACHE_HOME:-~/.cache}/vgg-at-scale/shard-sha256-<host name>.json``. The host name is part
    of it because a home folder is often shared by all nodes while each node may read its own copy."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vgg-at-scale" / f"shard-sha256-{socket.gethostname()}.json"


def check_shards(root: str | os.PathLike, split: str, info: dict | None = None,
                 cache: str | os.PathLike | None = None) -> None:
    """Raise ``DataError`` unless every shard of ``split`` hashes to the sha256 dataset.json records.

    A shard is hashed once per node: its hash is cached under (path, size, mtime_ns, ctime_ns) in
    ``cache`` (default ``shard_cache_path()``), and the processes of a node take turns on a lock, so
    the other workers of a node find the first one's hashes instead of reading the shards again. A
    dataset written before hashes were recorded is read unchecked, with one warning per process."""
    root = Path(root).resolve()
    info = read_info(root) if info is None else info
    entry = info.get("splits", {}).get(split, {})
    names, expected = list(entry.get("shards", [])), entry.get(SHARDS_SHA256)
    if expected is None:
        if (str(root), split) not in _warned_unchecked:
            _warned_unchecked.add((str(root), split))
            log.warning("%s: split %r records no %s, so its shards are read unchecked; preprocess it "
                        "again to record them", fmt.info_path(root), split, SHARDS_SHA256)
        return
    if not (isinstance(expected, list) and len(expected) == len(names)
            and all(isinstance(h, str) and _HEX64.fullmatch(h) for h in expected)):
        raise DataError(f"{fmt.info_path(root)}: split {split!r}: {SHARDS_SHA256} must list one hex sha256 "
                        f"per shard ({len(names)})")
    actual = _shard_hashes([root / n for n in names], Path(cache or shard_cache_path()))
    bad = [f"{root / n}: sha256 {a[:12]}, dataset.json records {e[:12]}"
           for n, e, a in zip(names, expected, actual) if a != e]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DataError(f"{'; '.join(bad[:3])}{more}: changed since preprocessing; run "
                        f"`python -m jobs.preprocess verify {root}` to find the damaged samples")


def _stamp(path: Path) -> list[int]:
    """What tells a rewritten file apart without reading it. ctime is there because tools that copy
    or restore files (cp -p, rsync -a, touch -r) set mtime back, but nothing sets ctime back."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _shard_hashes(paths: list[Path], cache_file: Path) -> list[str]:
    """sha256 of each file: cached where its stamp is unchanged, else hashed in threads (hashlib
    releases the GIL, so shards hash in parallel) and recorded in the cache."""
    with _node_lock(cache_file):
        cache = _read_cache(cache_file)
        stamps = {str(p): _stamp(p) for p in paths}            # taken before hashing: a file changed
        todo = [p for p in paths if cache.get(str(p), [])[:3] != stamps[str(p)]]  # meanwhile is redone
        if todo:
            with ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1, 16)) as pool:
                for p, digest in zip(todo, pool.map(_sha256_file, todo)):
                    cache[str(p)] = stamps[str(p)] + [digest]
            _write_cache(cache_file, cache)
        return [cache[str(p)][3] for p in paths]


def _sha256_file(path: Path) -> str:
    h, buf = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


@contextmanager
def _node_lock(cache_file: Path):
    """One process of the node at a time hashes and updates the cache (released on close)."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(f"{cache_file}.lock", "a")
    except OSError as e:
        log.warning("%s: cannot use the shard hash cache (%s); hashing every shard", cache_file, e)
        handle = None
    try:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        if handle is not None:
            handle.close()


def _read_cache(cache_file: Path) -> dict[str, list]:
    """The cache's entries; a missing, unreadable or foreign file is an empty cache (it is disposable)."""
    try:
        data = json.loads(cache_file.read_text())
        files = data["files"] if data.get("format") == CACHE_FORMAT else {}
        return {p: v for p, v in files.items() if isinstance(v, list) and len(v) == 4}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write_cache(cache_file: Path, cache: dict[str, list]) -> None:
    """Atomically, dropping files that are gone; a cache that cannot be written only costs re-hashing."""
    files = {p: v for p, v in cache.items() if os.path.exists(p)}
    try:
        atomic_write(cache_file, json.dumps({"format": CACHE_FORMAT, "files": files}).encode())
    except OSError as e:
        log.warning("%s: cannot write the shard hash cache (%s); shards will be hashed again", cache_file, e)


def changed_samples(root: str | os.PathLike, split: str, shards: list[str]) -> list[str] | None:
    """``"<shard>: <key>"`` for each JPEG in ``shards`` whose bytes no longer hash to the manifest's
    sha256 (what `jobs.preprocess verify` would find, limited to these shards); None when the shards,
    indexes or manifest cannot be read (this only diagnoses, so it never raises)."""
    try:
        table = fmt.read_manifest(root, split, columns=["key", "shard", "sha256"]).to_pydict()
    except (OSError, DataError, ValueError):
        return None
    recorded = {(s, k): h for k, s, h in zip(table["key"], table["shard"], table["sha256"]) if s}

    def scan(tar: str) -> list[str]:
        name, found = Path(tar).name, []
        idx = Path(tar).with_suffix(".idx")
        with open(tar, "rb") as f:
            for sample in fmt.parse_index(idx.read_text(), str(idx)):
                for ext, offset, size, member in sample:
                    if ext != "jpg":
                        continue
                    f.seek(offset)
                    key = member.split(".")[0]            # keys never contain a dot
                    if hashlib.sha256(f.read(size)).hexdigest() != recorded.get((name, key)):
                        found.append(f"{name}: {key}")
        return found

    try:
        with ThreadPoolExecutor(min(len(shards), os.cpu_count() or 1, 16) or 1) as pool:
            return [hit for hits in pool.map(scan, shards) for hit in hits]
    except (OSError, DataError):
        return None


def decode_failure(root: str | os.PathLike, split: Split, shards: list[str], reason: str) -> DataError:
    """The error for a sample DALI could not decode while reading ``shards``: the samples in them that
    changed since preprocessing when there are any, else the shards; and where to look next."""
    root = Path(root).resolve()
    names = [Path(s).name for s in shards]
    where = ", ".join(names) if len(names) <= 4 else f"{names[0]} ... {names[-1]} ({len(names)} shards)"
    verify = f"run `python -m jobs.preprocess verify {root}` to check every sample"
    failed = f"DALI could not read or decode a sample of split {split.name!r} ({reason})"
    keys = changed_samples(root, split.name, shards)
    if keys:
        more = f" (and {len(keys) - 5} more)" if len(keys) > 5 else ""
        return DataError(f"{root / keys[0].split(':')[0]}: {failed}; changed since preprocessing: "
                         f"{'; '.join(keys[:5])}{more}; {verify}")
    found = ("their JPEG bytes are the ones preprocessing stored" if keys == []
             else "their samples could not be compared with the manifest")
    return DataError(f"{root / names[0]}: {failed} while reading {where}; {found}; {verify}")
