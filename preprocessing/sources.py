"""Find the images of each split in an ImageNet-shaped SOURCE folder, with their keys and labels.

Layouts understood (see docs/preprocessing.md):

- ``SOURCE/train/<wnid>/<wnid>_<n>.JPEG``: ILSVRC2012 train, or any class-folder tree;
- ``SOURCE/val/ILSVRC2012_val_NNNNNNNN.JPEG`` flat, labelled by ``LOC_val_solution.csv`` (Kaggle) or by
  the devkit's ``ILSVRC2012_validation_ground_truth.txt`` read with the devkit's ``meta.mat`` synset order;
- ``SOURCE/val/<wnid>/...``: val already sorted into class folders;
- ``SOURCE/<class>/...``: SOURCE itself a class-folder tree (one split, ``train``).

The class list is torchvision ImageFolder's: sorted class-folder names of train (ImageNet's standard
0..999 order), else the wnids of ``LOC_synset_mapping.txt``; names come from that file when present.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from storage.dataformat import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff",
                    ".webp")
LOC_VAL_SOLUTION = "LOC_val_solution.csv"
LOC_SYNSET_MAPPING = "LOC_synset_mapping.txt"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
MAX_KEY = 80  # a ustar member name holds 100 bytes: key + ".jpg" must fit with room to spare


@dataclass(frozen=True)
class ClassInfo:
    index: int
    wnid: str
    name: str


@dataclass(frozen=True)
class Input:
    """One input file. ``source`` is relative to SOURCE, POSIX separators; ``label`` -1 when unknown."""
    key: str
    source: str
    wnid: str
    label: int
    size: int
    mtime_ns: int
    path_key: str  # the fallback key, unique by construction, used when ``key`` collides


@dataclass
class Layout:
    root: Path
    classes: list[ClassInfo]
    splits: dict[str, list[Input]]
    notes: list[str] = field(default_factory=list)  # where labels came from, files ignored


def discover(source, splits: tuple[str, ...] | list[str] | None = None) -> Layout:
    """List every input of each split of ``source``, sorted by path, with labels from the class list.

    ``splits`` None takes ``train`` and ``val`` where they exist, or SOURCE itself as ``train`` when it
    is a class-folder tree. A split named explicitly must exist.
    """
    root = Path(source).resolve()
    if not root.is_dir():
        raise DataError(f"SOURCE {source} is not a folder")
    notes: list[str] = []
    split_dirs = _split_dirs(root, splits)
    mapping_file = _find(root, LOC_SYNSET_MAPPING)
    names = _read_synset_mapping(mapping_file) if mapping_file else {}

    # The class list: ImageFolder's sorted class folders of train, else the synset mapping's wnids.
    train_dir = split_dirs.get("train") or (root / "train" if (root / "train").is_dir() else None)
    tree = _class_folders(train_dir) if train_dir else {}
    if tree:
        wnids = sorted(tree)
        notes.append(f"classes: {len(wnids)} class folders of {train_dir}")
    elif names:
        wnids = sorted(names)
        notes.append(f"classes: {len(wnids)} wnids of {mapping_file}")
    else:
        folders = {}
        for d in split_dirs.values():
            folders.update(_class_folders(d))
        wnids = sorted(folders)
        if not wnids:
            raise DataError(f"no class list for {root}: no class folders under train/, and no "
                            f"{LOC_SYNSET_MAPPING} in {root} or its parents")
        notes.append(f"classes: {len(wnids)} class folders")
    classes = [ClassInfo(i, w, names.get(w, w)) for i, w in enumerate(wnids)]
    index = {c.wnid: c.index for c in classes}

    out = {split: _split_inputs(root, split, d, index, notes) for split, d in split_dirs.items()}
    return Layout(root, classes, out, notes)


def _split_inputs(root: Path, split: str, d: Path, index: dict[str, int], notes: list[str]) -> list[Input]:
    """One split's inputs: class folders of ``d``, or images directly in it labelled from a file."""
    folders = _class_folders(d)
    loose, ignored = _files_in(d, recursive=False)
    if folders and loose:
        raise DataError(f"unknown layout in {d}: it holds both {len(loose)} images and "
                        f"{len(folders)} class folders; expected one or the other")
    if folders:
        rows = []
        for wnid in sorted(folders):
            files, ign = _files_in(d / wnid, recursive=True)
            ignored += ign
            rows += [_input(root, f, wnid, index.get(wnid, -1)) for f in files]
        notes.append(f"{split}: {len(rows)} images in {len(folders)} class folders of {d}")
    elif loose:
        labels, origin = _flat_labels(root, d, split, loose)
        if not any(f.stem in labels for f in loose):
            raise DataError(f"{split} folder without labels: {origin} labels none of the {len(loose)} "
                            f"images in {d} (expected names like ILSVRC2012_val_00000001.JPEG)")
        rows = [_input(root, f, labels.get(f.stem, ""), index.get(labels.get(f.stem, ""), -1))
                for f in loose]
        notes.append(f"{split}: {len(rows)} images in {d}, labels from {origin}")
    else:
        raise DataError(f"no images in {d}: expected class folders (<wnid>/*.JPEG) or, for val, "
                        f"ILSVRC2012_val_*.JPEG files with {LOC_VAL_SOLUTION}")
    if ignored:
        notes.append(f"{split}: ignored {ignored} files without an image extension "
                     f"({', '.join(IMAGE_EXTENSIONS)})")
    return _unique_keys(rows, split)


