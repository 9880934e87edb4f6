"""VGG nets A, A-LRN, B, C, D, E (Simonyan & Zisserman, Table 1). Imports torch only."""
from model.dense import DenseVGG, to_dense
from model.init import INITS, init_from_a, init_weights
from model.vgg import ALIASES, HEAD_KEYS, VGG, build, canonical_name, cfgs, list_models

__all__ = ["ALIASES", "HEAD_KEYS", "INITS", "VGG", "DenseVGG", "build", "canonical_name", "cfgs", "init_from_a",
           "init_weights", "list_models", "to_dense"]
