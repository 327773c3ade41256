"""Continual-learning methods, each an Avalanche plugin plus a thin strategy."""

from .base import AdapterTemplate, CurrentClassMask, freeze_except, rebuild_optimizer
from .sulora import CapacityError, SuLoRA, SuLoRAPlugin, check_capacity

__all__ = [
    "AdapterTemplate",
    "CapacityError",
    "CurrentClassMask",
    "SuLoRA",
    "SuLoRAPlugin",
    "check_capacity",
    "freeze_except",
    "rebuild_optimizer",
]
