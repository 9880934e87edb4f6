"""The DALI pipeline in CPU-only mode: shapes and layouts, the paper's augmentation measured on known
patterns, labels, sharding (disjoint and covering training epochs, exactly-once evaluation), resume,
and the errors a broken dataset gives."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import augment
from storage.dataset import DataError, Stats, load_split, stored_labels
from pipeline.loader import EvalLoader, TrainLoader
from pipeline.sharding import reader_batches, shard_range, steps_per_epoch
from pipeline.scoring import crop_grid

# The pattern dataset: "ramp" images (R = a_x * x, G = a_y * y, B = 128) measure the scale, the crop and
# the flip; "flat" images (grey 128) measure the colour shift and the mean.
PATTERN_W, PATTERN_H = 160, 128                  # the shorter side is the height
A_X, A_Y = 255 / (PATTERN_W - 1), 255 / (PATTERN_H - 1)
PATTERN_PER_CLASS = 48
RAMP, FLAT = 1, 0                                # class indices: sorted folder names "flat", "ramp"


def epoch(loader):
    return list(loader)


def keys_of(batches):
    return [k for b in batches for k in b.keys]


@pytest.fixture(scope="module")
def pattern_dataset(tmp_path_factory) -> Path:
    from preprocessing import writer

    src = tmp_path_factory.mktemp("pattern") / "source"
    x = np.arange(PATTERN_W)[None, :].repeat(PATTERN_H, 0)
    y = np.arange(PATTERN_H)[:, None].repeat(PATTERN_W, 1)
    ramp = np.stack([np.round(A_X * x), np.round(A_Y * y), np.full_like(x, 128)], -1).astype(np.uint8)
    flat = np.full((PATTERN_H, PATTERN_W, 3), 128, np.uint8)
    for split, n in (("train", PATTERN_PER_CLASS), ("val", 4)):
        for name, img in (("ramp", ramp), ("flat", flat)):
            d = src / split / name
            d.mkdir(parents=True)
            for i in range(n):  # identical pixels, distinct files (keys)
                Image.fromarray(img).save(d / f"{name}_{split}_{i}.JPEG", quality=95, subsampling=0)
    out = tmp_path_factory.mktemp("pattern-shards")
    writer.preprocess(src, out, shard_size=20, seed=0, progress=False, log=lambda message: None)
    return out


def with_stats(root: Path, tmp: Path, **stats) -> Path:
    """A copy of ``root`` whose dataset.json stats are replaced by ``stats``."""
    copy = tmp / "copy"
    shutil.copytree(root, copy)
    info = json.loads((copy / "dataset.json").read_text())
    info["stats"].update(stats)
    (copy / "dataset.json").write_text(json.dumps(info))
    return copy


def ramp_slopes(img: torch.Tensor) -> tuple[float, float]:
    """Least-squares slopes (grey levels per pixel) of R along x and G along y, inside a 4 px margin."""
    img = img.float()[:, 4:-4, 4:-4]
    r, g = img[0], img[1]
    xs = torch.arange(r.shape[1], dtype=torch.float32)
    ys = torch.arange(g.shape[0], dtype=torch.float32)
    sx = ((r - r.mean(1, keepdim=True)) * (xs - xs.mean())).sum(1) / ((xs - xs.mean()) ** 2).sum()
    sy = ((g - g.mean(0, keepdim=True)) * (ys - ys.mean())[:, None]).sum(0) / ((ys - ys.mean()) ** 2).sum()
    return sx.mean().item(), sy.mean().item()


def ramp_crops(cfg, epochs=2, batch=16):
    loader = TrainLoader(cfg, batch, 0, 1, seed=1)
    out = []
    for _ in range(epochs):
        for b in loader:
            out += [img for img, lbl in zip(b.images, b.labels) if lbl == RAMP]
    return out


# ------------------------------------------------------------------------------- pure functions

def test_dali_sharding_is_contiguous_disjoint_and_covering():
    for n in (1, 7, 48, 1001):
        for w in (1, 2, 3, 8):
            if w > n:
                continue
            ranges = [shard_range(n, w, r) for r in range(w)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1
            for b in (1, 4, 7):
                if n // (w * b):
                    assert steps_per_epoch(n, w, b) <= reader_batches(n, w, b) <= steps_per_epoch(n, w, b) + 1


def test_pca_matrix_shifts_alpha_times_sqrt_eigval_along_eigvectors():
    # The DALI graph draws z ~ N(0, I) and shifts by pca_matrix(stats, std) @ z, i.e. alpha = std * z.
    vec = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0].T
    stats = Stats((0, 0, 0), (400.0, 100.0, 25.0), tuple(map(tuple, vec)))
    shift = augment.pca_matrix(stats, 0.1) @ [1.0, -2.0, 3.0]       # alpha = (0.1, -0.2, 0.3)
    np.testing.assert_allclose(vec @ shift, [0.1 * 20, -0.2 * 10, 0.3 * 5], atol=1e-9)
    assert augment.scale_values(256, 258) == [256.0, 257.0, 258.0]


def test_multicrop_grid_includes_the_corners():
    grid = crop_grid(96, 120, 64, 5)
    assert len(grid) == 25 and grid[0] == (0, 0) and grid[4] == (0, 56) and grid[20] == (32, 0)
    assert grid[24] == (32, 56)


# --------------------------------------------------------------------------- shapes and layouts

@pytest.mark.parametrize("layout,dtype", [("NCHW", "float32"), ("NHWC", "float32"), ("NHWC", "bfloat16"),
                                          ("NCHW", "float16")])
def test_train_batches_shapes_dtypes_layouts(sample_dataset, data_config, layout, dtype):
    # decode="mixed" (the default) falls back to the CPU in CPU-only mode (device_id=None)
    loader = TrainLoader(data_config(sample_dataset, layout=layout, dtype=dtype, decode="mixed"), 8, 0, 1)
    b = next(iter(loader))
    assert b.images.shape == (8, 3, 64, 64)
    assert b.images.dtype == getattr(torch, dtype)
    fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    assert b.images.is_contiguous(memory_format=fmt)
    assert b.labels.shape == (8,) and b.labels.dtype == torch.int64
    assert len(b.keys) == 8 and all(isinstance(k, str) for k in b.keys)
    assert b.images.float().abs().max() < 300     # mean-subtracted 0-255 pixels, not [0, 1]


def test_labels_match_the_manifest_key_by_key(sample_dataset, data_config):
    cfg = data_config(sample_dataset)
    for split, loader in (("train", TrainLoader(cfg, 8, 0, 1)), ("val", EvalLoader(cfg, 5, 0, 1))):
        batches = epoch(loader)
        truth = stored_labels(sample_dataset, split)
        got = {k: int(lbl) for b in batches for k, lbl in zip(b.keys, b.labels)}
        assert got and all(truth[k] == lbl for k, lbl in got.items())
        assert len(set(got.values())) == 4


# ------------------------------------------------------------------------------- augmentation

def test_scale_jitter_draws_s_across_the_range(pattern_dataset, data_config):
    crops = ramp_crops(data_config(pattern_dataset, color_shift_std=0.0))
    s_x, s_y = zip(*[(PATTERN_H * A_X / abs(sx), PATTERN_H * A_Y / abs(sy)) for sx, sy in map(ramp_slopes, crops)])
    s_x, s_y = np.array(s_x), np.array(s_y)
    assert len(s_x) >= 60
    np.testing.assert_allclose(s_x, s_y, atol=3)              # isotropic
    assert s_x.min() > 64 - 3 and s_x.max() < 128 + 3         # within [Smin, Smax]
    assert s_x.min() < 75 and s_x.max() > 117                 # and across all of it
    assert 12 < s_x.std() < 25                                # uniform on [64, 128]: std 18.5


def test_fixed_scale_is_fixed(pattern_dataset, data_config):
    crops = ramp_crops(data_config(pattern_dataset, scale_min=96, scale_max=96, color_shift_std=0.0), epochs=1)
    s = np.array([PATTERN_H * A_X / abs(ramp_slopes(c)[0]) for c in crops])
    np.testing.assert_allclose(s, 96, atol=2)


def test_flips_happen_half_the_time_and_never_when_off(pattern_dataset, data_config):
    cfg = data_config(pattern_dataset, color_shift_std=0.0)
    flips = [ramp_slopes(c)[0] < 0 for c in ramp_crops(cfg, epochs=3)]
    assert len(flips) >= 120 and 0.35 < np.mean(flips) < 0.65
    assert not any(ramp_slopes(c)[0] < 0 for c in
                   ramp_crops(data_config(pattern_dataset, flip=False, color_shift_std=0.0), epochs=1))


def flat_draws(cfg, epochs=1, seed=3) -> list[tuple[str, torch.Tensor]]:
    """(key, (3,) per-channel value) of every flat-image crop drawn, asserting each is a constant."""
    loader, out = TrainLoader(cfg, 16, 0, 1, seed=seed), []
    for _ in range(epochs):
        for b in loader:
            for img, lbl, key in zip(b.images, b.labels, b.keys):
                if lbl == FLAT:
                    v = img.flatten(1)
                    assert (v.max(1).values - v.min(1).values).max() < 1e-3  # a per-image constant
                    out.append((key, v.mean(1)))
    return out


def test_mean_rgb_comes_from_dataset_json(pattern_dataset, data_config, tmp_path):
    root = with_stats(pattern_dataset, tmp_path, mean_rgb=[11.0, 22.0, 33.0])
    plain = dict(flat_draws(data_config(root, color_shift_std=0.0, mean_subtraction=False)))
    centred = dict(flat_draws(data_config(root, color_shift_std=0.0)))
    assert plain.keys() == centred.keys() and len(plain) == PATTERN_PER_CLASS
    for k in plain:
        torch.testing.assert_close(plain[k] - centred[k], torch.tensor([11.0, 22.0, 33.0]))
        assert (plain[k] - 128).abs().max() <= 2                     # the grey survived the JPEG


def test_colour_shift_has_the_pca_magnitude_and_is_off_at_zero(pattern_dataset, data_config, tmp_path):
    vec = np.array([[1.0, 1.0, 0.9], [-1.0, 1.0, 0.0], [-0.45, -0.45, 1.0]])
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)                  # orthonormal rows
    root = with_stats(pattern_dataset, tmp_path, rgb_eigval=[900.0, 100.0, 25.0], rgb_eigvec=vec.tolist())
    base = dict(flat_draws(data_config(root, color_shift_std=0.0)))
    draws = flat_draws(data_config(root, color_shift_std=0.1), epochs=3)
    offsets = np.array([(v - base[k]).numpy() for k, v in draws])      # (n, 3) RGB shifts
    coeff = offsets @ vec.T                                            # along the eigenvectors
    assert len(coeff) == 3 * PATTERN_PER_CLASS
    sigma = np.array([3.0, 1.0, 0.5])                                  # 0.1 * sqrt(eigval)
    np.testing.assert_allclose(coeff.std(0), sigma, rtol=0.25)
    assert (np.abs(coeff.mean(0)) < 4 * sigma / np.sqrt(len(coeff))).all(), coeff.mean(0)  # zero mean, 4 s.e.
    off = flat_draws(data_config(root, color_shift_std=0.0), epochs=2, seed=9)
    assert all(torch.equal(v, base[k]) for k, v in off)               # off means exactly off


# ---------------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("world,batch", [(2, 8), (3, 4), (2, 5)])
def test_training_ranks_see_disjoint_keys_covering_the_epoch(sample_dataset, data_config, world, batch):
    stored = set(stored_labels(sample_dataset, "train"))
    n = len(stored)
    loaders = [TrainLoader(data_config(sample_dataset), batch, r, world, seed=5) for r in range(world)]
    steps = n // (world * batch)
    assert {len(l) for l in loaders} == {steps}
    for _ in range(2):                                                 # epochs 0 and 1
        seen = [keys_of(epoch(l)) for l in loaders]
        assert all(len(s) == steps * batch for s in seen)
        flat = [k for s in seen for k in s]
        assert len(set(flat)) == len(flat) and set(flat) <= stored     # disjoint, each at most once
        if n % (world * batch) == 0 and n % world == 0:
            assert set(flat) == stored                                 # and covering when it divides
        else:
            assert n - len(flat) < world * batch                       # drop-last: < one global batch


@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_is_exactly_once(sample_dataset, data_config, world):
    stored = set(stored_labels(sample_dataset, "val"))
    shards = len(load_split(sample_dataset, "val").shards)
    assert world == 1 or shards % world                                # shard counts don't divide
    loaders = [EvalLoader(data_config(sample_dataset), 3, r, world) for r in range(world)]
    for _ in range(2):                                                 # every pass, not just the first
        seen = [keys_of(epoch(l)) for l in loaders]
        flat = [k for s in seen for k in s]
        assert len(flat) == len(set(flat)) == len(stored) and set(flat) == stored
        assert [len(s) for s in seen] == [l.num_samples for l in loaders]


def test_eval_modes_dense_multicrop_center_agree(sample_dataset, data_config):
    cfg = data_config(sample_dataset)
    q = 96                                                             # (Smin + Smax) / 2
    dense = {k: img for b in EvalLoader(cfg, 4, 1, 2, mode="dense") for k, img in zip(b.keys, b.images)}
    center = {k: img for b in EvalLoader(cfg, 4, 1, 2, mode="center") for k, img in zip(b.keys, b.images)}
    multi = {k: img for b in EvalLoader(cfg, 4, 1, 2, mode="multicrop") for k, img in zip(b.keys, b.images)}
    assert dense.keys() == center.keys() == multi.keys() and len(dense) == 16
    for k, img in dense.items():
        h, w = img.shape[1:]
        assert min(h, w) == q
        grid = crop_grid(h, w, 64, 5)
        assert multi[k].shape == (50, 3, 64, 64)
        for i, (y, x) in enumerate(grid):
            assert torch.equal(multi[k][i], img[:, y:y + 64, x:x + 64])
            assert torch.equal(multi[k][25 + i], img[:, y:y + 64, x:x + 64].flip(-1))
        cy, cx = math.floor((h - 64) / 2 + 0.5), math.floor((w - 64) / 2 + 0.5)
        assert torch.equal(center[k], img[:, cy:cy + 64, cx:cx + 64])


@pytest.mark.parametrize("mode", ["center", "dense", "multicrop"])
def test_eval_nhwc_is_channels_last_with_the_same_values(sample_dataset, data_config, mode):
    nchw = next(iter(EvalLoader(data_config(sample_dataset), 4, 0, 1, mode=mode)))
    nhwc = next(iter(EvalLoader(data_config(sample_dataset, layout="NHWC"), 4, 0, 1, mode=mode)))
    assert nhwc.keys == nchw.keys and torch.equal(nhwc.images, nchw.images)
    flat = nhwc.images.flatten(0, 1) if mode == "multicrop" else nhwc.images
    assert flat.is_contiguous(memory_format=torch.channels_last) and flat.shape[1] == 3


# ------------------------------------------------------------------------------------ resume

def test_restored_state_yields_identical_batches(sample_dataset, data_config):
    cfg = data_config(sample_dataset)
    a = TrainLoader(cfg, 8, 1, 2, seed=7)
    it = iter(a)
    next(it)
    state = a.state()
    assert len(state) < 4096
    expected = list(it) + epoch(a)[:2]                     # the rest of epoch 0, then into epoch 1
    b = TrainLoader(cfg, 8, 1, 2, seed=7, state=state)
    assert (b.epoch, b.step) == (0, 1)
    got = list(b) + epoch(b)[:2]
    assert len(got) == len(expected) == 4
    for x, y in zip(expected, got):
        assert x.keys == y.keys and torch.equal(x.labels, y.labels) and torch.equal(x.images, y.images)
    # a state taken at the end of an epoch resumes at the start of the next one
    end = a.state()
    c = TrainLoader(cfg, 8, 1, 2, seed=7, state=end)
    d_batches, c_batches = epoch(a), epoch(c)
    assert a.epoch == c.epoch and [x.keys for x in d_batches] == [x.keys for x in c_batches]
    with pytest.raises(ValueError, match="batch_size"):
        TrainLoader(cfg, 4, 1, 2, state=state)


# ------------------------------------------------------------------------------------ errors

def test_a_missing_index_is_rebuilt_identically(sample_dataset, data_config, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(sample_dataset, root)
    idx = sorted(root.glob("train-*.idx"))[1]
    original = idx.read_text().split()
    idx.unlink()
    loader = TrainLoader(data_config(root), 8, 0, 1)
    assert idx.read_text().split() == original
    assert len(keys_of(epoch(loader))) == 48


def test_a_missing_shard_is_named(sample_dataset, data_config, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(sample_dataset, root)
    shard = sorted(root.glob("val-*.tar"))[2]
    shard.unlink()
    with pytest.raises(DataError, match=shard.name):
        EvalLoader(data_config(root), 4, 0, 1)


def test_dataset_json_without_stats_is_an_error(sample_dataset, data_config, tmp_path):
    root = tmp_path / "d"
    shutil.copytree(sample_dataset, root)
    info = json.loads((root / "dataset.json").read_text())
    del info["stats"]
    (root / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="stats"):
        TrainLoader(data_config(root), 8, 0, 1)


def test_bad_arguments_are_named(sample_dataset, data_config):
    cfg = data_config(sample_dataset)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TrainLoader(cfg, 32, 0, 2)
    with pytest.raises(ValueError, match="shard_id"):
        TrainLoader(cfg, 8, 2, 2)
    with pytest.raises(ValueError, match="Only center, dense, multicrop"):
        EvalLoader(cfg, 4, 0, 1, mode="tencrop")


def test_evaluation_subtracts_the_training_mean_in_every_mode(pattern_dataset, data_config, tmp_path):
    """The paper's one preprocessing step holds at test time too: each eval mode's pixels are the
    unnormalised ones less dataset.json's mean RGB, as in training."""
    root = with_stats(pattern_dataset, tmp_path, mean_rgb=[11.0, 22.0, 33.0])
    mean = torch.tensor([11.0, 22.0, 33.0])[:, None, None]                # (3, 1, 1)

    def by_key(cfg, mode):
        return {k: img for b in EvalLoader(cfg, 4, 0, 1, mode=mode) for k, img in zip(b.keys, b.images)}

    for mode in ("center", "dense", "multicrop"):
        plain = by_key(data_config(root, mean_subtraction=False), mode)
        centred = by_key(data_config(root), mode)
        assert plain.keys() == centred.keys() and len(plain) == 8, mode
        for k in plain:
            torch.testing.assert_close(plain[k] - centred[k], mean.expand_as(plain[k]))
