"""VGG nets A, A-LRN, B, C, D, E (Simonyan & Zisserman, Table 1), with the classification head or the
localisation heads of Appendix A (SCR, PCR). Imports torch only."""
from model.build import build
from model.dense import DenseVGG, to_dense
from model.heads import box_loss, init_from_classification, select_class_boxes, start_at_box, to_localisation
from model.init import INITS, init_from_a, init_weights
from model.vgg import ALIASES, HEAD_KEYS, HEADS, VGG, canonical_name, cfgs, list_models

__all__ = ["ALIASES", "HEADS", "HEAD_KEYS", "INITS", "VGG", "DenseVGG", "box_loss", "build", "canonical_name", "cfgs",
           "init_from_a", "init_from_classification", "init_weights", "list_models", "select_class_boxes", "start_at_box",
           "to_dense", "to_localisation"]
