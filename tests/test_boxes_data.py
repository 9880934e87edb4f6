"""Boxes in the data (issue 16): ILSVRC annotations in both layouts (Kaggle CSV, PASCAL-VOC XML) go from
a SOURCE folder through preprocessing into the shards (``<key>.box``), the manifest and dataset.json;
bad boxes are recorded with their reason, images without boxes are marked, a dataset without
annotations is what it was before boxes existed, and the synthetic sample's boxes are exact."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from odd_sample import build, shard_samples, snapshot
from preprocessing import synthetic
from preprocessing.verify import verify
from storage import dataformat as fmt

ROOT = Path(__file__).resolve().parent.parent


def source(tmp_path: Path, sizes=(64, 96)) -> tuple[Path, list[str], dict[str, tuple[int, int]]]:
    """A 2-class synthetic SOURCE (3 train, 2 val images per class): (root, wnids, {train stem: (w, h)})."""
    root = synthetic.generate(tmp_path / "src", classes=2, train_per_class=3, val_per_class=2, size_range=sizes)
    wnids = sorted(p.name for p in (root / "train").iterdir())
    size = {}
    for p in (root / "train").rglob("*.JPEG"):
        with Image.open(p) as im:
            size[p.stem] = im.size
    return root, wnids, size


def by_key(out: Path, split: str) -> tuple[dict, dict]:
    """({key: manifest row}, {key: shard sample}) of ``split``."""
    rows = {r["key"]: r for r in fmt.read_manifest(out, split).to_pylist()}
    return rows, {s["key"]: s for s in shard_samples(out, split)}


def boxes_of(sample: dict) -> list[list[float]] | None:
    return fmt.decode_boxes(sample["box"]).tolist() if "box" in sample else None


def test_kaggle_csv_end_to_end_through_the_cli(tmp_path):
    root, (a, b), size = source(tmp_path)
    w, h = size[f"{a}_1"]
    kept = {line.split(",")[0]: line for line in (root / "LOC_train_solution.csv").read_text().splitlines()[1:]}
    (root / "LOC_train_solution.csv").write_text("\n".join([
        "ImageId,PredictionString",
        # several boxes: two good (one reaching past the right and bottom edges), a reversed one, another class's
        f"{a}_1,{a} 2 3 20 30 {a} 10 10 {w + 15} {h + 5} {a} 30 5 30 40 {b} 1 1 10 10",
        # {a}_2 has no row: an image without boxes
        f"{a}_3,{a} {w + 1} 0 {w + 10} 10",             # wholly outside: annotated, no box kept
        f"{b}_1,{b} 1 2 3 4 {b} 5",                        # unreadable: recorded, never raised
        kept[f"{b}_2"], kept[f"{b}_3"]]) + "\n")
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "jobs.preprocess"]
    r = subprocess.run([*cli, str(root), str(out), "--workers", "1", "--shard-size", "4", "--no-progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert ("train: boxes: 3 of 6 stored images have boxes (4 boxes, 1 clipped into the image, 3 rejected); "
            "1 have no annotation") in r.stdout
    assert "val: boxes: 4 of 4 stored images have boxes (4 boxes, 0 clipped" in r.stdout
    assert "annotations: 1 rows or objects could not be read" in r.stdout and f"{b}_1: 7 fields" in r.stdout
    assert "LOC_train_solution.csv: annotation file: read for the boxes" in r.stdout

    info = fmt.read_info(out)
    assert info["splits"]["train"][fmt.SPLIT_BOXES] == {"images": 3, "boxes": 4, "clipped": 1, "rejected": 3,
                                                        "annotated": 5, "without": 1}
    rows, samples = by_key(out, "train")
    assert boxes_of(samples[f"{a}_1"]) == [[2, 3, 20, 30], [10, 10, w, h]]
    assert rows[f"{a}_1"]["boxes"] == [2, 3, 20, 30, 10, 10, w, h] and rows[f"{a}_1"]["boxes_clipped"] == 1
    assert rows[f"{a}_1"]["boxes_rejected"] == [f"{a} 30 5 30 40: x1 >= x2",
                                                f"{b} 1 1 10 10: class {b}, not the image's class {a}"]
    assert rows[f"{a}_2"]["boxes"] is None and "box" not in samples[f"{a}_2"]  # marked: no annotation
    assert rows[f"{a}_3"]["boxes"] == [] and "box" not in samples[f"{a}_3"]
    assert rows[f"{a}_3"]["boxes_rejected"] == [f"{a} {w + 1} 0 {w + 10} 10: outside the image"]
    assert rows[f"{b}_1"]["boxes"] == [] and rows[f"{b}_1"]["boxes_rejected"] == []
    assert boxes_of(samples[f"{b}_2"]) == [[float(v) for v in kept[f"{b}_2"].split(",")[1].split()[1:]]]
    # val boxes come from the same CSV that labels it
    val_rows, val_samples = by_key(out, "val")
    assert all(boxes_of(val_samples[k]) == [r["boxes"]] for k, r in val_rows.items())
    assert verify(out) == []

    r = subprocess.run([*cli, "report", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert f"box rejected train/{a}/{a}_1.JPEG: {a} 30 5 30 40: x1 >= x2" in r.stdout
    assert "box unreadable" in r.stdout and "; 3 rejected boxes" in r.stdout
    assert "train: 3 of 6 stored images have boxes (4 boxes, 1 clipped, 3 rejected); 1 have no annotation" in r.stdout


def voc(path: Path, wnid: str, size: tuple[int, int] | None, boxes: list[tuple]) -> None:
    objects = "".join(f"<object><name>{wnid}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax>"
                      f"<ymax>{y2}</ymax></bndbox></object>" for x1, y1, x2, y2 in boxes)
    dims = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>" if size else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<annotation><filename>{path.stem}</filename>{dims}{objects}</annotation>")


def test_voc_xml_in_kaggles_tree_end_to_end_with_resizing(tmp_path):
    src, (a, b), size = source(tmp_path, sizes=(80, 96))
    # Kaggle's tree: SOURCE is ILSVRC/Data/CLS-LOC; LOC_* three levels up; XML in ILSVRC/Annotations/CLS-LOC
    top = tmp_path / "kaggle"
    data = top / "ILSVRC" / "Data" / "CLS-LOC"
    data.mkdir(parents=True)
    for split in ("train", "val"):
        shutil.move(src / split, data / split)
    for name in ("LOC_synset_mapping.txt", "LOC_val_solution.csv"):
        shutil.move(src / name, top / name)
    ann = top / "ILSVRC" / "Annotations" / "CLS-LOC" / "train"
    w, h = size[f"{a}_1"]
    voc(ann / a / f"{a}_1.xml", a, (w, h), [(4, 6, 40, 50), (-5, 8, 30, h + 9), (12, 30, 50, 30)])
    voc(ann / b / f"{b}_2.xml", b, None, [(1, 1, 20, 21), (30, 31, 60, 61)])
    voc(ann / b / f"{b}_3.xml", b, None, [])                     # annotated, no object
    (ann / b / f"{b}_1.xml").write_text("<annotation><object>")  # unreadable: recorded, no annotation

    out = tmp_path / "out"
    summary, log = build(data, out, max_side=64)  # every image (80-96 px) is resized
    assert f"train: boxes of 3 of 6 images (5 boxes) from {ann}; 1 unreadable rows or objects" in log
    assert f"{b}_1.xml: not readable XML" in log
    assert summary["train"]["boxes"] == {"images": 2, "boxes": 4, "clipped": 1, "rejected": 1,
                                         "annotated": 3, "without": 3}
    rows, samples = by_key(out, "train")
    row = rows[f"{a}_1"]
    assert row["status"] == "resized" and max(row["width"], row["height"]) == 64
    sx, sy = row["width"] / w, row["height"] / h  # stored / source, per axis
    want = np.float32([[4 * sx, 6 * sy, 40 * sx, 50 * sy], [0, 8 * sy, 30 * sx, row["height"]]])
    assert np.array_equal(fmt.decode_boxes(samples[f"{a}_1"]["box"]), want)
    assert row["boxes"] == want.reshape(-1).tolist() and row["boxes_clipped"] == 1
    assert row["boxes_rejected"] == [f"{a} 12 30 50 30: y1 >= y2"]
    assert len(boxes_of(samples[f"{b}_2"])) == 2
    assert rows[f"{b}_3"]["boxes"] == [] and "box" not in samples[f"{b}_3"]
    assert rows[f"{a}_2"]["boxes"] is None and rows[f"{b}_1"]["boxes"] is None
    assert verify(out) == []


def old_fingerprint(manifests: dict[str, list[dict]]) -> str:
    """dataset.json's fingerprint as it was computed before boxes existed (the 11 columns)."""
    h = hashlib.sha256()
    for split in sorted(manifests):
        for row in sorted(manifests[split], key=lambda r: r["key"]):
            h.update(json.dumps([split] + [row[c] for c in fmt.BASE_COLUMNS]).encode() + b"\n")
    return h.hexdigest()


