"""Localisation testing (the paper's Appendix A.1, "Testing"), in plain torch.

Two protocols, computed off the same decoded tensor per test scale Q (the whole image rescaled so that
min(H, W) == Q, as the dense classification evaluation reads it):

- (a), for comparing variants (Table 8): the net on the image's **central crop** only, and only the box
  of the **ground-truth class** (PCR: that class's 4 outputs; SCR: its one box). One guess per image, so
  its top-1 and top-5 errors are the same figure. Computed at the first Q of the protocol's scales.
- (b), the full one (Table 9): the localisation net(s) applied **densely** to the whole image (and its
  flip) at every Q: a box per output location (per class for PCR), mapped to image pixels through
  the location's 224-style window (``map_to_boxes``), each scored by the classification net's
  posterior of its class at the same location, then merged over all Qs and views
  (``boxes.greedy_merge``). Which 5 classes, in which order, is the label source:
  - labels given (the paper's way): each image's top-5 classes of a classification evaluation (its
    best classification system); the guesses are those classes in that order, each with its best
    merged box (``in_order_guesses``);
  - none given ("boxes"): the classification net's top ``classes_kept`` classes at each Q keep their
    boxes, and the 5 classes whose merged boxes score highest are the guesses (``boxes.top_guesses``).
  Several localisation nets: the union of their boxes is merged.

Baselines in the same pass: the whole image (the whole crop in (a)) and the mean training box (the mean
ground-truth box of the training split, as fractions of the image), with the ground-truth class in (a)
and with the label source's 5 classes in (b).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

import model
from model.heads import BOX_PARAMS, select_class_boxes
from model.vgg import STRIDE
from pipeline import boxes as B
from pipeline import evaluate as E
from pipeline import scoring
from pipeline.batch import Batch
from storage import dataformat as fmt

WHOLE, MEAN_BOX = "whole image", "mean training box"
BASELINES = (WHOLE, MEAN_BOX)
ENSEMBLE = "ensemble"
# One worker's hits per (row, column): "a" protocol (a); "b1" / "b5" protocol (b) top-1 / top-5.
COLUMNS = ("a", "b1", "b5")
MERGE_IMAGES = 64      # images whose candidate sets go through one boxes.greedy_merge_many call


@dataclass(frozen=True)
class LocProtocol:
    """What to compute: protocol (a) or not (``central``; (b) runs when classification nets are
    given), test ``scales`` Q ((a) at the first), flips for (b), the crop of the nets, how many of the
    classifier's classes keep their boxes at each Q, the merging threshold. ``member_scales``: each
    localisation net's own Q set (Table 9's fusion: 256 with 352,384), ``scales`` their union; (a) runs
    each net at its own first Q."""

    central: bool = True
    scales: tuple[int, ...] = (256,)
    member_scales: tuple[tuple[int, ...], ...] = ()
    crop: int = 224
    flip: bool = True
    classes_kept: int = 5
    merge_iou: float = 0.5
    guesses: int = 5           # ILSVRC scores 5 guesses per image
    max_batch: int = 64

    def __post_init__(self):
        if not self.scales or min(self.scales) < self.crop:
            raise ValueError(f"test scales {self.scales} must be non-empty and >= the crop {self.crop}")
        if self.classes_kept < 1:
            raise ValueError(f"classes_kept must be >= 1, got {self.classes_kept}")
        if any(not set(qs) <= set(self.scales) for qs in self.member_scales):
            raise ValueError(f"each net's Q set {self.member_scales} must be within the scales {self.scales}")

    def scales_of(self, net: int) -> tuple[int, ...]:
        """The Qs localisation net ``net`` runs at."""
        return self.member_scales[net] if self.member_scales else self.scales


def row_names(n_nets: int) -> list[str]:
    """The table's rows: each localisation net, their union when several, then the baselines."""
    names = [f"net{i + 1}" for i in range(n_nets)]
    return names + ([ENSEMBLE] if n_nets > 1 else []) + list(BASELINES)


# ---------------------------------------------------------------------------------------------------
# Net outputs -> boxes in pixels (docs/localisation.md, "Contracts")
# ---------------------------------------------------------------------------------------------------

def window_to_pixels(pred: torch.Tensor, origin: torch.Tensor, side: float) -> torch.Tensor:
    """(..., 4) (cx, cy, w, h) in units of a square window of ``side`` px whose top-left corner is at
    ``origin`` (..., 2) = (ox, oy) -> (..., 4) corners in image pixels: (ox + cx side, oy + cy side,
    w side, h side), then to corners."""
    scaled = pred * side
    centre = scaled[..., :2] + origin
    return B.cxcywh_to_xyxy(torch.cat([centre, scaled[..., 2:]], dim=-1))


