"""Initialisation schemes: the paper's N(0, 0.01), Glorot, torchvision's Kaiming, and "from A"."""
from __future__ import annotations

import torch
from torch import nn

INITS = ("paper", "glorot", "kaiming")


def init_weights(net: nn.Module, scheme: str = "paper") -> None:
    """Biases are zero in every scheme, as in the paper."""
    if scheme not in INITS:
        raise ValueError(f"Invalid init {scheme!r}. Only {', '.join(INITS)} are supported.")
    for m in net.modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        if scheme == "paper":
            # "variance 10^-2" in the text; Caffe's std 0.01 is the usual reading.
            nn.init.normal_(m.weight, 0.0, 0.01)
        elif scheme == "glorot":
            nn.init.xavier_uniform_(m.weight)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        else:
            nn.init.normal_(m.weight, 0.0, 0.01)
        nn.init.zeros_(m.bias)


def conv_positions(features: nn.Sequential) -> list[tuple[tuple[int, int], str]]:
    """((block, index within block), state_dict prefix) of every conv, in order."""
    out, block, idx = [], 0, 0
    for i, m in enumerate(features):
        if isinstance(m, nn.Conv2d):
            out.append(((block, idx), f"features.{i}"))
            idx += 1
        elif isinstance(m, nn.MaxPool2d):
            block, idx = block + 1, 0
    return out


def cfg_conv_positions(cfg: list) -> list[tuple[tuple[int, int], str]]:
    """The same as ``conv_positions`` read off a cfg list, without building the layers."""
    out, block, idx, i = [], 0, 0, 0
    for v in cfg:
        if v == "M":
            block, idx, i = block + 1, 0, i + 1
        elif v == "L":
            i += 1
        else:
            out.append(((block, idx), f"features.{i}"))
            idx, i = idx + 1, i + 2  # conv + its ReLU
    return out


def init_from_a(net: nn.Module, a_state: dict[str, torch.Tensor], head: bool = True) -> list[str]:
    """Copy net A's first four conv layers and its three FC layers into ``net`` (the paper, 3.1).

    A's convs are matched by position within their block: A's first four convs are block 1 conv 1,
    block 2 conv 1, block 3 convs 1 and 2, and land on the same positions of B, C, D or E, the only
    placement where their shapes fit. Returns the state_dict keys copied; a missing key or a shape
    mismatch (another width, another class count) is an error naming the layer. ``head`` False
    leaves FC8 as it is (a new head for another class count).
    """
    from model.vgg import cfgs

    target = dict(conv_positions(net.features))
    pairs = []
    for pos, src in cfg_conv_positions(cfgs["A"])[:4]:
        if pos not in target:
            raise ValueError(f"target net has no conv at block {pos[0] + 1}, position {pos[1] + 1} "
                             f"for A's {src}")
        pairs.append((src, target[pos]))
    pairs += [(f"classifier.{i}", f"classifier.{i}") for i in ((0, 3, 6) if head else (0, 3))]

    own = net.state_dict()
    copied = []
    with torch.no_grad():
        for src, dst in pairs:
            for leaf in ("weight", "bias"):
                s, d = f"{src}.{leaf}", f"{dst}.{leaf}"
                if s not in a_state:
                    raise ValueError(f"A's state_dict has no {s!r}: is it a trained config A?")
                if a_state[s].shape != own[d].shape:
                    raise ValueError(f"shape mismatch copying A's {s} {tuple(a_state[s].shape)} "
                                     f"into {d} {tuple(own[d].shape)}: same width and num_classes?")
                own[d].copy_(a_state[s])
                copied.append(d)
    return copied
