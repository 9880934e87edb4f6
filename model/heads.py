"""Localisation heads (the paper's Appendix A): the last FC layer predicts a box instead of class scores.

SCR (single-class regression) predicts one box shared by all classes, 4 outputs; PCR (per-class
regression) one box per class, 4 x num_classes outputs, class c's box at outputs 4c..4c+3 in the order
(cx, cy, w, h). Only FC8 (``classifier.6``) changes, so every other weight of a classification net
loads into the localisation net unchanged. Imports torch only.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from model.vgg import HEAD_KEYS, HEADS as ALL_HEADS, VGG

HEADS = ("scr", "pcr")
BOX_PARAMS = 4   # (cx, cy, w, h)


def check_head(head: str) -> None:
    if head not in ALL_HEADS:
        raise ValueError(f"Invalid head {head!r}. Only {', '.join(ALL_HEADS)} are supported.")


def with_head(net: VGG, head: str) -> VGG:
    """``net`` (built with a class-score FC8) with ``head``'s FC8. A box head draws its own FC8 after
    the rest, so a classification net's random numbers, and so its initial weights, do not depend on
    whether localisation exists."""
    check_head(head)
    return net if head == "classes" else to_localisation(net, head)


def box_outputs(head: str, num_classes: int) -> int:
    """FC8's width for a head: 4 for SCR, 4 x num_classes for PCR."""
    if head not in HEADS:
        raise ValueError(f"Invalid localisation head {head!r}. Only {', '.join(HEADS)} are supported.")
    return BOX_PARAMS if head == "scr" else BOX_PARAMS * num_classes


def to_localisation(net: VGG, head: str, num_classes: int | None = None) -> VGG:
    """Replace ``net``'s FC8 with a freshly initialised box regressor, in place; returns ``net``.

    ``num_classes`` (PCR only) defaults to the classification head's width. The new layer is drawn
    from N(0, 0.01) with zero bias, the paper's scheme: "the last layer is initialised randomly".
    """
    old = net.classifier[6]
    outputs = box_outputs(head, old.out_features if num_classes is None else num_classes)
    new = nn.Linear(old.in_features, outputs).to(device=old.weight.device, dtype=old.weight.dtype)
    nn.init.normal_(new.weight, 0.0, 0.01)
    nn.init.zeros_(new.bias)
    net.classifier[6] = new
    return net


def start_at_box(net: VGG, box: torch.Tensor) -> None:
    """Set the box head's FC8 bias to ``box`` (cx, cy, w, h) for every class it predicts, so that the
    fresh net starts at that box (the training set's mean) instead of at 0: its first steps then
    correct positions rather than drive every output up by half the crop. assumption: not the
    paper's (it starts the whole last layer at random); ``model.box_bias``."""
    fc8 = net.classifier[6]
    if fc8.out_features % BOX_PARAMS or box.shape != (BOX_PARAMS,):
        raise ValueError(f"a box head has 4 x k outputs and a box 4 values, not {fc8.out_features} and {tuple(box.shape)}")
    with torch.no_grad():
        fc8.bias.copy_(box.to(fc8.bias).repeat(fc8.out_features // BOX_PARAMS))


def init_from_classification(net: VGG, state: dict[str, torch.Tensor]) -> list[str]:
    """Load a classification net's ``state_dict`` into localisation ``net``, every weight but FC8.

    Returns the keys copied. Anything else missing or unexpected (another model, another width) is an
    error naming the keys, so a silent partial load cannot happen.
    """
    body = {k: v for k, v in state.items() if k not in HEAD_KEYS}
    result = net.load_state_dict(body, strict=False)
    missing = sorted(set(result.missing_keys) - set(HEAD_KEYS))
    if missing or result.unexpected_keys:
        raise ValueError(f"classification weights do not fit the localisation net: missing {missing}, "
                         f"unexpected {sorted(result.unexpected_keys)}")
    return sorted(body)


def select_class_boxes(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """PCR outputs (N, 4 x C) and classes (N,) -> each sample's class box (N, 4)."""
    n = pred.shape[0]
    per_class = pred.reshape(n, -1, BOX_PARAMS)                        # (N, C, 4)
    return per_class[torch.arange(n, device=pred.device), labels.long()]


def box_loss(pred: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean box loss: the mean over samples and the 4 box parameters of the squared error.

    ``pred`` (N, 4) for SCR, or (N, 4 x C) for PCR with ``labels`` (N,) the ground-truth classes (only
    their 4 outputs count); ``target`` (N, 4) in the same units as the net's outputs. Caffe's
    EuclideanLoss, 1/(2N) sum ||.||^2, is 2x this value; training uses it on the assumption that the
    paper's Caffe-based code did (the paper says only "Euclidean loss"; docs/localisation.md).
    """
    if pred.shape[-1] != BOX_PARAMS:
        if labels is None:
            raise ValueError(f"PCR outputs ({pred.shape[-1]} wide) need the ground-truth labels")
        pred = select_class_boxes(pred, labels)
    if pred.shape != target.shape:
        raise ValueError(f"box shapes disagree: predicted {tuple(pred.shape)}, target {tuple(target.shape)}")
    return F.mse_loss(pred, target)
