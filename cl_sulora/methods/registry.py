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
register(MethodSpec(
    name="sdlora",
    strategy=SDLoRA,
    config_cls=SDLoRAConfig,
    paper="SD-LoRA (Wu et al., ICLR 2025)",
    trains="the new LoRA pair (A_t, B_t) and every magnitude m_1..m_t, and the head",
    stores="one rank-10 pair and a magnitude per experience (earlier directions frozen)",
))
register(MethodSpec(
    name="sdlora-rr",
    strategy=SDLoRA,
    config_cls=SDLoRAConfig,
    paper="SD-LoRA-RR (Wu et al., ICLR 2025)",
    trains="as sdlora",
    stores="as sdlora, with ranks 10, then 8 from the 4th experience, 6 from the 8th",
    defaults={"rank_schedule": {3: 8, 7: 6}},
))
register(MethodSpec(
    name="sdlora-kd",
    strategy=SDLoRA,
    config_cls=SDLoRAConfig,
    paper="SD-LoRA-KD (Wu et al., ICLR 2025)",
    trains="as sdlora",
    stores="as sdlora, minus the new directions fitted by earlier ones (residual <= 9e-4)",
    defaults={"kd_threshold": KD_THRESHOLD},
))
register(MethodSpec(
    name="inflora",
    strategy=InfLoRA,
    config_cls=InfLoRAConfig,
    paper="InfLoRA (Liang and Li, CVPR 2024)",
    trains="the new branch's B_t and the head; A_t designed from the data and frozen",
    stores="one rank-10 branch per experience, plus a DualGPM input basis per layer",
))
register(MethodSpec(
    name="olora",
    strategy=OLoRA,
    config_cls=OLoRAConfig,
    paper="O-LoRA (Wang et al., Findings of EMNLP 2023)",
    trains="the new LoRA (A_t, B_t) under an orthogonality penalty to earlier A, and the head",
    stores="one rank-8 LoRA per experience",
))
register(MethodSpec(
    name="seqlora",
    strategy=SeqLoRA,
    config_cls=BranchLoRAConfig,
    paper="sequential LoRA fine-tuning (lower bound)",
    trains="one LoRA (A, B) through the whole stream, and the head",
    stores="one LoRA",
))
register(MethodSpec(
    name="inclora",
    strategy=IncLoRA,
    config_cls=BranchLoRAConfig,
    paper="incremental LoRA (a new LoRA per experience, no constraint)",
    trains="the new LoRA (A_t, B_t) and the head",
    stores="one LoRA per experience",
))
register(MethodSpec(
    name="jointlora",
    strategy=JointLoRA,
    config_cls=BranchLoRAConfig,
    paper="joint LoRA training on the whole stream (upper bound)",
    trains="one LoRA and the head, once, on every experience's data",
    stores="one LoRA",
))
register(MethodSpec(
    name="naive",
    strategy=NaiveBaseline,
    config_cls=None,
    paper="naive fine-tuning (Avalanche's Naive)",
    trains="the whole backbone and the head",
    stores="nothing",
))
register(MethodSpec(
    name="ewc",
    strategy=EWCBaseline,
    config_cls=EWCConfig,
    paper="EWC (Kirkpatrick et al., PNAS 2017), Avalanche's EWCPlugin",
    trains="the whole backbone and the head, under the EWC penalty",
    stores="parameters and Fisher importances per experience (separate mode)",
))
register(MethodSpec(
    name="lwf",
    strategy=LwFBaseline,
    config_cls=LwFConfig,
    paper="LwF (Li and Hoiem, TPAMI 2017), Avalanche's LwFPlugin",
    trains="the whole backbone and the head, with distillation from the previous model",
    stores="a copy of the previous model",
))
register(MethodSpec(
    name="replay",
    strategy=ReplayBaseline,
    config_cls=ReplayConfig,
    paper="experience replay, Avalanche's ReplayPlugin",
    trains="the whole backbone and the head on new data plus the buffer",
    stores="an experience-balanced buffer of mem_size samples",
))
