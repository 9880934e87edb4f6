"""Box arithmetic for localisation (the paper's Appendix A): conversions, IoU, the ILSVRC correctness
rule, top-k localisation error and OverFeat's greedy merging. Plain torch, no GPU needed.

Every box is four floats in pixels of one image: corners ``(x1, y1, x2, y2)`` with x to the right and
y down, or the net's parameters ``(cx, cy, w, h)`` (centre, width, height; Appendix A). Areas are
continuous, ``(x2 - x1) * (y2 - y1)``, without ILSVRC's "+1" for inclusive pixel indices
(docs/localisation.md, assumption).
"""
from __future__ import annotations

import torch

IOU_CORRECT = 0.5   # Appendix A: correct when IoU > 0.5 with a ground-truth box of the right class


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) corners -> (..., 4) centre x, centre y, width, height, same units."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre x, centre y, width, height -> (..., 4) corners, same units."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box of ``a`` (N, 4) with every box of ``b`` (M, 4), corners -> (N, M) in [0, 1].

    A pair whose union is empty (two degenerate boxes) has IoU 0, not NaN.
    """
    a, b = a.reshape(-1, 4).double(), b.reshape(-1, 4).double()
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])          # (N, M, 2) top-left of the overlap
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])          # (N, M, 2) bottom-right
    inter = (rb - lt).clamp(min=0).prod(-1)                     # (N, M)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def is_correct(label: int, box: torch.Tensor, gt_labels: torch.Tensor, gt_boxes: torch.Tensor,
               threshold: float = IOU_CORRECT) -> bool:
    """One guess (class ``label``, corners ``box`` (4,)) against an image's ground truth
    (``gt_labels`` (G,), ``gt_boxes`` (G, 4)): right class and IoU > ``threshold`` with a ground-truth
    box of that class. An image with no ground-truth box has no correct guess."""
    same = gt_labels.reshape(-1) == int(label)
    if not bool(same.any()):
        return False
    return bool((box_iou(box.reshape(1, 4), gt_boxes.reshape(-1, 4)[same]) > threshold).any())


def localisation_hits(pred_labels: torch.Tensor, pred_boxes: torch.Tensor,
                      gt: list[tuple[torch.Tensor, torch.Tensor]], k: int = 5) -> torch.Tensor:
    """(N,) bool: whether one of image i's first ``k`` guesses is correct (arguments as
    ``localisation_error``). Per image, so that workers' shares can be gathered before counting."""
    n = pred_labels.shape[0]
    if n != len(gt) or pred_boxes.shape[:2] != pred_labels.shape:
        raise ValueError(f"shapes disagree: labels {tuple(pred_labels.shape)}, boxes "
                         f"{tuple(pred_boxes.shape)}, {len(gt)} ground truths")
    return torch.tensor([any(is_correct(int(pred_labels[i, j]), pred_boxes[i, j], gt_labels, gt_boxes)
                             for j in range(min(k, pred_labels.shape[1])))
                         for i, (gt_labels, gt_boxes) in enumerate(gt)], dtype=torch.bool)


def localisation_error(pred_labels: torch.Tensor, pred_boxes: torch.Tensor,
                       gt: list[tuple[torch.Tensor, torch.Tensor]], k: int = 5) -> float:
    """Top-k localisation error: the fraction of images none of whose first ``k`` guesses is correct.

    ``pred_labels`` (N, K) and ``pred_boxes`` (N, K, 4) hold each image's guesses best first (K >= k;
    top-1 is ``k=1``); ``gt[i]`` is image i's (labels (G,), boxes (G, 4)). Returns a fraction in [0, 1].
    """
    if pred_labels.shape[0] == 0 and len(gt) == 0:
        raise ValueError("no images to score")
    hits = localisation_hits(pred_labels, pred_boxes, gt, k)
    return int((~hits).sum()) / len(hits)