def window_origins(h: int, w: int, stride: int = STRIDE) -> torch.Tensor:
    """(h * w, 2) top-left corners (ox, oy), row-major, of the windows behind a dense net's (h, w)
    output map: ``model.to_dense`` slides the training crop over the image in steps of the features'
    stride (32 px: five 2x2 pools) from the top-left pixel, FC6 being an unpadded grid x grid conv, so
    location (i, j) saw the crop-sized window starting at (32 j, 32 i)."""
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1).float() * stride


def map_to_boxes(box_map: torch.Tensor, crop: int, stride: int = STRIDE) -> torch.Tensor:
    """A dense localisation net's output (N, 4 x K, h, w) -> (N, h * w, K, 4) corners in pixels of the
    image it ran on; K = 1 for SCR, the class count for PCR (class c at channels 4c..4c+3)."""
    n, ch, h, w = box_map.shape
    per = box_map.float().reshape(n, ch // BOX_PARAMS, BOX_PARAMS, h * w).permute(0, 3, 1, 2)  # (N, L, K, 4)
    origin = window_origins(h, w, stride).to(box_map.device)[None, :, None, :]                 # (1, L, 1, 2)
    return window_to_pixels(per, origin, float(crop))


def mirror(corners: torch.Tensor, width: float) -> torch.Tensor:
    """Corners (..., 4) in a horizontally flipped image of ``width`` px -> in the original image."""
    x1, y1, x2, y2 = corners.unbind(-1)
    return torch.stack([width - x2, y1, width - x1, y2], dim=-1)


def to_fractions(corners: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Pixels of an h x w image -> fractions of its sides. The images at different Q are isotropic
    rescalings of one another, so fractions put every Q's boxes in one frame; IoU is unchanged by a
    scaling of each axis, so scoring in fractions is scoring in pixels."""
    return corners / corners.new_tensor([w, h, w, h])


# ---------------------------------------------------------------------------------------------------
# Protocol (a): the central crop, the ground-truth class's box
# ---------------------------------------------------------------------------------------------------

def gt_class_box(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A net's outputs (N, 4) (SCR) or (N, 4 x C) (PCR) -> the ground-truth class's box (N, 4)."""
    return pred if pred.shape[1] == BOX_PARAMS else select_class_boxes(pred, labels)


@torch.no_grad()
def protocol_a(nets: Sequence[nn.Module], x: torch.Tensor, labels: torch.Tensor, gt: Sequence[torch.Tensor],
               crop: int, mean_box: torch.Tensor, names: Sequence[str] = (),
               baselines: bool = True) -> dict[str, torch.Tensor]:
    """{row: (N,) bool correct} on the central crop of images ``x`` (N, 3, H, W) with ground-truth
    corners ``gt[i]`` (G, 4) in their pixels: each net's box for the ground-truth class (rows
    ``names``, default net1, net2, ...), and with ``baselines`` the whole crop and the mean training
    box (``mean_box`` (4,) corners as fractions of the image)."""
    h, w = x.shape[-2:]
    top, left = scoring.center_box(h, w, crop)
    view = x[:, :, top:top + crop, left:left + crop]
    shift = torch.tensor([left, top, left, top], dtype=torch.float32)
    whole = torch.tensor([0.0, 0.0, crop, crop])
    prior = mean_box.float() * torch.tensor([w, h, w, h], dtype=torch.float32) - shift
    names = names or [f"net{i + 1}" for i in range(len(nets))]
    guesses = {name: window_to_pixels(gt_class_box(net(view).float().cpu(), labels.cpu()), torch.zeros(2), float(crop))
               for name, net in zip(names, nets)}
    if baselines:
        guesses[WHOLE] = whole.expand(len(labels), 4)
        guesses[MEAN_BOX] = prior.expand(len(labels), 4)
    return {row: torch.tensor([B.is_correct(int(c), g[i], labels[i:i + 1].expand(len(gt[i])).cpu(),
                                            gt[i].float() - shift)
                               for i, c in enumerate(labels.tolist())], dtype=torch.bool)
            for row, g in guesses.items()}


# ---------------------------------------------------------------------------------------------------
# Protocol (b): dense boxes, scored by the classification net, merged
# ---------------------------------------------------------------------------------------------------

@dataclass
class _Image:
    """One image's protocol-(b) material, gathered over scales and views: per localisation net its
    boxes (fractions of the image), their scores and classes; the classifier's posterior summed over
    Qs; its ground truth as fractions (from the first Q)."""

    boxes: list[list[torch.Tensor]]
    scores: list[list[torch.Tensor]]
    labels: list[list[torch.Tensor]]
    posterior: torch.Tensor | None = None
    gt: torch.Tensor | None = None


def _views(x: torch.Tensor, flip: bool) -> list[tuple[torch.Tensor, bool]]:
    return [(x, False)] + ([(torch.flip(x, dims=[3]), True)] if flip else [])


def _forward(dense: nn.Module, x: torch.Tensor, p: LocProtocol) -> torch.Tensor:
    return torch.cat(E.forward_chunks(dense, x, p.max_batch, None))


@torch.no_grad()
def dense_candidates(loc_dense: Sequence[nn.Module], cls_dense: Sequence[nn.Module], x: torch.Tensor,
                     p: LocProtocol):
    """Dense (b) material of same-sized images ``x`` (N, 3, H, W) at one Q.

    Returns (posterior (N, C): the classifiers' image posterior, averaged over views and nets as the
    dense classification evaluation computes it; per view and localisation net, (boxes (N, L, K, 4)
    corners as fractions of the image, location posteriors (N, L, C))). A location's posterior is the
    soft-max of the classifiers' score map there, averaged over the classifiers.
    """
    h, w = x.shape[-2:]
    image_ps, per_view = [], []
    for view, flipped in _views(x, p.flip):
        maps = [_forward(d, view, p) for d in cls_dense]                       # (N, C, h', w') each
        image_ps += [scoring.posteriors(scoring.pool_score_map(m)) for m in maps]
        loc_post = scoring.average_posteriors([torch.softmax(m.float(), dim=1) for m in maps]).flatten(2)
        nets = []
        for d in loc_dense:
            box_map = _forward(d, view, p)
            if box_map.shape[-2:] != maps[0].shape[-2:]:
                raise ValueError(f"box map {tuple(box_map.shape[-2:])} and class score map "
                                 f"{tuple(maps[0].shape[-2:])} differ: the nets' crops must agree")
            corners = map_to_boxes(box_map, p.crop)
            corners = mirror(corners, w) if flipped else corners
            nets.append((to_fractions(corners, h, w), loc_post.transpose(1, 2)))  # (N, L, K, 4), (N, L, C)
        per_view.append(nets)
    return scoring.average_posteriors(image_ps), per_view


def class_candidates(boxes: torch.Tensor, loc_post: torch.Tensor, classes: torch.Tensor):
    """One image's candidates for its kept ``classes`` (k,): ``boxes`` (L, K, 4) (K = 1 shared SCR box
    or one per class), ``loc_post`` (L, C) -> (boxes (L k, 4), scores (L k,), labels (L k,))."""
    chosen = boxes[:, classes] if boxes.shape[1] > 1 else boxes.expand(-1, len(classes), -1)
    scores = loc_post[:, classes]                                             # (L, k)
    labels = classes.expand(boxes.shape[0], -1)
    return chosen.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)


def ranked_guesses(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, p: LocProtocol):
    """Merge, then the ``p.guesses`` best (class, box), padded with class -1 (never correct) ->
    (labels (1, guesses), boxes (1, guesses, 4))."""
    lab, box = B.top_guesses(*B.greedy_merge(boxes, scores, labels, p.merge_iou), k=p.guesses)
    return pad_guesses(lab, box, p.guesses)


def in_order_guesses(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor,
                     p: LocProtocol, merged: bool = False):
    """Merge (unless ``merged``: they are ``greedy_merge``'s output), then for each of ``classes`` (k,) in
    that order its best merged box (none: an empty one, never correct) -> labels (1, guesses), boxes (1, guesses, 4)."""
    box, score, lab = (boxes, scores, labels) if merged else B.greedy_merge(boxes, scores, labels, p.merge_iou)
    picked = []
    for c in classes.tolist()[:p.guesses]:
        mine = (lab == c).nonzero()
        picked.append(box[mine[0, 0]] if len(mine) else torch.zeros(4))
    return pad_guesses(classes[:p.guesses], torch.stack(picked).reshape(-1, 4), p.guesses)


def pad_guesses(lab: torch.Tensor, box: torch.Tensor, k: int):
    pad = k - len(lab)
    lab = torch.cat([lab.long(), torch.full((pad,), -1, dtype=torch.long)])
    box = torch.cat([box.float(), torch.zeros(pad, 4)])
    return lab[None], box[None]


# ---------------------------------------------------------------------------------------------------
# One worker's share: every scale, every batch
# ---------------------------------------------------------------------------------------------------

@dataclass
class LocShare:
    """What a worker sends back: its keys and labels, whether each image has a ground-truth box
    (``scored``; only those count), and per (row, column) of ``COLUMNS`` an (N,) bool of hits."""

    keys: list[str]
    labels: torch.Tensor
    scored: torch.Tensor
    hits: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)


