"""SuLoRA: subspace allocators, SRLoRA importance, fusion policies, and the plugin and strategy
that put them together."""

from .allocators import (
    ALLOCATORS,
    Allocator,
    DataAllocator,
    OrthogonalAllocator,
    PrincipalAllocator,
    build_allocator,
)
from .fusion import (
    FUSION_POLICIES,
    FractionFusion,
    FusionPolicy,
    NeverFusion,
    WhenFullFusion,
    build_fusion_policy,
)
from .plugin import SuLoRA, SuLoRAPlugin, check_capacity

__all__ = [
    "ALLOCATORS",
    "FUSION_POLICIES",
    "Allocator",
    "DataAllocator",
    "FractionFusion",
    "FusionPolicy",
    "NeverFusion",
    "OrthogonalAllocator",
    "PrincipalAllocator",
    "SuLoRA",
    "SuLoRAPlugin",
    "WhenFullFusion",
    "build_allocator",
    "build_fusion_policy",
    "check_capacity",
]
