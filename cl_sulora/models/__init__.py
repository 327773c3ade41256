"""Models: feature backbones (timm vision transformers, Hugging Face text encoders) and the
continual classifier with the head of each protocol."""

from .backbones import Backbone, HFEncoder, build_backbone
from .heads import PROTOCOLS, ContinualClassifier, grow_head, head_structure, make_head

__all__ = ["PROTOCOLS", "Backbone", "ContinualClassifier", "HFEncoder", "build_backbone",
           "grow_head", "head_structure", "make_head"]
