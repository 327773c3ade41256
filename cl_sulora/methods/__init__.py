"""Continual-learning methods, each an Avalanche plugin plus a thin strategy, registered where it
is defined (:mod:`.registry`): SuLoRA, the branch-LoRA baselines (SD-LoRA, InfLoRA, O-LoRA,
Seq/Inc/Joint LoRA), full fine-tuning with Avalanche's Naive, EWC, LwF and Replay, the
adapter-free baseline (a frozen backbone under a trained head), and the closed-form
classifiers on frozen features (SimpleCIL, RanPAC)."""

from .closed_form import RanPAC, RanPACConfig, SimpleCIL
from .frozen import FrozenBackbone, FrozenConfig
from .full_finetuning import (
    EWCBaseline,
    EWCConfig,
    LwFBaseline,
    LwFConfig,
    NaiveBaseline,
    ReplayBaseline,
    ReplayConfig,
)
from .inflora import InfLoRA, InfLoRAConfig, InfLoRAPlugin
from .lora import BranchLoRAPlugin, BranchLoRAStrategy, IncLoRA, JointLoRA, SeqLoRA
from .olora import OLoRA, OLoRAConfig, OLoRAPlugin
from .registry import METHODS, MethodSpec, get_method, register
from .sdlora import SDLoRA, SDLoRAConfig, SDLoRAPlugin
from .sulora import SuLoRA, SuLoRAPlugin, check_capacity

__all__ = [
    "METHODS",
    "BranchLoRAPlugin",
    "BranchLoRAStrategy",
    "EWCBaseline",
    "EWCConfig",
    "FrozenBackbone",
    "FrozenConfig",
    "IncLoRA",
    "InfLoRA",
    "InfLoRAConfig",
    "InfLoRAPlugin",
    "JointLoRA",
    "LwFBaseline",
    "LwFConfig",
    "MethodSpec",
    "NaiveBaseline",
    "OLoRA",
    "OLoRAConfig",
    "OLoRAPlugin",
    "RanPAC",
    "RanPACConfig",
    "ReplayBaseline",
    "ReplayConfig",
    "SDLoRA",
    "SDLoRAConfig",
    "SDLoRAPlugin",
    "SeqLoRA",
    "SimpleCIL",
    "SuLoRA",
    "SuLoRAPlugin",
    "check_capacity",
    "get_method",
    "register",
]
