"""The six VGG configurations of Simonyan & Zisserman, Table 1, from one table and one builder.

Module layout and ``state_dict`` keys follow torchvision's ``models/vgg.py`` (``features``, ``avgpool``,
``classifier.{0,3,6}``), so torchvision's vgg11/13/16/19 checkpoints load into A/B/D/E with strict=True.
"""
from __future__ import annotations

import torch
from torch import nn

# One list per config: an int is a 3x3 conv with that many output channels, (c, 1) a 1x1 conv,
# "L" AlexNet's local response normalisation (after the ReLU, as AlexNet placed it), "M" a 2x2 max-pool.
cfgs: dict[str, list] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "A-LRN": [64, "L", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C": [64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M", 512, 512, (512, 1), "M",
          512, 512, (512, 1), "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"],
}

ALIASES = {"vgg11": "A", "vgg11_lrn": "A-LRN", "vgg13": "B", "vgg16_c": "C", "vgg16": "D", "vgg19": "E"}
FC_WIDTH = 4096
HEAD_KEYS = ("classifier.6.weight", "classifier.6.bias")   # FC8: the one layer sized by the class count
STRIDE = 32  # five 2x2 pools
HEADS = ("classes", "scr", "pcr")  # what FC8 predicts: class scores, or a box (Appendix A, model/heads.py)


class VGG(nn.Module):
    """``features`` (conv stacks) -> ``avgpool`` -> ``classifier`` (FC6, FC7, FC8), as torchvision.

    ``image_size`` is the training crop: FC6 sees a (image_size/32)^2 grid, 7x7 for the paper's 224.
    The adaptive pool is the identity at that size and only matters for other input sizes, as in
    torchvision; dense evaluation (``to_dense``) bypasses it.
    """

    def __init__(self, features: nn.Sequential, num_classes: int, fc_width: int, grid: int,
                 dropout: float = 0.5):
        super().__init__()
        channels = [m.out_channels for m in features if isinstance(m, nn.Conv2d)][-1]
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((grid, grid))
        self.classifier = nn.Sequential(
            nn.Linear(channels * grid * grid, fc_width), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(fc_width, fc_width), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(fc_width, num_classes),
        )
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, classes)
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def make_layers(cfg: list, width: float = 1.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif v == "L":
            # AlexNet's LRN with the parameters of its paper (size n 5, alpha 1e-4, beta 0.75, k 2),
            # which VGG's A-LRN names. torch computes b = a / (k + alpha/n * sum a^2)^beta: alpha is
            # divided by n, as in Caffe's LRN layer (VGG's framework) and Krizhevsky's cuda-convnet
            # (layer.py: scale /= size), while AlexNet's paper writes alpha without /n. So alpha=1e-4
            # here is the frameworks' reading; the paper's formula taken literally is alpha=5e-4.
            # docs/models.md.
            layers.append(nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0))
        else:
            channels, kernel = v if isinstance(v, tuple) else (v, 3)
            out_channels = scaled(channels, width)
            layers += [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2),
                       nn.ReLU(inplace=True)]
            in_channels = out_channels
    return nn.Sequential(*layers)


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def canonical_name(name: str) -> str:
    """"vgg16", "D", "d" -> "D"; an unknown name is an error listing the known ones."""
    by_lower = {k.lower(): k for k in cfgs} | {k.lower(): v for k, v in ALIASES.items()}
    try:
        return by_lower[name.lower()]
    except KeyError:
        known = ", ".join(list(cfgs) + list(ALIASES))
        raise ValueError(f"Unknown VGG model {name!r}. Known: {known}") from None


def list_models() -> list[str]:
    return list(cfgs)
