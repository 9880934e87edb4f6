"""What the pipeline reads from a preprocessed dataset folder, checked before DALI sees it.

The contract is docs/data-format.md: ``<root>/<split>-NNNNNN.tar`` shards with a DALI index
(``.idx``) beside each, ``<root>/<split>/manifest.parquet`` and ``<root>/dataset.json``. Every check
here fails with a message that names the file, so a broken dataset never reaches DALI (which would
otherwise read garbage from a stale index, or hang on an empty shard list).
"""
from __future__ import annotations

import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

INDEX_VERSION = "v1.2"  # the wds2idx format DALI's fn.readers.webdataset reads


class DatasetError(ValueError):
    """A dataset folder that does not match docs/data-format.md; the message names the file."""


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


def read_info(root: str | os.PathLike) -> dict:
    """Parsed ``<root>/dataset.json``."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path}: not found; is {root} a folder written by `python -m jobs.preprocess`?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from e


def load_stats(root: str | os.PathLike, info: dict | None = None) -> Stats:
    """The training mean RGB and RGB eigen-decomposition from dataset.json, validated."""
    info = read_info(root) if info is None else info
    path = Path(root) / "dataset.json"
    stats = info.get("stats")
    if not stats:
        raise DatasetError(f"{path}: has no 'stats' (mean_rgb, rgb_eigval, rgb_eigvec); the pipeline "
                           "takes the mean subtraction and the colour shift from there. Re-run preprocessing "
                           "with the train split.")
    missing = [k for k in ("mean_rgb", "rgb_eigval", "rgb_eigvec") if stats.get(k) is None]
    if missing:
        raise DatasetError(f"{path}: 'stats' lacks {', '.join(missing)}")
    mean = np.asarray(stats["mean_rgb"], dtype=np.float64)
    val = np.asarray(stats["rgb_eigval"], dtype=np.float64)
    vec = np.asarray(stats["rgb_eigvec"], dtype=np.float64)
    if mean.shape != (3,) or val.shape != (3,) or vec.shape != (3, 3):
        raise DatasetError(f"{path}: stats need mean_rgb[3], rgb_eigval[3], rgb_eigvec[3][3]; got shapes "
                           f"{mean.shape}, {val.shape}, {vec.shape}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(val)) and np.all(np.isfinite(vec))):
        raise DatasetError(f"{path}: stats contain NaN or infinity")
    if np.any(val < -1e-6):
        raise DatasetError(f"{path}: rgb_eigval must be >= 0 (a covariance's eigenvalues), got {val.tolist()}")
    return Stats(mean_rgb=tuple(mean.tolist()), eigval=tuple(np.clip(val, 0, None).tolist()),
                 eigvec=tuple(tuple(row) for row in vec.tolist()))


def num_classes(root: str | os.PathLike, info: dict | None = None) -> int:
    info = read_info(root) if info is None else info
    return len(info.get("classes", []))


def load_split(root: str | os.PathLike, split: str, info: dict | None = None,
               build_missing_index: bool = True) -> Split:
    """Resolve and check one split: every shard on disk, an index for each (built when missing),
    index sample counts summing to dataset.json's ``num_samples``, the manifest's shards all listed."""
    root = Path(root).resolve()
    info = read_info(root) if info is None else info
    splits = info.get("splits", {})
    if split not in splits:
        raise DatasetError(f"{root / 'dataset.json'}: no split {split!r}; it has {', '.join(splits) or 'none'}")
    entry = splits[split]
    names = list(entry.get("shards", []))
    if not names:
        raise DatasetError(f"{root / 'dataset.json'}: split {split!r} lists no shards")
    _check_manifest_shards(root, split, names)
    shards, indexes, total = [], [], 0
    for name in names:
        tar = root / name
        if not tar.is_file():
            raise DatasetError(f"{tar}: shard of split {split!r} listed in dataset.json is missing on disk")
        idx = tar.with_suffix(".idx")
        if not idx.is_file():
            if not build_missing_index:
                raise DatasetError(f"{idx}: index of {tar.name} is missing")
            log.warning("%s: index missing, building it", idx)
            build_index(tar, idx)
        total += index_count(idx)
        shards.append(str(tar))
        indexes.append(str(idx))
    expected = int(entry.get("num_samples", -1))
    if total != expected:
        raise DatasetError(f"{root}: the {split!r} indexes count {total} samples but dataset.json says "
                           f"{expected}; an index is stale (delete the .idx files to rebuild them) or a "
                           "shard was rewritten")
    return Split(name=split, shards=tuple(shards), indexes=tuple(indexes), num_samples=total)


def manifest_path(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / split / "manifest.parquet"


def stored_labels(root: str | os.PathLike, split: str) -> dict[str, int]:
    """key -> label of every sample stored in the split's shards (quarantined rows excluded)."""
    import pyarrow.parquet as pq

    path = manifest_path(root, split)
    if not path.is_file():
        raise DatasetError(f"{path}: manifest not found")
    table = pq.read_table(path, columns=["key", "label", "shard", "status"]).to_pydict()
    return {k: int(lbl) for k, lbl, shard, status in
            zip(table["key"], table["label"], table["shard"], table["status"])
            if shard is not None and status != "quarantined"}


