"""Evaluation arithmetic on tiny nets, no data files: the scoring math, the paper's dense / multi-crop /
multi-scale protocols, flips, ensembles, mixed image sizes, exactly-once bookkeeping, FC7 features.
The jobs that run them on shards are in test_evaluate.py."""
from __future__ import annotations

import math

import pytest
import torch

import model
from pipeline.batch import Batch
from pipeline import evaluate as E
from pipeline import features as F
from pipeline import scoring as S

CLASSES = 10


def tiny(name="A", crop=32, seed=0, classes=CLASSES):
    torch.manual_seed(seed)
    return model.build(name, num_classes=classes, width=1 / 16, image_size=crop, init="glorot").eval()


def images(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) * 60 for h, w in shapes]


# --------------------------------------------------------------------------------- pure scoring math

def test_test_scales_follow_the_paper():
    assert S.test_scales(256, 256) == [224, 256, 288]
    assert S.test_scales(384, 384) == [352, 384, 416]
    assert S.test_scales(256, 512) == [256, 384, 512]
    with pytest.raises(ValueError, match="smin"):
        S.test_scales(512, 256)


def test_crop_grid_is_exactly_the_5x5_grid_corners_included():
    boxes = S.crop_grid(256, 341, 224)
    assert len(boxes) == 25 and len(set(boxes)) == 25
    tops = sorted({t for t, _ in boxes})
    lefts = sorted({l for _, l in boxes})
    assert tops == [0, 8, 16, 24, 32]            # slack 32: even steps of 8
    assert lefts == [0, 29, 59, 88, 117]         # slack 117: steps of 29.25, mirrored, middle 58.5 up
    assert boxes == [(t, l) for t in tops for l in lefts]  # row-major, every (row, column) pair
    for corner in [(0, 0), (0, 117), (32, 0), (32, 117)]:
        assert corner in boxes
    # Every crop lies inside the image, the corner ones touch its borders.
    assert all(0 <= t <= 256 - 224 and 0 <= l <= 341 - 224 for t, l in boxes)
    # The grid is its own mirror image (what a flipped image needs), but for the middle column of an
    # odd slack (117): no whole-pixel crop is centred, it sits where the centre crop does.
    mirrored = [117 - l for l in reversed(lefts)]
    assert mirrored[:2] == lefts[:2] and mirrored[3:] == lefts[3:]
    assert (tops[2], lefts[2]) == S.center_box(256, 341, 224) == (16, 59)
    assert tops == [32 - t for t in reversed(tops)]
    assert S.crop_grid(224, 224, 224) == [(0, 0)] * 25
    assert S.crop_grid(300, 300, 100, n=3) == [(t, l) for t in (0, 100, 200) for l in (0, 100, 200)]
    with pytest.raises(ValueError, match="does not fit"):
        S.crop_grid(200, 300, 224)


def test_crops_are_the_pixels_at_the_grid_positions():
    h, w, c = 40, 57, 32
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img = torch.stack([yy, xx, yy * 0]).float()[None]            # channel 0 = row, 1 = column
    boxes = S.crop_grid(h, w, c)
    crops = E.crops_of(img, boxes, c)
    assert crops.shape == (25, 3, c, c)
    for crop, (t, l) in zip(crops, boxes):
        assert (crop[0, 0, 0].item(), crop[1, 0, 0].item()) == (t, l)
        assert (crop[0, -1, -1].item(), crop[1, -1, -1].item()) == (t + c - 1, l + c - 1)
    assert crops[-1, 0, -1, -1] == h - 1 and crops[-1, 1, -1, -1] == w - 1  # bottom-right corner


def test_pooling_softmax_and_averages():
    m = torch.randn(2, CLASSES, 3, 4)
    torch.testing.assert_close(S.pool_score_map(m), m.mean(dim=(2, 3)))
    p = S.posteriors(S.pool_score_map(m))
    torch.testing.assert_close(p.sum(1), torch.ones(2))
    torch.testing.assert_close(p, torch.softmax(m.mean(dim=(2, 3)), 1))     # pooled before the soft-max
    a, b = torch.softmax(torch.randn(4, 5), 1), torch.softmax(torch.randn(4, 5), 1)
    torch.testing.assert_close(S.average_posteriors([a, b]), S.average_posteriors([b, a]))
    torch.testing.assert_close(S.average_posteriors([a, a]), a)
    torch.testing.assert_close(S.group_mean(torch.cat([a, b], 1).reshape(8, 5), 2), (a + b) / 2)
    with pytest.raises(ValueError, match="different shapes"):
        S.average_posteriors([a, b[:2]])


