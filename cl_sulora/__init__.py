"""cl-sulora: continual learning with subspace LoRA adapters for Avalanche."""

from .config import SubspaceLoRAConfig
from .injection import (
    add_subspace_lora,
    merge_subspace_lora,
    subspace_lora_layers,
    unmerge_subspace_lora,
)
from .layer import SubspaceLoRALinear
from .methods import SuLoRA, SuLoRAPlugin
from .serialization import load_subspace_lora, save_subspace_lora

__version__ = "0.1.0"

__all__ = [
    "SubspaceLoRAConfig",
    "SubspaceLoRALinear",
    "SuLoRA",
    "SuLoRAPlugin",
    "add_subspace_lora",
    "load_subspace_lora",
    "merge_subspace_lora",
    "save_subspace_lora",
    "subspace_lora_layers",
    "unmerge_subspace_lora",
]