def _record_b(images: dict[str, _Image], keys: list[str], gt: list[torch.Tensor], x: torch.Tensor, post,
              per_view, p: LocProtocol, given: dict[str, torch.Tensor] | None, active: list[int], n_nets: int) -> None:
    """Add one batch's dense candidates of the ``active`` localisation nets (of ``n_nets``) to each
    image's pool (on the CPU): the boxes of the given classes, else of this Q's top ``classes_kept``."""
    h, w = x.shape[-2:]
    kept = torch.stack([given[k] for k in keys]) if given else scoring.topk(post, p.classes_kept)   # (N, k)
    for j, key in enumerate(keys):
        im = images.setdefault(key, _Image([[] for _ in range(n_nets)], [[] for _ in range(n_nets)],
                                           [[] for _ in range(n_nets)]))
        for view in per_view:
            for m, (bx, lp) in zip(active, view):
                b, s, lab = class_candidates(bx[j], lp[j], kept[j])
                im.boxes[m].append(b)
                im.scores[m].append(s)
                im.labels[m].append(lab)
        im.posterior = post[j].clone() if im.posterior is None else im.posterior + post[j]
        if im.gt is None:
            im.gt = to_fractions(gt[j].float(), h, w)


def _b_sets(im: _Image) -> list[tuple[torch.Tensor, ...]]:   # (boxes, scores, labels) of each net, then their union
    cat = [tuple(torch.cat(parts) for parts in (im.boxes[m], im.scores[m], im.labels[m])) for m in range(len(im.boxes))]
    return cat + ([tuple(torch.cat(parts) for parts in zip(*cat))] if len(cat) > 1 else [])


