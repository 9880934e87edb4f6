"""Changed bytes are never trained on silently: each shard's and each index's sha256 checked against
dataset.json's record, every index entry checked against its tar's member headers (both cached per
node), and, when DALI cannot decode a sample, which samples changed since preprocessing."""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from storage import dataformat as fmt
from storage.dataformat import DataError
from storage.files import atomic_write

log = logging.getLogger("storage.shard_check")


SHARDS_SHA256 = fmt.SHARDS_SHA256
INDEXES_SHA256 = fmt.INDEXES_SHA256
CACHE_ENV = "VGG_SHARD_CACHE"
CACHE_FORMAT = 1                 # a cache without the "indexes" section (older) is still format 1
FILES, INDEXES = "files", "indexes"
INDEX_THREADS = 2
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


def node_cache_folder(name: str) -> Path:
    """A folder of this node's for the cache ``name``: ``<name>-<host name>`` beside
    ``shard_cache_path()`` (so ``$VGG_SHARD_CACHE`` moves it too), per node for the same reason."""
    return shard_cache_path().parent / f"{name}-{socket.gethostname()}"


def publish_folder(tmp: Path, dest: Path) -> bool:
    """Rename the finished folder ``tmp`` to ``dest`` in one step, so a reader finds all of it or
    nothing. False when another process published ``dest`` first: ``tmp`` is removed, use ``dest``."""
    try:
        os.rename(tmp, dest)
        return True
    except OSError:
        if not dest.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def check_split_shards(root: Path, split: str, entry: dict, cache: str | os.PathLike | None = None) -> None:
    """Raise ``DataError`` unless every shard of ``split`` (dataset.json's ``entry`` for it) and every
    shard's index hash to the sha256 recorded there (``shards_sha256``, ``indexes_sha256``).

    A file is hashed once per node: its hash is cached under (path, size, mtime_ns, ctime_ns) in
    ``cache`` (default ``shard_cache_path()``), and the processes of a node take turns on a lock, so
    the other workers of a node find the first one's hashes instead of reading the shards again. A
    dataset written before a list was recorded has those files read unchecked, with one warning per
    process."""
    names = list(entry.get("shards", []))
    _warn_unrecorded(root, split, [k for k in (SHARDS_SHA256, INDEXES_SHA256) if entry.get(k) is None])
    files, expected = [], []
    for key, suffix in ((SHARDS_SHA256, ".tar"), (INDEXES_SHA256, ".idx")):
        if entry.get(key) is not None:
            files += [(root / n).with_suffix(suffix) for n in names]
            expected += _recorded(root, split, entry[key], key, len(names))
    if not files:
        return
    actual = _shard_hashes(files, Path(cache or shard_cache_path()))
    bad = [(p, e, a) for p, e, a in zip(files, expected, actual) if a != e]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        rebuild = ("; a changed index of an intact shard is rebuilt from it when deleted"
                   if any(p.suffix == ".idx" for p, _, _ in bad) else "")
        raise DataError("; ".join(f"{p}: sha256 {a[:12]}, dataset.json records {e[:12]}" for p, e, a in bad[:3])
                        + f"{more}: changed since preprocessing; run `python -m jobs.preprocess verify {root}` "
                        f"to find the damaged samples{rebuild}")


def _warn_unrecorded(root: Path, split: str, keys: list[str]) -> None:
    """One warning per process and split of a dataset written before ``keys`` were recorded."""
    if keys and (str(root), split) not in _warned_unchecked:
        _warned_unchecked.add((str(root), split))
        files = " and ".join({SHARDS_SHA256: "shards", INDEXES_SHA256: "indexes"}[k] for k in keys)
        log.warning("%s: split %r records no %s, so its %s are read unchecked by sha256; preprocess it "
                    "again to record them", fmt.info_path(root), split, " or ".join(keys), files)


def _recorded(root: Path, split: str, digests, key: str, shards: int) -> list[str]:
    """dataset.json's list ``key`` of hex sha256 for ``split``, checked to have one per shard."""
    if not (isinstance(digests, list) and len(digests) == shards
            and all(isinstance(h, str) and _HEX64.fullmatch(h) for h in digests)):
        raise DataError(f"{fmt.info_path(root)}: split {split!r}: {key} must list one hex sha256 "
                        f"per shard ({shards})")
    return digests


def check_split_indexes(tars: list[Path], indexes: list[Path], cache: str | os.PathLike | None = None) -> None:
    """Raise ``DataError`` unless every entry of every index is the member of its tar it names
    (``storage.dataformat.check_index``: one 512-byte header read per member).

    The verdict is cached per node like the hashes (``cache``, default ``shard_cache_path()``), under
    the index's path with the (size, mtime_ns, ctime_ns) of both the index and the tar, so a warm
    start costs two ``stat`` calls per shard and reads no header."""
    cache_file = Path(cache or shard_cache_path())
    with node_lock(cache_file):
        cache = _read_cache(cache_file)
        checked = cache[INDEXES]
        stamps = {str(i): file_stamp(i) + file_stamp(t) for t, i in zip(tars, indexes)}
        todo = [(t, i) for t, i in zip(tars, indexes) if checked.get(str(i)) != stamps[str(i)]]
        if not todo:
            return
        # Two threads: the check is mostly Python (GIL-bound); a second one overlaps the other's
        # header reads on a cold disk, more only fight over the GIL (4 ran 1.8x slower than 1).
        with ThreadPoolExecutor(min(len(todo), INDEX_THREADS)) as pool:
            # every index is checked before the first error is raised: the good ones are cached
            outcomes = list(pool.map(_check_index, todo))
        for (_, i), error in zip(todo, outcomes):
            if error is None:
                checked[str(i)] = stamps[str(i)]
        _write_cache(cache_file, cache)
    errors = [e for e in outcomes if e is not None]
    if errors:
        raise errors[0]


