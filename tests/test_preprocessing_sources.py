"""preprocessing/sources.py: the source layouts it reads (ILSVRC with CSV or devkit labels, class-folder
trees, flat val folders) and the clear errors for sources it cannot read."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from odd_sample import build
from preprocessing import synthetic
from storage.dataformat import DataError
from preprocessing.sources import discover
from preprocessing.writer import preprocess


def test_val_labels_from_the_devkit_ground_truth(tmp_path):
    import scipy.io as scipy_io
    root = synthetic.generate(tmp_path / "s", classes=3, train_per_class=1, val_per_class=3,
                              size_range=(32, 48))
    csv_labels = {r.source: r.label for r in discover(root).splits["val"]}
    wnids = sorted(p.name for p in (root / "train").iterdir())
    ids = {wnids[2]: 1, wnids[0]: 2, wnids[1]: 4}  # the devkit's order is not the sorted order
    rows = [(i, w, 0) for w, i in ids.items()] + [(3, "n00000001", 2)]  # 3: an inner node
    synsets = np.array(rows, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    scipy_io.savemat(data / "meta.mat", {"synsets": synsets})
    stem_wnid = {}
    for line in (root / "LOC_val_solution.csv").read_text().splitlines()[1:]:
        stem, pred = line.split(",")
        stem_wnid[stem] = pred.split()[0]
    n = len(stem_wnid)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{ids[stem_wnid[f'ILSVRC2012_val_{i:08d}']]}\n" for i in range(1, n + 1)))
    (root / "LOC_val_solution.csv").unlink()
    layout = discover(root)
    assert {r.source: r.label for r in layout.splits["val"]} == csv_labels
    assert any("ground_truth" in note for note in layout.notes)


def test_class_folder_trees_val_folders_and_colliding_stems(tmp_path):
    root = tmp_path / "pets"
    img = Image.fromarray(np.full((20, 30, 3), 100, np.uint8))
    for split in ("train", "val"):
        for cls in ("dog", "cat"):
            (root / split / cls).mkdir(parents=True)
            img.save(root / split / cls / "001.jpg")
    img.save(root / "train" / "dog" / "002.png")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    layout = discover(root)
    assert [c.wnid for c in layout.classes] == ["cat", "dog"]
    train = {r.source: (r.key, r.label) for r in layout.splits["train"]}
    assert train == {"train/cat/001.jpg": ("train__cat__001", 0), "train/dog/001.jpg": ("train__dog__001", 1),
                     "train/dog/002.png": ("002", 1)}
    assert layout.others == [("train/dog/notes.txt", "skipped", layout.others[0][2])]
    assert "not an image" in layout.others[0][2] and "'.txt'" in layout.others[0][2]
    summary, _ = build(root, tmp_path / "out")
    assert summary["train"]["converted"] == 1 and summary["val"]["stored"] == 2
    # SOURCE itself a class-folder tree: one split, train.
    assert list(discover(root / "val").splits) == ["train"]


@pytest.mark.parametrize("case", ["empty", "no_images", "loose", "val_without_labels", "val_labels_elsewhere",
                                  "missing_split"])
def test_clear_errors_for_bad_sources(tmp_path, case):
    root = tmp_path / "src"
    root.mkdir()
    img = Image.fromarray(np.zeros((20, 20, 3), np.uint8))
    splits = None
    if case == "no_images":
        (root / "train" / "a").mkdir(parents=True)
        (root / "train" / "a" / "README.txt").write_text("hello")
    elif case == "loose":
        img.save(root / "photo.jpg")
    elif case in ("val_without_labels", "val_labels_elsewhere", "missing_split"):
        (root / "train" / "n01440764").mkdir(parents=True)
        img.save(root / "train" / "n01440764" / "n01440764_1.JPEG")
        if case.startswith("val"):
            (root / "val").mkdir()
            img.save(root / "val" / "ILSVRC2012_val_00000001.JPEG")
        if case == "val_labels_elsewhere":  # a label file for other images
            (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\nother,n01440764 1 2 3 4\n")
        if case == "missing_split":
            splits = ["train", "test"]
    message = {"empty": "no images in", "no_images": "no images in", "loose": "unknown layout",
               "val_without_labels": "val folder without labels", "missing_split": "--split test",
               "val_labels_elsewhere": "val folder without labels.*LOC_val_solution.csv labels none"}[case]
    with pytest.raises(DataError, match=message):
        preprocess(root, tmp_path / "out", splits=splits, progress=False, log=lambda s: None)
    assert not (tmp_path / "out").exists()  # a refused run leaves no OUT folder behind
