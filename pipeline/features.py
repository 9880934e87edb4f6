"""Transfer features (the paper's appendix B), in plain torch: the image descriptor of one or more nets.

Per net and test scale Q: the net applied densely (``model.to_dense``) to the whole image rescaled to Q,
its FC7 map after the ReLU (4096 x width channels) averaged spatially ("global average pooling"), then
averaged with the horizontally flipped image's. Over a net's scales the descriptors are averaged or
stacked (concatenated; appendix B: stacking "allows a subsequent classifier to learn how to optimally
combine image statistics over a range of scales", at the cost of a larger descriptor). Each net's
descriptor is L2-normalised; several nets (D and E) are stacked, and the stack is L2-normalised again.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

import model
from pipeline import scoring
from pipeline.batch import Batch
from pipeline.evaluate import checked_passes, flip_stack, forward_chunks, same_shape_batches

AGGREGATES = ("mean", "stack")


def fc7_width(net: nn.Module) -> int:
    return net.classifier[3].out_features


@torch.no_grad()
def penultimate_features(net: nn.Module, images: Sequence[torch.Tensor] | torch.Tensor, flip: bool = True,
                         max_batch: int = 64, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense FC7 features: the 4096-D (4096 x width) map after FC7's ReLU, spatially averaged, averaged
    with the flipped image. (N, fc_width), not normalised (aggregate over scales first, then L2)."""
    dense = model.to_dense(net)
    drop7 = net.classifier[5]  # DenseVGG calls this module on the FC7 map: hook it, no copied forward
    maps: list[torch.Tensor] = []
    handle = drop7.register_forward_hook(lambda mod, inp, out: maps.append(out.float().mean(dim=(2, 3))))
    n = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
    out = torch.zeros(n, fc7_width(net))
    try:
        for idx, x in same_shape_batches(images):
            maps.clear()
            forward_chunks(dense, flip_stack(x, flip), max_batch, amp_dtype)
            out[idx] = scoring.group_mean(torch.cat(maps), 2 if flip else 1).cpu()
    finally:
        handle.remove()
    return out


def l2_normalise(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm; an all-zero row (every FC7 ReLU dead) stays zero."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def descriptor(per_net: Sequence[torch.Tensor], aggregate: str = "mean") -> torch.Tensor:
    """Appendix B's image descriptor from per-net, per-scale features: ``per_net[i]`` is
    (N, scales_i, D_i). Scales averaged (D_i) or stacked (scales_i x D_i, in scale order), each net's
    descriptor L2-normalised; several nets concatenated and L2-normalised again (equal weight per net)."""
    if aggregate not in AGGREGATES:
        raise ValueError(f"Invalid aggregate {aggregate!r}. Only {', '.join(AGGREGATES)} are supported.")
    nets = [l2_normalise(f.mean(dim=1) if aggregate == "mean" else f.flatten(1)) for f in per_net]
    return nets[0] if len(nets) == 1 else l2_normalise(torch.cat(nets, dim=1))


@torch.no_grad()
def features_share(nets: Sequence[nn.Module], batches_at: Callable[[int], Iterable[Batch]],
                   member_scales: Sequence[Sequence[int]], flip: bool = True, device: torch.device | str = "cpu",
                   max_batch: int = 64, amp_dtype: torch.dtype | None = None,
                   progress: Callable[[int], None] | None = None
                   ) -> tuple[list[str], torch.Tensor, list[torch.Tensor]]:
    """Dense FC7 features of one worker's share: net i at each Q of ``member_scales[i]`` (one decode per
    Q of their union, each image exactly once per pass, as in evaluation). Returns (sorted keys, labels
    (N,), per net (N, len(member_scales[i]), D_i) in that net's scale order), not normalised."""
    device = torch.device(device)
    nets = [n.to(device).eval() for n in nets]
    union = sorted({q for qs in member_scales for q in qs})
    got: list[dict[int, dict[str, torch.Tensor]]] = [{q: {} for q in qs} for qs in member_scales]
    labels: dict[str, int] = {}
    for q, keys, lbl, images in checked_passes(batches_at, union, device):
        labels.update(zip(keys, lbl.tolist()))
        for i, net in enumerate(nets):
            if q in got[i]:
                f = penultimate_features(net, images, flip, max_batch, amp_dtype)
                got[i][q].update(zip(keys, f))
        if progress is not None:
            progress(len(keys))
    order = sorted(labels)
    per_net = []
    for i, qs in enumerate(member_scales):
        if order:
            per_net.append(torch.stack([torch.stack([got[i][q][k] for q in qs]) for k in order]))
        else:
            per_net.append(torch.zeros(0, len(qs), fc7_width(nets[i])))
    return order, torch.tensor([labels[k] for k in order], dtype=torch.long), per_net
