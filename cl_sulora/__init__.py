"""cl-sulora: continual learning with subspace LoRA adapters for Avalanche.

Areas: :mod:`cl_sulora.adapters` (adapter layers and injection), :mod:`cl_sulora.methods`
(SuLoRA and the baselines), :mod:`cl_sulora.training` (the template and its plugins),
:mod:`cl_sulora.models` (backbones and heads), :mod:`cl_sulora.benchmarks` and
:mod:`cl_sulora.runner` (configs, the experience loop, records, the command line).
"""

from . import _third_party  # noqa: F401 - first: quiets third-party import-time warnings
from .adapters import (
    BranchLoRAConfig,
    BranchLoRALinear,
    SubspaceLoRAConfig,
    SubspaceLoRALinear,
    add_branch_lora,
    add_subspace_lora,
    branch_lora_layers,
    load_subspace_lora,
    merge_adapters,
    merge_and_unload,
    save_subspace_lora,
    subspace_lora_layers,
    unmerge_adapters,
)
from .errors import (
    BackboneError,
    CapacityError,
    CheckpointError,
    CLSuLoRAError,
    ConfigError,
    DataError,
    DivergenceError,
)
from .methods import (
    EWCConfig,
    FrozenBackbone,
    FrozenConfig,
    IncLoRA,
    InfLoRA,
    InfLoRAConfig,
    JointLoRA,
    LwFConfig,
    OLoRA,
    OLoRAConfig,
    RanPAC,
    RanPACConfig,
    ReplayConfig,
    SDLoRA,
    SDLoRAConfig,
    SeqLoRA,
    SimpleCIL,
    SuLoRA,
    SuLoRAPlugin,
)
from .saving import load_model, save_model

__version__ = "0.1.0"

__all__ = [
    "BackboneError",
    "BranchLoRAConfig",
    "BranchLoRALinear",
    "CLSuLoRAError",
    "CapacityError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DivergenceError",
    "EWCConfig",
    "FrozenBackbone",
    "FrozenConfig",
    "IncLoRA",
    "InfLoRA",
    "InfLoRAConfig",
    "JointLoRA",
    "LwFConfig",
    "OLoRA",
    "OLoRAConfig",
    "RanPAC",
    "RanPACConfig",
    "ReplayConfig",
    "SDLoRA",
    "SDLoRAConfig",
    "SeqLoRA",
    "SimpleCIL",
    "SubspaceLoRAConfig",
    "SubspaceLoRALinear",
    "SuLoRA",
    "SuLoRAPlugin",
    "add_branch_lora",
    "add_subspace_lora",
    "branch_lora_layers",
    "load_model",
    "load_subspace_lora",
    "merge_adapters",
    "merge_and_unload",
    "save_model",
    "save_subspace_lora",
    "subspace_lora_layers",
    "unmerge_adapters",
]
