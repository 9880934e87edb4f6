"""ILSVRC localisation annotations in both layouts users have, and the checks a box must pass.

- Kaggle: ``LOC_train_solution.csv`` / ``LOC_val_solution.csv``, header ``ImageId,PredictionString``,
  each row ``<image id>,<wnid> <x1> <y1> <x2> <y2> [<wnid> <x1> ...]``.
- PASCAL-VOC XML: ``Annotations/CLS-LOC/{train/<wnid>,val}/<image id>.xml``, one ``<object>`` per box
  with ``<name>`` (the wnid) and ``<bndbox>`` (``xmin``, ``ymin``, ``xmax``, ``ymax``), image size in
  ``<size>``.

Both give ``{image id: [(wnid, x1, y1, x2, y2), ...]}``, pixels of the original image, and the sha256
of what was read. A row or an object that cannot be read is recorded in ``problems`` (file, row or
object, reason), never raised: one bad box out of half a million must not stop preprocessing. So is a
CSV row that repeats an image id: the first row is used, each later one listed (Kaggle's file has one
row per image; merging would hide an edit gone wrong). Only a file that is not an annotation file at
all (a CSV without the header, or with a byte that is not UTF-8) is an error. No torch here.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from storage.dataformat import DataError

Box = tuple[str, float, float, float, float]   # (wnid, x1, y1, x2, y2), pixels
CSV_HEADER = "ImageId,PredictionString"
DUPLICATE = "repeats the image id of line"  # in a problem line: a row not used (the first row is)
NO_ANNOTATION = "none"  # box_digest of an image that no annotation names


@dataclass
class Annotations:
    boxes: dict[str, list[Box]] = field(default_factory=dict)    # image id -> its boxes ([] = none)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)   # image id -> (width, height), XML only
    problems: list[str] = field(default_factory=list)             # "<file>:<where>: <reason>"
    sha256: str = ""  # of the CSV's bytes; of a folder: of its XML files' relative paths and sha256s


def box_digest(boxes: list[Box] | None) -> str:
    """What the plan records of one image's raw annotation (its boxes, in order), or NO_ANNOTATION."""
    if boxes is None:
        return NO_ANNOTATION
    return hashlib.sha256(json.dumps(boxes).encode()).hexdigest()


def is_duplicate(problem: str) -> bool:
    return f": {DUPLICATE} " in problem


@dataclass
class Checked:
    kept: list[Box]                         # inside the image, x1 < x2 and y1 < y2
    clipped: int                            # how many of ``kept`` were moved inside the image
    rejected: list[tuple[Box, str]]         # each bad box with its reason


def read_kaggle_csv(path: Path) -> Annotations:
    """Parse a Kaggle ``LOC_*_solution.csv``. A row with no boxes maps its image to []. A row without a
    comma or an image id, and a row repeating an earlier row's image id, are problems and not used."""
    path = Path(path)
    data = path.read_bytes()
    out = Annotations(sha256=hashlib.sha256(data).hexdigest())
    lines = text_lines(path, data)
    if lines[0].strip().replace(" ", "") != CSV_HEADER:
        raise DataError(f"{path}:1: expected the header {CSV_HEADER!r}")
    first: dict[str, int] = {}  # image id -> the line that gave its boxes
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        image_id, comma, pred = line.partition(",")
        image_id = image_id.strip()
        if not comma or not image_id:
            out.problems.append(f"{path}:{n}: {'no comma' if not comma else 'no image id'} in {line[:60]!r} "
                                f"(rows are {CSV_HEADER}): row not used")
            continue
        if image_id in first:
            out.problems.append(f"{path}:{n}: {image_id}: {DUPLICATE} {first[image_id]}: row not used")
            continue
        first[image_id] = n
        boxes, reason = _parse_prediction(pred.split())
        if reason:
            out.problems.append(f"{path}:{n}: {image_id}: {reason}")
        out.boxes[image_id] = boxes
    return out


def text_lines(path: Path, data: bytes | None = None) -> list[str]:
    """The lines of a UTF-8 text file, split at LF only (a CR before it dropped): ``lines[i]`` is the
    editor's line i + 1. A byte that is not UTF-8 is a DataError naming the file and the line."""
    data = Path(path).read_bytes() if data is None else data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: byte 0x{data[e.start]:02x} is not UTF-8; save the file as UTF-8") from None
    return [line.removesuffix("\r") for line in text.split("\n")]


