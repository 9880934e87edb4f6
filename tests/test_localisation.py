"""Localisation groundwork (issue 16): box arithmetic, the ILSVRC metric, greedy merging, the SCR/PCR
heads and their loss, and the annotation parsers, each on cases computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

import model
from model.heads import box_loss, box_outputs, init_from_classification, to_localisation
from pipeline.boxes import (box_iou, cxcywh_to_xyxy, greedy_merge, is_correct, localisation_error,
                            top_guesses, xyxy_to_cxcywh)
from preprocessing.annotations import (Annotations, check_boxes, read_kaggle_csv, read_voc_dir,
                                       read_voc_xml)
from storage.dataformat import DataError

T = torch.tensor


# ---------------------------------------------------------------- boxes and the metric

def test_conversions_by_hand_and_round_trip():
    assert xyxy_to_cxcywh(T([10., 20., 30., 60.])).tolist() == [20., 40., 20., 40.]
    assert cxcywh_to_xyxy(T([[20., 40., 20., 40.]])).tolist() == [[10., 20., 30., 60.]]
    b = T([[0., 1., 5., 9.], [2.5, 3., 4., 7.5]])
    assert torch.equal(cxcywh_to_xyxy(xyxy_to_cxcywh(b)), b)


def test_iou_by_hand():
    a = T([[0., 0., 2., 2.]])
    b = T([[1., 1., 3., 3.],      # overlap 1, union 4 + 4 - 1 = 7
           [0., 0., 2., 2.],      # identical
           [2., 0., 4., 2.],      # touching edge: no area in common
           [0., 0., 4., 2.]])     # contains a: 4 / 8
    iou = box_iou(a, b)
    assert iou.shape == (1, 4)
    assert iou[0].tolist() == pytest.approx([1 / 7, 1.0, 0.0, 0.5])
    assert box_iou(T([[1., 1., 1., 1.]]), T([[1., 1., 1., 1.]])).item() == 0.0   # degenerate: 0, not NaN


def test_correct_needs_the_right_class_and_iou_strictly_above_half():
    gt_labels, gt_boxes = T([7, 4]), T([[0., 0., 10., 10.], [20., 20., 30., 30.]])
    assert is_correct(4, T([21., 20., 30., 30.]), gt_labels, gt_boxes)            # IoU 0.9
    assert not is_correct(7, T([20., 20., 30., 30.]), gt_labels, gt_boxes)        # box of the other class
    assert not is_correct(7, T([0., 0., 20., 10.]), gt_labels, gt_boxes)          # IoU exactly 0.5
    assert is_correct(7, T([0., 0., 19., 10.]), gt_labels, gt_boxes)              # 100 / 190 > 0.5
    assert not is_correct(3, T([0., 0., 10., 10.]), gt_labels, gt_boxes)          # class not in the image
    assert not is_correct(7, T([0., 0., 10., 10.]), T([], dtype=torch.long), torch.zeros(0, 4))


def test_top1_and_top5_localisation_error_by_hand():
    far = [999, [0., 0., 1., 1.]]

    def guesses(*gs):
        gs = list(gs) + [far] * (5 - len(gs))
        return [g[0] for g in gs], [g[1] for g in gs]

    images = [
        guesses([1, [0., 0., 10., 10.]], [3, [0., 0., 10., 10.]]),   # right at guess 2: top-5 only
        guesses([2, [5., 0., 15., 10.]]),                             # right class, IoU 1/3: wrong
        guesses([4, [21., 20., 30., 30.]]),                           # right at guess 1
    ]
    labels = T([g[0] for g in images])
    boxes = T([g[1] for g in images])
    gt = [(T([3]), T([[0., 0., 10., 10.]])), (T([2]), T([[0., 0., 10., 10.]])),
          (T([7, 4]), T([[0., 0., 10., 10.], [20., 20., 30., 30.]]))]
    assert localisation_error(labels, boxes, gt, k=1) == pytest.approx(2 / 3)
    assert localisation_error(labels, boxes, gt, k=5) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="disagree"):
        localisation_error(labels, boxes, gt[:2], k=5)


# ---------------------------------------------------------------- greedy merging

def merge_case():
    boxes = T([[0., 0., 10., 10.],     # A, class 0
               [1., 0., 11., 10.],     # B, class 0: IoU(A, B) = 90/110
               [2., 0., 12., 10.],     # C, class 0: IoU(B, C) = 90/110, IoU(A, C) = 80/120
               [50., 50., 60., 60.],   # D, class 0, far from the rest
               [0., 0., 10., 10.]])    # E, class 1: A's box, another class, so never merged with A
    scores = T([0.5, 0.25, 0.125, 0.9, 0.3])
    labels = T([0, 0, 0, 0, 1])
    return boxes, scores, labels


def test_greedy_merging_by_hand():
    # A+B first (IoU 0.818), then AB's mean (0.5, 0, 10.5, 10) with C: overlap 85, union 115, 0.739 > 0.5.
    # The result is the mean of A, B, C, (1, 0, 11, 10) (pairwise averaging would give x1 = 1.25),
    # scored 0.5 + 0.25 + 0.125; D stays alone and ranks first on its own 0.9.
    b, s, lab = greedy_merge(*merge_case())
    assert lab.tolist() == [0, 0, 1]
    assert s.tolist() == pytest.approx([0.9, 0.875, 0.3])
    assert b.tolist() == [[50., 50., 60., 60.], [1., 0., 11., 10.], [0., 0., 10., 10.]]


def test_greedy_merging_threshold_is_strict_and_raising_it_keeps_boxes_apart():
    half = T([[0., 0., 10., 10.], [0., 0., 10., 20.]])      # IoU exactly 0.5
    b, s, _ = greedy_merge(half, T([1., 2.]), T([0, 0]))
    assert len(b) == 2 and s.tolist() == [2., 1.]
    b, _, _ = greedy_merge(*merge_case(), threshold=0.8)     # only A+B (0.818) and then nothing else
    assert len(b) == 4
    assert [0.5, 0., 10.5, 10.] in b.tolist()
    empty = greedy_merge(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert [len(x) for x in empty] == [0, 0, 0]


def test_top_guesses_keep_the_best_box_of_each_class():
    merged = greedy_merge(*merge_case())
    labels, boxes = top_guesses(*merged, k=5)
    assert labels.tolist() == [0, 1]                          # two classes, so two guesses
    assert boxes.tolist() == [[50., 50., 60., 60.], [0., 0., 10., 10.]]
    labels, _ = top_guesses(*merged, k=1)
    assert labels.tolist() == [0]


# ---------------------------------------------------------------- heads and loss

def tiny(num_classes: int = 10):
    torch.manual_seed(0)
    return model.build("A", num_classes=num_classes, width=1 / 16, image_size=32)


@pytest.mark.parametrize("head, width", [("scr", 4), ("pcr", 40)])
def test_heads_output_shapes(head, width):
    net = to_localisation(tiny(), head).eval()
    assert box_outputs(head, 10) == width
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, width)
    assert net.classifier[6].bias.abs().sum() == 0                        # fresh layer: zero bias
    assert 0.005 < net.classifier[6].weight.std().item() < 0.02           # N(0, 0.01)
    with pytest.raises(ValueError, match="Only scr, pcr"):
        box_outputs("box", 10)


@pytest.mark.parametrize("head", ["scr", "pcr"])
def test_init_from_a_classification_net_keeps_every_weight_but_the_head(head):
    cls_state = tiny().state_dict()
    torch.manual_seed(1)                                                  # other weights than cls's
    loc = to_localisation(model.build("A", num_classes=10, width=1 / 16, image_size=32), head)
    fresh_head = loc.classifier[6].weight.clone()
    copied = init_from_classification(loc, cls_state)
    assert set(copied) == set(cls_state) - set(model.HEAD_KEYS)
    for k, v in loc.state_dict().items():
        if k not in model.HEAD_KEYS:
            assert torch.equal(v, cls_state[k]), k
    assert torch.equal(loc.classifier[6].weight, fresh_head)              # the head stays random
    other = model.build("B", num_classes=10, width=1 / 16, image_size=32).state_dict()
    with pytest.raises(ValueError, match="do not fit"):
        init_from_classification(to_localisation(tiny(), head), other)


@pytest.mark.parametrize("head", ["scr", "pcr"])
def test_a_box_head_started_at_a_box_predicts_it_for_every_class_on_a_blank_input(head):
    net = model.build("A", num_classes=3, width=1 / 16, image_size=32, head=head).eval()
    box = torch.tensor([0.5, 0.4, 0.3, 0.2])
    model.start_at_box(net, box)
    with torch.no_grad():
        net.classifier[6].weight.zero_()                       # the bias alone speaks
        out = net(torch.rand(2, 3, 32, 32)).reshape(2, -1, 4)
    assert out.shape[1] == (1 if head == "scr" else 3) and torch.equal(out, box.expand_as(out))
    with pytest.raises(ValueError, match="4 values"):
        model.start_at_box(net, torch.zeros(3))


def test_box_loss_by_hand():
    pred, target = T([[1., 2., 3., 4.], [0., 0., 0., 0.]]), T([[0., 2., 3., 6.], [1., 1., 1., 1.]])
    assert box_loss(pred, target).item() == pytest.approx((1 + 0 + 0 + 4 + 4) / 8)
    # PCR with 3 classes: sample 0 is class 2 (outputs 8..11), sample 1 class 0 (outputs 0..3); the
    # other classes' outputs are 100 and must not count.
    pcr = torch.full((2, 12), 100.)
    pcr[0, 8:12], pcr[1, 0:4] = pred[0], pred[1]
    assert box_loss(pcr, target, T([2, 0])).item() == pytest.approx(9 / 8)
    with pytest.raises(ValueError, match="labels"):
        box_loss(pcr, target)


# ---------------------------------------------------------------- annotations

def test_kaggle_csv(tmp_path):
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\n"
                   "v1,n01 10 20 30 40 n01 50 60 70 80 \n"
                   "v2,n02 0 0 600 400\n"
                   "v3,\n"
                   "v4,n03 1 2 3\n"
                   "v5,n03 1 2 3 4 n03 a b c d\n\n")
    ann = read_kaggle_csv(csv)
    assert ann.boxes == {"v1": [("n01", 10., 20., 30., 40.), ("n01", 50., 60., 70., 80.)],
                         "v2": [("n02", 0., 0., 600., 400.)], "v3": [], "v4": [],
                         "v5": [("n03", 1., 2., 3., 4.)]}
    assert len(ann.problems) == 2
    assert ann.problems[0].startswith(f"{csv}:5: v4:") and "groups of 5" in ann.problems[0]
    assert "box 2" in ann.problems[1] and ":6: v5:" in ann.problems[1]
    (tmp_path / "bad.csv").write_text("id,label\nv1,n01\n")
    with pytest.raises(DataError, match="ImageId,PredictionString"):
        read_kaggle_csv(tmp_path / "bad.csv")


def voc(objects: str, size: str = "<size><width>500</width><height>375</height><depth>3</depth></size>"):
    return f"<annotation><folder>val</folder><filename>x</filename>{size}{objects}</annotation>"


def obj(name, *coords):
    tags = ("xmin", "ymin", "xmax", "ymax")
    return f"<object><name>{name}</name><bndbox>" + "".join(
        f"<{t}>{c}</{t}>" for t, c in zip(tags, coords)) + "</bndbox></object>"


def test_voc_xml(tmp_path):
    d = tmp_path / "Annotations" / "CLS-LOC" / "val"
    d.mkdir(parents=True)
    (d / "v1.xml").write_text(voc(obj("n01", 10, 20, 30, 40) + obj("n02", 100, 0, 520, 375)
                                  + obj("n03", 1, "two", 3, 4)))
    (d / "v2.xml").write_text(voc(""))                                    # an image without boxes
    (d / "v3.xml").write_text("<annotation><object>")                     # truncated file
    ann = read_voc_dir(tmp_path / "Annotations")
    assert ann.boxes == {"v1": [("n01", 10., 20., 30., 40.), ("n02", 100., 0., 520., 375.)], "v2": []}
    assert ann.sizes == {"v1": (500, 375), "v2": (500, 375)}
    assert len(ann.problems) == 2
    assert "v1.xml: object 3" in ann.problems[0] and "v3.xml: not readable XML" in ann.problems[1]
    one = Annotations()
    read_voc_xml(d / "v1.xml", one)
    read_voc_xml(d / "v1.xml", one)     # a second file for the same image adds to its boxes
    assert len(one.boxes["v1"]) == 4


def test_check_boxes_clips_counts_and_rejects_with_reasons():
    boxes = [("a", 10., 10., 20., 20.),       # fine
             ("b", -5., 0., 20., 600.),       # clipped to (0, 0, 20, 375)
             ("c", 100., 0., 520., 375.),     # xmax = 520 > 500: clipped
             ("d", 30., 10., 20., 40.),       # reversed in x
             ("e", 10., 40., 20., 40.),       # zero height
             ("f", 600., 10., 700., 20.),     # wholly right of the image
             ("g", math.nan, 0., 1., 1.)]
    c = check_boxes(boxes, 500, 375)
    assert c.kept == [("a", 10., 10., 20., 20.), ("b", 0., 0., 20., 375.), ("c", 100., 0., 500., 375.)]
    assert c.clipped == 2
    assert [(b[0], r) for b, r in c.rejected] == [("d", "x1 >= x2"), ("e", "y1 >= y2"),
                                                  ("f", "outside the image"), ("g", "not finite")]
    assert check_boxes([], 10, 10) == type(c)([], 0, [])


# ---------------------------------------------------------------- testing: boxes from nets (pipeline/localise.py)

def test_a_dense_box_map_to_image_pixels_by_hand():
    from pipeline.localise import map_to_boxes, mirror

    scr = torch.zeros(1, 4, 2, 3)                 # SCR, a 2 x 3 map: windows of 64 px every 32 px
    scr[0, :, 1, 2] = T([0.5, 0.5, 1.0, 1.0])     # the whole window at row 1, column 2: it starts at (64, 32)
    got = map_to_boxes(scr, crop=64)
    assert got.shape == (1, 6, 1, 4)
    assert got[0, 5, 0].tolist() == [64., 32., 128., 96.]
    assert got[0, 0, 0].tolist() == [0., 0., 0., 0.]                  # a zero box at the origin
    pcr = torch.zeros(1, 4 * 3, 1, 2)             # PCR, 3 classes, a 1 x 2 map
    pcr[0, 4:8, 0, 1] = T([0.25, 0.5, 0.5, 0.25])  # class 1 at column 1: window at (32, 0)
    got = map_to_boxes(pcr, crop=64)
    assert got.shape == (1, 2, 3, 4)
    assert got[0, 1, 1].tolist() == [32., 24., 64., 40.]             # centre (48, 32), 32 x 16
    assert mirror(T([[32., 24., 64., 40.]]), 100).tolist() == [[36., 24., 68., 40.]]


def glorot_pcr(pointwise=False):
    """Net A (width 1/16, 64 px crops, 3 classes) with a PCR head, every layer Glorot-initialised, so its
    outputs are of order 1 (the paper's N(0, 0.01) gives ~1e-9, and any two outputs agree then).
    ``pointwise``: every 3 x 3 kernel keeps only its centre tap (times 3, keeping the variance), so a
    feature depends on the pixels under it alone and the convs' zero padding contributes nothing."""
    torch.manual_seed(0)
    net = model.build("A", num_classes=3, width=1 / 16, image_size=64, dropout=0.0, init="glorot", head="pcr")
    torch.nn.init.xavier_uniform_(net.classifier[6].weight)          # to_localisation drew FC8 from N(0, 0.01)
    if pointwise:
        with torch.no_grad():
            for conv in net.features:
                if isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3):
                    centre = conv.weight[:, :, 1, 1] * 3
                    conv.weight.zero_()
                    conv.weight[:, :, 1, 1] = centre
    return net.eval()


