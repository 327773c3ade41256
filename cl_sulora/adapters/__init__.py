"""Adapter layers and putting them into models: the frozen-``A`` subspace LoRA (slots, their
batched lifecycle) and the branch LoRA of the baselines, their configs, injection, merging and
saving."""

from .base import AdaptedLinear
from .branch_layer import BranchLoRALinear, LoRABranch
from .config import DEFAULT_TARGETS, BranchLoRAConfig, SubspaceLoRAConfig
from .injection import (
    adapter_config,
    adapter_layers,
    add_branch_lora,
    add_subspace_lora,
    branch_lora_layers,
    merge_adapters,
    merge_and_unload,
    subspace_lora_layers,
    unmerge_adapters,
)
from .serialization import load_subspace_lora, save_subspace_lora
from .slot_table import FREE, SlotTable
from .slots import deferred_refresh
from .subspace_layer import SubspaceLoRALinear

__all__ = [
    "DEFAULT_TARGETS",
    "FREE",
    "AdaptedLinear",
    "BranchLoRAConfig",
    "BranchLoRALinear",
    "LoRABranch",
    "SlotTable",
    "SubspaceLoRAConfig",
    "SubspaceLoRALinear",
    "adapter_config",
    "adapter_layers",
    "add_branch_lora",
    "add_subspace_lora",
    "branch_lora_layers",
    "deferred_refresh",
    "load_subspace_lora",
    "merge_adapters",
    "merge_and_unload",
    "save_subspace_lora",
    "subspace_lora_layers",
    "unmerge_adapters",
]