# ---------------------------------------------------------------------------------------------------
# OverFeat's greedy merging. The order it merges in is the loop's below, which is the reference
# (jobs/bench/merge.py keeps it as it was written, ``loop_merge``):
#
#     per class (ascending label), clusters start as the class's boxes in input order; while two remain:
#         IoU of every pair of cluster means (box_iou, float64), the diagonal -1; (i, j) = argmax over the
#         matrix in row-major order (first maximum: i < j, the lowest i, then the lowest j);
#         stop if that IoU <= threshold; else cluster i takes j's corner sums, count and score sum
#         (i + j, float64) and j is removed (the others keep their order).
#
# The vectorised version below follows the same steps with the same float64 operations, so its clusters
# are the same bits: it keeps each cluster's best partner instead of recomputing every pair at each
# merge, and advances many problems (one class of one candidate set each) by one merge per step.
# ---------------------------------------------------------------------------------------------------

NEG = float("-inf")
_DEAD = -2.0                 # a dead or padding row's "best IoU": below every IoU and every threshold (>= -1)
_DIRTY, _NONE = -1, -2       # ``bc`` of a row whose best is only a bound; of a removed or padding slot
_BATCH_SLOTS = 1 << 17       # padded boxes merged together (about 14 MB of state)
_PAIRS_CHUNK = 1 << 17       # IoU entries computed at once when a batch starts (about 1 MB a plane)
_COMPACT_EVERY = 16          # steps between dropping finished problems and removed clusters


def greedy_merge(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5):
    """OverFeat's greedy merging (Sermanet et al., 2014), per class, then ranked by class score.

    ``boxes`` (N, 4) corners, ``scores`` (N,) the classification net's score of ``labels`` (N,) for the
    window each box came from. Repeatedly the two same-class boxes with the highest IoU are merged while
    that IoU > ``threshold`` (assumption: OverFeat's own "match score" mixes centre distance and
    intersection area without scales; IoU is scale-free). A merged box is the mean of its members'
    corners and scores the sum of theirs (OverFeat "cumulatively adds" the class outputs). Ties go to
    the first pair in the order above. Returns (boxes (M, 4), scores (M,), labels (M,)), highest score
    first (equal scores: ascending label, then the cluster's first box). Several sets at once:
    :func:`greedy_merge_many`, much faster per set.
    """
    return greedy_merge_many([(boxes, scores, labels)], threshold)[0]


def greedy_merge_many(sets, threshold: float = 0.5) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`greedy_merge` of each (boxes, scores, labels) of ``sets``, the same bits, merged together:
    every (set, class) is one problem and all advance one merge per step, so a step's fixed cost is
    shared (tens of sets, e.g. an evaluation's images, make each set's merging several times cheaper
    than alone). On the device of the first set's boxes."""
    if not sets:
        return []
    # The loop stops at IoU <= threshold: below -1 (or NaN) it merges every class into one cluster,
    # as -1 does here, where dead slots (-2) must stay below it.
    thr = float(threshold) if float(threshold) >= -1 else -1.0
    boxes = torch.cat([b.reshape(-1, 4).double() for b, _, _ in sets])              # (N, 4) every set's
    scores = torch.cat([s.reshape(-1).double() for _, s, _ in sets])
    values = torch.cat([boxes, torch.ones_like(scores)[:, None], scores[:, None]], 1)   # (N, 6) a cluster of one
    classes = [torch.unique(lab, return_inverse=True) for _, _, lab in sets]          # ascending, as the loop
    first = torch.tensor([0] + [len(c) for c, _ in classes], device=boxes.device).cumsum(0)   # each set's first problem
    pid = torch.cat([inv.reshape(-1) + first[k] for k, (_, inv) in enumerate(classes)])       # (N,) problem of each box
    size = torch.bincount(pid, minlength=int(first[-1]))
    order = torch.argsort(pid, stable=True)
    slot = torch.empty_like(pid)
    slot[order] = torch.arange(len(pid), device=pid.device) - (size.cumsum(0) - size)[pid[order]]  # rank in its class
    found = [_Merging(values, pid, slot, group).run(thr) for group in _batches(size.tolist())]
    ids, slots, sums = zip(*found) if found else ([pid[:0]], [pid[:0]], [values[:0].T])
    return _ranked(sets, classes, first, torch.cat(ids), torch.cat(slots), torch.cat(sums, 1))


