"""What the pipeline reads from a preprocessed dataset folder, checked before DALI sees it.

The format is ``storage.dataformat`` (docs/data-format.md). Every check here fails with a
``DataError`` that names the file, so a broken dataset never reaches DALI (which would otherwise read
garbage from a stale index, or hang on an empty shard list).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage import dataformat as fmt
from storage.dataformat import DataError, read_info

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
               build_missing_index: bool = True) -> Split:
    """Resolve and check one split: every shard on disk, an index for each (built when missing),
    index sample counts summing to dataset.json's ``num_samples``, the manifest's shards all listed."""
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