def test_a_dataset_without_annotations_is_unchanged(tmp_path):
    root, _, _ = source(tmp_path)
    with_boxes, without = tmp_path / "with", tmp_path / "without"
    build(root, with_boxes, splits=["train"])
    csv = (root / "LOC_train_solution.csv").read_text()
    (root / "LOC_train_solution.csv").unlink()
    _, log = build(root, without, splits=["train"])
    assert "boxes" not in log
    before = snapshot(without)
    (root / "LOC_train_solution.csv").write_text(csv)  # annotations arrive after the shards were written
    _, log = build(root, without)
    assert "nothing to do" in log and snapshot(without) == before  # shards are never rewritten; it says so
    assert "warning: train: 6 stored images have an annotation now but were written without one" in log
    info = fmt.read_info(without)
    assert fmt.SPLIT_BOXES not in info["splits"]["train"]
    assert pq.read_schema(fmt.manifest_path(without, "train")).names == list(fmt.BASE_COLUMNS)  # as before
    rows = fmt.read_manifest(without, "train").to_pylist()  # a manifest without the columns still reads
    assert rows and all(r["boxes"] is None and r["boxes_rejected"] is None for r in rows)
    assert info["fingerprint"] == old_fingerprint({"train": rows})
    samples = {s["key"]: s for s in shard_samples(without, "train")}
    assert not any("box" in s for s in samples.values())
    # Against the same source with its annotations: only the boxes differ.
    boxed = {s["key"]: s for s in shard_samples(with_boxes, "train")}
    assert all("box" in s for s in boxed.values())
    assert {k: {**s, "shard": None} for k, s in samples.items()} == \
        {k: {e: v for e, v in s.items() if e != "box"} | {"shard": None} for k, s in boxed.items()}
    boxed_rows = fmt.read_manifest(with_boxes, "train").to_pylist()
    assert [{c: r[c] for c in fmt.BASE_COLUMNS} for r in boxed_rows] == \
        [{c: r[c] for c in fmt.BASE_COLUMNS} for r in rows]
    other = fmt.read_info(with_boxes)
    assert other["fingerprint"] != info["fingerprint"] and fmt.SPLIT_BOXES in other["splits"]["train"]


