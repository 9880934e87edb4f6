"""ILSVRC localisation annotations in both layouts users have, and the checks a box must pass.

- Kaggle: ``LOC_train_solution.csv`` / ``LOC_val_solution.csv``, header ``ImageId,PredictionString``,
  each row ``<image id>,<wnid> <x1> <y1> <x2> <y2> [<wnid> <x1> ...]``.
- PASCAL-VOC XML: ``Annotations/CLS-LOC/{train/<wnid>,val}/<image id>.xml``, one ``<object>`` per box
  with ``<name>`` (the wnid) and ``<bndbox>`` (``xmin``, ``ymin``, ``xmax``, ``ymax``), image size in
  ``<size>``.

Both give ``{image id: [(wnid, x1, y1, x2, y2), ...]}``, pixels of the original image. A row or an
object that cannot be read is recorded in ``problems`` (file, row or object, reason), never raised:
one bad box out of half a million must not stop preprocessing. Only a file that is not an annotation
file at all (a CSV without the header) is an error. No torch here.
"""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from storage.dataformat import DataError

Box = tuple[str, float, float, float, float]   # (wnid, x1, y1, x2, y2), pixels
CSV_HEADER = "ImageId,PredictionString"


@dataclass
class Annotations:
    boxes: dict[str, list[Box]] = field(default_factory=dict)    # image id -> its boxes ([] = none)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)   # image id -> (width, height), XML only
    problems: list[str] = field(default_factory=list)             # "<file>:<where>: <reason>"


@dataclass
class Checked:
    kept: list[Box]                         # inside the image, x1 < x2 and y1 < y2
    clipped: int                            # how many of ``kept`` were moved inside the image
    rejected: list[tuple[Box, str]]         # each bad box with its reason


def read_kaggle_csv(path: Path) -> Annotations:
    """Parse a Kaggle ``LOC_*_solution.csv``. A row with no boxes maps its image to []."""
    path = Path(path)
    out = Annotations()
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].strip().replace(" ", "") != CSV_HEADER:
        raise DataError(f"{path}: expected the header {CSV_HEADER!r}")
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        image_id, _, pred = line.partition(",")
        image_id = image_id.strip()
        boxes, reason = _parse_prediction(pred.split())
        if reason:
            out.problems.append(f"{path}:{n}: {image_id}: {reason}")
        out.boxes.setdefault(image_id, []).extend(boxes)
    return out


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


def read_voc_xml(path: Path, out: Annotations) -> None:
    """Add one PASCAL-VOC file's boxes (and image size) to ``out``, keyed by the file's stem.

    ElementTree expands no external entities and fetches nothing, so a hostile file cannot read other
    files; these are local data, and the parse is still bounded to the one file.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
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
    out = Annotations()
    for path in sorted(Path(folder).rglob("*.xml")):
        read_voc_xml(path, out)
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
    return tuple(int(v) for v in values) if values and all(v > 0 for v in values) else None


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
