"""What every loader yields, training or evaluation: one type, each field of one type."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    """``images``: (N, C, H, W) on the loader's device (channels_last strides when layout is NHWC);
    multicrop: (N, 50, C, crop, crop). ``labels``: (N,) int64 on the same device. ``keys``: N str.
    ``boxes`` (a ``TrainLoader`` built with ``boxes=True``, else None): (N, 4) float32 target
    (cx, cy, w, h) in crop units on the device. ``gt_boxes`` (an ``EvalLoader`` built with
    ``boxes=True``, else empty): per image its (G, 4) float32 CPU ground-truth corners in pixels of the
    yielded image (``pipeline.box_augment``)."""
    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    boxes: torch.Tensor | None = None
    gt_boxes: tuple[torch.Tensor, ...] = ()
