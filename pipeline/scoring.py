"""The scoring math of the paper's testing protocol (section 3.2), as pure torch functions.

Posteriors are soft-max outputs, (N, classes); every average here is over posteriors, never over raw
scores, except the spatial pooling of a dense class-score map, which the paper does *before* the
soft-max ("the class score map is spatially averaged (sum-pooled)").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

SCALE_STEP = 32  # the paper's Q in {S - 32, S, S + 32} for a fixed training scale S


def test_scales(smin: int, smax: int, step: int = SCALE_STEP) -> list[int]:
    """The paper's multi-scale test set for a training scale range (Table 4).

    A fixed S (``smin == smax``) gives Q in {S - 32, S, S + 32}; a jittered S in [Smin, Smax] gives
    Q in {Smin, (Smin + Smax) / 2, Smax} (the middle rounded down to a whole pixel).
    """
    if smin > smax or smin <= 0:
        raise ValueError(f"need 0 < smin <= smax, got smin={smin}, smax={smax}")
    if smin == smax:
        return [smin - step, smin, smin + step]
    return [smin, (smin + smax) // 2, smax]


def posteriors(scores: torch.Tensor) -> torch.Tensor:
    """(N, classes) scores -> (N, classes) soft-max posteriors, computed in float32."""
    return torch.softmax(scores.float(), dim=1)


def pool_score_map(score_map: torch.Tensor) -> torch.Tensor:
    """(N, classes, h, w) class-score map -> (N, classes): the spatial mean (the paper's sum-pooling;
    a sum and a mean differ by the factor h*w, which would change the soft-max's temperature, so the
    mean, which equals the plain logits at the training crop, is the one that keeps scales comparable)."""
    return score_map.float().mean(dim=(2, 3))


def average_posteriors(ps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of equally shaped posteriors: over flips, crops, scales, protocols or models."""
    if len(ps) == 0:
        raise ValueError("average_posteriors needs at least one posterior")
    shapes = {tuple(p.shape) for p in ps}
    if len(shapes) != 1:
        raise ValueError(f"posteriors of different shapes cannot be averaged: {sorted(shapes)}")
    return torch.stack([p.float() for p in ps]).mean(dim=0)


def group_mean(p: torch.Tensor, per_item: int) -> torch.Tensor:
    """(N * per_item, classes) rows ordered item-major -> (N, classes): e.g. 50 crops per image."""
    if p.shape[0] % per_item:
        raise ValueError(f"{p.shape[0]} rows do not split into groups of {per_item}")
    return p.reshape(-1, per_item, p.shape[1]).mean(dim=1)


def crop_grid(h: int, w: int, crop: int, n: int = 5) -> list[tuple[int, int]]:
    """(top, left) of an n x n regular grid of ``crop``-sized crops covering an h x w image, row-major.

    The first and last rows/columns touch the image borders (all four corners are crops); the steps
    between them are as even as whole pixels allow, and the grid is its own mirror image (position
    n-1-i is the flip of position i), so a flipped image gets the flipped set of crops. The one
    exception is the middle of an odd n when the slack (size - crop) is odd: no whole-pixel crop is
    centred then; it sits half a pixel right/down, where :func:`center_box` (and DALI's centre crop)
    puts it. A side equal to the crop gives one position repeated,
    as the grid still has n x n cells (each crop then weighs the same in the average).
    """
    if h < crop or w < crop:
        raise ValueError(f"a {crop}px crop does not fit a {h}x{w} image")
    if n < 1:
        raise ValueError(f"grid size must be >= 1, got {n}")

    def axis(size: int) -> list[int]:
        slack = size - crop
        if n == 1:
            return [slack // 2]
        pos = [0] * n
        for i in range((n + 1) // 2):
            pos[i] = int(i * slack / (n - 1) + 0.5)  # round half up: deterministic, no banker's rounding
            pos[n - 1 - i] = slack - pos[i]
        if n % 2:
            pos[n // 2] = (slack + 1) // 2
        return pos

    return [(t, l) for t in axis(h) for l in axis(w)]


def center_box(h: int, w: int, crop: int) -> tuple[int, int]:
    """(top, left) of the centre crop (the training-time validation view), halves rounded up as
    DALI rounds its crop anchor, so this is the crop the DALI "center" loader gives."""
    if h < crop or w < crop:
        raise ValueError(f"a {crop}px crop does not fit a {h}x{w} image")
    return (h - crop + 1) // 2, (w - crop + 1) // 2


def topk(p: torch.Tensor, k: int = 5) -> torch.Tensor:
    """(N, classes) -> (N, min(k, classes)) class indices, best first (ties: lowest index first)."""
    k = min(k, p.shape[1])
    # A stable descending sort breaks ties deterministically, so every worker ranks alike.
    return torch.sort(p.float(), dim=1, descending=True, stable=True).indices[:, :k]


def misses(top: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(2,) int64 count of top-1 and top-5 misses in a batch, on ``top``'s device (no CPU-GPU sync).

    ``top`` is (N, K) class indices, best first (:func:`topk`, or ``logits.topk`` in training); with
    fewer than 5 columns (fewer classes) top-5 means all of them. The one definition of a miss: the
    training loop's running error and :class:`Tally` both count with it.
    """
    hit = top == labels.reshape(-1, 1)
    return torch.stack([(~hit[:, 0]).sum(), (~hit[:, :5].any(dim=1)).sum()])


@dataclass
class Tally:
    """Running counts for one protocol (mode x scales): mergeable across batches and workers."""

    num_classes: int
    n: int = 0
    top1_wrong: int = 0
    top5_wrong: int = 0
    class_total: torch.Tensor = field(default=None)  # (classes,) int64
    class_correct: torch.Tensor = field(default=None)

    def __post_init__(self):
        if self.class_total is None:
            self.class_total = torch.zeros(self.num_classes, dtype=torch.long)
            self.class_correct = torch.zeros(self.num_classes, dtype=torch.long)

    def add(self, top: torch.Tensor, labels: torch.Tensor) -> "Tally":
        """Count a batch: ``top`` (N, K) class indices best first, ``labels`` (N,)."""
        top, labels = top.cpu(), labels.cpu().long()
        top1_wrong, top5_wrong = misses(top, labels).tolist()
        self.n += labels.numel()
        self.top1_wrong += top1_wrong
        self.top5_wrong += top5_wrong
        self.class_total += torch.bincount(labels, minlength=self.num_classes)
        self.class_correct += torch.bincount(labels[top[:, 0] == labels], minlength=self.num_classes)
        return self

    def merge(self, other: "Tally") -> "Tally":
        out = Tally(self.num_classes, self.n + other.n, self.top1_wrong + other.top1_wrong,
                    self.top5_wrong + other.top5_wrong, self.class_total + other.class_total,
                    self.class_correct + other.class_correct)
        return out

    @property
    def top1_error(self) -> float:
        return self.top1_wrong / self.n if self.n else float("nan")

    @property
    def top5_error(self) -> float:
        return self.top5_wrong / self.n if self.n else float("nan")

    def per_class_accuracy(self) -> torch.Tensor:
        """(classes,) top-1 accuracy per true class; NaN (0/0) for a class with no images."""
        return self.class_correct.float() / self.class_total.float()
