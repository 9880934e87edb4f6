"""A preprocessed dataset folder, opened once and checked before DALI sees it: ``open_dataset(root)``.

The format is ``storage.dataformat`` (docs/data-format.md). Every check here fails with a
``DataError`` that names the file, so a broken dataset never reaches DALI (which would otherwise read
garbage from a stale index, or hang on an empty shard list): every index entry is checked against
its tar's member headers (cached per node), the manifest's shards and stored count against dataset.json
(the verdict cached per node too), and a shard or index whose bytes changed since preprocessing is
refused before it is read (``storage.shard_check``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from storage import dataformat as fmt
from storage import shard_check
from storage.dataformat import DataError, read_info
from storage.files import atomic_write

log = logging.getLogger(__name__)

MANIFEST_CACHE = "manifest-check"      # the node cache's name: shard_check.node_cache_folder(MANIFEST_CACHE)
MANIFEST_CACHE_FORMAT = 1


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


@dataclass
class Dataset:
    """A dataset folder's ``dataset.json``, read once; its splits resolved (their indexes checked
    against their tars, and their shards' and indexes' sha256) once each, when first asked for."""
    root: Path
    info: dict
    _splits: dict[tuple[str, bool], Split] = field(default_factory=dict, repr=False)

    @property
    def fingerprint(self) -> str:
        return str(self.info.get("fingerprint", ""))

    @property
    def classes(self) -> list[dict]:
        return list(self.info.get("classes", []))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def stats(self) -> Stats:
        return _stats(self.root, self.info)

    def boxed_images(self, split: str) -> int:
        """How many stored images of ``split`` have a box (0: none), from dataset.json."""
        return fmt.boxed_images(self.info, split)

    def has_boxes(self, split: str) -> bool:
        """Whether dataset.json records boxes for ``split`` (readers learn it here, never by scanning)."""
        return fmt.SPLIT_BOXES in self.info.get("splits", {}).get(split, {})

    def split(self, name: str, build_missing_index: bool = True, check: bool = True) -> Split:
        """The split resolved and checked (``resolve_split``, index entries against tar headers
        included); with ``check``, its shards' and indexes' sha256 too."""
        key = (name, check)
        if key not in self._splits:
            self._splits[key] = resolve_split(self.root, self.info, name, build_missing_index)
            if check:
                self.check_shards(name)
        return self._splits[key]

    def check_shards(self, split: str, cache: str | os.PathLike | None = None) -> None:
        shard_check.check_split_shards(self.root, split, self.info.get("splits", {}).get(split, {}), cache)

    def stored_labels(self, split: str) -> dict[str, int]:
        """key -> label of every sample stored in the split's shards (quarantined rows excluded)."""
        table = fmt.read_manifest(self.root, split, ["key", "label", "shard", "status"], self.info).to_pydict()
        return {k: int(lbl) for k, lbl, shard, status in
                zip(table["key"], table["label"], table["shard"], table["status"])
                if shard is not None and status != "quarantined"}


def open_dataset(root: str | os.PathLike) -> Dataset:
    """The dataset at ``root``: its dataset.json read and checked to be a format this version reads."""
    root = Path(root).resolve()
    return Dataset(root, read_info(root))


# The same, for a caller that needs one thing of a dataset once.
def load_split(root: str | os.PathLike, split: str, build_missing_index: bool = True, check: bool = True) -> Split:
    return open_dataset(root).split(split, build_missing_index, check)


def load_stats(root: str | os.PathLike) -> Stats:
    return open_dataset(root).stats()


def stored_labels(root: str | os.PathLike, split: str) -> dict[str, int]:
    return open_dataset(root).stored_labels(split)


def check_shards(root: str | os.PathLike, split: str, cache: str | os.PathLike | None = None) -> None:
    open_dataset(root).check_shards(split, cache)


# ----------------------------------------------------------------------------- checks

