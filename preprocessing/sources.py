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
import re
from dataclasses import dataclass, field
from pathlib import Path

from preprocessing.annotations import text_lines
from preprocessing.walk import Entry, listing
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
    notes: list[str] = field(default_factory=list)  # where labels came from
    # Every entry under SOURCE that is no input: (path relative to SOURCE, "skipped" or "quarantined",
    # why). Quarantined here: links that cannot be followed, loops, FIFOs, unreadable folders.
    others: list[tuple[str, str, str]] = field(default_factory=list)
    new_classes: list[ClassInfo] = field(default_factory=list)  # appended after ``known`` this time
    # Localisation annotations (``preprocessing.boxfiles.attach``): {split: {source: [(wnid, x1, y1,
    # x2, y2), ...]}} in annotation pixels, for the inputs an annotation names; and the annotation rows
    # or objects that could not be read.
    boxes: dict[str, dict[str, list]] = field(default_factory=dict)
    box_problems: list[str] = field(default_factory=list)


def discover(source, splits: tuple[str, ...] | list[str] | None = None,
             known: list[ClassInfo] | None = None) -> Layout:
    """List every input of each split of ``source``, sorted by path, with labels from the class list,
    and every other entry under ``source`` with why it is no input.

    ``splits`` None takes ``train`` and ``val`` where they hold images, or SOURCE itself as ``train``
    when it is a class-folder tree; a split named explicitly must be a folder of SOURCE. ``known``: the
    classes an existing OUT has; they keep their indices and classes found now are appended after them.
    """
    root = Path(source).resolve()
    if not root.is_dir():
        raise DataError(f"SOURCE {source} is not a folder")
    notes: list[str] = []
    entries = listing(root)
    images = [e for e in entries if not e.hidden and _is_image(e.rel)]
    split_dirs = _split_dirs(root, images, splits)
    mapping_file = _find(root, LOC_SYNSET_MAPPING)
    names = _read_synset_mapping(mapping_file) if mapping_file else {}
    label_files = {mapping_file} if mapping_file else set()
    classes, new = _classes(root, images, split_dirs, names, known, notes)
    index = {c.wnid: c.index for c in classes}
    out = {split: _split_inputs(root, split, prefix, images, index, notes, label_files)
           for split, prefix in split_dirs.items()}
    used = {i.source for inputs in out.values() for i in inputs}
    others = _others(root, entries, used, split_dirs, label_files)
    return Layout(root, classes, out, notes, others, new)


def _classes(root: Path, images: list[Entry], split_dirs: dict[str, str], names: dict[str, str],
             known: list[ClassInfo] | None, notes: list[str]) -> tuple[list[ClassInfo], list[ClassInfo]]:
    """ImageFolder's sorted class folders of train, else the synset mapping's wnids, else every class
    folder; after ``known`` (which keep their indices and names). Returns (all classes, new ones)."""
    train = split_dirs.get("train", "train" if _under(images, "train") else None)
    tree = _class_folders(images, train) if train is not None else {}
    if tree:
        wnids = sorted(tree)
        notes.append(f"classes: {len(wnids)} class folders of {root / train if train else root}")
    elif names:
        wnids = sorted(names)
        notes.append(f"classes: {len(wnids)} wnids of {LOC_SYNSET_MAPPING}")
    else:
        wnids = sorted({w for prefix in split_dirs.values() for w in _class_folders(images, prefix)})
        if not wnids:
            raise DataError(f"no class list for {root}: no class folders under train/, and no "
                            f"{LOC_SYNSET_MAPPING} in {root} or its parents")
        notes.append(f"classes: {len(wnids)} class folders")
    known = list(known or [])
    have = {c.wnid for c in known}
    new = [ClassInfo(len(known) + n, w, names.get(w, w)) for n, w in enumerate(w for w in wnids if w not in have)]
    return known + new, new


def _under(images: list[Entry], prefix: str) -> list[tuple[str, Entry]]:
    """(path below ``prefix``, entry) of the images in folder ``prefix`` ("" = SOURCE itself)."""
    if not prefix:
        return [(e.rel, e) for e in images]
    return [(e.rel[len(prefix) + 1:], e) for e in images if e.rel.startswith(prefix + "/")]


def _class_folders(images: list[Entry], prefix: str) -> dict[str, int]:
    """Subfolders of ``prefix`` holding at least one image (at any depth), with their image counts:
    ImageFolder's classes."""
    out: dict[str, int] = {}
    for rest, _ in _under(images, prefix):
        if "/" in rest:
            wnid = rest.split("/", 1)[0]
            out[wnid] = out.get(wnid, 0) + 1
    return out


def _split_inputs(root: Path, split: str, prefix: str, images: list[Entry], index: dict[str, int],
                  notes: list[str], label_files: set) -> list[Input]:
    """One split's inputs: class folders of ``prefix``, or images directly in it labelled from a file."""
    under = _under(images, prefix)
    d = root / prefix if prefix else root
    folders = _class_folders(images, prefix)
    loose = [e for rest, e in under if "/" not in rest]
    if folders and loose:
        raise DataError(f"unknown layout in {d}: it holds both {len(loose)} images and "
                        f"{len(folders)} class folders; expected one or the other")
    if folders:
        rows = []
        for rest, e in under:
            wnid = rest.split("/", 1)[0]
            rows.append(_input(e, wnid, index.get(wnid, -1)))
        notes.append(f"{split}: {len(rows)} images in {len(folders)} class folders of {d}")
    elif loose:
        labels, origin = _flat_labels(root, d, split, len(loose), label_files)
        stems = [Path(e.rel).stem for e in loose]
        if not any(s in labels for s in stems):
            raise DataError(f"{split} folder without labels: {origin} labels none of the {len(loose)} "
                            f"images in {d} (expected names like ILSVRC2012_val_00000001.JPEG)")
        rows = [_input(e, labels.get(s, ""), index.get(labels.get(s, ""), -1)) for s, e in zip(stems, loose)]
        notes.append(f"{split}: {len(rows)} images in {d}, labels from {origin}")
    else:
        raise DataError(f"no images in {d}: expected class folders (<wnid>/*.JPEG) or, for val, "
                        f"ILSVRC2012_val_*.JPEG files with {LOC_VAL_SOLUTION}")
    return _unique_keys(rows, split)


