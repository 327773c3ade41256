"""Continual-learning methods, each an Avalanche plugin plus a thin strategy."""

from .avalanche_baselines import (
    EWCBaseline,
    EWCConfig,
    LwFBaseline,
    LwFConfig,
    NaiveBaseline,
    ReplayBaseline,
    ReplayConfig,
)
from .base import AdapterTemplate, CurrentClassMask, freeze_except, rebuild_optimizer
from .inflora import InfLoRA, InfLoRAConfig, InfLoRAPlugin
from .lora_baselines import BranchLoRAPlugin, BranchLoRAStrategy, IncLoRA, JointLoRA, SeqLoRA
from .olora import OLoRA, OLoRAConfig, OLoRAPlugin
from .sdlora import SDLoRA, SDLoRAConfig, SDLoRAPlugin
from .sulora import CapacityError, SuLoRA, SuLoRAPlugin, check_capacity

__all__ = [
    "AdapterTemplate",
    "BranchLoRAPlugin",
    "BranchLoRAStrategy",
    "CapacityError",
    "CurrentClassMask",
    "EWCBaseline",
    "EWCConfig",
    "IncLoRA",
    "InfLoRA",
    "InfLoRAConfig",
    "InfLoRAPlugin",
    "JointLoRA",
    "LwFBaseline",
    "LwFConfig",
    "NaiveBaseline",
    "OLoRA",
    "OLoRAConfig",
    "OLoRAPlugin",
    "ReplayBaseline",
    "ReplayConfig",
    "SDLoRA",
    "SDLoRAConfig",
    "SDLoRAPlugin",
    "SeqLoRA",
    "SuLoRA",
    "SuLoRAPlugin",
    "check_capacity",
    "freeze_except",
    "rebuild_optimizer",
]