def test_the_window_of_a_dense_output_is_the_crop_the_plain_net_would_see():
    """Location (i, j) of the dense map on a 96 x 160 image is the plain net on the 64 px window starting
    at (32 j, 32 i), the origins map_to_boxes uses, once the convs' padding is out of the picture: with
    centre-tap-only kernels each output sees exactly its window, so the two are equal to float rounding,
    and the windows a few pixels off are far from it."""
    from pipeline.localise import window_origins

    net = glorot_pcr(pointwise=True)
    x = torch.randn(1, 3, 96, 160, generator=torch.Generator().manual_seed(1)) * 60
    with torch.no_grad():
        dense = model.to_dense(net)(x)                                # (1, 12, 2, 4)
        assert dense.shape == (1, 12, 2, 4)
        assert (dense.abs().amax(dim=1) > 0.1).all()                  # every location: outputs far from 0
        origins = window_origins(*dense.shape[-2:])
        assert origins.tolist() == [[0., 0.], [32., 0.], [64., 0.], [96., 0.],
                                    [0., 32.], [32., 32.], [64., 32.], [96., 32.]]
        for k, (ox, oy) in enumerate(origins.long().tolist()):
            got = dense[0, :, k // 4, k % 4]
            torch.testing.assert_close(got, net(x[:, :, oy:oy + 64, ox:ox + 64])[0], rtol=1e-5, atol=1e-5)
            for dy in (-16, -8, 0, 8, 16):                            # a wrong origin would be far off:
                for dx in (-16, -8, 0, 8, 16):                        # measured >= 11 % of the outputs' size
                    if (dx or dy) and 0 <= oy + dy <= 32 and 0 <= ox + dx <= 96:
                        other = net(x[:, :, oy + dy:oy + dy + 64, ox + dx:ox + dx + 64])[0]
                        assert (got - other).abs().max() > 0.05 * got.abs().max()


def test_a_dense_output_also_sees_59_px_around_its_window_which_the_plain_crop_pads_with_zeros():
    """With real 3 x 3 kernels net A's features see 150 px (32 + 2 x 59): location j of the dense map
    depends on columns 32 j - 59 to 32 j + 122 (its window and 59 px either side) and no others; the
    plain net on the window
    has zeros (the convs' padding) there, so the two differ, by about 30 % of the outputs' size here."""
    net = glorot_pcr()
    dense_net = model.to_dense(net)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(1, 3, 64, 288, generator=g) * 60 for _ in range(2))
    with torch.no_grad():
        dense = dense_net(x)                                          # (1, 12, 1, 8): windows at 0, 32, ..., 224
        assert dense.shape == (1, 12, 1, 8)
        for j in (0, 3):
            want = dense[0, :, 0, j]
            assert want.abs().max() > 1.0
            last = 32 * j + 64 + 58                                   # the last column the output sees
            first = 32 * j - 59                                       # the first (net A; j = 0: the border)

            def after(col):                                           # columns col.. replaced by y
                return dense_net(torch.cat([x[..., :col], y[..., col:]], 3))[0, :, 0, j]

            torch.testing.assert_close(after(last + 1), want, rtol=0, atol=1e-5)
            assert (after(last) - want).abs().max() > 1e-3            # measured 4e-3 (j = 0), 3.6e-3 (j = 3)
            if first > 0:
                def before(col):                                      # columns ..col replaced by y
                    return dense_net(torch.cat([y[..., :col + 1], x[..., col + 1:]], 3))[0, :, 0, j]

                torch.testing.assert_close(before(first - 1), want, rtol=0, atol=1e-5)
                assert (before(first) - want).abs().max() > 1e-3      # measured 6e-3
            plain = net(x[:, :, :, 32 * j:32 * j + 64])[0]
            assert (plain - want).abs().max() > 0.2 * want.abs().max()  # the context changes the output
        # On an input the size of the crop there is no context: the 1 x 1 map is the plain net's output.
        torch.testing.assert_close(dense_net(x[..., :64])[0, :, 0, 0], net(x[..., :64])[0], rtol=1e-5, atol=1e-5)