def _split_dirs(root: Path, splits) -> dict[str, Path]:
    if splits is None:
        found = {s: root / s for s in ("train", "val")
                 if (root / s).is_dir() and any(True for _ in _walk_images(root / s))}
        if found:
            return found
        if _class_folders(root):
            return {"train": root}
        loose, _ = _files_in(root, recursive=False)
        if loose:
            raise DataError(f"unknown layout in {root}: {len(loose)} images lie directly in SOURCE; "
                            "expected SOURCE/train/<class>/..., SOURCE/val/..., or SOURCE/<class>/...")
        if any(True for _ in _walk_images(root)):
            raise DataError(f"unknown layout in {root}: no train/ or val/ folder and no class folders "
                            "holding images directly; expected SOURCE/train/<class>/*.JPEG, "
                            "SOURCE/val/..., or SOURCE/<class>/*.JPEG")
        raise DataError(f"no images in {root}: found no files with an image extension "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    out = {}
    for s in splits:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", s):
            raise DataError(f"--split {s!r}: a split name is lower-case letters, digits and '_'")
        if (root / s).is_dir():
            out[s] = root / s
        elif len(splits) == 1 and _class_folders(root):
            out[s] = root  # SOURCE is itself the split's class-folder tree
        else:
            raise DataError(f"--split {s}: no folder {root / s}")
    return out


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _files_in(d: Path, recursive: bool) -> tuple[list[Path], int]:
    """Image files under ``d`` sorted by path, and how many other (non-hidden) files were skipped."""
    files, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith(".")) if recursive else []
        for n in sorted(filenames):
            if _is_image(n):
                files.append(Path(dirpath) / n)
            elif not n.startswith("."):
                ignored += 1
    return sorted(files), ignored


def _walk_images(d: Path):
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]
        for n in filenames:
            if _is_image(n):
                yield Path(dirpath) / n


def _class_folders(d: Path) -> dict[str, Path]:
    """Subfolders of ``d`` holding at least one image (at any depth): ImageFolder's classes."""
    out = {}
    for e in sorted(os.scandir(d), key=lambda e: e.name):
        if e.is_dir() and not e.name.startswith(".") and any(True for _ in _walk_images(Path(e.path))):
            out[e.name] = Path(e.path)
    return out


def _input(root: Path, f: Path, wnid: str, label: int) -> Input:
    st = f.stat()
    rel = f.relative_to(root).as_posix()
    return Input(_sanitize(f.stem), rel, wnid, label, st.st_size, st.st_mtime_ns,
                 _sanitize(rel.rsplit(".", 1)[0].replace("/", "__")))


