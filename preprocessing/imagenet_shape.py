"""An ILSVRC-2012-shaped SOURCE tree at full counts (1,281,167 train + 50,000 val images) of tiny JPEGs,
for timing preprocessing, verify, reruns and loaders at ImageNet's scale.

``generate`` (``python -m jobs.sample OUT --imagenet-shape [--images N]``) writes the layout the
embedded sample (``preprocessing.synthetic``) writes, which ``preprocessing.sources`` reads as ImageNet::

    OUT/train/<wnid>/<wnid>_<n>.JPEG         1,000 class folders, n = 1 .. the class's count
    OUT/val/ILSVRC2012_val_NNNNNNNN.JPEG      flat, numbered in a seeded shuffled class order
    OUT/LOC_train_solution.csv                Kaggle's layout: boxes of 544,546 of the train images
    OUT/LOC_val_solution.csv                  Kaggle's layout: the label and boxes of every val image
    OUT/LOC_synset_mapping.txt                wnid and name per class, sorted by wnid
    OUT/.imagenet-shape.json                  what was generated; ``"complete": true`` is written last

Counts. ImageNet's facts: 1,000 classes, 732 to 1,300 train images a class, 1,281,167 in all, 50 val
images a class, boxes for 544,546 train images and every val image. For ``train_images`` N below the
full count every figure scales by N / 1,281,167 (largest-remainder rounding, so the class counts sum to
N exactly with every class >= 1, hence N >= 1,000; val: round(50,000 N / 1,281,167) >= 1 images spread
over the classes, so at small N most classes have none; boxed train images: round(544,546 N / 1,281,167)).

- assumption: 895 classes hold 1,300 train images and 105 fewer: one 732 (ImageNet's minimum), the other
  104 short of 1,300 by a deficit falling off as (1 - k/105)^2.2 from 568, scaled so the total is
  exactly 1,281,167. The real per-class table is not embedded; this has its total, minimum, maximum
  and "most classes have 1,300". Which classes are short is a fixed permutation (not the seed's), so
  the counts depend on N only; ties in rounding are broken by the same permutation.
- assumption: wnids. The 40 real ones of ``preprocessing/data/synsets.txt`` (classes 0..39 in sorted
  order), then ``n90000000`` .. ``n90000959``: WordNet 3.0 noun offsets stay below 16,000,000, so an
  ``n9`` id can never be a real synset. The class ``add_new`` brings is ``n99999999``.
- assumption: boxes per image 1 (82 %), 2 (10 %), 3 (4 %), 4 (2 %), 5 (1 %), 6 or 8 (0.5 % each), a mean
  of 1.34, in ImageNet's 1.2-1.5 range; the same spread for train and val. Each box lies inside its image
  (pixel edges, 0 <= x1 < x2 <= width), each side 20-100 % of the image's.
- Images: 32-64 px sides, baseline RGB JPEG at quality 75 (about 1.4 KB), a per-class colour plus
  uniform noise. Each class has a pool of 16 pre-encoded JPEGs, encoded when first used; a file is a
  pool entry with a COM segment holding its key inserted after the JFIF header, so every file has
  distinct bytes at no encoding cost. Creating the 1.33 M files is the expensive part.

Deterministic: the bytes depend on N and ``seed`` only, never on ``workers`` (each class's files are a
function of the class, the parent writes the CSVs). Idempotent: a rerun into a complete tree with the
same N and seed writes nothing; a killed run is rerun whole; a folder holding anything else is refused.
``add_new`` adds a fraction of new train images and one new class (a rerun benchmark), ``remove_new``
puts the tree back byte for byte.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from preprocessing.synthetic import synsets
from storage.dataformat import DataError
from storage.files import atomic_write, remove

CLASSES = 1000
TRAIN_IMAGES = 1_281_167
MIN_PER_CLASS, MAX_PER_CLASS = 732, 1300
VAL_PER_CLASS = 50
TRAIN_BOXED = 544_546
SHORT_CLASSES, DEFICIT_POWER = 105, 2.2          # assumption (module doc)
BOXES_PER_IMAGE = ((1, 0.82), (2, 0.10), (3, 0.04), (4, 0.02), (5, 0.01), (6, 0.005), (8, 0.005))
SIDES = (32, 64)                                  # pixels, both ends included
POOL = 16                                         # pre-encoded JPEGs per class
QUALITY = 75
NEW_WNID = ("n99999999", "synthetic class added later")
MARKER = ".imagenet-shape.json"
ADDED = ".imagenet-shape-added.json"
VERSION = 1
_TIE = np.random.default_rng(2012).permutation(CLASSES)   # fixed: which classes are short, rounding ties
_CSV_HEADER = "ImageId,PredictionString\n"
_FILES = ("LOC_train_solution.csv", "LOC_val_solution.csv", "LOC_synset_mapping.txt")


def classes() -> list[tuple[str, str]]:
    """The 1,000 (wnid, name) pairs, sorted by wnid: the real ones first, then the ``n9`` ones."""
    real = synsets()
    made = [(f"n{90_000_000 + k:08d}", f"synthetic class {k}") for k in range(CLASSES - len(real))]
    return real + made


def full_counts() -> np.ndarray:
    """Train images per class at full size (class index order): the assumed shape of the module doc."""
    k = np.arange(1, SHORT_CLASSES)
    weights = np.round(1e6 * (1 - k / SHORT_CLASSES) ** DEFICIT_POWER).astype(np.int64)
    deficit = CLASSES * MAX_PER_CLASS - TRAIN_IMAGES - (MAX_PER_CLASS - MIN_PER_CLASS)
    deficits = np.concatenate([[MAX_PER_CLASS - MIN_PER_CLASS], apportion(weights, deficit, 1)])
    counts = np.full(CLASSES, MAX_PER_CLASS, np.int64)
    counts[np.argsort(_TIE)[:SHORT_CLASSES]] -= deficits
    return counts


def apportion(weights, total: int, minimum: int = 0, tie=None) -> np.ndarray:
    """Integers summing to ``total`` in proportion to the integer ``weights``, each >= ``minimum``:
    floors first, then one more to the largest remainders (ties: lowest ``tie`` rank first)."""
    w = np.asarray(weights, np.int64)
    whole = int(w.sum())
    base = np.maximum(minimum, total * w // whole)
    rest = total - int(base.sum())
    if rest < 0:
        raise ValueError(f"cannot give {len(w)} shares of at least {minimum} from {total}")
    remainder = total * w - base * whole  # numerators over ``whole``; negative where the minimum lifted it
    order = np.lexsort((np.arange(len(w)) if tie is None else tie, -remainder))
    base[order[:rest]] += 1
    return base


def scaled(full: int, n: int) -> int:
    """``full`` x n / 1,281,167, rounded half up (exact integers)."""
    return (2 * full * n + TRAIN_IMAGES) // (2 * TRAIN_IMAGES)


def train_counts(n: int) -> np.ndarray:
    """Train images per class for ``n`` train images in all (>= 1 a class)."""
    return apportion(full_counts(), n, 1, _TIE)


def val_counts(n: int) -> np.ndarray:
    """Val images per class for ``n`` train images: 50 a class at full size, >= 1 in all."""
    return apportion(np.ones(CLASSES), max(1, scaled(VAL_PER_CLASS * CLASSES, n)), 0, _TIE)


@dataclass
class Batch:
    """Images to write: per class (index = position in ``classes``) train images numbered from
    ``first[c]``; val images numbered from ``val_first``; ``stream`` prefixes every RNG seed."""
    classes: list[tuple[str, str]]
    stream: list[int]
    first: np.ndarray           # per class: number of its first train image
    counts: np.ndarray          # per class: train images
    val_class: np.ndarray       # class of val image val_first + i
    val_first: int
    boxed: int                  # how many train images get boxes

    def __post_init__(self):
        rng = np.random.default_rng([*self.stream, 1])
        self.train_slots = rng.integers(0, POOL, int(self.counts.sum()))
        self.val_slots = rng.integers(0, POOL, len(self.val_class))
        self.sizes = np.stack([pool_sizes(self.stream, c) for c in range(len(self.classes))])

    def tasks(self, root: Path) -> list[tuple]:
        """One job per class with images: (root, stream, class, wnid, first, train slots, val numbers,
        val slots)."""
        offsets = np.concatenate([[0], np.cumsum(self.counts)])
        val_numbers = np.arange(len(self.val_class)) + self.val_first
        out = []
        for c, (wnid, _) in enumerate(self.classes):
            mine = self.val_class == c
            if self.counts[c] or mine.any():
                out.append((str(root), self.stream, c, wnid, int(self.first[c]),
                            self.train_slots[offsets[c]:offsets[c + 1]], val_numbers[mine], self.val_slots[mine]))
        return out

    def train_rows(self) -> str:
        """LOC_train_solution.csv rows (no header) of the ``boxed`` train images, in class order."""
        n = int(self.counts.sum())
        pick = np.sort(np.random.default_rng([*self.stream, 2]).choice(n, self.boxed, replace=False))
        cls = np.repeat(np.arange(len(self.classes)), self.counts)[pick]
        offsets = np.concatenate([[0], np.cumsum(self.counts)])
        numbers = self.first[cls] + pick - offsets[cls]
        stems = [f"{self.classes[c][0]}_{m}" for c, m in zip(cls.tolist(), numbers.tolist())]
        return _rows(np.random.default_rng([*self.stream, 3]), stems, cls, self.sizes[cls, self.train_slots[pick]],
                     self.classes)

    def val_rows(self) -> str:
        """LOC_val_solution.csv rows (no header) of every val image, in number order."""
        stems = [f"ILSVRC2012_val_{self.val_first + i:08d}" for i in range(len(self.val_class))]
        return _rows(np.random.default_rng([*self.stream, 4]), stems, self.val_class,
                     self.sizes[self.val_class, self.val_slots], self.classes)


def _rows(rng: np.random.Generator, stems: list[str], cls: np.ndarray, wh: np.ndarray, names) -> str:
    """Kaggle rows ``stem,wnid x1 y1 x2 y2 wnid ... `` with BOXES_PER_IMAGE boxes inside each image."""
    if not stems:
        return ""
    values, p = zip(*BOXES_PER_IMAGE)
    per = rng.choice(values, len(stems), p=np.array(p) / sum(p))
    img = np.repeat(np.arange(len(stems)), per)
    sides = wh[img]                                                      # (boxes, 2): image w, h
    u = rng.random((len(img), 4))
    lo = np.maximum(1, sides // 5)
    span = lo + (u[:, :2] * (sides - lo + 1)).astype(np.int64)           # box w, h: 20-100 % of a side
    start = (u[:, 2:] * (sides - span + 1)).astype(np.int64)             # x1, y1
    boxes = np.concatenate([start, start + span], axis=1).tolist()       # x1, y1, x2, y2
    wnids = [names[c][0] for c in cls[img].tolist()]
    groups = [f"{w} {x1} {y1} {x2} {y2}" for w, (x1, y1, x2, y2) in zip(wnids, boxes)]
    ends = np.cumsum(per).tolist()
    starts = [0] + ends[:-1]
    return "".join(f"{s},{' '.join(groups[a:b])} \n" for s, a, b in zip(stems, starts, ends))


def pool_sizes(stream: list[int], c: int) -> np.ndarray:
    """(POOL, 2) widths and heights of class ``c``'s pre-encoded JPEGs."""
    return np.random.default_rng([*stream, 5, c]).integers(SIDES[0], SIDES[1] + 1, (POOL, 2))


