"""The one way a VGG is made: its layers (``model.vgg``), their initialisation (``model.init``) and
the FC8 of its head (``model.heads``). Imports torch only."""
from __future__ import annotations

from model.heads import check_head, with_head
from model.init import init_weights
from model.vgg import FC_WIDTH, STRIDE, VGG, canonical_name, cfgs, make_layers, scaled


def build(name: str, num_classes: int = 1000, width: float = 1.0, init: str = "paper",
          image_size: int = 224, dropout: float = 0.5, head: str = "classes") -> VGG:
    """Build a VGG by name ("A", "A-LRN", "B", "C", "D", "E" or vgg11, vgg11_lrn, vgg13, vgg16_c,
    vgg16, vgg19). ``width`` scales every channel count, conv and FC, for CPU-sized runs. ``head``:
    "classes" (FC8 scores ``num_classes`` classes), or a localisation head, "scr" (FC8 predicts one
    box, 4 outputs) or "pcr" (one box per class, 4 x ``num_classes``), see ``model.heads``."""
    if image_size % STRIDE or image_size < STRIDE:
        raise ValueError(f"image_size must be a positive multiple of {STRIDE}, got {image_size}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    check_head(head)
    net = VGG(make_layers(cfgs[canonical_name(name)], width), num_classes,
              scaled(FC_WIDTH, width), image_size // STRIDE, dropout)
    init_weights(net, init)
    return with_head(net, head)
