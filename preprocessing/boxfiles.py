"""Find each split's localisation annotations in SOURCE and attach every input's raw boxes to the layout.

Per split, the first of (docs/preprocessing.md, "Boxes"):

- Kaggle's ``LOC_<split>_solution.csv`` where the label files are looked for (SOURCE, SOURCE/val, a
  devkit data folder, up to three parents: Kaggle puts ``LOC_*`` three levels above
  ``ILSVRC/Data/CLS-LOC``);
- PASCAL-VOC XML files under ``Annotations/CLS-LOC/<split>/`` or ``Annotations/<split>/`` of SOURCE or
  of up to three parents (ILSVRC's own tarballs, and Kaggle's ``ILSVRC/Annotations/CLS-LOC``).

assumption: when both exist the CSV wins: Kaggle ships both with the same boxes, and one CSV reads in
seconds where ImageNet train's 544,546 XML files take minutes. An image's annotation is matched by its
file's stem (ILSVRC's image id), within its split. Images whose id no annotation names have none:
their manifest row says so, and they get no box member. Each file's sha256 goes into state.json and
the run's history entry (``preprocessing.state``).
"""
from __future__ import annotations

from pathlib import Path

from preprocessing.annotations import Annotations, is_duplicate, read_kaggle_csv, read_voc_dir
from preprocessing.sources import Layout, _find

ANNOTATION_NOTE = "annotation file: read for the boxes, not an image"
LABELS_AND_BOXES = "label and annotation file: read for the labels and boxes, not an image"


def csv_name(split: str) -> str:
    return f"LOC_{split}_solution.csv"


def find(root: Path, split: str) -> Path | None:
    """The annotation file or folder of ``split``, or None when it has none."""
    csv = _find(root, csv_name(split))
    if csv is not None:
        return csv
    for base in (root, *list(root.parents)[:3]):
        for rel in (f"Annotations/CLS-LOC/{split}", f"Annotations/{split}"):
            if (base / rel).is_dir():
                return base / rel
    return None


def attach(layout: Layout) -> dict[str, dict]:
    """Fill ``layout.boxes`` ({split: {source path: [(wnid, x1, y1, x2, y2), ...]}}, annotation pixels)
    and ``layout.box_problems`` (rows or objects not used: recorded, never raised), add a note per
    split, and list the annotation files among SOURCE's other entries as such. Returns what was read:
    {split: {"file": CSV or XML folder, "sha256": ...}} for the splits that have annotations."""
    used: list[Path] = []
    read: dict[str, dict] = {}
    for split, inputs in layout.splits.items():
        where = find(layout.root, split)
        if where is None:
            continue
        used.append(where)
        ann: Annotations = read_kaggle_csv(where) if where.is_file() else read_voc_dir(where)
        read[split] = {"file": str(where), "sha256": ann.sha256}
        found = {}
        for i in inputs:
            boxes = ann.boxes.get(Path(i.source).stem)
            if boxes is not None:
                found[i.source] = boxes
        layout.boxes[split] = found
        layout.box_problems += ann.problems
        named = {Path(i.source).stem for i in inputs}
        elsewhere = sum(1 for k in ann.boxes if k not in named)
        repeated = sum(map(is_duplicate, ann.problems))
        unreadable = len(ann.problems) - repeated
        layout.notes.append(
            f"{split}: boxes of {len(found)} of {len(inputs)} images ({sum(map(len, found.values()))} boxes) "
            f"from {where}" + (f"; {unreadable} unreadable rows or objects" if unreadable else "")
            + (f"; {repeated} rows repeat an earlier row's image id (not used)" if repeated else "")
            + (f"; {elsewhere} annotated images are not in SOURCE" if elsewhere else ""))
    _relabel(layout, used)
    return read


def _relabel(layout: Layout, used: list[Path]) -> None:
    """Annotation files under SOURCE are skipped entries: say why."""
    files = {str(p) for p in used if p.is_file()}
    folders = [str(p) + "/" for p in used if p.is_dir()]
    for n, (rel, status, reason) in enumerate(layout.others):
        path = str(layout.root / rel)
        if status == "skipped" and (path in files or any(path.startswith(f) for f in folders)):
            # LOC_val_solution.csv gives val its labels too
            note = LABELS_AND_BOXES if reason.startswith("label file") else ANNOTATION_NOTE
            layout.others[n] = (rel, status, note)