class FixedMap(torch.nn.Module):
    """A 'dense net' whose class-score map is ``score_map`` for every view it is given."""

    def __init__(self, score_map):
        super().__init__()
        self.score_map = score_map

    def forward(self, x):
        return self.score_map.expand(x.shape[0], -1, -1, -1)


def test_dense_averages_the_score_map_before_the_softmax():
    """Section 3.2: the class-score map is spatially averaged, *then* soft-maxed. On a map larger than
    1 x 1 the other order (soft-max at each location, then average) gives other posteriors."""
    # By hand, a 3 x 4 map of 2 classes: class 0 scores 24 at one location and 0 at the 11 others
    # (mean 2), class 1 scores 1 everywhere (mean 1). Pooled first: soft-max(2, 1), class 0 ahead.
    # Soft-max first: class 0 gets ~1 at one place and 1/(1+e) at 11, mean 0.33: class 1 ahead.
    m = torch.ones(1, 2, 3, 4)
    m[0, 0] = 0.0
    m[0, 0, 1, 2] = 24.0
    right = torch.softmax(torch.tensor([[2.0, 1.0]]), 1)
    swapped = torch.softmax(m, 1).mean(dim=(2, 3))
    assert right[0, 0] > 0.73 and swapped[0, 0] < 0.34           # the two orders rank the classes apart
    torch.testing.assert_close(S.posteriors(S.pool_score_map(m)), right)
    img = torch.zeros(3, 96, 128)
    for flip in (False, True):
        p = E.Protocol(modes=("dense",), scales=(96,), crop=32, flip=flip)
        got = E.posteriors_at_scale([tiny()], [img], p, dense_nets=[FixedMap(m)])["dense"]
        torch.testing.assert_close(got, right, atol=1e-6, rtol=0)
    # A real net on a 96 x 128 image with 32 px crops: a 3 x 4 map per view (and its flip).
    net = tiny()
    imgs = images([(96, 128)] * 2, seed=3)
    x = torch.stack(imgs)
    with torch.no_grad():
        maps = model.to_dense(net)(torch.cat([x, x.flip(3)]))          # image 0, image 1, flip 0, flip 1
    assert maps.shape == (4, CLASSES, 3, 4)
    pooled_first = torch.softmax(maps.mean(dim=(2, 3)), 1)
    softmax_first = torch.softmax(maps, 1).mean(dim=(2, 3))
    right = (pooled_first[:2] + pooled_first[2:]) / 2                  # each image's mean over its flip
    swapped = (softmax_first[:2] + softmax_first[2:]) / 2
    assert (right - swapped).abs().max() > 0.01                        # measured 0.025: the order shows
    got = E.posteriors_at_scale([net], imgs, E.Protocol(modes=("dense",), scales=(96,), crop=32))["dense"]
    torch.testing.assert_close(got, right, atol=1e-5, rtol=0)


def test_misses_tally_and_per_class_accuracy():
    p = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5], [0.3, 0.3, 0.4]])
    labels = torch.tensor([1, 2, 2, 0])
    top = S.topk(p, 2)
    assert top.tolist() == [[1, 2], [0, 2], [2, 1], [2, 0]]     # ties broken by the lower index
    # Two columns: "top-5" is every prediction there is (fewer classes than 5).
    assert S.misses(top, labels).tolist() == [2, 0] and S.misses(top[:, :1], labels).tolist() == [2, 2]
    t = S.Tally(4).add(top, labels)
    assert (t.n, t.top1_wrong, t.top5_wrong) == (4, 2, 0) and (t.top1_error, t.top5_error) == (0.5, 0.0)
    acc = t.per_class_accuracy()
    assert acc[:3].tolist() == [0.0, 1.0, 0.5] and math.isnan(acc[3])  # class 3: no images
    merged = S.Tally(4).add(top[:2], labels[:2]).merge(S.Tally(4).add(top[2:], labels[2:]))
    assert (merged.n, merged.top1_wrong, merged.top5_wrong) == (4, 2, 0)
    torch.testing.assert_close(merged.per_class_accuracy()[:3], acc[:3])


