"""Boxes through the augmentation (issue 16): on images of solid rectangles, preprocessed with their
boxes in Kaggle's CSV, the box the loaders yield bounds the rectangle's pixels as they come out of
DALI (scale jitter, crop, flip; centre crop and dense rescale) within a pixel; the target is the
rectangle most inside the crop; only samples with boxes train; the index filter keeps epochs, ranks
and resume right."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import box_augment
from storage.dataset import DataError, load_stats
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