def _check_index(pair: tuple[Path, Path]) -> DataError | None:
    """``check_index``'s error for (tar, index), returned (None when the index is sound)."""
    tar, idx = pair
    try:
        fmt.check_index(idx, tar)
    except DataError as e:
        return e
    except OSError as e:
        return DataError(f"{tar}: cannot check it against {idx.name} ({e})")
    return None


def file_stamp(path: Path) -> list[int]:
    """What tells a rewritten file apart without reading it. ctime is there because tools that copy
    or restore files (cp -p, rsync -a, touch -r) set mtime back, but nothing sets ctime back."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _shard_hashes(paths: list[Path], cache_file: Path) -> list[str]:
    """sha256 of each file: cached where its stamp is unchanged, else hashed in threads (hashlib
    releases the GIL, so shards hash in parallel) and recorded in the cache."""
    with node_lock(cache_file):
        cache = _read_cache(cache_file)
        files = cache[FILES]
        stamps = {str(p): file_stamp(p) for p in paths}        # taken before hashing: a file changed
        todo = [p for p in paths if files.get(str(p), [])[:3] != stamps[str(p)]]  # meanwhile is redone
        if todo:
            with ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1, 16)) as pool:
                for p, digest in zip(todo, pool.map(_sha256_file, todo)):
                    files[str(p)] = stamps[str(p)] + [digest]
            _write_cache(cache_file, cache)
        return [files[str(p)][3] for p in paths]


def _sha256_file(path: Path) -> str:
    h, buf = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


@contextmanager
def node_lock(cache_file: Path):
    """One process of the node at a time inside: ``flock`` on ``<cache_file>.lock`` (released on close),
    so the node's other workers find the first one's results instead of computing them again. Where
    the lock file cannot be made, a warning and no lock: each cache is still written atomically."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(f"{cache_file}.lock", "a")
    except OSError as e:
        log.warning("%s: cannot take the node's lock (%s); going on without it", cache_file, e)
        handle = None
    try:
        if handle is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        if handle is not None:
            handle.close()


def _read_cache(cache_file: Path) -> dict[str, dict[str, list]]:
    """The cache's sections: ``files`` (path -> size, mtime_ns, ctime_ns, sha256) and ``indexes``
    (index path -> its and its tar's size, mtime_ns, ctime_ns: checked against the tar). A missing,
    unreadable or foreign file is an empty cache (it is disposable); a cache written before the
    ``indexes`` section existed has an empty one."""
    sections = {FILES: (4, str), INDEXES: (6, int)}
    try:
        data = json.loads(cache_file.read_text())
        if data.get("format") != CACHE_FORMAT:
            data = {}
        return {name: {p: v for p, v in (data.get(name) or {}).items()
                       if isinstance(v, list) and len(v) == n and isinstance(v[-1], last)}
                for name, (n, last) in sections.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {FILES: {}, INDEXES: {}}


def _write_cache(cache_file: Path, cache: dict[str, dict[str, list]]) -> None:
    """Atomically, dropping files that are gone; a cache that cannot be written only costs re-hashing."""
    sections = {name: {p: v for p, v in entries.items() if os.path.exists(p)} for name, entries in cache.items()}
    try:
        atomic_write(cache_file, json.dumps({"format": CACHE_FORMAT, **sections}).encode())
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


def decode_failure(root: str | os.PathLike, split: str, shards: list[str], reason: str) -> DataError:
    """The error for a sample DALI could not decode while reading ``shards``: the samples in them that
    changed since preprocessing when there are any, else the shards; and where to look next."""
    root = Path(root).resolve()
    names = [Path(s).name for s in shards]
    where = ", ".join(names) if len(names) <= 4 else f"{names[0]} ... {names[-1]} ({len(names)} shards)"
    verify = f"run `python -m jobs.preprocess verify {root}` to check every sample"
    failed = f"DALI could not read or decode a sample of split {split!r} ({reason})"
    keys = changed_samples(root, split, shards)
    if keys:
        more = f" (and {len(keys) - 5} more)" if len(keys) > 5 else ""
        return DataError(f"{root / keys[0].split(':')[0]}: {failed}; changed since preprocessing: "
                         f"{'; '.join(keys[:5])}{more}; {verify}")
    found = ("their JPEG bytes are the ones preprocessing stored" if keys == []
             else "their samples could not be compared with the manifest")
    return DataError(f"{root / names[0]}: {failed} while reading {where}; {found}; {verify}")