def test_misses_is_a_tensor_on_the_predictions_device():
    """The training loop's running error: a (2,) tensor it adds up on the device, read every log step."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    top = logits.topk(5, dim=1).indices            # row 0 leaves out class 0, row 1 class 5
    wrong = S.misses(top, torch.tensor([5, 5]))
    assert wrong.shape == (2,) and wrong.device == top.device and wrong.tolist() == [1, 1]
    assert S.misses(top, torch.tensor([0, 1])).tolist() == [2, 1]


# ------------------------------------------------------------------------ protocols on tiny nets

@pytest.mark.parametrize("name,crop", [("A", 224), ("C", 64), ("A-LRN", 32)])
def test_dense_on_the_training_crop_equals_the_plain_forward(name, crop):
    net = tiny(name, crop)
    imgs = images([(crop, crop)] * 3)
    for flip in (False, True):
        p = E.Protocol(modes=("dense", "center"), scales=(crop,), crop=crop, flip=flip)
        out = E.posteriors_at_scale([net], imgs, p)
        with torch.no_grad():
            logits = net(torch.stack(imgs))
            if flip:
                plain = (torch.softmax(logits, 1) + torch.softmax(net(torch.stack(imgs).flip(3)), 1)) / 2
            else:
                plain = torch.softmax(logits, 1)
        assert plain.max() - plain.min() > 1e-3  # the net is not constant: the check can fail
        torch.testing.assert_close(out["dense"], plain, atol=1e-5, rtol=0)
        torch.testing.assert_close(out["center"], plain, atol=1e-5, rtol=0)


def test_multicrop_is_the_mean_of_50_crop_posteriors():
    net = tiny()
    (img,) = images([(48, 72)])
    p = E.Protocol(modes=("multicrop",), scales=(48,), crop=32)
    got = E.posteriors_at_scale([net], [img], p)["multicrop"]
    crops = [img[:, t:t + 32, l:l + 32] for t, l in S.crop_grid(48, 72, 32)]
    views = torch.stack(crops + [c.flip(2) for c in crops])
    assert views.shape[0] == 50
    with torch.no_grad():
        want = torch.softmax(net(views), 1).mean(0, keepdim=True)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["dense", "multicrop", "center", "both"])
def test_flip_averaging_is_symmetric(mode):
    net = tiny()
    # 72 - 32 = 40: an even slack, so the 5x5 grid and the centre crop are their own mirror images.
    imgs = images([(48, 72), (40, 40), (48, 72)], seed=1)
    p = E.Protocol(modes=(mode,), scales=(40,), crop=32)
    a = E.posteriors_at_scale([net], imgs, p)[mode]
    b = E.posteriors_at_scale([net], [im.flip(2) for im in imgs], p)[mode]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    nf = E.Protocol(modes=(mode,), scales=(40,), crop=32, flip=False)
    c = E.posteriors_at_scale([net], imgs, nf)[mode]
    d = E.posteriors_at_scale([net], [im.flip(2) for im in imgs], nf)[mode]
    assert (c - d).abs().max() > 1e-4  # without the flip average the two differ: the test has teeth


def test_an_ensemble_of_a_model_with_itself_equals_the_model():
    net = tiny()
    imgs = images([(40, 56), (56, 40), (40, 56)])
    p = E.Protocol(modes=("both", "center"), scales=(40,), crop=32)
    one = E.posteriors_at_scale([net], imgs, p)
    two = E.posteriors_at_scale([net, net], imgs, p)
    for m in ("center", "dense", "multicrop", "both"):
        torch.testing.assert_close(one[m], two[m], atol=1e-6, rtol=0)
    other = tiny(seed=1)
    mixed = E.posteriors_at_scale([net, other], imgs, p)["dense"]
    torch.testing.assert_close(mixed, (one["dense"] + E.posteriors_at_scale([other], imgs, p)["dense"]) / 2)


def test_images_of_different_sizes_give_what_each_gives_alone():
    net = tiny()
    imgs = images([(40, 56), (56, 40), (40, 64), (40, 56)])
    p = E.Protocol(modes=("both",), scales=(40,), crop=32)
    batch = E.posteriors_at_scale([net], imgs, p)
    assert E.shape_groups(imgs) == {(40, 56): [0, 3], (56, 40): [1], (40, 64): [2]}
    for i, im in enumerate(imgs):
        alone = E.posteriors_at_scale([net], [im], p)
        for m in ("dense", "multicrop", "both"):
            torch.testing.assert_close(batch[m][i], alone[m][0], atol=1e-6, rtol=0)


def test_protocol_rejects_unknown_modes_and_small_scales():
    with pytest.raises(ValueError, match="Only center, dense, multicrop, both"):
        E.Protocol(modes=("sparse",))
    with pytest.raises(ValueError, match=">= the crop"):
        E.Protocol(scales=(200,), crop=224)
    p = E.Protocol(modes=("both",), scales=(256, 384), crop=224)
    assert p.computed == ("dense", "multicrop") and p.reported == ("dense", "multicrop", "both")
    assert E.rows(p)[:3] == [("dense", "256"), ("dense", "384"), ("dense", "256,384")]


def fake_share(keys, shapes_at, labels):
    """A batches_at(Q) for evaluate_share: images of the given shape per Q, in 2 batches."""
    def batches_at(q):
        imgs = images([shapes_at(q)] * len(keys), seed=q)
        half = len(keys) // 2
        for sl in (slice(0, half), slice(half, None)):
            yield Batch(imgs[sl], torch.tensor(labels[sl]), keys[sl])
    return batches_at


def test_evaluate_share_multiscale_rows_are_the_mean_over_scales():
    net = tiny()
    keys = [f"k{i}" for i in range(5)]
    labels = [i % CLASSES for i in range(5)]
    p = E.Protocol(modes=("dense",), scales=(32, 40), crop=32)
    seen = []
    res = E.evaluate_share([net], fake_share(keys, lambda q: (q, q + 8), labels), p, keep_posteriors=True,
                           progress=seen.append)
    assert sum(seen) == 5 * 2
    assert res.keys == sorted(keys) and res.labels.tolist() == labels
    assert set(res.top) == {("dense", "32"), ("dense", "40"), ("dense", "32,40")}
    per_q = [E.posteriors_at_scale([net], images([(q, q + 8)] * 5, seed=q), p)["dense"] for q in (32, 40)]
    mean = (per_q[0] + per_q[1]) / 2
    torch.testing.assert_close(res.posteriors["dense"].float(), mean, atol=1e-3, rtol=0)
    assert res.top[("dense", "32,40")].tolist() == S.topk(mean, 5).tolist()
    assert res.top[("dense", "32")].tolist() == S.topk(per_q[0], 5).tolist()


def test_ensemble_members_are_each_evaluated_at_their_own_scales():
    """Table 6: nets trained at different S, each at its own Q set; the ensemble averages each net's
    multi-scale posterior with equal weights."""
    a, b = tiny(seed=0), tiny(seed=1)
    keys = [f"k{i}" for i in range(5)]
    labels = [i % CLASSES for i in range(5)]
    share = fake_share(keys, lambda q: (q, q + 8), labels)
    p = E.Protocol(modes=("dense",), scales=(32, 40, 48), crop=32, member_scales=((32, 40), (40, 48)))
    assert E.rows(p) == [("dense", "net1@32,40"), ("dense", "net2@40,48"), ("dense", "ensemble")]
    seen = []
    res = E.evaluate_share([a, b], share, p, keep_posteriors=True, progress=seen.append)
    assert sum(seen) == 5 * 3                                   # one pass per Q of the union
    alone = [E.evaluate_share([net], share, E.Protocol(modes=("dense",), scales=qs, crop=32),
                              keep_posteriors=True).posteriors["dense"].float()
             for net, qs in ((a, (32, 40)), (b, (40, 48)))]
    assert set(res.top) == {("dense", "net1@32,40"), ("dense", "net2@40,48"), ("dense", "ensemble")}
    assert res.top[("dense", "net1@32,40")].tolist() == S.topk(alone[0], 5).tolist()
    assert res.top[("dense", "net2@40,48")].tolist() == S.topk(alone[1], 5).tolist()
    torch.testing.assert_close(res.posteriors["dense"].float(), (alone[0] + alone[1]) / 2, atol=1e-3, rtol=0)
    # Had net 2 been run at net 1's scales (the old rule), the ensemble would differ.
    wrong = E.evaluate_share([b], share, E.Protocol(modes=("dense",), scales=(32, 40), crop=32),
                             keep_posteriors=True).posteriors["dense"].float()
    assert ((alone[0] + wrong) / 2 - res.posteriors["dense"].float()).abs().max() > 1e-3
    with pytest.raises(ValueError, match="within the scales"):
        E.Protocol(scales=(32, 40), crop=32, member_scales=((32,), (48,)))
    with pytest.raises(ValueError, match="2 member Q sets"):
        E.evaluate_share([a], share, p)


def test_evaluate_share_rejects_a_key_seen_twice():
    net = tiny()
    p = E.Protocol(modes=("center",), scales=(32,), crop=32)
    with pytest.raises(E.DuplicateKeyError, match="came twice"):
        E.evaluate_share([net], fake_share(["a", "b", "a", "c"], lambda q: (q, q), [0, 1, 0, 2]), p)


def test_check_exactly_once_names_duplicates_and_missing_keys():
    def share(keys):
        return E.ShareResult(keys, torch.zeros(len(keys), dtype=torch.long), {})
    E.check_exactly_once([share(["a", "b"]), share(["c"])], {"a", "b", "c"})
    with pytest.raises(E.DuplicateKeyError, match=r"1 duplicated \['b'\], 1 missing \['c'\]"):
        E.check_exactly_once([share(["a", "b"]), share(["b"])], {"a", "b", "c"})
    with pytest.raises(E.DuplicateKeyError, match=r"1 unexpected \['z'\]"):
        E.check_exactly_once([share(["a", "b", "c", "z"])], {"a", "b", "c"})


def test_penultimate_features_are_the_dense_fc7_activations():
    net = tiny(crop=32)
    imgs = images([(32, 32), (32, 32)])
    f = F.penultimate_features(net, imgs, flip=False)
    assert f.shape == (2, net.classifier[3].out_features)
    with torch.no_grad():
        x = net.avgpool(net.features(torch.stack(imgs))).flatten(1)
        want = net.classifier[4](net.classifier[3](net.classifier[1](net.classifier[0](x))))
    torch.testing.assert_close(f, want, atol=1e-5, rtol=0)
    n = F.l2_normalise(F.penultimate_features(net, images([(40, 56)]), flip=True))
    torch.testing.assert_close(n.norm(dim=1), torch.ones(1))


def test_descriptor_averages_or_stacks_scales_and_stacks_nets():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(4, 3, 6, generator=g)                       # 4 images, 3 scales, 6-D features
    e = torch.rand(4, 2, 5, generator=g)                       # a second net: 2 scales, 5-D
    mean = F.descriptor([d], "mean")
    torch.testing.assert_close(mean, d.mean(1) / d.mean(1).norm(dim=1, keepdim=True))
    stack = F.descriptor([d], "stack")
    assert stack.shape == (4, 18)
    torch.testing.assert_close(stack[:, 6:12] * d.flatten(1).norm(dim=1, keepdim=True), d[:, 1])  # scale 2
    both = F.descriptor([d, e], "stack")
    assert both.shape == (4, 18 + 10)
    torch.testing.assert_close(both.norm(dim=1), torch.ones(4))
    # Each net weighs the same: both halves have norm 1/sqrt(2) whatever the nets' raw magnitudes.
    big = F.descriptor([d, 100 * e], "mean")
    torch.testing.assert_close(big[:, :6].norm(dim=1), torch.full((4,), 0.5 ** 0.5))
    with pytest.raises(ValueError, match="Only mean, stack"):
        F.descriptor([d], "max")


def test_both_is_the_mean_of_the_dense_and_multicrop_posteriors():
    """Table 5's "dense + multi-crop": the two protocols' posteriors averaged, neither left out."""
    net = tiny()
    imgs = images([(40, 56), (48, 48)], seed=2)
    got = E.posteriors_at_scale([net], imgs, E.Protocol(modes=("both",), scales=(40,), crop=32))["both"]
    alone = [E.posteriors_at_scale([net], imgs, E.Protocol(modes=(m,), scales=(40,), crop=32))[m]
             for m in ("dense", "multicrop")]
    torch.testing.assert_close(got, (alone[0] + alone[1]) / 2, atol=1e-6, rtol=0)
    assert (alone[0] - alone[1]).abs().max() > 1e-4  # the two differ, so leaving one out would show