def _b_hits(im: _Image, label: int, mean_box: torch.Tensor, p: LocProtocol, given: torch.Tensor | None = None,
            merged: list | None = None) -> dict[str, tuple[bool, bool]]:
    """{row: (top-1 hit, top-5 hit)} of one image's protocol (b): each net's merged boxes (``merged``: its
    ``_b_sets`` merged already), their union's when several, the baselines' box for each of the labels' classes."""
    gt = [(torch.full((len(im.gt),), label, dtype=torch.long), im.gt)]
    guesses = {}
    merged = merged if merged is not None else [B.greedy_merge(*x, threshold=p.merge_iou) for x in _b_sets(im)]
    for row, m in zip(row_names(len(im.boxes)), merged):
        guesses[row] = (in_order_guesses(*m, given, p, merged=True) if given is not None
                        else pad_guesses(*B.top_guesses(*m, k=p.guesses), p.guesses))
    classes = given if given is not None else scoring.topk(im.posterior[None], p.guesses)[0]
    for row, box in ((WHOLE, torch.tensor([0.0, 0.0, 1.0, 1.0])), (MEAN_BOX, mean_box.float())):
        guesses[row] = pad_guesses(classes, box.expand(len(classes), 4), p.guesses)
    return {row: (bool(B.localisation_hits(lab, box, gt, 1)[0]), bool(B.localisation_hits(lab, box, gt, 5)[0]))
            for row, (lab, box) in guesses.items()}


