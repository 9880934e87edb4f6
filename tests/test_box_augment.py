"""Boxes through the augmentation (issue 16): on images of solid rectangles, preprocessed with their
boxes in Kaggle's CSV, the box the loaders yield bounds the rectangle's pixels as they come out of
DALI (scale jitter, crop, flip; centre crop and dense rescale) within a pixel; the target is the
rectangle most inside the crop; only samples with boxes train; the index filter keeps epochs, ranks
and resume right, and its copies are built once per node, reused only while nothing changed."""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import box_augment
from storage import dataformat as fmt
from storage import shard_check
from storage.dataset import DataError, load_stats, open_dataset
from pipeline.loader import EvalLoader, TrainLoader

# Images: red a horizontal ramp (tells a flipped crop); green 255 inside the first rectangle, blue 255
# inside the second (found by thresholding, even where they overlap), 0 elsewhere. Keys ending in a
# multiple of 3 have no box (their rectangle is drawn but not annotated); those ending in 2 mod 3
# have two boxes; the others one.
PER_CLASS = {"train": 24, "val": 8}
CLASSES = ("n00000001", "n00000002")
TOL = 1.0            # px: a thresholded edge of a linearly resampled, antialiased JPEG edge


def box_count(key: str) -> int:
    return (0, 1, 2)[int(key.rsplit("_", 1)[1]) % 3]


def has_box(key: str) -> bool:
    return box_count(key) > 0


