"""Adding data to an existing OUT as users get it: a new class is appended (old indices, and a
checkpoint's predictions on the old images, unchanged), options come from OUT, history.json records
each run; and every entry under SOURCE is accounted for, symlinks included, with real CLI processes."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model
from odd_sample import build
from preprocessing import synthetic
from storage import dataformat as fmt

ROOT = Path(__file__).resolve().parent.parent
WIDTH, CROP = 1 / 16, 32


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.preprocess", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def add_class(src: Path, more: Path, wnid: str, val: bool) -> None:
    """Copy class ``wnid`` of the bigger sample ``more`` into ``src``: its train folder, or its val
    images (numbered after src's, labelled in LOC_val_solution.csv, as new ILSVRC-style data comes)."""
    shutil.copy(more / "LOC_synset_mapping.txt", src / "LOC_synset_mapping.txt")
    if not val:
        shutil.copytree(more / "train" / wnid, src / "train" / wnid)
        return
    lines = [line for line in (more / "LOC_val_solution.csv").read_text().splitlines()[1:]
             if line.split(",")[1].split()[0] == wnid]
    with open(src / "LOC_val_solution.csv", "a") as csv:
        for n, line in enumerate(lines, start=1000):
            stem = f"ILSVRC2012_val_{n:08d}"
            shutil.copy(more / "val" / f"{line.split(',')[0]}.JPEG", src / "val" / f"{stem}.JPEG")
            csv.write(f"{stem},{line.split(',', 1)[1]}\n")  # its own boxes


def predict(data_config, out: Path, checkpoint: Path, classes: int) -> dict[str, tuple[int, torch.Tensor]]:
    """key -> (label, logits) of every val image, through the DALI eval loader training uses."""
    from pipeline.loader import EvalLoader

    net = model.build("A", classes, width=WIDTH, init="kaiming", image_size=CROP)
    net.load_state_dict(torch.load(checkpoint, weights_only=True))
    net.eval()
    cfg = data_config(out, crop_size=CROP, scale_min=CROP, scale_max=48)
    found = {}
    with torch.no_grad():
        for batch in EvalLoader(cfg, 4, 0, 1):
            for key, label, logits in zip(batch.keys, batch.labels.tolist(), net(batch.images)):
                found[key] = (label, logits)
    return found


def test_a_new_class_is_appended_and_a_checkpoint_keeps_its_predictions(data_config, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    synthetic.generate(src, classes=3, train_per_class=4, val_per_class=2, seed=0, size_range=(48, 64))
    more = synthetic.generate(tmp_path / "more", classes=4, train_per_class=4, val_per_class=2, seed=0,
                              size_range=(48, 64))  # the same 3 classes (same pixels) and a 4th
    build(src, out, shard_size=4, seed=3)
    before = fmt.read_info(out)
    old_rows = {s: fmt.read_manifest(out, s).to_pylist() for s in ("train", "val")}
    torch.manual_seed(0)
    checkpoint = tmp_path / "before.pt"
    torch.save(model.build("A", 3, width=WIDTH, init="kaiming", image_size=CROP).state_dict(), checkpoint)
    predicted = predict(data_config, out, checkpoint, 3)

    new = sorted(p.name for p in (more / "train").iterdir())[3]
    add_class(src, more, new, val=False)
    r = cli(src, out, "--workers", "1", "--no-progress")  # no options: OUT's (shard size 4, seed 3)
    assert r.returncode == 0, r.stderr
    assert f"classes: 1 new, appended after the 3 that {out} has: 3 {new}" in r.stdout
    assert re.search(rf"warning: 1 of 4 classes have no val images.*: 3 {new} \(", r.stdout)
    info = fmt.read_info(out)
    assert info["classes"][:3] == before["classes"] and info["classes"][3]["wnid"] == new
    assert info["classes"][3]["index"] == 3 and info["classes"][3][fmt.CLASS_RUN] == 1
    assert (info["seed"], info["options"]) == (3, {"shard_size": 4, "max_side": None})
    assert info["stats"] == before["stats"]  # what a checkpoint was trained with stays
    rows = fmt.read_manifest(out, "train").to_pylist()
    assert rows[:len(old_rows["train"])] == old_rows["train"]  # earlier samples and labels unchanged
    assert {r["label"] for r in rows[len(old_rows["train"]):]} == {3}

    add_class(src, more, new, val=True)
    _, log = build(src, out, shard_size=None, seed=None)  # in-process, again without options
    assert "warning" not in log and "val: added 2 images in 1 shard (val-000" in log
    history = fmt.read_history(out)
    assert [h["run"] for h in history] == [0, 1, 2]
    assert history[1]["classes_added"] == [new] and history[1]["added"]["train"]["inputs"] == 4
    assert history[2]["classes_added"] == [] and history[2]["added"]["val"]["inputs"] == 2
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", history[1]["git_commit"])  # from the CLI
    assert history[1]["source"] == str(src) and history[1]["options"]["seed"] == 3

    after = predict(data_config, out, checkpoint, 3)
    assert len(after) == len(predicted) + 2
    for key, (label, logits) in predicted.items():
        assert after[key][0] == label
        assert after[key][1].argmax() == logits.argmax()
        torch.testing.assert_close(after[key][1], logits, rtol=0, atol=1e-5)


def test_symlinks_are_followed_walked_or_quarantined(tmp_path):
    from PIL import Image
    import numpy as np

    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    for folder, names in ((src / "train" / "cat", ("c1", "c2")), (elsewhere / "dog", ("d1", "d2"))):
        folder.mkdir(parents=True)
        for i, name in enumerate(names):
            Image.fromarray(np.full((24, 32, 3), 40 * i, np.uint8)).save(folder / f"{name}.jpg")
    Image.fromarray(np.full((24, 32, 3), 200, np.uint8)).save(elsewhere / "real.jpg")
    os.symlink(elsewhere / "dog", src / "train" / "dog")  # a class folder that is a link: walked
    cat = src / "train" / "cat"
    os.symlink(elsewhere / "real.jpg", cat / "alias.jpg")  # a file link: followed
    os.symlink("nowhere.jpg", cat / "dead.jpg")  # dangling
    os.symlink("loop.jpg", cat / "loop.jpg")  # a link to itself
    os.symlink("..", cat / "up")  # a folder loop: train/cat/up/cat/up/...
    out = tmp_path / "out"
    r = cli(src, out, "--workers", "1", "--no-progress")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    rows = {row["source"]: row for row in fmt.read_manifest(out, "train").to_pylist()}
    assert {s: rows[s]["label"] for s in ("train/dog/d1.jpg", "train/dog/d2.jpg")} == {"train/dog/d1.jpg": 1,
                                                                                     "train/dog/d2.jpg": 1}
    assert rows["train/cat/alias.jpg"]["status"] == "kept"
    assert rows["train/cat/alias.jpg"]["bytes"] == (elsewhere / "real.jpg").stat().st_size
    assert rows["train/cat/dead.jpg"]["status"] == "quarantined"
    assert rows["train/cat/dead.jpg"]["reason"] == "dangling symlink to nowhere.jpg"
    assert rows["train/cat/loop.jpg"]["status"] == "quarantined" and "symlink loop" in rows["train/cat/loop.jpg"]["reason"]
    assert "quarantined  train/cat/up: symlink loop: a link to .., a folder that contains it" in r.stdout
    assert f"SOURCE {src}: 8 files: 5 kept, 0 converted, 0 resized, 3 quarantined, 0 skipped" in r.stdout

    missing = cli(src, tmp_path / "out2", "--split", "test", "--workers", "1")
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert missing.returncode == 2 and len(lines) == 1 and "Traceback" not in missing.stderr, missing.stderr
    assert lines[0].startswith(f"error: --split test: no folder {src / 'test'}")


def test_every_file_under_source_is_accounted_for(built, odd_source):
    out, summary, log = built
    files = sorted(Path(d, f).relative_to(odd_source).as_posix() for d, _, fs in os.walk(odd_source) for f in fs)
    s = summary["SOURCE"]
    assert s["files"] == len(files) == s["kept"] + s["converted"] + s["resized"] + s["quarantined"] + s["skipped"]
    assert (s["resized"], s["quarantined"], s["skipped"]) == (0, 5, 6)  # 4 train + 1 val bad images
    assert f"quarantined or skipped (10 of 11; all of them: python -m jobs.preprocess report {out}):" in log
    assert "skipped      train/n01440764/..evil.jpg: hidden" in log
    r = cli("report", out)
    assert r.returncode == 0, r.stderr
    listed = {line.split()[1].rstrip(":"): line.split()[0] for line in r.stdout.splitlines()
              if line.startswith(("quarantined ", "skipped "))}
    stored = {row["source"] for split in ("train", "val") for row in fmt.read_manifest(out, split).to_pylist()
              if row["status"] != "quarantined"}
    assert sorted(listed) == sorted(set(files) - stored)  # every file not stored, with its status
    assert listed["LOC_val_solution.csv"] == "skipped" and listed["train/n01440764/README.txt"] == "skipped"
    assert listed["LOC_train_solution.csv"] == "skipped"  # read for the boxes
    assert "5 quarantined inputs (manifests of train, val); 6 skipped and 0 quarantined other entries" in r.stdout
    assert re.search(r"^run 0: \d{4}-\d\d-\d\dT.*; train \+52 inputs, val \+18 inputs; classes added 4",
                     r.stdout, re.M)


@pytest.mark.parametrize("option, value, recorded", [("seed", 1, 0), ("shard_size", "16", 8)])
def test_a_conflicting_explicit_option_is_named(built, odd_source, tmp_path, option, value, recorded):
    from storage.dataformat import DataError

    out = tmp_path / "out"
    shutil.copytree(built[0], out)
    flag = "--" + option.replace("_", "-")
    with pytest.raises(DataError, match=rf"{flag} {value} \(OUT has {recorded}\)"):
        build(odd_source, out, **{option: value})
    summary, log = build(odd_source, out, shard_size=None)  # not given: recorded
    assert "nothing to do" in log and summary["train"]["shards_written"] == 0