@torch.no_grad()
def evaluate_loc_share(loc_nets: Sequence[nn.Module], cls_nets: Sequence[nn.Module],
                       batches_at: Callable[[int], Iterable[Batch]], p: LocProtocol, mean_box: torch.Tensor,
                       device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None,
                       given: dict[str, torch.Tensor] | None = None) -> LocShare:
    """Protocols (a) and (b) on one worker's share: ``batches_at(Q)`` yields that share's images at Q
    with their ground-truth boxes. Without ``cls_nets`` only protocol (a) is computed. ``given``: key
    -> the 5 classes protocol (b) guesses, in order (the label source), else the classifiers' own.
    Every scale's pass must give the same keys, each once (``evaluate.checked_passes``)."""
    device = torch.device(device)
    loc_nets = [n.to(device).eval() for n in loc_nets]
    cls_nets = [n.to(device).eval() for n in cls_nets]
    loc_dense, cls_dense = [model.to_dense(n) for n in loc_nets], [model.to_dense(n) for n in cls_nets]
    gts: dict[str, torch.Tensor] = {}

    def plain(q: int):  # the ground truth is kept aside, by key
        for batch in batches_at(q):
            gts.update(zip(batch.keys, batch.gt_boxes))
            yield batch

    labels: dict[str, int] = {}
    a_hits: dict[str, dict[str, bool]] = {}
    images: dict[str, _Image] = {}
    for q, keys, lbl, x in E.checked_passes(plain, p.scales, device):
        gt = [gts[k].float().cpu() for k in keys]
        labels.update(zip(keys, lbl.tolist()))
        if p.central:
            first = [i for i in range(len(loc_nets)) if p.scales_of(i)[0] == q]
            for row, hit in protocol_a([loc_nets[i] for i in first], x, lbl.cpu(), gt, p.crop, mean_box,
                                       [f"net{i + 1}" for i in first], q == p.scales[0]).items():
                a_hits.setdefault(row, {}).update(zip(keys, hit.tolist()))
        active = [i for i in range(len(loc_nets)) if q in p.scales_of(i)]
        if cls_nets:
            post, per_view = dense_candidates([loc_dense[i] for i in active], cls_dense, x, p)
            per_view = [[(b.cpu(), lp.cpu()) for b, lp in view] for view in per_view]  # one sync per batch
            _record_b(images, keys, gt, x, post.cpu(), per_view, p, given, active, len(loc_nets))
        if progress is not None:
            progress(len(keys))
    return _share(sorted(labels), labels, gts, a_hits, images, mean_box, p, given)


def _share(order, labels, gts, a_hits, images, mean_box, p: LocProtocol, given) -> LocShare:
    scored = torch.tensor([len(gts[k]) > 0 for k in order], dtype=torch.bool)
    hits = {(row, "a"): torch.tensor([got[k] for k in order], dtype=torch.bool) for row, got in a_hits.items()}
    if images:
        keys, merged = [k for k in order if len(gts[k])], {}
        for i in range(0, len(keys), MERGE_IMAGES):   # one call shares each merging step among the images
            sets = {k: _b_sets(images[k]) for k in keys[i:i + MERGE_IMAGES]}
            out = iter(B.greedy_merge_many([x for per in sets.values() for x in per], p.merge_iou))
            merged.update((k, [next(out) for _ in per]) for k, per in sets.items())
        per_key = [_b_hits(images[k], labels[k], mean_box, p, given[k] if given else None, merged[k])
                   if len(gts[k]) else None for k in order]
        for row in row_names(len(next(iter(images.values())).boxes)):
            for col, i in (("b1", 0), ("b5", 1)):
                hits[(row, col)] = torch.tensor([bool(h and h[row][i]) for h in per_key], dtype=torch.bool)
    return LocShare(order, torch.tensor([labels[k] for k in order], dtype=torch.long), scored, hits)


def tally(shares: Sequence[LocShare]) -> dict[tuple[str, str], tuple[int, int]]:
    """{(row, column): (errors, images scored)} over all shares: an error is a scored image not hit."""
    out: dict[tuple[str, str], list[int]] = {}
    for s in shares:
        for cell, hit in s.hits.items():
            got = out.setdefault(cell, [0, 0])
            got[0] += int((s.scored & ~hit).sum())
            got[1] += int(s.scored.sum())
    return {cell: (e, n) for cell, (e, n) in out.items()}


# ---------------------------------------------------------------------------------------------------
# The mean training box (a baseline)
# ---------------------------------------------------------------------------------------------------

def mean_training_box(root, split: str = "train") -> torch.Tensor:
    """(4,) the mean of every kept ground-truth box of ``split``'s stored images, corners as fractions
    of its image's width and height: the box one would guess knowing only the training set. From the
    manifest's ``boxes`` column (the box members' values) and its stored image sizes."""
    m = fmt.read_manifest(root, split, columns=["width", "height", "shard", "status", "boxes"]).to_pydict()
    found = [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) / torch.tensor([w, h, w, h], dtype=torch.float32)
             for w, h, shard, status, b in zip(m["width"], m["height"], m["shard"], m["status"], m["boxes"])
             if b and shard and status != "quarantined"]
    if not found:
        raise fmt.DataError(f"{fmt.manifest_path(root, split)}: split {split!r} has no boxes")
    return torch.cat(found).mean(dim=0)


def mean_box_cxcywh(root, split: str = "train") -> torch.Tensor:
    """:func:`mean_training_box` as (cx, cy, w, h), the box heads' order."""
    return B.xyxy_to_cxcywh(mean_training_box(root, split))