def _ranked(sets, classes, first, pid, slot, val):
    """Each set's clusters ((pid, slot, 6 sums) in any order) as the loop returns them: by class, then
    slot, then stably by score, highest first."""
    by_place = torch.argsort(pid * (int(slot.max()) + 1 if len(slot) else 1) + slot)
    pid, val = pid[by_place], val[:, by_place]
    owner = torch.searchsorted(first, pid, right=True) - 1                          # each cluster's set
    by_score = torch.argsort(val[5], descending=True, stable=True)
    final = by_score[torch.argsort(owner[by_score], stable=True)]
    pid, val, owner = pid[final], val[:, final], owner[final]
    bounds = torch.bincount(owner, minlength=len(sets)).tolist()
    out = []
    for k, ((b, s, lab), p, v) in enumerate(zip(sets, pid.split(bounds), val.split(bounds, dim=1))):
        if not len(p):
            out.append((b.reshape(0, 4), s.reshape(0), lab.reshape(0)))
            continue
        out.append(((v[:4] / v[4]).T.to(b.dtype), v[5].to(s.dtype), classes[k][0].long().to(lab.dtype)[p - first[k]]))
    return out


def _batches(sizes: list[int]) -> list[list[int]]:
    """Problem indices in groups of at most ``_BATCH_SLOTS`` padded boxes, largest problems first (similar
    sizes pad least)."""
    groups: list[list[int]] = []
    width = 0
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if not groups or (len(groups[-1]) + 1) * width > _BATCH_SLOTS:
            groups.append([])
            width = sizes[i] + 1      # the group's widest problem, and its scratch slot
        groups[-1].append(i)
    return groups


def _areas(c: torch.Tensor) -> torch.Tensor:
    """(4, ...) corners -> (...) areas, as ``box_iou`` computes them."""
    return (c[2] - c[0]).clamp(min=0) * (c[3] - c[1]).clamp(min=0)


def _iou(c, a, q, qa, fill):
    """``box_iou``'s entries, elementwise with broadcasting: boxes ``c`` (4, ...) of areas ``a`` against
    ``q`` (4, ...) of areas ``qa``, float64. ``fill`` None: finite boxes, whose union is never negative
    and is 0 only where the overlap is 0, so ``box_iou``'s guard is not needed; else the IoU of a pair
    without a union (``box_iou``'s 0, or NaN for a finished problem)."""
    lt = torch.maximum(c[:2], q[:2])
    wh = torch.minimum(c[2:], q[2:]).sub_(lt).clamp_(min=0)
    inter = wh[0] * wh[1]
    union = (qa + a).sub_(inter)      # qa + a == a + qa: the same bits as box_iou's area_a + area_b
    if fill is not None:
        return torch.where(union > 0, inter / union.clamp(min=1e-12), fill)
    return inter.div_(union.clamp_(min=1e-12))