def _parse_prediction(tokens: list[str]) -> tuple[list[Box], str]:
    """``wnid x1 y1 x2 y2`` groups -> boxes, and a reason when a group cannot be read (the readable
    groups before it are kept)."""
    boxes: list[Box] = []
    if len(tokens) % 5:
        return boxes, f"{len(tokens)} fields, not groups of 5 (wnid x1 y1 x2 y2)"
    for i in range(0, len(tokens), 5):
        try:
            coords = tuple(float(t) for t in tokens[i + 1:i + 5])
        except ValueError:
            return boxes, f"box {i // 5 + 1}: coordinates {tokens[i + 1:i + 5]} are not numbers"
        boxes.append((tokens[i], *coords))
    return boxes, ""


def read_voc_xml(path: Path, out: Annotations, data: bytes | None = None) -> None:
    """Add one PASCAL-VOC file's boxes (and image size) to ``out``, keyed by the file's stem; ``data``:
    its bytes when already read.

    ElementTree expands no external entities and fetches nothing, so a hostile file cannot read other
    files; these are local data, and the parse is still bounded to the one file. A file that is not
    XML in the encoding it declares (a byte that is not UTF-8, an unknown encoding) is a problem.
    """
    path = Path(path)
    try:
        root = ET.fromstring(path.read_bytes() if data is None else data)
    except (ET.ParseError, OSError, ValueError, LookupError) as e:  # ValueError: a multi-byte encoding
        out.problems.append(f"{path}: not readable XML: {e}")
        return
    key = path.stem
    boxes = out.boxes.setdefault(key, [])
    size = _ints(root.find("size"), ("width", "height"))
    if size:
        out.sizes[key] = size
    for n, obj in enumerate(root.iter("object"), start=1):
        wnid = (obj.findtext("name") or "").strip()
        coords = _floats(obj.find("bndbox"), ("xmin", "ymin", "xmax", "ymax"))
        if not wnid or coords is None:
            out.problems.append(f"{path}: object {n}: no name or no numeric bndbox")
            continue
        boxes.append((wnid, *coords))


def read_voc_dir(folder: Path) -> Annotations:
    """Every ``*.xml`` under ``folder`` (e.g. ``Annotations/CLS-LOC/val``), in sorted order."""
    out, digest = Annotations(), hashlib.sha256()
    for path in sorted(Path(folder).rglob("*.xml")):
        try:
            data = path.read_bytes()
        except OSError as e:
            out.problems.append(f"{path}: not readable XML: {e}")
            data = b""
        else:
            read_voc_xml(path, out, data)
        digest.update(os.fsencode(path.relative_to(folder).as_posix()) + b"\0"
                      + hashlib.sha256(data).hexdigest().encode() + b"\n")
    out.sha256 = digest.hexdigest()
    return out


def _floats(node, tags: tuple[str, ...]) -> tuple[float, ...] | None:
    if node is None:
        return None
    try:
        return tuple(float((node.findtext(t) or "").strip()) for t in tags)
    except ValueError:
        return None


def _ints(node, tags: tuple[str, ...]) -> tuple[int, ...] | None:
    values = _floats(node, tags)
    ok = values and all(math.isfinite(v) and v > 0 for v in values)  # int(inf) would raise
    return tuple(int(v) for v in values) if ok else None


def check_boxes(boxes: list[Box], width: int, height: int) -> Checked:
    """Clip each box to the image ``[0, width] x [0, height]`` (pixels) and reject the unusable.

    Reasons: "not finite", "outside the image" (nothing left after clipping), "x1 >= x2", "y1 >= y2"
    (judged on the given coordinates, so a reversed box is named as such). Never raises.
    """
    kept, rejected, clipped = [], [], 0
    for box in boxes:
        wnid, x1, y1, x2, y2 = box
        reason = _bad(x1, y1, x2, y2)
        if not reason:
            c = (min(max(x1, 0.0), width), min(max(y1, 0.0), height),
                 min(max(x2, 0.0), width), min(max(y2, 0.0), height))
            if c[0] >= c[2] or c[1] >= c[3]:
                reason = "outside the image"
            else:
                clipped += c != (x1, y1, x2, y2)
                kept.append((wnid, *c))
        if reason:
            rejected.append((box, reason))
    return Checked(kept, clipped, rejected)


def _bad(x1: float, y1: float, x2: float, y2: float) -> str:
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return "not finite"
    if x1 >= x2:
        return "x1 >= x2"
    if y1 >= y2:
        return "y1 >= y2"
    return ""
