"""The fully convolutional form of a VGG for dense evaluation (the paper, section 3.2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.vgg import VGG


class DenseVGG(nn.Module):
    """FC6 -> (grid x grid) conv, FC7 and FC8 -> 1x1 convs, computed from the *same* parameters.

    The conv kernels are views of the Linear weights, taken at every forward, so the dense net never
    drifts from the net it was made from and gradients reach the original parameters.
    """

    def __init__(self, net: VGG):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, classes, h, w)
        x = self.net.features(x)
        fc6, fc7, fc8 = (self.net.classifier[i] for i in (0, 3, 6))
        drop6, drop7 = self.net.classifier[2], self.net.classifier[5]
        g, c = self.net.grid, x.shape[1]
        # torch.flatten of (C, g, g) is channel-major, so a Linear row reshapes to a (C, g, g) kernel.
        x = drop6(F.relu(F.conv2d(x, fc6.weight.view(-1, c, g, g), fc6.bias)))
        x = drop7(F.relu(F.conv2d(x, fc7.weight[:, :, None, None], fc7.bias)))
        return F.conv2d(x, fc8.weight[:, :, None, None], fc8.bias)


def to_dense(net: VGG) -> DenseVGG:
    """Fully convolutional view of ``net``: on an input of the training crop size its (N, classes,
    1, 1) output equals ``net``'s logits; on a larger input it is the class-score map (N, classes,
    h, w) with h = (H - crop)/32 + 1."""
    return DenseVGG(net)