def _stats(root: Path, info: dict) -> Stats:
    """The training mean RGB and RGB eigen-decomposition from dataset.json, validated."""
    path = fmt.info_path(root)
    stats = info.get("stats")
    if not stats:
        raise DataError(f"{path}: has no 'stats' (mean_rgb, rgb_eigval, rgb_eigvec); the pipeline "
                           "takes the mean subtraction and the colour shift from there. Re-run preprocessing "
                           "with the train split.")
    missing = [k for k in ("mean_rgb", "rgb_eigval", "rgb_eigvec") if stats.get(k) is None]
    if missing:
        raise DataError(f"{path}: 'stats' lacks {', '.join(missing)}")
    mean, val, vec = stats["mean_rgb"], stats["rgb_eigval"], stats["rgb_eigvec"]
    if not (_numbers(mean, 3) and _numbers(val, 3) and isinstance(vec, list) and len(vec) == 3
            and all(_numbers(row, 3) for row in vec)):
        raise DataError(f"{path}: stats need mean_rgb[3], rgb_eigval[3], rgb_eigvec[3][3] of numbers; got "
                        f"{mean!r}, {val!r}, {vec!r}")
    if not all(abs(x) <= sys.float_info.max for x in [*mean, *val, *(x for row in vec for x in row)]):
        raise DataError(f"{path}: stats contain NaN, infinity or a number past a float's range")
    if any(v < -1e-6 for v in val):
        raise DataError(f"{path}: rgb_eigval must be >= 0 (a covariance's eigenvalues), got {val}")
    return Stats(mean_rgb=tuple(float(x) for x in mean), eigval=tuple(max(float(v), 0.0) for v in val),
                 eigvec=tuple(tuple(float(x) for x in row) for row in vec))


def _numbers(values, n: int) -> bool:
    return (isinstance(values, list) and len(values) == n
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values))


def resolve_split(root: Path, info: dict, split: str, build_missing_index: bool = True,
                  cache: str | os.PathLike | None = None) -> Split:
    """Resolve and check one split: every shard on disk, an index for each (built when missing),
    index sample counts summing to dataset.json's ``num_samples``, the manifest's shards all listed,
    and every index entry the member of its tar that it names (``shard_check.check_split_indexes``,
    cached per node in ``cache``), so DALI never reads past a file's end or another sample's bytes."""
    splits = info.get("splits", {})
    if split not in splits:
        raise DataError(f"{fmt.info_path(root)}: no split {split!r}; it has {', '.join(splits) or 'none'}")
    entry = splits[split]
    names = list(entry.get("shards", []))
    if not names:
        raise DataError(f"{fmt.info_path(root)}: split {split!r} lists no shards")
    _check_manifest_shards(root, split, names, info, cache)
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
    shard_check.check_split_indexes([Path(s) for s in shards], [Path(i) for i in indexes], cache)
    return Split(name=split, shards=tuple(shards), indexes=tuple(indexes), num_samples=total)


def _check_manifest_shards(root: Path, split: str, listed: list[str], info: dict,
                           cache: str | os.PathLike | None = None) -> None:
    """Every shard the manifest puts a sample in is one dataset.json lists, and the manifest's stored
    rows (those dataset.json's ``inputs`` covers) are the ``num_samples`` it records: a dataset.json
    that counts fewer inputs than were stored would hide samples from every exactly-once check.

    Reading the manifest's rows on every loader start grows with the dataset, so a sound verdict is
    cached per node (``_manifest_verdict_file(cache)``, the processes of a node taking turns on its
    lock) under the manifest's (size, mtime_ns, ctime_ns) and a digest of what dataset.json says of
    the split (``inputs``, ``num_samples``, shard list): a rewritten manifest or a changed dataset.json
    is read again, and a bad verdict is never cached. A warm start still finds every shard the
    manifest names on disk (one ``stat`` each)."""
    path = fmt.manifest_path(root, split)
    try:
        stamp = shard_check.file_stamp(path) + [_split_digest(info["splits"][split], listed)]
    except OSError:                     # no manifest: the check below says so
        _manifest_shards_checked(root, split, listed, info)
        return
    verdict_file = _manifest_verdict_file(cache)
    with shard_check.node_lock(verdict_file):
        verdicts = _read_verdicts(verdict_file)
        hit = verdicts.get(str(path))
        if hit is not None and hit[:4] == stamp:
            in_manifest = hit[4]
        else:
            in_manifest = _manifest_shards_checked(root, split, listed, info)
            verdicts[str(path)] = stamp + [in_manifest]
            _write_verdicts(verdict_file, verdicts)
    for name in in_manifest:
        if not (root / name).is_file():
            raise DataError(f"{root / name}: shard named in {path} is missing on disk")


