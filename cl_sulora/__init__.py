"""cl-sulora: continual learning with subspace LoRA adapters for Avalanche."""

from .branch_layer import (
    BranchLoRAConfig,
    BranchLoRALinear,
    add_branch_lora,
    branch_lora_layers,
)
from .config import SubspaceLoRAConfig
from .injection import (
    add_subspace_lora,
    merge_subspace_lora,
    subspace_lora_layers,
    unmerge_subspace_lora,
)
from .layer import SubspaceLoRALinear
from .methods import (
    IncLoRA,
    InfLoRA,
    JointLoRA,
    OLoRA,
    SDLoRA,
    SeqLoRA,
    SuLoRA,
    SuLoRAPlugin,
)
from .serialization import load_subspace_lora, save_subspace_lora

__version__ = "0.1.0"

__all__ = [
    "BranchLoRAConfig",
    "BranchLoRALinear",
    "IncLoRA",
    "InfLoRA",
    "JointLoRA",
    "OLoRA",
    "SDLoRA",
    "SeqLoRA",
    "SubspaceLoRAConfig",
    "SubspaceLoRALinear",
    "SuLoRA",
    "SuLoRAPlugin",
    "add_branch_lora",
    "add_subspace_lora",
    "branch_lora_layers",
    "load_subspace_lora",
    "merge_subspace_lora",
    "save_subspace_lora",
    "subspace_lora_layers",
    "unmerge_subspace_lora",
]
