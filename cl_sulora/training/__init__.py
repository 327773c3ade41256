"""Training infrastructure every method shares: the Avalanche template, its plugins (class mask,
divergence guard, schedule, precision, augmentation, progress, timing), classifier alignment,
data loading and data-parallel training."""

from .alignment import AlignmentConfig, ClassifierAlignment
from .plugins import (
    TF32,
    Autocast,
    BatchAugment,
    CurrentClassMask,
    DivergenceGuard,
    EpochTimer,
    LRSchedule,
    Progress,
)
from .template import AdapterTemplate, freeze_except, reset_optimizer, task_label

__all__ = [
    "AdapterTemplate",
    "AlignmentConfig",
    "Autocast",
    "BatchAugment",
    "ClassifierAlignment",
    "CurrentClassMask",
    "EpochTimer",
    "LRSchedule",
    "DivergenceGuard",
    "Progress",
    "TF32",
    "freeze_except",
    "reset_optimizer",
    "task_label",
]
