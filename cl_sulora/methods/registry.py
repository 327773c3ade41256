"""Registry of continual-learning methods: preset name -> strategy class and method config."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..branch_layer import BranchLoRAConfig
from ..config import SubspaceLoRAConfig
from .avalanche_baselines import (
    EWCBaseline,
    EWCConfig,
    LwFBaseline,
    LwFConfig,
    NaiveBaseline,
    ReplayBaseline,
    ReplayConfig,
)
from .inflora import InfLoRA, InfLoRAConfig
from .lora_baselines import IncLoRA, JointLoRA, SeqLoRA
from .olora import OLoRA, OLoRAConfig
from .sdlora import KD_THRESHOLD, SDLoRA, SDLoRAConfig
from .sulora import SuLoRA


@dataclass(frozen=True)
class MethodSpec:
    """A method the runner can build.

    Args:
        name: preset name (``strategies/<name>.yaml``).
        strategy: the Avalanche strategy class (keyword-only constructor taking ``model``,
            ``optimizer``, ``config``, ``train_mb_size``, ``train_epochs``, ``eval_mb_size``,
            ``device``, ``evaluator``, ``plugins``).
        config_cls: the method's config class (a pydantic dataclass rejecting unknown keys), or
            ``None`` for methods without one.
        paper: the source paper.
        trains: what is trained per experience.
        stores: what is stored per experience.
        defaults: config values that make this preset differ from ``config_cls()``.
    """

    name: str
    strategy: type
    config_cls: type | None
    paper: str
    trains: str
    stores: str
    defaults: dict = field(default_factory=dict)


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


register(MethodSpec(
    name="sulora",
    strategy=SuLoRA,
    config_cls=SubspaceLoRAConfig,
    paper="SuLoRA (Findings of ACL 2025) + SRLoRA (arXiv 2505.12433), combined here",
    trains="the new experience's slot B (rank columns) and the head; A frozen",
    stores="rank rows of A and columns of B per live slot; fused pairs live in W0",
))
register(MethodSpec(
    name="sulora-nofusion",
    strategy=SuLoRA,
    config_cls=SubspaceLoRAConfig,
    paper="ablation of SuLoRA",
    trains="as sulora",
    stores="as sulora, never fused (one slot per experience)",
    defaults={"fusion": "never"},
))