def pool_jpeg(stream: list[int], c: int, slot: int) -> bytes:
    """One of class ``c``'s pre-encoded JPEGs: its colour plus uniform noise, baseline RGB."""
    w, h = pool_sizes(stream, c)[slot].tolist()
    colour = np.random.default_rng([*stream, 6, c]).integers(0, 256, 3)
    noise = np.random.default_rng([*stream, 7, c, slot]).integers(-48, 49, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(colour + noise, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=QUALITY)
    return buf.getvalue()


def with_key(jpeg: bytes, key: str) -> bytes:
    """``jpeg`` with a COM segment holding ``key`` after its JFIF header (APP0 stays first)."""
    at = 4 + int.from_bytes(jpeg[4:6], "big") if jpeg[2:4] == b"\xff\xe0" else 2
    com = key.encode()
    return b"".join((jpeg[:at], b"\xff\xfe", (len(com) + 2).to_bytes(2, "big"), com, jpeg[at:]))


def _write_class(task) -> int:
    """Write one class's train folder and val files; returns how many files it wrote."""
    root, stream, c, wnid, first, train_slots, val_numbers, val_slots = task
    pool: dict[int, bytes] = {}
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC

    def put(folder: int, stem: str, slot: int) -> None:
        if slot not in pool:
            pool[slot] = pool_jpeg(stream, c, slot)
        fd = os.open(stem + ".JPEG", flags, 0o644, dir_fd=folder)  # relative: no path walk per file
        try:
            os.write(fd, with_key(pool[slot], stem))
        finally:
            os.close(fd)

    os.makedirs(os.path.join(root, "train", wnid), exist_ok=True)
    folders = [os.open(os.path.join(root, *sub), os.O_RDONLY) for sub in (("train", wnid), ("val",))]
    try:
        for i, slot in enumerate(train_slots.tolist()):
            put(folders[0], f"{wnid}_{first + i}", slot)
        for number, slot in zip(val_numbers.tolist(), val_slots.tolist()):
            put(folders[1], f"ILSVRC2012_val_{number:08d}", slot)
    finally:
        for fd in folders:
            os.close(fd)
    return len(train_slots) + len(val_numbers)


def _write_all(batch: Batch, root: Path, workers: int, progress: bool, desc: str) -> None:
    """Every class's files: in this process, or in ``workers`` spawned ones (same bytes)."""
    from tqdm import tqdm

    tasks = batch.tasks(root)
    (root / "val").mkdir(parents=True, exist_ok=True)
    total = sum(len(t[5]) + len(t[6]) for t in tasks)
    with tqdm(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        if workers > 1:
            with get_context("spawn").Pool(workers) as pool:
                for n in pool.imap_unordered(_write_class, tasks, chunksize=4):
                    bar.update(n)
        else:
            for t in tasks:
                bar.update(_write_class(t))


def base_batch(n: int, seed: int) -> Batch:
    """The tree ``generate`` writes for ``n`` train images."""
    per_val = val_counts(n)
    val_class = np.repeat(np.arange(CLASSES), per_val)[np.random.default_rng([seed, 0]).permutation(int(per_val.sum()))]
    return Batch(classes(), [seed], np.ones(CLASSES, np.int64), train_counts(n), val_class, 1,
                 scaled(TRAIN_BOXED, n))


def generate(out, train_images: int = TRAIN_IMAGES, seed: int = 0, workers: int = 2,
             progress: bool = False) -> Path:
    """Write the ImageNet-shaped tree (module doc) under ``out`` and return it: the SOURCE for
    ``jobs.preprocess``. A complete tree of the same ``train_images`` and ``seed`` is left untouched."""
    if not CLASSES <= train_images <= TRAIN_IMAGES:
        raise DataError(f"train_images {train_images}: between {CLASSES:,} (one a class) and {TRAIN_IMAGES:,}")
    if workers < 1:
        raise DataError(f"workers {workers}: at least 1")
    root = Path(out)
    want = {"generator": "imagenet_shape", "version": VERSION, "train_images": train_images, "seed": seed}
    record = _record(root, MARKER)
    if record is not None and {k: record.get(k) for k in want} != want:
        raise DataError(f"{root / MARKER}: {root} holds an ImageNet-shaped tree of other parameters "
                        f"({ {k: record.get(k) for k in want} }); write into another folder or delete it")
    if record is not None and record.get("complete"):
        return root
    if record is None and root.exists() and any(root.iterdir()):
        raise DataError(f"{root} is not empty and holds no {MARKER}: write the tree into an empty folder")
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / MARKER, _json({**want, "complete": False}))
    batch = base_batch(train_images, seed)
    _write_all(batch, root, workers, progress, "imagenet-shape")
    train, val = batch.train_rows(), batch.val_rows()
    atomic_write(root / _FILES[0], (_CSV_HEADER + train).encode())
    atomic_write(root / _FILES[1], (_CSV_HEADER + val).encode())
    atomic_write(root / _FILES[2], "".join(f"{w} {name}\n" for w, name in batch.classes).encode())
    counts = {"train": train_images, "val": len(batch.val_class), "train_boxed": batch.boxed,
              "train_boxes": _boxes(train), "val_boxes": _boxes(val)}
    atomic_write(root / MARKER, _json({**want, "complete": True, **counts}))
    return root


def read_record(out) -> dict | None:
    """What ``generate`` recorded in ``out`` (parameters, ``complete``, counts and box totals), or None."""
    return _record(Path(out), MARKER)


def _boxes(rows: str) -> int:
    return sum(len(line.split()) // 5 for line in rows.splitlines())


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def _record(root: Path, name: str) -> dict | None:
    path = root / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not readable JSON ({e}); delete the tree and generate it again") from None


def added_batch(n: int, fraction: float, seed: int) -> Batch:
    """What ``add_new`` writes into a tree of ``n`` train images: round(fraction x n) new train images
    spread over the classes in proportion to their counts, numbered after each class's last, plus one
    new class (``NEW_WNID``) of a mean class's round(n / 1,000) train images and max(1, round(50 n /
    1,281,167)) val images numbered after the last; boxes for the usual share of the new train images."""
    counts = train_counts(n)
    extra = apportion(counts, int(round(fraction * n)), 0, _TIE)
    new_train = max(1, int(round(n / CLASSES)))
    new_val = max(1, scaled(VAL_PER_CLASS, n))
    added = np.concatenate([extra, [new_train]])
    return Batch(classes() + [NEW_WNID], [seed, 1], np.concatenate([counts + 1, [1]]), added,
                 np.full(new_val, CLASSES), int(val_counts(n).sum()) + 1, scaled(TRAIN_BOXED, int(added.sum())))


def add_new(out, fraction: float = 0.01, seed: int = 0) -> dict:
    """Add new train images to the existing classes and one new class with train and val images
    (``added_batch``) to a complete tree, with their rows appended to the LOC files (each rewritten
    atomically). Returns {"train": new train images, "val": new val images, "wnid": the new class}.
    Idempotent for the same ``fraction`` and ``seed``; ``remove_new`` undoes it."""
    root = Path(out)
    base = _record(root, MARKER)
    if not base or not base.get("complete"):
        raise DataError(f"{root}: no complete ImageNet-shaped tree ({MARKER} missing or incomplete)")
    if not 0 <= fraction <= 1:
        raise DataError(f"fraction {fraction}: between 0 and 1")
    want = {"fraction": fraction, "seed": seed}
    have = _record(root, ADDED)
    batch = added_batch(base["train_images"], fraction, seed)
    summary = {"train": int(batch.counts.sum()), "val": len(batch.val_class), "wnid": NEW_WNID[0]}
    if have is not None:
        if {k: have.get(k) for k in want} != want:
            raise DataError(f"{root / ADDED}: new images of fraction {have.get('fraction')} seed "
                            f"{have.get('seed')} are in the tree; remove_new first")
        if have.get("complete"):
            return summary
        before = have["before"]
    else:
        before = {name: (root / name).stat().st_size for name in _FILES}
        atomic_write(root / ADDED, _json({**want, "complete": False, "before": before}))
    _write_all(batch, root, 1, False, "add_new")
    added = {_FILES[0]: batch.train_rows(), _FILES[1]: batch.val_rows(), _FILES[2]: "%s %s\n" % NEW_WNID}
    for name, text in added.items():
        atomic_write(root / name, (root / name).read_bytes()[:before[name]] + text.encode())
    atomic_write(root / ADDED, _json({**want, "complete": True, "before": before, **summary}))
    return summary


def remove_new(out) -> int:
    """Undo ``add_new`` (complete or killed half-way): delete its files, cut the LOC files back to
    their earlier bytes (atomically), then its record. Returns how many images it deleted."""
    root = Path(out)
    have = _record(root, ADDED)
    if have is None:
        return 0
    base = _record(root, MARKER)
    if not base:
        raise DataError(f"{root / ADDED}: the tree it was added to has no {MARKER}")
    batch = added_batch(base["train_images"], have["fraction"], have["seed"])
    gone = 0
    for task in batch.tasks(root):
        _, _, c, wnid, first, slots, val_numbers, _ = task
        paths = [root / "train" / wnid / f"{wnid}_{first + i}.JPEG" for i in range(len(slots))]
        paths += [root / "val" / f"ILSVRC2012_val_{m:08d}.JPEG" for m in val_numbers.tolist()]
        for p in paths:
            gone += p.is_file()
            p.unlink(missing_ok=True)
    if (root / "train" / NEW_WNID[0]).is_dir():
        (root / "train" / NEW_WNID[0]).rmdir()
    for name, size in have["before"].items():
        data = (root / name).read_bytes()
        if len(data) != size:
            atomic_write(root / name, data[:size])
    remove(root / ADDED)
    return gone