def _split_dirs(root: Path, images: list[Entry], splits) -> dict[str, str]:
    """{split: its folder relative to SOURCE ("" when SOURCE itself is the class tree)}."""
    if splits is None:
        found = {s: s for s in ("train", "val") if _under(images, s)}
        if found:
            return found
        if _class_folders(images, ""):
            return {"train": ""}
        if images:
            raise DataError(f"unknown layout in {root}: {len(images)} images lie directly in SOURCE; "
                            "expected SOURCE/train/<class>/..., SOURCE/val/..., or SOURCE/<class>/...")
        raise DataError(f"no images in {root}: found no files with an image extension "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    out = {}
    for s in splits:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", s):
            raise DataError(f"--split {s!r}: a split name is lower-case letters, digits and '_'")
        if not (root / s).is_dir():
            # Never SOURCE itself as the split: that would read train/ and val/ as two classes.
            raise DataError(f"--split {s}: no folder {root / s} (SOURCE has "
                            f"{', '.join(sorted(p.name for p in root.iterdir() if p.is_dir())) or 'no folders'})")
        out[s] = s
    return out


def _others(root: Path, entries: list[Entry], used: set[str], split_dirs: dict[str, str],
            label_files: set) -> list[tuple[str, str, str]]:
    """Every entry that is no input, with "skipped" or "quarantined" and why."""
    labels = {str(p) for p in label_files}
    prefixes = list(split_dirs.values())
    out = []
    for e in entries:
        if e.rel in used:
            continue
        if e.hidden:
            out.append((e.rel, "skipped", "hidden: its name or a folder on its path starts with '.'"))
        elif e.problem:
            out.append((e.rel, "quarantined", e.problem))
        elif str(root / e.rel) in labels:
            out.append((e.rel, "skipped", "label file: read for the labels, not an image"))
        elif any(not p or e.rel.startswith(p + "/") for p in prefixes):
            out.append((e.rel, "skipped", f"not an image: extension {Path(e.rel).suffix or '(none)'!r} is "
                                          "not one of " + " ".join(IMAGE_EXTENSIONS)))
        else:
            out.append((e.rel, "skipped", f"not in a split folder of this run ({', '.join(split_dirs)})"))
    return out


def _is_image(rel: str) -> bool:
    return rel.lower().endswith(IMAGE_EXTENSIONS)


def _input(e: Entry, wnid: str, label: int) -> Input:
    return Input(_sanitize(Path(e.rel).stem), e.rel, wnid, label, e.size, e.mtime_ns,
                 _sanitize(e.rel.rsplit(".", 1)[0].replace("/", "__")))


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
    for n, line in enumerate(text_lines(path), start=1):
        if not line.strip():
            continue
        wnid, _, name = line.strip().partition(" ")
        if not wnid:
            raise DataError(f"{path}:{n}: expected '<wnid> <name>', got {line!r}")
        out[wnid] = name.strip() or wnid
    return out


def _flat_labels(root: Path, d: Path, split: str, n_files: int, label_files: set):
    """{stem: wnid} for a flat folder, and where the labels came from (added to ``label_files``)."""
    csv = _find(root, LOC_VAL_SOLUTION)
    if csv:
        label_files.add(csv)
        labels = {}
        lines = text_lines(csv)
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
        order = _devkit_synsets(root, gt, label_files)
        label_files.add(gt)
        labels = {}
        for n, line in enumerate(" ".join(text_lines(gt)).split(), start=1):
            ilsvrc_id = int(line)
            if ilsvrc_id not in order:
                raise DataError(f"{gt}: line {n} has ILSVRC2012_ID {ilsvrc_id}, not in the devkit's meta.mat")
            labels[f"ILSVRC2012_val_{n:08d}"] = order[ilsvrc_id]
        return labels, f"{gt} with the synset order of {DEVKIT_META}"
    raise DataError(f"{split} folder without labels: {d} holds {n_files} images directly and no class "
                    f"folders, and there is no {LOC_VAL_SOLUTION}, nor {DEVKIT_GROUND_TRUTH} with "
                    f"{DEVKIT_META}, in {root}, {root / 'val'}, a devkit data folder or SOURCE's parents")


def _devkit_synsets(root: Path, gt: Path, label_files: set) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid from the devkit's meta.mat (its 1000 leaf synsets), as torchvision reads it."""
    meta = gt.with_name(DEVKIT_META) if (gt.with_name(DEVKIT_META)).is_file() else _find(root, DEVKIT_META)
    if meta is None:
        raise DataError(f"{gt} numbers classes in the devkit's synset order, which is in {DEVKIT_META}; "
                        f"put the devkit's data/{DEVKIT_META} beside it")
    try:
        from scipy.io import loadmat  # only this layout needs scipy; it is not a declared dependency
    except ImportError as e:
        raise DataError(f"reading {meta} needs scipy (pip install scipy), or use {LOC_VAL_SOLUTION}") from e
    label_files.add(meta)
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    out = {}
    for s in synsets:
        ilsvrc_id, wnid, num_children = int(s["ILSVRC2012_ID"]), str(s["WNID"]), int(s["num_children"])
        if num_children == 0:
            out[ilsvrc_id] = wnid
    return out