def _manifest_shards_checked(root: Path, split: str, listed: list[str], info: dict) -> list[str]:
    """``_check_manifest_shards``'s reading of the manifest: raises ``DataError`` on a bad one, else
    returns the shard names it puts samples in, sorted."""
    import pyarrow.compute as pc

    path = fmt.manifest_path(root, split)
    table = fmt.read_manifest(root, split, ["shard", "status"], info)
    column = table.column("shard")
    stored = int(pc.sum(pc.and_(pc.is_valid(column), pc.not_equal(table.column("status"), "quarantined"))).as_py() or 0)
    recorded = info["splits"][split].get("num_samples")
    if stored != recorded:
        raise DataError(f"{path}: {stored} stored samples in the rows {fmt.DATASET_JSON}'s 'inputs' covers, but it "
                        f"records num_samples {recorded} for split {split!r}; one of them is damaged (run "
                        f"`python -m jobs.preprocess verify {root}`)")
    in_manifest = {s for s in pc.unique(column).to_pylist() if s}
    unlisted = sorted(in_manifest - set(listed))
    if unlisted:
        raise DataError(f"{path}: samples stored in {', '.join(unlisted[:5])} which dataset.json does not "
                           f"list for split {split!r}")
    return sorted(in_manifest)


def _split_digest(entry: dict, listed: list[str]) -> str:
    """sha256 of what dataset.json says of a split that the manifest check depends on."""
    said = {"inputs": entry.get("inputs"), "num_samples": entry.get("num_samples"), "shards": listed}
    return hashlib.sha256(json.dumps(said, sort_keys=True, default=str).encode()).hexdigest()


def _manifest_verdict_file(cache: str | os.PathLike | None) -> Path:
    """This node's manifest verdicts: ``<shard cache's folder>/manifest-check-<host name>.json``, or
    beside ``cache`` (an explicit shard cache file) as ``<its stem>-manifest-check.json``."""
    if cache is None:
        return shard_check.node_cache_folder(MANIFEST_CACHE).with_suffix(".json")
    return Path(cache).with_name(f"{Path(cache).stem}-{MANIFEST_CACHE}.json")


def _read_verdicts(verdict_file: Path) -> dict[str, list]:
    """manifest path -> [size, mtime_ns, ctime_ns, split digest, [shard names]]; a missing, unreadable
    or foreign file is an empty cache (it is disposable), a malformed entry is dropped."""
    try:
        data = json.loads(verdict_file.read_text())
        if data.get("format") != MANIFEST_CACHE_FORMAT:
            return {}
        return {p: v for p, v in data["manifests"].items()
                if isinstance(v, list) and len(v) == 5 and all(isinstance(x, int) for x in v[:3])
                and isinstance(v[3], str) and isinstance(v[4], list) and all(isinstance(n, str) for n in v[4])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write_verdicts(verdict_file: Path, verdicts: dict[str, list]) -> None:
    """Atomically, dropping manifests that are gone; a cache that cannot be written only costs a re-read."""
    kept = {p: v for p, v in verdicts.items() if os.path.exists(p)}
    try:
        atomic_write(verdict_file, json.dumps({"format": MANIFEST_CACHE_FORMAT, "manifests": kept}).encode())
    except OSError as e:
        log.warning("%s: cannot write the manifest check cache (%s); manifests will be read again", verdict_file, e)


