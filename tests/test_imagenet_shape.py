"""preprocessing/imagenet_shape.py: the ILSVRC-2012-shaped tree at scaled counts (N = 2,000 train images
here), read back with preprocessing's own readers; same bytes for any workers; reruns write nothing;
add_new / remove_new; jobs.preprocess stores every image; jobs.sample's --imagenet-shape options."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs import cli
from jobs.sample import main as sample_main
from preprocessing import imagenet_shape as ish
from preprocessing.annotations import read_kaggle_csv
from preprocessing.sources import discover
from preprocessing.synthetic import synsets
from storage.dataformat import DataError, read_manifest

N = 2000
ROOT = Path(__file__).parents[1]


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def train_files(root: Path) -> dict[str, list[str]]:
    return {d.name: sorted(f.name for f in d.iterdir()) for d in sorted((root / "train").iterdir())}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return ish.generate(tmp_path_factory.mktemp("ish") / "tree", N, seed=0, workers=1)


def test_the_full_table_has_imagenets_total_minimum_and_maximum():
    full = ish.full_counts()
    assert len(full) == ish.CLASSES and full.sum() == ish.TRAIN_IMAGES
    assert full.min() == ish.MIN_PER_CLASS and full.max() == ish.MAX_PER_CLASS
    assert (full == ish.MAX_PER_CLASS).sum() > ish.CLASSES // 2  # most classes are full


@pytest.mark.parametrize("n", [1000, 1001, 1750, N, 12_345, 100_000, ish.TRAIN_IMAGES])
def test_scaled_counts_sum_exactly_and_stay_within_one_of_their_share(n):
    full, counts = ish.full_counts(), ish.train_counts(n)
    assert counts.sum() == n and counts.min() >= 1
    assert np.all(np.abs(counts - n * full / full.sum()) < 1)
    val = ish.val_counts(n)
    assert val.sum() == max(1, round(ish.VAL_PER_CLASS * ish.CLASSES * n / ish.TRAIN_IMAGES))
    assert val.max() - val.min() <= 1


def test_the_tree_has_1000_classes_and_the_scaled_counts(tree):
    files = train_files(tree)
    wnids = [w for w, _ in ish.classes()]
    assert sorted(files) == sorted(wnids) and len(set(wnids)) == ish.CLASSES
    assert {w for w, _ in synsets()} < set(wnids) and all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    counts = dict(zip(wnids, ish.train_counts(N).tolist()))
    for wnid, names in files.items():
        assert names == sorted(f"{wnid}_{i}.JPEG" for i in range(1, counts[wnid] + 1))
    val = sorted(p.name for p in (tree / "val").iterdir())
    assert val == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, int(ish.val_counts(N).sum()) + 1)]
    mapping = (tree / "LOC_synset_mapping.txt").read_text().splitlines()
    assert [line.split(" ", 1)[0] for line in mapping] == sorted(wnids)
    record = ish.read_record(tree)
    assert record["complete"] and record["train"] == N and record["val"] == len(val)


def test_preprocessing_reads_the_tree_as_imagenet_with_boxes_inside_their_images(tree):
    layout = discover(tree)
    assert len(layout.classes) == ish.CLASSES
    assert len(layout.splits["train"]) == N and len(layout.splits["val"]) == ish.val_counts(N).sum()
    assert all(i.label >= 0 for s in layout.splits.values() for i in s)
    wnid_of = {Path(i.source).stem: i.wnid for s in layout.splits.values() for i in s}
    path_of = {Path(i.source).stem: tree / i.source for s in layout.splits.values() for i in s}
    per_image = []
    for split, n_boxed in (("train", ish.scaled(ish.TRAIN_BOXED, N)), ("val", len(layout.splits["val"]))):
        ann = read_kaggle_csv(tree / f"LOC_{split}_solution.csv")
        assert ann.problems == [] and len(ann.boxes) == n_boxed
        for stem, boxes in ann.boxes.items():
            w, h = Image.open(path_of[stem]).size
            for wnid, x1, y1, x2, y2 in boxes:
                assert wnid == wnid_of[stem] and 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            per_image.append(len(boxes))
    assert min(per_image) == 1 and max(per_image) > 1 and 1 < np.mean(per_image) < 2


def test_images_are_small_baseline_rgb_jpegs_with_distinct_bytes(tree):
    paths = sorted(tree.rglob("*.JPEG"))
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    assert len(digests) == len(paths)
    for p in paths[::97]:
        with Image.open(p) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and not img.info.get("progressive")
            assert all(ish.SIDES[0] <= s <= ish.SIDES[1] for s in img.size)
            img.load()


def test_two_workers_write_the_same_bytes(tree, tmp_path):
    other = ish.generate(tmp_path / "two", N, seed=0, workers=2)
    assert snapshot(other) == snapshot(tree)
    assert snapshot(ish.generate(tmp_path / "seed1", N, seed=1, workers=1)) != snapshot(tree)


def test_a_complete_tree_is_not_rewritten_and_a_killed_one_is_redone(tree, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in tree.rglob("*")}
    ish.generate(tree, N, seed=0, workers=1)
    assert {p: p.stat().st_mtime_ns for p in tree.rglob("*")} == before
    with pytest.raises(DataError, match="other parameters"):
        ish.generate(tree, N, seed=1)
    killed = tmp_path / "killed"
    shutil.copytree(tree, killed)
    for p in sorted((killed / "train").rglob("*.JPEG"))[::3]:
        p.write_bytes(p.read_bytes()[:10])  # cut short, as by a kill
    (killed / "LOC_val_solution.csv").unlink()
    record = json.loads((killed / ish.MARKER).read_text())
    (killed / ish.MARKER).write_text(json.dumps({**record, "complete": False}))
    ish.generate(killed, N, seed=0, workers=1)
    assert snapshot(killed) == snapshot(tree)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    with pytest.raises(DataError, match="not empty"):
        ish.generate(foreign, N)


def test_add_new_adds_a_share_of_images_and_one_class_and_remove_new_restores_the_tree(tree, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(tree, work)
    original = snapshot(work)
    added = ish.add_new(work, fraction=0.01, seed=0)
    new_wnid = added["wnid"]
    assert added["train"] == round(0.01 * N) + round(N / ish.CLASSES) and added["val"] >= 1
    files = train_files(work)
    assert len(files) == ish.CLASSES + 1 and len(files[new_wnid]) == round(N / ish.CLASSES)
    assert sum(map(len, files.values())) == N + added["train"]
    layout = discover(work)
    assert len(layout.classes) == ish.CLASSES + 1 and len(layout.splits["val"]) == ish.val_counts(N).sum() + added["val"]
    train = read_kaggle_csv(work / "LOC_train_solution.csv")
    assert train.problems == [] and len(train.boxes) == ish.scaled(ish.TRAIN_BOXED, N) + ish.scaled(
        ish.TRAIN_BOXED, added["train"])
    val = read_kaggle_csv(work / "LOC_val_solution.csv")
    assert val.problems == [] and sum(b[0][0] == new_wnid for b in val.boxes.values()) == added["val"]
    after = snapshot(work)
    assert ish.add_new(work, fraction=0.01, seed=0) == added and snapshot(work) == after  # idempotent
    with pytest.raises(DataError, match="remove_new first"):
        ish.add_new(work, fraction=0.02, seed=0)
    assert ish.remove_new(work) == added["train"] + added["val"]
    assert snapshot(work) == original
    assert ish.remove_new(work) == 0


def test_preprocess_stores_every_image_of_a_small_tree(tree, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "jobs.preprocess", str(tree), str(out), "--workers", "2",
                        "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    record = ish.read_record(tree)
    for split, n in (("train", record["train"]), ("val", record["val"])):
        rows = read_manifest(out, split).to_pylist()
        assert len(rows) == n and {row["status"] for row in rows} == {"kept"}
    boxed = [row for row in read_manifest(out, "train").to_pylist() if row["boxes"] is not None]
    assert len(boxed) == record["train_boxed"]


def test_the_sample_command_writes_the_tree_and_refuses_bad_options(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli.run(sample_main, [str(out), "--imagenet-shape", "--images", "1000", "--workers", "1",
                                 "--no-progress"]) == 0
    assert ish.read_record(out)["train"] == 1000 and "1,000 train images" in capsys.readouterr().out
    for argv, named in (([str(out), "--imagenet-shape", "--images", "999"], "--images 999"),
                        ([str(out), "--imagenet-shape", "--images", str(ish.TRAIN_IMAGES + 1)], "--images"),
                        ([str(out), "--imagenet-shape", "--workers", "0"], "--workers 0"),
                        ([str(out), "--imagenet-shape", "--classes", "4"], "--classes"),
                        ([str(out), "--images", "5000"], "--images"),
                        ([str(out), "--imagenet-shape", "--images", "2000"], "other parameters")):
        assert cli.run(sample_main, argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and named in err and err.count("\n") == 1
