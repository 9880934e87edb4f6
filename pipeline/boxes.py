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


def _merge_one_class(boxes: torch.Tensor, scores: torch.Tensor, threshold: float):
    """Greedy merging of one class's boxes (N, 4) with scores (N,) -> (boxes (M, 4), scores (M,))."""
    # Each cluster keeps the sum of its members' corners and their count, so a merged box is the mean
    # of all the boxes it absorbed whatever the merge order (assumption: OverFeat averages pairwise).
    sums, total = boxes.double().clone(), scores.double().clone()   # (n, 4) corner sums, (n,) scores
    counts = torch.ones(len(boxes), dtype=torch.float64)
    while len(sums) > 1:
        iou = box_iou(sums / counts[:, None], sums / counts[:, None])
        iou.fill_diagonal_(-1.0)
        best = int(iou.argmax())
        i, j = divmod(best, len(sums))
        if float(iou[i, j]) <= threshold:
            break
        keep = torch.ones(len(sums), dtype=torch.bool)
        keep[j] = False
        sums[i], counts[i], total[i] = sums[i] + sums[j], counts[i] + counts[j], total[i] + total[j]
        sums, counts, total = sums[keep], counts[keep], total[keep]
    return (sums / counts[:, None]).to(boxes.dtype), total.to(scores.dtype)


def greedy_merge(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, threshold: float = 0.5):
    """OverFeat's greedy merging (Sermanet et al., 2014), per class, then ranked by class score.

    ``boxes`` (N, 4) corners, ``scores`` (N,) the classification net's score of ``labels`` (N,) for the
    window each box came from. Repeatedly the two same-class boxes with the highest IoU are merged while
    that IoU > ``threshold`` (assumption: OverFeat's own "match score" mixes centre distance and
    intersection area without scales; IoU is scale-free). A merged box is the mean of its members'
    corners and scores the sum of theirs (OverFeat "cumulatively adds" the class outputs).
    Returns (boxes (M, 4), scores (M,), labels (M,)), highest score first.
    """
    out_boxes, out_scores, out_labels = [], [], []
    for c in torch.unique(labels):
        mine = labels == c
        b, s = _merge_one_class(boxes[mine], scores[mine], threshold)
        out_boxes.append(b)
        out_scores.append(s)
        out_labels.append(torch.full((len(s),), int(c), dtype=labels.dtype))
    if not out_boxes:
        return boxes.reshape(0, 4), scores.reshape(0), labels.reshape(0)
    b, s, lab = torch.cat(out_boxes), torch.cat(out_scores), torch.cat(out_labels)
    order = torch.argsort(s, descending=True, stable=True)
    return b[order], s[order], lab[order]


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