def _check_manifest_shards(root: Path, split: str, listed: list[str]) -> None:
    """Every shard the manifest puts a sample in is one dataset.json lists (reads one column)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = manifest_path(root, split)
    if not path.is_file():
        raise DatasetError(f"{path}: manifest of split {split!r} not found")
    column = pq.read_table(path, columns=["shard"]).column("shard")
    in_manifest = {s for s in pc.unique(column).to_pylist() if s}
    unlisted = sorted(in_manifest - set(listed))
    if unlisted:
        raise DatasetError(f"{path}: samples stored in {', '.join(unlisted[:5])} which dataset.json does not "
                           f"list for split {split!r}")
    for name in sorted(in_manifest):
        if not (root / name).is_file():
            raise DatasetError(f"{root / name}: shard named in {path} is missing on disk")


# --- DALI index files -------------------------------------------------------------------------------

def index_count(idx: str | os.PathLike) -> int:
    """The sample count in an index file's header line (``v1.2 <num_samples>``)."""
    with open(idx) as f:
        head = f.readline().split()
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise DatasetError(f"{idx}: not a DALI webdataset index (expected '{INDEX_VERSION} <count>' "
                           f"on the first line, got {' '.join(head)!r}); delete it to rebuild")
    return int(head[1])


def index_lines(tar: str | os.PathLike) -> list[str]:
    """The index body for a tar, one line per sample, as DALI's ``wds2idx`` writes it:
    ``<ext> <data offset> <size> <member name>`` for each member of the sample, members of one
    sample being consecutive regular files sharing the name up to the first dot."""
    samples: list[list[tuple[str, int, int, str]]] = []
    last = None
    try:
        with tarfile.open(tar, "r:") as tf:
            for m in tf:
                if not m.isreg():
                    continue
                base_dir = m.name.rfind("/") + 1
                dot = m.name.find(".", base_dir)
                if dot < 0:
                    continue
                base, ext = m.name[:dot], m.name[dot + 1:]
                if not base or base.endswith("/"):  # hidden files, as wds2idx skips them
                    continue
                component = (ext, m.offset_data, m.size, m.name)
                if base != last:
                    samples.append([component])
                    last = base
                else:
                    samples[-1].append(component)
    except tarfile.TarError as e:
        raise DatasetError(f"{tar}: not a readable tar ({e})") from e
    if not samples:
        raise DatasetError(f"{tar}: holds no samples")
    return [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in sample) for sample in samples]


def build_index(tar: str | os.PathLike, idx: str | os.PathLike) -> int:
    """Write ``idx`` for ``tar`` atomically (temp name, fsync, rename); returns the sample count."""
    lines = index_lines(tar)
    tmp = Path(f"{idx}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(f"{INDEX_VERSION} {len(lines)}\n")
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, idx)
    return len(lines)