class Fixed(torch.nn.Module):
    """A 'net' whose output for sample i is row i of ``out``, whatever the input."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        assert x.shape[-2:] == (64, 64)                               # protocol (a) feeds the central crop
        return self.out[:x.shape[0]]


def test_protocol_a_uses_the_central_crop_and_the_ground_truth_class_box():
    from pipeline.localise import MEAN_BOX, WHOLE, protocol_a

    x = torch.zeros(2, 3, 100, 120)               # central 64 crop at top 18, left 28
    labels = T([0, 1])
    gt = [T([[28., 18., 92., 82.]]),              # image 0: exactly the crop
          T([[28., 18., 60., 50.]])]              # image 1: the crop's top-left quarter
    scr = Fixed(T([[0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0]]))   # the whole crop for both
    pcr = Fixed(T([[0.5, 0.5, 1.0, 1.0, 0.0, 0.0, 0.1, 0.1],      # class 0's box right, class 1's wrong
                   [0.5, 0.5, 1.0, 1.0, 0.25, 0.25, 0.5, 0.5]]))   # class 1 (the truth): the quarter
    mean_box = T([28 / 120, 18 / 100, 92 / 120, 82 / 100])         # the crop, as fractions of the image
    got = protocol_a([scr, pcr], x, labels, gt, 64, mean_box)
    assert {k: v.tolist() for k, v in got.items()} == {
        "net1": [True, False],        # the whole crop has IoU 1/4 with the quarter
        "net2": [True, True],         # image 1 takes class 1's box, not class 0's
        WHOLE: [True, False], MEAN_BOX: [True, False]}
    shifted = protocol_a([pcr], x, labels, [g + 5 for g in gt], 64, mean_box)   # 5 px off: still > 0.5
    assert shifted["net1"].tolist() == [True, True]
    off = protocol_a([pcr], x, labels, [g + 20 for g in gt], 64, mean_box)      # 20 px: IoU < 0.5
    assert off["net1"].tolist() == [False, False]


def test_protocol_b_ranks_merged_boxes_by_class_scores_and_an_ensemble_merges_the_union():
    """Class 0's true box is proposed once by each of two nets (score 0.3 each); class 1's wrong box
    once, by net 1 (0.5). Alone, each net's best guess is class 1; the union merges class 0's two
    boxes into one of score 0.6, first."""
    from pipeline.localise import ENSEMBLE, MEAN_BOX, WHOLE, LocProtocol, _b_hits, _Image

    truth = T([[0.1, 0.1, 0.5, 0.5]])
    near, wrong = T([[0.12, 0.1, 0.5, 0.52]]), T([[0.6, 0.6, 0.9, 0.9]])
    im = _Image(boxes=[[truth, wrong]], scores=[[T([0.3]), T([0.5])]], labels=[[T([0]), T([1])]],
                posterior=T([0.7, 0.2, 0.1]), gt=truth)
    im.boxes.append([near])
    im.scores.append([T([0.3])])
    im.labels.append([T([0])])
    got = _b_hits(im, 0, T([0.0, 0.0, 0.5, 0.5]), LocProtocol(scales=(64,), crop=64))
    assert got["net1"] == (False, True)          # class 1 first, class 0's box second
    assert got["net2"] == (True, True)           # net 2 only has class 0
    assert got[ENSEMBLE] == (True, True)
    assert got[WHOLE] == (False, False)          # IoU of the whole image with the truth: 0.16
    assert got[MEAN_BOX] == (True, True)         # (0, 0, .5, .5): IoU 0.64, with the top class 0
    im.boxes[1][0], im.scores[1][0] = T([[0.6, 0.1, 0.9, 0.5]]), T([0.2])   # far away: no merge, class 1 wins
    assert _b_hits(im, 0, T([0.0, 0.0, 0.5, 0.5]), LocProtocol(scales=(64,), crop=64))[ENSEMBLE] == (False, True)


def test_dense_candidates_by_hand_with_the_flip_mirrored_back():
    """A 64 x 96 image, 64 px windows at x = 0 and 32. Location 0's box: its whole window; location 1's:
    the left half of its window. The classifier favours class 0 at location 0, class 1 at location 1."""
    from pipeline.localise import LocProtocol, class_candidates, dense_candidates

    box_map = T([[0.5, 0.25], [0.5, 0.5], [1.0, 0.5], [1.0, 1.0]]).reshape(1, 4, 1, 2)
    score_map = T([[2.0, 0.0], [0.0, 2.0]]).reshape(1, 2, 1, 2)
    post, per_view = dense_candidates([lambda x: box_map], [lambda x: score_map], torch.zeros(1, 3, 64, 96),
                                      LocProtocol(scales=(64,), crop=64, flip=True))
    assert post[0].tolist() == pytest.approx([0.5, 0.5])          # soft-max of the mean logits (1, 1)
    (boxes, loc_post), = per_view[0]
    assert boxes.shape == (1, 2, 1, 4)
    torch.testing.assert_close(boxes[0, :, 0], T([[0, 0, 2 / 3, 1], [1 / 3, 0, 2 / 3, 1]]))
    p0 = math.exp(2) / (math.exp(2) + 1)
    torch.testing.assert_close(loc_post[0], T([[p0, 1 - p0], [1 - p0, p0]]))
    (flipped, _), = per_view[1]                                    # the same outputs on the flipped image
    torch.testing.assert_close(flipped[0, :, 0], T([[1 / 3, 0, 1, 1], [1 / 3, 0, 2 / 3, 1]]))
    b, s, lab = class_candidates(boxes[0], loc_post[0], T([1, 0]))  # SCR: the one box for each kept class
    assert lab.tolist() == [1, 0, 1, 0] and s.tolist() == pytest.approx([1 - p0, p0, p0, 1 - p0])
    assert torch.equal(b[0], b[1]) and torch.equal(b[2], b[3])