def draw(rng, rectangles: int) -> tuple[np.ndarray, list[list[int]]]:
    """An image and its rectangles' exact boxes (pixel edges: columns x1 .. x2 - 1 are inside)."""
    h, w = (int(v) for v in rng.integers(96, 161, 2))
    img, boxes = np.zeros((h, w, 3), np.uint8), []
    img[..., 0] = np.round(np.arange(w) * 255 / (w - 1))[None, :]
    for channel in (1, 2)[:rectangles]:
        bw, bh = int(rng.integers(w // 5, w * 7 // 10)), int(rng.integers(h // 5, h * 7 // 10))
        x1, y1 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        img[y1:y1 + bh, x1:x1 + bw, channel] = 255
        boxes.append([x1, y1, x1 + bw, y1 + bh])
    return img, boxes


@pytest.fixture(scope="module")
def box_dataset(tmp_path_factory):
    """(root, key -> boxes, key -> (H, W), plain): the images preprocessed with their boxes (in
    ``LOC_<split>_solution.csv``); ``plain`` the same images preprocessed without annotations."""
    from preprocessing import writer

    src, rng = tmp_path_factory.mktemp("boxes") / "source", np.random.default_rng(0)
    truth, sizes, rows = {}, {}, {split: [] for split in PER_CLASS}
    for split, n in PER_CLASS.items():
        for cls in CLASSES:
            (src / split / cls).mkdir(parents=True)
            for i in range(n):
                key = f"{cls}_{split}_{i}"
                img, boxes = draw(rng, max(box_count(key), 1))
                Image.fromarray(img).save(src / split / cls / f"{key}.JPEG", quality=95, subsampling=0)
                truth[key], sizes[key] = boxes[:box_count(key)], img.shape[:2]
                if has_box(key):
                    rows[split].append(f"{key}," + " ".join(f"{cls} {x1} {y1} {x2} {y2}"
                                                            for x1, y1, x2, y2 in truth[key]))
    plain = tmp_path_factory.mktemp("plain-shards")
    writer.preprocess(src, plain, shard_size=7, seed=0, progress=False, log=lambda message: None)
    for split, lines in rows.items():
        (src / f"LOC_{split}_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(lines) + "\n")
    out = tmp_path_factory.mktemp("box-shards")
    writer.preprocess(src, out, shard_size=7, seed=0, progress=False, log=lambda message: None)
    return out, truth, sizes, plain


def cfg_for(data_config, root, **over):
    return data_config(root, color_shift_std=0.0, **over)


def rectangle(img: torch.Tensor, channel: int) -> tuple[torch.Tensor | None, int]:
    """(x1, y1, x2, y2) pixel edges of the pixels whose ``channel`` is above half (None if none),
    and how many there are."""
    mask = img[channel] > 127.5
    if not mask.any():
        return None, 0
    cols, rows = mask.any(0).nonzero()[:, 0], mask.any(1).nonzero()[:, 0]
    edges = [cols[0].item(), rows[0].item(), cols[-1].item() + 1.0, rows[-1].item() + 1.0]
    return torch.tensor(edges, dtype=torch.float64), int(mask.sum())


def area(box: torch.Tensor) -> float:
    return float((box[2] - box[0]).clamp(min=0) * (box[3] - box[1]).clamp(min=0))


def corners(cxcywh: torch.Tensor, side: int) -> torch.Tensor:
    cx, cy, w, h = (cxcywh.double() * side).tolist()
    return torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dtype=torch.float64)


# ------------------------------------------------------------------------------- pure functions

def test_the_target_is_the_box_most_inside_the_crop_clipped():
    big_outside = torch.tensor([[-2.0, -2.0, 0.1, 0.1], [0.5, 0.5, 0.9, 1.2]])   # 0.01 vs 0.2 inside
    assert torch.allclose(box_augment.pick_target(big_outside), torch.tensor([0.5, 0.5, 0.9, 1.0]))
    # nothing inside: the largest box, unclipped, so the target still points at the object
    away = torch.tensor([[1.2, 0.1, 1.5, 0.4], [-1.0, 0.0, -0.2, 2.0]])
    assert torch.equal(box_augment.pick_target(away), away[1])
    # a flipped crop maps u to 1 - u; a window at (y, x) = (10, 20) of side 40
    t = box_augment.crop_targets([torch.tensor([[30.0, 10.0, 40.0, 30.0]])], torch.tensor([[10.0, 20.0]]),
                                 torch.tensor([[50.0, 60.0]]), torch.tensor([1]))
    assert torch.allclose(t, torch.tensor([[1 - 0.375, 0.25, 0.25, 0.5]]))


def test_rescaled_size_matches_the_yielded_dense_images(box_dataset, data_config):
    root, truth, sizes, plain = box_dataset
    for batch in EvalLoader(cfg_for(data_config, root), 4, 0, 1, mode="dense", scale=77):
        for key, img in zip(batch.keys, batch.images):
            assert tuple(img.shape[1:]) == box_augment.rescaled_size(*sizes[key], 77)


# ----------------------------------------------------------------------------------- training

def train_errors(batch, crop: int, stats) -> tuple[list[float], list[int], int]:
    """For each yielded box: its error (px) against the rectangle it should be, the one with the
    most pixels in the crop (samples where the two are nearly equal are skipped); which rectangle
    (0, 1) that was; and how many crops were flipped."""
    errors, chosen, flipped = [], [], 0
    for key, img, target in zip(batch.keys, batch.images, batch.boxes):
        img = img + torch.tensor(stats.mean_rgb, dtype=img.dtype)[:, None, None]  # back to 0-255
        flipped += int(img[0, :, -1].mean() < img[0, :, 0].mean())              # the red ramp descends
        box = corners(target, crop)
        inside = box.clamp(0, crop)
        seen = [rectangle(img, channel) for channel in (1, 2)[:box_count(key)]]
        counts = sorted((n, i) for i, (_, n) in enumerate(seen))
        if counts[-1][0] == 0:  # no rectangle in the crop: neither is the target (a sliver at most)
            assert area(inside) < TOL * crop, (key, box)
            continue
        assert (box - inside).abs().max() < 1e-3, f"{key}: a target partly in the crop is clipped: {box}"
        if len(counts) == 2 and counts[1][0] - counts[0][0] < 2 * crop:
            continue            # nearly equal areas: which one is the larger depends on the rounding
        errors.append((box - seen[counts[-1][1]][0]).abs().max().item())
        chosen.append(counts[-1][1])
    return errors, chosen, flipped


def test_train_boxes_follow_the_scale_jitter_crop_and_flip(box_dataset, data_config):
    root, truth, sizes, plain = box_dataset
    cfg = cfg_for(data_config, root)
    loader = TrainLoader(cfg, 8, 0, 1, seed=4, boxes=True)
    boxed = {k for k in truth if "_train_" in k and has_box(k)}
    assert len(loader) == len(boxed) // 8 == 4
    stats, errors, chosen, flipped, keys = load_stats(root), [], [], 0, []
    for _ in range(3):
        for batch in loader:
            assert batch.boxes.shape == (8, 4) and batch.boxes.dtype == torch.float32
            e, c, f = train_errors(batch, cfg.crop_size, stats)
            errors, chosen, flipped, keys = errors + e, chosen + c, flipped + f, keys + batch.keys
    assert set(keys) <= boxed and len(set(keys)) > 0.9 * len(boxed)     # never a sample without a box
    assert len(errors) > 0.7 * len(keys) and max(errors) <= TOL, sorted(errors)[-5:]
    assert chosen.count(1) >= 3, "the second box is the target when it is more inside the crop"
    assert 0.25 < flipped / len(keys) < 0.75


def test_train_box_state_resumes_identically(box_dataset, data_config):
    root, *_ = box_dataset
    cfg = cfg_for(data_config, root)
    a = TrainLoader(cfg, 8, 0, 1, seed=2, boxes=True)
    it = iter(a)
    next(it)
    state = a.state()
    rest = list(it)
    b = TrainLoader(cfg, 8, 0, 1, seed=2, boxes=True, state=state)
    again = list(b)
    assert [x.keys for x in again] == [x.keys for x in rest]
    assert all(torch.equal(x.boxes, y.boxes) for x, y in zip(again, rest))
    with pytest.raises(ValueError, match="boxes=True, False"):    # the boxed samples are another epoch
        TrainLoader(cfg, 8, 0, 1, seed=2, state=state)


def test_ranks_split_the_boxed_samples_disjointly(box_dataset, data_config):
    root, truth, *_ = box_dataset
    boxed = {k for k in truth if "_train_" in k and has_box(k)}
    ranks = [TrainLoader(cfg_for(data_config, root), 4, r, 2, boxes=True) for r in range(2)]
    for _ in range(2):                                                     # two epochs: ranks rotate
        seen = [[k for b in loader for k in b.keys] for loader in ranks]
        assert len(seen[0]) == len(seen[1]) == len(boxed) // 2 == 4 * len(ranks[0])
        assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == boxed


def test_without_boxes_the_loaders_are_unchanged(box_dataset, data_config):
    root, truth, sizes, plain = box_dataset
    loader = TrainLoader(cfg_for(data_config, root), 8, 0, 1)
    assert len(loader) == 2 * PER_CLASS["train"] // 8                    # every sample, boxed or not
    batch = next(iter(loader))
    assert batch.boxes is None and batch.gt_boxes == () and len(batch) == 5
    with pytest.raises(DataError, match=r"dataset\.json: split 'train' has no 'boxes' entry"):
        TrainLoader(cfg_for(data_config, plain), 8, 0, 1, boxes=True)
    with pytest.raises(DataError, match=r"dataset\.json: split 'val' has no 'boxes' entry"):
        EvalLoader(cfg_for(data_config, plain), 4, 0, 1, boxes=True)
    assert next(iter(EvalLoader(cfg_for(data_config, plain), 4, 0, 1))).gt_boxes == ()


def test_a_stale_box_count_or_boxless_shards_are_named(box_dataset, data_config, tmp_path):
    root, *_, plain = box_dataset
    for images, match in ((31, "records 31 images with boxes but its indexes hold 32"),
                          (None, "no sample in its shards has a box member")):
        copy = tmp_path / f"copy-{images}"
        shutil.copytree(root if images else plain, copy)   # plain: shards without box members
        info = json.loads((copy / "dataset.json").read_text())
        info["splits"]["train"]["boxes"] = {"images": images}
        (copy / "dataset.json").write_text(json.dumps(info))
        with pytest.raises(DataError, match=match):
            TrainLoader(cfg_for(data_config, copy), 8, 0, 1, boxes=True, check=False)


# --------------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize("mode", ["center", "dense"])
def test_eval_boxes_bound_the_rectangles_in_the_yielded_image(box_dataset, data_config, mode):
    root, truth, sizes, plain = box_dataset
    cfg = cfg_for(data_config, root, mean_subtraction=False)
    seen_keys, beyond, errors = [], 0, []
    for batch in EvalLoader(cfg, 4, 0, 1, mode=mode, scale=80, boxes=True):
        assert isinstance(batch.gt_boxes, tuple) and len(batch.gt_boxes) == len(batch.keys)
        for key, img, boxes in zip(batch.keys, batch.images, batch.gt_boxes):
            seen_keys.append(key)
            assert boxes.dtype == torch.float32 and boxes.device.type == "cpu"
            assert boxes.shape == (box_count(key), 4)                       # (0, 4) without boxes
            h, w = img.shape[1:]
            for channel, box in zip((1, 2), boxes.double()):               # the CSV's order
                beyond += bool(box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h)  # not clipped
                inside = torch.stack([box[0].clamp(0, w), box[1].clamp(0, h), box[2].clamp(0, w),
                                      box[3].clamp(0, h)])
                found, _ = rectangle(img, channel)
                if found is None:
                    assert area(inside) < TOL * max(h, w), (key, box)
                    continue
                errors.append((inside - found).abs().max().item())
    assert sorted(seen_keys) == sorted(k for k in truth if "_val_" in k)    # every image, boxed or not
    assert len(errors) >= 12 and max(errors) <= TOL, sorted(errors)[-5:]
    assert (beyond > 0) == (mode == "center")


# --------------------------------------------------------------------- the node cache of boxed indexes

def entries(cache) -> list:
    """The published entries (folders) of every dataset and split in the boxed index cache ``cache``."""
    return sorted(e for group in cache.iterdir() if group.is_dir() for e in group.iterdir()
                  if e.is_dir() and not e.name.startswith(".tmp-"))


def identity(split) -> list[tuple[int, int, int]]:
    """(inode, mtime_ns, size) of each of a split's index files: what a rebuild would change."""
    return [(s.st_ino, s.st_mtime_ns, s.st_size) for s in (Path(i).stat() for i in split.indexes)]


def mark(split) -> Path:
    """A file dropped into a split's cache entry: gone if the entry is removed and built again."""
    marker = Path(split.indexes[0]).parent / "marker"
    marker.write_text("")
    return marker


def touch_index(path: Path, ns: int) -> None:
    """Rewrite an index with the same bytes and an mtime of its own (as a rebuild from its tar would)."""
    path.write_bytes(path.read_bytes())
    os.utime(path, ns=(ns, ns))


def boxed(root, cache):
    """The boxed train split of the dataset at ``root``, through the boxed index cache ``cache``."""
    ds = open_dataset(root)
    return box_augment.boxed_split(ds, ds.split("train", check=False), cache)


def test_the_boxed_index_fast_path_selects_what_the_reader_reads(box_dataset, tmp_path):
    root, truth, *_ = box_dataset
    split = boxed(root, tmp_path / "cache")
    sources = open_dataset(root).split("train", check=False)
    kept = {}
    for idx in sources.indexes:
        by_reader = [s for s in fmt.read_index(idx) if any(c[0] == fmt.BOX_EXT for c in s)]
        fast = fmt.index_lines_with(idx, fmt.BOX_EXT)
        assert [" ".join(f"{e} {o} {n} {m}" for e, o, n, m in s) for s in by_reader] == fast
    for tar, idx in zip(split.shards, split.indexes):       # each copy: its tar's boxed samples, as read
        kept.update({s[0][3].split(".")[0]: tar for s in fmt.read_index(idx)})
        assert all(fmt.BOX_EXT in {c[0] for c in s} for s in fmt.read_index(idx))
    assert set(kept) == {k for k in truth if "_train_" in k and has_box(k)}
    assert split.num_samples == len(kept)
    bad = tmp_path / "bad.idx"
    bad.write_text("v1.2 3\nbox 512 16 a.box\n")
    with pytest.raises(DataError, match=r"bad\.idx: header 'v1.2 3' is not 'v1.2 1'"):
        fmt.index_lines_with(bad, fmt.BOX_EXT)


def test_a_second_loader_reuses_the_node_cache_entry(box_dataset, data_config, tmp_path, monkeypatch):
    root, *_ = box_dataset
    monkeypatch.setenv(shard_check.CACHE_ENV, str(tmp_path / "shards.json"))
    first = TrainLoader(cfg_for(data_config, root), 8, 0, 1, boxes=True)
    before, marker = identity(first.split), mark(first.split)
    del first
    second = TrainLoader(cfg_for(data_config, root), 8, 0, 1, boxes=True)
    cache = shard_check.node_cache_folder(box_augment.CACHE_NAME)
    assert all(Path(i).is_relative_to(cache) for i in second.split.indexes)     # $VGG_SHARD_CACHE moved it
    assert identity(second.split) == before and marker.exists()                # the same files, not rebuilt
    assert len(entries(cache)) == 1
    assert len(second) == 4 and next(iter(second)).boxes.shape == (8, 4)


def test_a_changed_dataset_gets_a_new_entry_and_old_ones_are_bounded(box_dataset, tmp_path):
    root, *_ = box_dataset
    copy, cache = tmp_path / "copy", tmp_path / "cache"
    shutil.copytree(root, copy)
    first = boxed(copy, cache)
    info = json.loads((copy / "dataset.json").read_text())
    info["fingerprint"] = "another"                                    # another dataset.json, same indexes
    (copy / "dataset.json").write_text(json.dumps(info))
    second = boxed(copy, cache)
    assert set(second.indexes).isdisjoint(first.indexes) and len(entries(cache)) == 2
    idx = copy / Path(second.indexes[0]).name.split("-", 1)[1]
    touch_index(idx, 10**18)                                           # an index rewritten (or rebuilt)
    third = boxed(copy, cache)
    assert set(third.indexes).isdisjoint(second.indexes) and len(entries(cache)) == 3
    marker = mark(third)
    assert boxed(copy, cache).indexes == third.indexes and marker.exists()   # unchanged since: reused
    now = time.time()
    for age, split in ((300, first), (200, third), (100, second)):      # used: second last, first least
        os.utime(Path(split.indexes[0]).parent, (now - age, now - age))
    touch_index(idx, 2 * 10**18)
    fourth = boxed(copy, cache)
    assert len(entries(cache)) == box_augment.KEEP_ENTRIES == 3        # the least recently used went
    assert not Path(first.indexes[0]).exists()
    assert all(Path(s.indexes[0]).exists() for s in (second, third, fourth))
    assert fourth.num_samples == first.num_samples


@pytest.mark.parametrize("damage", ["delete", "truncate", "rewrite", "manifest"])
def test_a_damaged_entry_is_rebuilt(box_dataset, tmp_path, damage):
    root, *_ = box_dataset
    cache = tmp_path / "cache"
    good = boxed(root, cache)
    victim, marker = Path(good.indexes[1]), mark(good)
    text = victim.read_text()
    if damage == "delete":
        victim.unlink()
    elif damage == "truncate":
        victim.write_text(text[:len(text) // 2])
    elif damage == "rewrite":                          # same size, another header (count)
        victim.write_text(text.replace("v1.2 ", "v1.2 9", 1)[:len(text)])
    else:
        (victim.parent / box_augment.ENTRY_JSON).unlink()
    again = boxed(root, cache)
    assert not marker.exists()                                       # rebuilt, not trusted
    assert again.indexes == good.indexes and again.num_samples == good.num_samples
    assert Path(again.indexes[1]).read_text() == text and len(entries(cache)) == 1
    assert (victim.parent / box_augment.ENTRY_JSON).is_file()


def test_a_half_built_entry_is_never_used_and_an_old_one_is_removed(box_dataset, tmp_path):
    root, *_ = box_dataset
    cache = tmp_path / "cache"
    good = boxed(root, cache)
    folder = Path(good.indexes[0]).parent
    shutil.rmtree(folder)
    half = folder.with_name(f".tmp-{folder.name}.1.deadbeef")          # a build killed before its rename
    half.mkdir()
    (half / Path(good.indexes[0]).name).write_text("v1.2 0\n")
    again = boxed(root, cache)
    assert again.indexes == good.indexes and Path(again.indexes[0]).read_text() != "v1.2 0\n"
    assert half.exists()                                                 # young: maybe still building
    os.utime(half, (time.time() - 2 * box_augment.STALE_TEMP_S,) * 2)
    boxed(root, cache)
    assert not half.exists()


def race(cache, root, barrier, lock: bool, results):
    """One process's boxed_split, all processes let through ``barrier`` together: before the node
    lock (``lock``), or without the lock, just before publishing (the rename race itself)."""
    publish, node_lock, build = shard_check.publish_folder, shard_check.node_lock, box_augment._build

    def counted_build(*args):
        results.put(("build", os.getpid()))
        return build(*args)

    def waiting_lock(path):
        barrier.wait(30)
        return node_lock(path)

    def waiting_publish(tmp, dest):
        barrier.wait(30)
        won = publish(tmp, dest)
        results.put(("published", won))
        return won

    box_augment._build = counted_build
    if lock:
        shard_check.node_lock = waiting_lock
    else:
        shard_check.node_lock = lambda path: contextlib.nullcontext()
        shard_check.publish_folder = waiting_publish
    results.put(("indexes", boxed(root, cache).indexes))


@pytest.mark.parametrize("lock", [True, False], ids=["node-lock", "rename-race"])
def test_two_processes_racing_end_with_one_valid_entry(box_dataset, tmp_path, lock):
    root, *_ = box_dataset
    ctx = multiprocessing.get_context("fork")
    cache, barrier, results = tmp_path / "cache", ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=race, args=(cache, root, barrier, lock, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in range(6 if not lock else 3)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    by = lambda kind: [v for k, v in got if k == kind]                 # noqa: E731
    assert len(by("build")) == (1 if lock else 2)                      # the lock: the second reuses
    if not lock:
        assert sorted(by("published")) == [False, True]                # the loser used the winner's
    first, second = by("indexes")
    assert first == second and len(entries(cache)) == 1
    assert not [p for g in cache.iterdir() if g.is_dir() for p in g.iterdir() if p.name.startswith(".tmp-")]
    expected = boxed(root, tmp_path / "fresh")
    assert [Path(i).read_text() for i in first] == [Path(i).read_text() for i in expected.indexes]


def test_an_unwritable_cache_falls_back_to_a_private_copy(box_dataset, tmp_path, caplog):
    root, *_ = box_dataset
    (tmp_path / "file").write_text("")
    split = boxed(root, tmp_path / "file" / "cache")
    assert "cannot write the boxed index cache" in caplog.text
    assert split.num_samples == boxed(root, tmp_path / "cache").num_samples > 0
    assert all(Path(i).is_file() and "vgg-box-index-" in i for i in split.indexes)