class _Merging:
    """Problems (one class of one set each) merged together, one merge per problem and step.

    Each problem's clusters sit in the slots of a row of width ``w`` in the loop's order; the last slot
    is a scratch one that finished problems write to. Per slot: ``S`` (6, P, w) float64 corner sums
    x1 y1 x2 y2, member count, score sum; ``C`` (4, P, w) the mean box, sums / count as the loop
    divides; ``A`` its area; ``bias`` 0 for a cluster, -inf for a removed, padding or scratch slot.
    Per cluster: ``bv`` its best IoU with another cluster and ``bc`` (int32) the first column holding it,
    or ``bc`` ``_DIRTY`` when that column has merged since: ``bv`` is then an upper bound, made exact
    before it could be its problem's maximum. A removed or padding slot: ``bv`` ``_DEAD``, ``bc`` ``_NONE``.
    """

    def __init__(self, values, pid, slot, group):
        """Problems ``group`` (ids) of the boxes' ``values`` (N, 6: corners, 1, score) in problem ``pid``
        (N,) at ``slot`` (N,), each padded to the widest plus the scratch slot."""
        device = values.device
        self.ids = torch.tensor(group, device=device)
        row = torch.full((int(pid.max()) + 1,), -1, device=device)         # problem id -> row here
        row[self.ids] = torch.arange(len(group), device=device)
        mine = (row[pid] >= 0).nonzero()[:, 0]
        r, c = row[pid[mine]], slot[mine]
        S = torch.zeros(6, len(group), int(c.max()) + 2, dtype=torch.float64, device=device)
        S[4] = 1.0
        S[:, r, c] = values[mine].T
        bias = torch.full(S.shape[1:], NEG, dtype=torch.float64, device=device)
        bias[r, c] = 0.0
        self.exact = not bool(torch.isfinite(values[mine, :4]).all())
        self.found: list = []
        self._set(S, bias)
        self.bv, self.bc = self._first_bests()

    def _set(self, S, bias):
        self.S, self.bias = S, bias
        self.C = S[:4] / S[4]
        self.A = _areas(self.C)
        self.w = bias.shape[1]
        self.base = torch.arange(bias.shape[0], device=S.device) * self.w     # flat index of each row's slot 0

    def _fill(self, go=None):
        if not self.exact:
            return None
        return 0.0 if go is None else torch.where(go, 0.0, float("nan")).double()[:, None]

    def _first_bests(self):
        """Every cluster's best partner from the full IoU matrix, a chunk of problems at a time."""
        P, w = self.bias.shape
        bv = torch.empty(P, w, dtype=torch.float64, device=self.S.device)
        bc = torch.empty(P, w, dtype=torch.long, device=self.S.device)
        for s in range(0, P, max(1, _PAIRS_CHUNK // (w * w))):
            e = s + max(1, _PAIRS_CHUNK // (w * w))
            c, a = self.C[:, s:e], self.A[s:e]
            iou = _iou(c[:, :, None, :], a[:, None, :], c[..., None], a[..., None], self._fill())  # (k, w, w)
            iou.add_(self.bias[s:e, None, :]).diagonal(dim1=1, dim2=2).fill_(NEG)
            v, i = iou.max(2)                                     # the first maximum of each row
            bv[s:e], bc[s:e] = v.masked_fill_(self.bias[s:e] < 0, _DEAD), i.masked_fill_(self.bias[s:e] < 0, _NONE)
        return bv, bc.int()

    def _rows_best(self, p, r):
        """Exact (flat index, best IoU, first column) of clusters ``r`` of problems ``p``."""
        f = self.base[p] + r
        q, qa = self.C.view(4, -1).index_select(1, f), self.A.view(-1).index_select(0, f)
        vals = _iou(self.C.index_select(1, p), self.A.index_select(0, p), q[:, :, None], qa[:, None],
                    self._fill()).add_(self.bias.index_select(0, p))
        vals.view(-1).index_fill_(0, torch.arange(len(p), device=p.device) * self.w + r, NEG)
        v, c = vals.max(1)
        return f, v, c

    def _refresh(self):
        """Make exact every dirty bound that reaches its problem's best exact value."""
        dirty = self.bc == _DIRTY
        clean = self.bv.masked_fill(dirty, NEG).amax(1, keepdim=True)
        p, r = (dirty & (self.bv >= clean)).nonzero(as_tuple=True)      # a CPU-GPU sync on a GPU
        if len(p):
            f, v, c = self._rows_best(p, r)
            self.bv.view(-1).index_copy_(0, f, v)
            self.bc.view(-1).index_copy_(0, f, c.int())

    def step(self, thr: float):
        """One merge in every problem whose best pair exceeds ``thr``: (P,) bool of those, None when none."""
        self._refresh()
        gv, gi = self.bv.max(1)          # the first row holding the maximum: the loop's i (exact, refreshed)
        go = gv > thr
        if not bool(go.any()):
            return None
        scratch = self.w - 1
        gi = torch.where(go, gi, scratch)
        fi = self.base + gi
        gj = torch.where(go, self.bc.view(-1).index_select(0, fi), scratch)      # its first best column: j
        fj = self.base + gj
        Sf = self.S.view(6, -1)
        zi = Sf.index_select(1, fi) + Sf.index_select(1, fj)              # the loop's sums[i] + sums[j]
        Sf.index_copy_(1, fi, zi)
        ci = zi[:4] / zi[4]
        self.C.view(4, -1).index_copy_(1, fi, ci)
        ai = _areas(ci)
        self.A.view(-1).index_copy_(0, fi, ai)
        self.bias.view(-1).index_fill_(0, fj, NEG)
        # IoU of the merged cluster with every slot; NaN throughout for finished problems, which keeps
        # their bests NaN (never > thr) without a mask.
        qa = torch.where(go, ai, float("nan"))
        vals = _iou(self.C, self.A, ci[:, :, None], qa[:, None], self._fill(go)).add_(self.bias)
        vals.view(-1).index_fill_(0, fi, NEG)
        self._update(vals, gi, gj, fi, fj, go)
        return go

    def _update(self, vals, gi, gj, fi, fj, go):
        """Fold the merged cluster's IoUs ``vals`` (P, w) into every row's best, as the first maximum."""
        bv, bc = self.bv, self.bc
        qv, qc = vals.max(1)
        g1, g2 = gi.int()[:, None], gj.int()[:, None]
        stale = (bc == g1) | (bc == g2)          # the best partner merged: the row's best may have fallen
        upd = vals > bv
        ties = vals == bv
        if bool(ties.any()):                     # equal IoUs: the first column wins (a dirty row cannot tell)
            upd |= ties & (bc >= 0) & ((g1 < bc) | stale)
        self.bv = bv = torch.maximum(vals, bv)   # a stale row keeps its old best as an upper bound
        self.bc = bc = torch.where(upd, g1, bc.masked_fill_(stale, _DIRTY))
        bv.view(-1).index_copy_(0, fi, torch.where(go, qv, NEG))
        bc.view(-1).index_copy_(0, fi, qc.int())
        bv.view(-1).index_fill_(0, fj, _DEAD)
        bc.view(-1).index_fill_(0, fj, _NONE)

    def _keep(self, rows):
        """Hand the clusters of ``rows`` (1-D index) on as (problem id, slot, (6, m) sums)."""
        i, c = (self.bias[rows] == 0).nonzero(as_tuple=True)
        self.found.append((self.ids[rows][i], c, self.S[:, rows][:, i, c]))

    def compact(self, go):
        """Hand finished problems' clusters on and drop them and removed slots (order kept)."""
        self._keep((~go).nonzero()[:, 0])
        keep = go.nonzero()[:, 0]
        self.ids = self.ids[keep]
        live = self.bias[keep] == 0
        w = int(live.sum(1).max()) + 1
        order = torch.sort((~live).to(torch.uint8), dim=1, stable=True).indices[:, :w]  # live slots first
        column = live.int().cumsum(1) - 1                                                 # old -> new slot
        dirty = (self.bc[keep] == _DIRTY).gather(1, order)
        bc = column.gather(1, self.bc[keep].clamp(min=0).long()).gather(1, order).masked_fill_(dirty, _DIRTY)
        S, bias = self.S[:, keep].gather(2, order.expand(6, -1, -1)), self.bias[keep].gather(1, order)
        S[:, :, w - 1], S[4, :, w - 1], bias[:, w - 1] = 0.0, 1.0, NEG
        bv = self.bv[keep].gather(1, order)
        self._set(S, bias)
        self.bv, self.bc = bv.masked_fill_(bias < 0, _DEAD), bc.masked_fill_(bias < 0, _NONE).int()

    def run(self, thr: float):
        """Merge until no problem has a pair above ``thr``: every cluster as (problem ids, slots
        within the problem as the loop orders them, (6, m) corner sums, count, score sum)."""
        steps = 0
        while len(self.ids):
            go = self.step(thr)
            if go is None:
                break
            steps += 1
            if steps % _COMPACT_EVERY == 0:
                self.compact(go)
        self._keep(torch.arange(len(self.ids), device=self.ids.device))
        ids, slots, sums = zip(*self.found)
        return torch.cat(ids), torch.cat(slots), torch.cat(sums, 1)


def top_guesses(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, k: int = 5):
    """The ``k`` guesses ILSVRC scores: the best-scoring box of each of the ``k`` best classes.
    Input as ``greedy_merge``'s output; returns (labels (<=k,), boxes (<=k, 4)), best first."""
    order = torch.argsort(scores, descending=True, stable=True)
    seen: list[int] = []
    picks: list[int] = []
    for i in order.tolist():
        c = int(labels[i])
        if c not in seen:
            seen.append(c)
            picks.append(i)
            if len(picks) == k:
                break
    idx = torch.tensor(picks, dtype=torch.long)
    return labels[idx], boxes[idx].reshape(-1, 4)