# ---- the synthetic sample's boxes are exact ---------------------------------------------------------------

def background(words, kind: str, size_range) -> np.ndarray:
    """The image ``draw`` makes from these RNG words, without its object."""
    img, _ = synthetic.render(np.random.default_rng(list(words)), kind, size_range, with_object=False)
    return np.asarray(img, np.int16)


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_synthetic_box_bounds_exactly_the_pixels_the_object_changed(kind):
    for seed in range(4):
        img, box = synthetic.draw(np.random.default_rng([seed, 7]), kind, (48, 160))
        changed = np.abs(np.asarray(img, np.int16) - background([seed, 7], kind, (48, 160))).max(-1) > 0
        ys, xs = np.nonzero(changed)
        assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), (kind, seed)


def test_stored_synthetic_boxes_bound_the_decoded_shape(sample_dataset, sample_source):
    """Through CSV, reader, check and shard: each stored box is the object's exact bounds (exact on the
    drawn pixels: the test above), and in the decoded stored JPEG the pixels far from the background lie
    inside it, within 1 px. (Edges are not checked on JPEG pixels: 4:2:0 chroma and ringing move colour
    up to 2 px past an edge, and a star's 1-px tip fades below any threshold that separates them.)"""
    from conftest import SAMPLE_CLASSES, SAMPLE_TRAIN_PER_CLASS, SAMPLE_VAL_PER_CLASS

    wnids = sorted(p.name for p in (sample_source / "train").iterdir())
    checked = 0
    for split, stream in (("train", 0), ("val", 1)):
        rows, samples = by_key(sample_dataset, split)
        assert fmt.read_info(sample_dataset)["splits"][split][fmt.SPLIT_BOXES]["images"] == len(samples)
        for key, s in samples.items():
            c = rows[key]["label"]
            index = int(key.rsplit("_", 1)[1]) - (1 if split == "train" else 0)
            words, kind = (0, stream, c, index), synthetic.KINDS[c]
            img, box = synthetic.draw(np.random.default_rng(list(words)), kind, (96, 160))
            assert boxes_of(s) == [list(box)], key
            decoded = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), np.int16)
            far = np.abs(decoded - background(words, kind, (96, 160))).max(-1) > 90
            far &= np.roll(far, 1, 0) & np.roll(far, 1, 1)  # 2x2 runs: no lone JPEG ringing pixel
            ys, xs = np.nonzero(far)
            x1, y1, x2, y2 = box
            assert xs.min() >= x1 - 1 and ys.min() >= y1 - 1 and xs.max() < x2 + 1 and ys.max() < y2 + 1, key
            checked += 1
    assert checked == SAMPLE_CLASSES * (SAMPLE_TRAIN_PER_CLASS + SAMPLE_VAL_PER_CLASS)
    assert wnids == [c["wnid"] for c in fmt.read_info(sample_dataset)["classes"]]  # label c drew KINDS[c]


def test_verify_checks_the_box_member(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built[0], out)
    shard = out / fmt.read_info(out)["splits"]["train"]["shards"][0]
    sample = fmt.parse_index(shard.with_suffix(".idx").read_text())[1]
    ext, offset, size, name = sample[0]
    assert ext == fmt.BOX_EXT and size == 16  # first, one box
    data = bytearray(shard.read_bytes())
    data[offset:offset + 4] = np.float32(-3).tobytes()  # x1 moved out of the image
    shard.write_bytes(bytes(data))
    problems = verify(out, decode=False)
    assert problems and problems[0].key == name.split(".")[0] and f"{name} holds [-3.0" in problems[0].message
