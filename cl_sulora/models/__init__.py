"""Models: feature backbones (timm vision transformers, Hugging Face text encoders, optionally
followed by RanPAC's random features) and the continual classifier with the head of each
protocol."""

from .backbones import Backbone, HFEncoder, RandomFeatures, build_backbone, with_random_features
from .heads import (
    PROTOCOLS,
    ContinualClassifier,
    SolvedHead,
    grow_head,
    head_structure,
    make_head,
    split_head,
)

__all__ = ["PROTOCOLS", "Backbone", "ContinualClassifier", "HFEncoder", "RandomFeatures",
           "SolvedHead", "build_backbone", "grow_head", "head_structure", "make_head",
           "split_head", "with_random_features"]