def _sanitize(name: str) -> str:
    """A key: ASCII letters, digits, '_' and '-' only (never a dot: WebDataset splits at the first)."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    if len(key) > MAX_KEY:
        key = key[:MAX_KEY - 17] + "_" + hashlib.sha256(name.encode()).hexdigest()[:16]
    return key


def _unique_keys(rows: list[Input], split: str) -> list[Input]:
    """Keys are stems; files whose stems collide in a split take their path-based key instead."""
    count: dict[str, int] = {}
    for r in rows:
        count[r.key] = count.get(r.key, 0) + 1
    out = [r if count[r.key] == 1 else Input(r.path_key, r.source, r.wnid, r.label, r.size, r.mtime_ns,
                                             r.path_key) for r in rows]
    seen: dict[str, str] = {}
    for r in out:
        if r.key in seen:
            raise DataError(f"{split}: files {seen[r.key]} and {r.source} map to the same key {r.key!r}; "
                            "rename one of them")
        seen[r.key] = r.source
    return out


def _find(root: Path, name: str) -> Path | None:
    """``name`` in SOURCE, SOURCE/val, a devkit data folder, or up to three parents (Kaggle's layout
    puts LOC_*.{csv,txt} three levels above ILSVRC/Data/CLS-LOC)."""
    places = [root, root / "val", root / "data"]
    places += sorted(p / "data" for p in root.glob("*devkit*") if p.is_dir())
    places += sorted(p for p in root.glob("*devkit*") if p.is_dir())
    places += list(root.parents)[:3]
    for p in places:
        if (p / name).is_file():
            return p / name
    return None


def _read_synset_mapping(path: Path) -> dict[str, str]:
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not wnid:
            raise DataError(f"{path}:{n}: expected '<wnid> <name>', got {line!r}")
        out[wnid] = name.strip() or wnid
    return out


def _flat_labels(root: Path, d: Path, split: str, files: list[Path]):
    """{stem: wnid} for a flat folder, and where the labels came from."""
    csv = _find(root, LOC_VAL_SOLUTION)
    if csv:
        labels = {}
        lines = csv.read_text(encoding="utf-8").splitlines()
        if not lines or not lines[0].startswith("ImageId"):
            raise DataError(f"{csv}: expected the header 'ImageId,PredictionString'")
        for n, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            image_id, _, pred = line.partition(",")
            if not pred.split():
                raise DataError(f"{csv}:{n}: no wnid in {line!r}")
            labels[image_id.strip()] = pred.split()[0]
        return labels, csv
    gt = _find(root, DEVKIT_GROUND_TRUTH)
    if gt:
        order = _devkit_synsets(root, gt)
        labels = {}
        for n, line in enumerate(gt.read_text().split(), start=1):
            ilsvrc_id = int(line)
            if ilsvrc_id not in order:
                raise DataError(f"{gt}: line {n} has ILSVRC2012_ID {ilsvrc_id}, not in the devkit's meta.mat")
            labels[f"ILSVRC2012_val_{n:08d}"] = order[ilsvrc_id]
        return labels, f"{gt} with the synset order of {DEVKIT_META}"
    raise DataError(f"{split} folder without labels: {d} holds {len(files)} images directly and no class "
                    f"folders, and there is no {LOC_VAL_SOLUTION}, nor {DEVKIT_GROUND_TRUTH} with "
                    f"{DEVKIT_META}, in {root}, {root / 'val'}, a devkit data folder or SOURCE's parents")


def _devkit_synsets(root: Path, gt: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid from the devkit's meta.mat (its 1000 leaf synsets), as torchvision reads it."""
    meta = gt.with_name(DEVKIT_META) if (gt.with_name(DEVKIT_META)).is_file() else _find(root, DEVKIT_META)
    if meta is None:
        raise DataError(f"{gt} numbers classes in the devkit's synset order, which is in {DEVKIT_META}; "
                        f"put the devkit's data/{DEVKIT_META} beside it")
    try:
        from scipy.io import loadmat  # only this layout needs scipy; it is not a declared dependency
    except ImportError as e:
        raise DataError(f"reading {meta} needs scipy (pip install scipy), or use {LOC_VAL_SOLUTION}") from e
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    out = {}
    for s in synsets:
        ilsvrc_id, wnid, num_children = int(s["ILSVRC2012_ID"]), str(s["WNID"]), int(s["num_children"])
        if num_children == 0:
            out[ilsvrc_id] = wnid
    return out
