"""Boxes through the augmentation (localisation, docs/localisation.md): which samples a localisation
net trains on, the target box of each training crop, and where the ground-truth boxes lie in an
evaluation image. ``pipeline.loader`` calls these when built with ``boxes=True``.

Training: DALI draws each image's crop window and flip once (``augment.train_augment(...,
with_draws=True)``) and outputs those very numbers next to the pixels; ``crop_targets`` maps the
stored boxes through them in torch. So the pixels and the box can never disagree about the crop.

Units. Stored boxes: corners ``(x1, y1, x2, y2)`` in pixels of the stored JPEG (continuous
coordinates: the image spans [0, W] x [0, H]). Training targets: ``(cx, cy, w, h)`` in units of the
crop side, ``(0.5, 0.5, 1, 1)`` = the whole crop. Evaluation: corners in pixels of the image as
yielded.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.boxes import xyxy_to_cxcywh
from storage.dataset import Dataset, Split
from pipeline.scoring import center_box
from storage import dataformat as fmt
from storage import shard_check
from storage.dataformat import DataError
from storage.files import TMP_PREFIX, temp_name

log = logging.getLogger(__name__)

# --- which samples: filtered copies of DALI's indexes, built once per node --------------------------

CACHE_NAME = "boxed-indexes"    # the node cache's folder: shard_check.node_cache_folder(CACHE_NAME)
CACHE_FORMAT = 1                # of entry.json and the key; another value never reuses an entry
ENTRY_JSON = "entry.json"
# assumption: the 3 most recently used entries per dataset folder and split: enough for a dataset
# preprocessed again while a run still reads the last version, and a bound on the cache (3 x the
# boxed share of the split's index bytes); older ones are deleted whenever an entry is used.
KEEP_ENTRIES = 3
STALE_TEMP_S = 3600             # a build's temporary folder this old was left by a killed process


def check_has_boxes(ds: Dataset, split: str) -> None:
    """``DataError`` naming dataset.json unless ``split`` records boxes (the contract: readers learn
    it from dataset.json, not by scanning shards)."""
    if not ds.has_boxes(split):
        raise DataError(f"{fmt.info_path(ds.root)}: split {split!r} has no {fmt.SPLIT_BOXES!r} entry, so its "
                        "samples carry no boxes; preprocess the dataset with its box annotations to "
                        "train or evaluate localisation")


def boxed_split(ds: Dataset, split: Split, cache: str | os.PathLike | None = None) -> Split:
    """The samples of ``split`` that have a box member, as DALI indexes built once per node.

    Each index keeps only the lines (samples) with a ``box`` component, at their offsets in the
    unchanged tar file; DALI's reader reads just those, and splits them over ranks like any index, so
    ``num_samples`` (hence steps per epoch, resume and the epoch guarantees) counts boxed samples
    only. A tar file without a boxed sample is left out.

    The copies are an entry of the node cache ``cache`` (default
    ``shard_check.node_cache_folder(CACHE_NAME)``, beside the shard hash cache, so ``$VGG_SHARD_CACHE``
    moves it), keyed by ``_entry_key``: a changed dataset never finds an old entry. The node's
    processes take turns on a lock, so one builds and the others reuse; an entry is built in a
    temporary folder and renamed into place, and reused only when its files are as its ``entry.json``
    records them (else rebuilt). An unwritable cache: a private folder, removed at exit."""
    check_has_boxes(ds, split.name)
    group = Path(cache or shard_check.node_cache_folder(CACHE_NAME)) / _group_name(ds.root, split.name)
    key, lock = _entry_key(ds, split), shard_check.node_lock(group)
    try:
        group.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("%s: cannot write the boxed index cache (%s); building a private copy", group, e)
        group, lock = Path(tempfile.mkdtemp(prefix="vgg-box-index-")), contextlib.nullcontext()
        atexit.register(shutil.rmtree, group, True)
    with lock:
        entry = _entry(group / key, key, split)
    _check_count(ds, split.name, entry["samples"])
    return Split(name=split.name, shards=tuple(split.shards[f[0]] for f in entry["files"]),
                 indexes=tuple(str(group / key / f[1]) for f in entry["files"]), num_samples=entry["samples"])


def _group_name(root: Path, split: str) -> str:
    """The cache folder of one dataset folder's split (what ``KEEP_ENTRIES`` counts): readable, and
    unique by a hash of the path."""
    return f"{root.name}-{split}-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}"


def _entry_key(ds: Dataset, split: Split) -> str:
    """What the copies are made from: this code's format, the dataset's fingerprint, the split's
    recorded index sha256 and each index's path and stamp (size, mtime, ctime), so an index
    rewritten or rebuilt since (checked by sha256 or not: ``check=False``) is a new key too."""
    spec = [CACHE_FORMAT, split.name, ds.fingerprint, ds.info["splits"][split.name].get(fmt.INDEXES_SHA256),
            [[idx, *shard_check.file_stamp(Path(idx))] for idx in split.indexes]]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:32]


def _entry(folder: Path, key: str, split: Split) -> dict:
    """The entry in ``folder``: reused when intact, else (missing or damaged) built; then marked
    used (its folder's mtime) and its group pruned. Called under the node lock."""
    entry = _read_entry(folder, key, len(split.indexes))
    if entry is None:
        if folder.exists():
            log.warning("%s: boxed index cache entry damaged (a file missing or changed); rebuilding it", folder)
            shutil.rmtree(folder, ignore_errors=True)
        entry = _build(folder, key, split)
    os.utime(folder)
    _prune(folder)
    return entry


def _build(folder: Path, key: str, split: Split) -> dict:
    """Write the filtered indexes and ``entry.json`` (per file: shard position, name, samples, bytes,
    mtime_ns) into a temporary folder beside ``folder`` and rename it into place. A process that
    published first wins: its entry is used and this one's removed."""
    tmp = temp_name(folder)
    tmp.mkdir()
    try:
        files = []
        for i, idx in enumerate(split.indexes):
            lines = fmt.index_lines_with(idx, fmt.BOX_EXT)
            if lines:
                out = tmp / f"{i:06d}-{Path(idx).name}"
                out.write_text(fmt.index_text(lines))   # a cache: published by the folder's rename
                st = out.stat()
                files.append([i, out.name, len(lines), st.st_size, st.st_mtime_ns])
        entry = {"format": CACHE_FORMAT, "key": key, "split": split.name,
                 "samples": sum(f[2] for f in files), "files": files}
        (tmp / ENTRY_JSON).write_text(json.dumps(entry))
        if shard_check.publish_folder(tmp, folder):
            return entry
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    entry = _read_entry(folder, key, len(split.indexes))
    if entry is None:
        raise DataError(f"{folder}: another process published this boxed index cache entry damaged; delete it")
    return entry


def _read_entry(folder: Path, key: str, shards: int) -> dict | None:
    """The entry in ``folder`` when complete and intact (its ``entry.json``, and every file with the
    size, mtime and header count recorded there: a deleted, truncated or rewritten file fails), else None."""
    try:
        entry = json.loads((folder / ENTRY_JSON).read_text())
        files = entry["files"]
        intact = (entry["format"] == CACHE_FORMAT and entry["key"] == key
                  and entry["samples"] == sum(f[2] for f in files)
                  and all(0 <= i < shards and _stat(folder / name) == [size, mtime]
                          and fmt.index_count(folder / name) == lines for i, name, lines, size, mtime in files))
        return entry if intact else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _prune(current: Path) -> None:
    """Keep ``current`` and the ``KEEP_ENTRIES - 1`` most recently used other entries of its group;
    remove temporary folders older than ``STALE_TEMP_S`` (a build killed midway)."""
    now, others = time.time(), []
    for path in current.parent.iterdir():
        try:
            used = path.stat().st_mtime_ns
        except OSError:
            continue                    # removed meanwhile by a process without the lock
        if path.name.startswith(TMP_PREFIX):
            if now - used / 1e9 > STALE_TEMP_S:
                shutil.rmtree(path, ignore_errors=True)
        elif path.is_dir() and path != current:
            others.append((used, path))
    for _, path in sorted(others, reverse=True)[KEEP_ENTRIES - 1:]:
        shutil.rmtree(path, ignore_errors=True)


def _check_count(ds: Dataset, split: str, total: int) -> None:
    """The boxed samples found must be dataset.json's ``boxes.images`` (else an index is stale), and some."""
    recorded = ds.info["splits"][split][fmt.SPLIT_BOXES]
    images = recorded.get("images") if isinstance(recorded, dict) else None
    if images is not None and int(images) != total:
        raise DataError(f"{fmt.info_path(ds.root)}: split {split!r} records {images} images with "
                        f"boxes but its indexes hold {total}; an index is stale (delete the .idx files)")
    if total == 0:
        raise DataError(f"{fmt.info_path(ds.root)}: split {split!r} has a {fmt.SPLIT_BOXES!r} entry but no "
                        "sample in its shards has a box member")


# --- pure math -----------------------------------------------------------------------------------

def pick_target(xyxy: torch.Tensor) -> torch.Tensor:
    """One sample's target (4,) corners in crop units from its boxes (G, 4), same units.

    The box with the largest area inside the crop (the first of equals), clipped to the crop. When no
    box overlaps the crop (area inside 0), the largest box unclipped: it lies outside [0, 1]^2 and
    still says where the object is relative to the window."""
    clipped = xyxy.clamp(0.0, 1.0)
    inside = (clipped[:, 2] - clipped[:, 0]).clamp(min=0) * (clipped[:, 3] - clipped[:, 1]).clamp(min=0)
    if inside.max() > 0:
        return clipped[int(torch.argmax(inside))]
    area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    return xyxy[int(torch.argmax(area))]


def crop_targets(boxes: list[torch.Tensor], start: torch.Tensor, end: torch.Tensor,
                 mirror: torch.Tensor) -> torch.Tensor:
    """(N, 4) float32 targets (cx, cy, w, h) in crop units.

    ``boxes``: N (G, 4) corners in source pixels, G >= 1. ``start``, ``end``: (N, 2) the crop windows
    (y, x) in source pixels, as the resize used them. ``mirror``: (N,) 1 where the crop was flipped
    horizontally (a crop coordinate u becomes 1 - u, so x1 and x2 swap)."""
    out = []
    for b, s, e, m in zip(boxes, start.double(), end.double(), mirror.tolist()):
        b = b.double()
        u = (b[:, [0, 2]] - s[1]) / (e[1] - s[1])               # (G, 2) x1, x2 in crop units
        v = (b[:, [1, 3]] - s[0]) / (e[0] - s[0])               # (G, 2) y1, y2
        if m:
            u = 1.0 - u.flip(-1)
        out.append(pick_target(torch.stack((u[:, 0], v[:, 0], u[:, 1], v[:, 1]), -1)))
    return xyxy_to_cxcywh(torch.stack(out)).float()


def rescaled_size(h: int, w: int, q: int) -> tuple[int, int]:
    """(H', W') of an H x W image after DALI's ``resize_shorter=q``: the shorter side is q, the other
    side rounded half up (checked against DALI's output shapes by tests/test_box_augment.py)."""
    s = q / min(h, w)
    return (q if h <= w else math.floor(h * s + 0.5)), (q if w < h else math.floor(w * s + 0.5))


def image_boxes(boxes: torch.Tensor, src_hw: tuple[int, int], q: int, crop: int | None) -> torch.Tensor:
    """(G, 4) corners in source pixels -> pixels of the evaluation image: the whole image rescaled to
    shorter side q (``crop`` None), or its centre crop of side ``crop``. Not clipped. The resize maps
    [0, W] onto [0, W'], so each axis scales by W'/W (the rounding makes the two differ slightly)."""
    h, w = src_hw
    rh, rw = rescaled_size(h, w, q)
    oy, ox = center_box(rh, rw, crop) if crop is not None else (0, 0)
    scale = torch.tensor([rw / w, rh / h, rw / w, rh / h], dtype=torch.float64)
    offset = torch.tensor([ox, oy, ox, oy], dtype=torch.float64)
    return (boxes.double() * scale - offset).float()


# --- DALI outputs -> torch -----------------------------------------------------------------------

def per_sample_boxes(tl, n: int) -> list[torch.Tensor]:
    """The first ``n`` samples' box members (flat float32, 4 per box) as (G, 4) tensors (G may be 0)."""
    return [torch.from_numpy(np.array(tl[i]).reshape(-1, 4)) for i in range(n)]


def train_outputs(box, draws) -> list:
    """Extra DALI outputs of the training graph: the box members, then the crop window and the flip
    the pixels were made with (the flip only when it is a node: flipping may be off)."""
    start, end, mirror = draws
    return [box, start, end] + ([mirror] if not isinstance(mirror, (int, float)) else [])


def train_boxes(extra, device: torch.device) -> torch.Tensor:
    """``Batch.boxes`` from ``train_outputs``' DALI results: (N, 4) float32 on ``device``."""
    box, start, end, *mirror = extra
    start = torch.from_numpy(np.array(start.as_tensor(), dtype=np.float32)).reshape(-1, 2)
    end = torch.from_numpy(np.array(end.as_tensor(), dtype=np.float32)).reshape(-1, 2)
    n = start.shape[0]
    flips = (torch.from_numpy(np.array(mirror[0].as_tensor())).reshape(-1) if mirror
             else torch.zeros(n, dtype=torch.int32))
    targets = crop_targets(per_sample_boxes(box, n), start, end, flips)
    if device.type == "cuda":
        # from pinned memory without waiting: the copy is ordered on the current stream like the images
        return targets.pin_memory().to(device, non_blocking=True)
    return targets


def eval_outputs(box, jpegs) -> list:
    """Extra DALI outputs of the evaluation graph: the box members and each JPEG's (H, W, C)."""
    import nvidia.dali.fn as fn

    return [box, fn.peek_image_shape(jpegs)]


def eval_boxes(extra, n: int, q: int, crop: int | None) -> tuple[torch.Tensor, ...]:
    """``Batch.gt_boxes`` of an evaluation batch's first ``n`` samples from the DALI outputs (box
    members, the JPEG's (H, W, C) from its header): N (G, 4) float32 CPU corners in image pixels."""
    box, shape = extra
    return tuple(image_boxes(b, tuple(int(v) for v in np.array(shape[i])[:2]), q, crop)
                 for i, b in enumerate(per_sample_boxes(box, n)))
