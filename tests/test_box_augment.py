"""Boxes through the augmentation (issue 16): on images of one solid rectangle, the box the loaders
yield bounds the rectangle's pixels as they come out of DALI (scale jitter, crop, flip; centre crop
and dense rescale), within a pixel; only samples with boxes train; the index filter keeps resume
and epochs right."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import box_augment
from pipeline.dataset import DataError, load_stats
from pipeline.loader import EvalLoader, TrainLoader
from preprocessing.shards import ShardWriter
from storage import dataformat as fmt

# Images: red channel a horizontal ramp (tells a flipped crop), green 0 outside the rectangle and 255
# inside it (found by thresholding), blue 128. Keys ending in a multiple of 3 have no box.
PER_CLASS = {"train": 24, "val": 8}
CLASSES = ("aa", "bb")
TOL = 1.0            # px: a thresholded edge of a linearly resampled, antialiased JPEG edge


def has_box(key: str) -> bool:
    return int(key.rsplit("_", 1)[1]) % 3 != 0


def draw(rng) -> tuple[np.ndarray, list[int]]:
    """One image and its rectangle's exact box (pixel edges: columns x1 .. x2 - 1 are inside)."""
    h, w = (int(v) for v in rng.integers(96, 161, 2))
    bw, bh = int(rng.integers(w // 5, w * 7 // 10)), int(rng.integers(h // 5, h * 7 // 10))
    x1, y1 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.round(np.arange(w) * 255 / (w - 1))[None, :]
    img[..., 2] = 128
    img[y1:y1 + bh, x1:x1 + bw, 1] = 255
    return img, [x1, y1, x1 + bw, y1 + bh]


def add_box_members(root: Path, split: str, boxes: dict[str, list[int]]) -> None:
    """Rewrite ``split``'s shards with ``<key>.box`` members (the writer's own ShardWriter), their
    indexes and hashes, and give dataset.json the split's boxes entry."""
    info = json.loads((root / "dataset.json").read_text())
    entry = info["splits"][split]
    hashes = []
    for name in entry["shards"]:
        tar, idx = root / name, (root / name).with_suffix(".idx")
        data, samples = tar.read_bytes(), fmt.parse_index(idx.read_text())
        with ShardWriter(tar) as out:
            for sample in samples:
                part = {ext: data[off:off + size] for ext, off, size, _ in sample}
                key = part["key"].decode()
                box = fmt.encode_boxes([boxes[key]]) if key in boxes else b""
                out.add(key, int(part["cls"]), part["jpg"], boxes=box)
            _, lines, sha = out.commit()
        fmt.write_index(idx, lines)
        hashes.append(sha)
    entry[fmt.SHARDS_SHA256] = hashes
    entry[box_augment.BOXES_KEY] = {"images": len(boxes), "boxes": len(boxes)}
    (root / "dataset.json").write_text(json.dumps(info))


@pytest.fixture(scope="module")
def box_dataset(tmp_path_factory):
    """(root, key -> box, key -> (H, W), plain): boxes on two thirds of the images of each split;
    ``plain`` is the same dataset as preprocessing wrote it, without boxes."""
    from preprocessing import writer

    src, rng, truth = tmp_path_factory.mktemp("boxes") / "source", np.random.default_rng(0), {}
    sizes = {}
    for split, n in PER_CLASS.items():
        for cls in CLASSES:
            (src / split / cls).mkdir(parents=True)
            for i in range(n):
                img, box = draw(rng)
                Image.fromarray(img).save(src / split / cls / f"{cls}_{split}_{i}.JPEG", quality=95,
                                          subsampling=0)
                truth[f"{cls}_{split}_{i}"] = box
                sizes[f"{cls}_{split}_{i}"] = img.shape[:2]
    plain = tmp_path_factory.mktemp("plain-shards")
    writer.preprocess(src, plain, shard_size=7, seed=0, progress=False, log=lambda message: None)
    out = tmp_path_factory.mktemp("box-shards") / "out"
    shutil.copytree(plain, out)
    for split in PER_CLASS:
        add_box_members(out, split, {k: b for k, b in truth.items() if f"_{split}_" in k and has_box(k)})
    return out, truth, sizes, plain


def cfg_for(data_config, root, **over):
    return data_config(root, color_shift_std=0.0, **over)


def green_bounds(img: torch.Tensor, level: float) -> tuple[float, float, float, float] | None:
    """(x1, y1, x2, y2) pixel edges of the pixels whose green exceeds ``level``, None if none."""
    mask = img[1] > level
    if not mask.any():
        return None
    cols, rows = mask.any(0).nonzero()[:, 0], mask.any(1).nonzero()[:, 0]
    return cols[0].item(), rows[0].item(), cols[-1].item() + 1.0, rows[-1].item() + 1.0


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

def check_train_batch(batch, root, crop, stats) -> tuple[list[float], int]:
    """Errors (px) of every yielded box against its rectangle's thresholded pixels; flipped count."""
    errors, flipped = [], 0
    for key, img, target in zip(batch.keys, batch.images, batch.boxes):
        img = img + torch.tensor(stats.mean_rgb, dtype=img.dtype)[:, None, None]  # back to 0-255
        flipped += int(img[0, :, -1].mean() < img[0, :, 0].mean())              # the red ramp descends
        box = corners(target, crop)
        seen = green_bounds(img, 127.5)
        inside = box.clamp(0, crop)
        if seen is None:        # the rectangle is outside the crop: so is the target (a sliver at most)
            assert (inside[2] - inside[0]) * (inside[3] - inside[1]) < TOL * crop, (key, box)
            continue
        assert (box - inside).abs().max() < 1e-3, f"{key}: a target partly in the crop is clipped: {box}"
        errors.append((box - torch.tensor(seen, dtype=torch.float64)).abs().max().item())
    return errors, flipped


def test_train_boxes_follow_the_scale_jitter_crop_and_flip(box_dataset, data_config):
    root, truth, sizes, plain = box_dataset
    cfg = cfg_for(data_config, root)
    loader = TrainLoader(cfg, 8, 0, 1, seed=4, boxes=True)
    boxed = {k for k in truth if "_train_" in k and has_box(k)}
    assert len(loader) == len(boxed) // 8 == 4
    stats, errors, flipped, keys = load_stats(root), [], 0, []
    for _ in range(3):
        for batch in loader:
            assert batch.boxes.shape == (8, 4) and batch.boxes.dtype == torch.float32
            e, f = check_train_batch(batch, root, cfg.crop_size, stats)
            errors, flipped, keys = errors + e, flipped + f, keys + batch.keys
    assert set(keys) <= boxed and len(set(keys)) > 0.9 * len(boxed)     # never a sample without a box
    assert len(errors) > 0.8 * len(keys) and max(errors) <= TOL, sorted(errors)[-5:]
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


def test_without_boxes_the_loaders_are_unchanged(box_dataset, data_config):
    root, truth, sizes, plain = box_dataset
    loader = TrainLoader(cfg_for(data_config, root), 8, 0, 1)
    assert len(loader) == 2 * PER_CLASS["train"] // 8                    # every sample, boxed or not
    batch = next(iter(loader))
    assert batch.boxes is None and len(batch) == 4
    with pytest.raises(DataError, match=r"dataset\.json: split 'train' has no 'boxes' entry"):
        TrainLoader(cfg_for(data_config, plain), 8, 0, 1, boxes=True)
    with pytest.raises(DataError, match=r"dataset\.json: split 'val' has no 'boxes' entry"):
        EvalLoader(cfg_for(data_config, plain), 4, 0, 1, boxes=True)
    assert next(iter(EvalLoader(cfg_for(data_config, plain), 4, 0, 1))).boxes is None


# --------------------------------------------------------------------------------- evaluation

@pytest.mark.parametrize("mode", ["center", "dense"])
def test_eval_boxes_bound_the_rectangle_in_the_yielded_image(box_dataset, data_config, mode):
    root, truth, sizes, plain = box_dataset
    cfg = cfg_for(data_config, root, mean_subtraction=False)
    seen_keys, beyond, errors = [], 0, []
    for batch in EvalLoader(cfg, 4, 0, 1, mode=mode, scale=80, boxes=True):
        assert isinstance(batch.boxes, list) and len(batch.boxes) == len(batch.keys)
        for key, img, boxes in zip(batch.keys, batch.images, batch.boxes):
            seen_keys.append(key)
            assert boxes.dtype == torch.float32 and boxes.device.type == "cpu"
            if not has_box(key):
                assert boxes.shape == (0, 4)
                continue
            assert boxes.shape == (1, 4)
            h, w = img.shape[1:]
            box = boxes[0].double()
            beyond += bool(box[0] < 0 or box[1] < 0 or box[2] > w or box[3] > h)   # not clipped
            inside = box.clone()
            inside[0::2], inside[1::2] = inside[0::2].clamp(0, w), inside[1::2].clamp(0, h)
            found = green_bounds(img, 127.5)
            if found is None:
                assert (inside[2] - inside[0]) * (inside[3] - inside[1]) < TOL * max(h, w)
                continue
            errors.append((inside - torch.tensor(found, dtype=torch.float64)).abs().max().item())
    assert sorted(seen_keys) == sorted(k for k in truth if "_val_" in k)    # every image, boxed or not
    assert len(errors) >= 8 and max(errors) <= TOL, sorted(errors)[-5:]
    assert (beyond > 0) == (mode == "center")
