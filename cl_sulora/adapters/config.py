"""Configurations of the adapters: the subspace LoRA (with SuLoRA's continual-learning policy)
and the branch LoRA that the baselines build on."""

from __future__ import annotations

import math
from dataclasses import asdict, field
from typing import Literal

from pydantic import ConfigDict, model_validator
from pydantic.dataclasses import dataclass

#: Target patterns used when ``target_modules`` is not given: timm ViT's fused ``attn.qkv`` and
#: Hugging Face BERT-style ``query``/``value`` projections.
DEFAULT_TARGETS = ("attn.qkv", "attention.self.query", "attention.self.value")

STRICT = ConfigDict(extra="forbid", validate_assignment=True)


def config_dataclass(cls: type) -> type:
    """``cls`` as a strict pydantic dataclass (unknown fields refused, every assignment
    validated) whose refused assignments are undone. pydantic sets an assigned field before it
    runs the model's ``after`` checks, so without the undo a refused value would stay in the
    config and every later assignment, copy or save of it would fail or carry it on."""
    cls = dataclass(config=STRICT)(cls)
    validated_setattr = cls.__setattr__

    def __setattr__(self, name: str, value) -> None:
        missing = object()
        before = self.__dict__.get(name, missing)
        try:
            validated_setattr(self, name, value)
        except ValueError:
            if before is not missing:
                object.__setattr__(self, name, before)
            raise

    cls.__setattr__ = __setattr__
    return cls


class AdapterTargets:
    """What LoRA configs with ``target_modules``, ``rank`` and ``alpha`` fields derive alike."""

    target_modules: list[str] | None
    rank: int
    alpha: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def targets(self) -> list[str]:
        return list(self.target_modules) if self.target_modules else list(DEFAULT_TARGETS)

    def to_dict(self) -> dict:
        return asdict(self)


@config_dataclass
class SubspaceLoRAConfig(AdapterTargets):
    """Frozen-``A`` LoRA whose rank space is split into per-experience slots.

    Each target ``nn.Linear`` gets ``num_slots * rank`` orthonormal, frozen rows of ``A``; every new
    experience takes ``rank`` free rows (a slot) and trains only that slot's ``B``.

    Args:
        target_modules: module-name patterns to adapt. A pattern matches a module whose dotted name
            equals it or ends with ``"." + pattern``; a pattern starting with ``re:`` is a regular
            expression matched against the whole name. ``None`` uses :data:`DEFAULT_TARGETS`.
        qkv_parts: for fused ``qkv`` projections, which of q, k and v are adapted.
        rank: rows of ``A`` (and columns of ``B``) per slot, i.e. per experience.
        num_slots: slots per layer; the total rank is ``num_slots * rank``.
        alpha: LoRA scaling numerator; the update is scaled by ``alpha / rank``.
        allocator: how a new slot's rows are chosen: ``orthogonal`` (random directions orthogonal
            to every row in use), ``principal`` (next unused right-singular directions of the
            current weight) or ``data`` (top input directions of the new experience outside the
            input subspace of earlier ones).
        fusion: when low-importance pairs are fused into the frozen weight: ``never``,
            ``when_full`` (before an experience that does not fit) or ``fraction`` (the lowest
            ``fusion_gamma`` of old pairs after every experience; also fuses when full).
        fusion_gamma: fraction of old pairs fused after each experience under ``fraction``.
        fusion_score: what ranks the pairs that fusion folds first (lowest first):
            ``importance`` (SRLoRA's: the importance recorded while the pair trained) or
            ``norm`` (the Frobenius norm of the pair's update, i.e. of its ``B`` column since
            ``A``'s rows are orthonormal: the pairs that change the layer least go first).
        importance_beta1: EMA factor of the sensitivity ``|w * grad|`` (AdaLoRA's beta1).
        importance_beta2: EMA factor of the uncertainty ``|I - I_ema|`` (AdaLoRA's beta2).
        recompose_every: SRLoRA's intra-experience recomposition period in optimizer steps
            (0 disables it).
        recompose_gamma: fraction of the training slot's pairs recomposed each period.
        data_energy: energy threshold of the per-layer input basis kept by the ``data`` allocator.
        data_max_samples: inputs (samples, not tokens) from which the ``data`` allocator
            estimates an experience's input covariance: the forward passes of its first
            ``ceil(data_max_samples / batch_size)`` training batches, after which the slot's
            rows are set (zero until then); the covariance is kept for the basis update after
            training.
        data_keep_slot_rows: the ``data`` allocator also adds each experience's slot rows to the
            kept input basis, so no later slot is given a direction of an earlier slot once
            fusion has freed it (without it only the rows in use are excluded, and a slot's
            rows beyond what the energy rule kept may be handed out again after their fusion).
            Costs up to ``rank`` more basis rows per experience.
        data_gain_limit: the largest gain on a new slot's update under the ``data`` allocator
            (1, the default: no gain). The slot's ``B`` trains as ``g * B'`` with
            ``g = min(data_gain_limit, sqrt(E_top / E_slot))``: ``E_slot`` is the experience's
            input energy along the slot's rows, ``E_top`` the most any ``rank`` rows could
            hold. Rows outside earlier experiences' input subspace may see a few percent of a
            new experience's energy, so under Adam(W) (whose step ignores the gradient's scale)
            their slot moves the layer's output far less per step than a slot on the top
            directions; the gain evens that out. The gain is folded into ``B`` when the slot
            ends.
        data_centred_rows: the ``data`` allocator picks each new slot's rows (and sets its
            gain) from the experience's centred input covariance ``E[x x^T] - E[x] E[x]^T``
            instead of ``E[x x^T]``, within the same span outside the kept basis; the basis
            still grows from ``E[x x^T]``. The top direction of ``E[x x^T]`` lies near the
            inputs' mean, which inputs of every experience share: centred, a slot follows its
            experience's spread, and the mean direction stays in the basis, out of every
            later slot's reach.
        slot_magnitudes: also train, in every experience, one scale per earlier slot and layer
            (SD-LoRA's learned magnitudes of frozen directions), folded into those slots' ``B``
            when the experience ends: the directions stay fixed, their weights adapt.
        trainable_modules: module-name components trained alongside the slot (the head).
        seed: seed of the random directions of the ``orthogonal`` allocator.
    """

    target_modules: list[str] | None = None
    qkv_parts: list[Literal["q", "k", "v"]] = field(default_factory=lambda: ["q", "v"])
    rank: int = 4
    num_slots: int = 10
    alpha: float = 1.0
    allocator: Literal["orthogonal", "principal", "data"] = "orthogonal"
    fusion: Literal["never", "when_full", "fraction"] = "when_full"
    fusion_gamma: float = 0.25
    fusion_score: Literal["importance", "norm"] = "importance"
    importance_beta1: float = 0.85
    importance_beta2: float = 0.85
    recompose_every: int = 0
    recompose_gamma: float = 0.25
    data_energy: float = 0.95
    data_max_samples: int = 256
    data_keep_slot_rows: bool = False
    data_gain_limit: float = 1.0
    data_centred_rows: bool = False
    slot_magnitudes: bool = False
    trainable_modules: list[str] = field(default_factory=lambda: ["head", "classifier"])
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SubspaceLoRAConfig:
        _positive(rank=self.rank, num_slots=self.num_slots, data_max_samples=self.data_max_samples)
        _finite(alpha=self.alpha)
        if self.recompose_every < 0:
            raise ValueError("recompose_every must be >= 0 (0 disables recomposition)")
        for name in ("fusion_gamma", "recompose_gamma", "data_energy"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        for name in ("importance_beta1", "importance_beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.data_gain_limit < 1.0:
            raise ValueError(f"data_gain_limit must be >= 1 (1: no gain), got "
                             f"{self.data_gain_limit}")
        data_only = {  # field: (whether it is set, what it needs of the allocator, its off value)
            "data_keep_slot_rows": (self.data_keep_slot_rows, "the kept input basis", "false"),
            "data_gain_limit": (self.data_gain_limit > 1.0,
                                "the gain comes from its input statistics", "at 1"),
            "data_centred_rows": (self.data_centred_rows, "the rows come from its input "
                                  "statistics", "false"),
        }
        for name, (used, why, off) in data_only.items():
            if used and self.allocator != "data":
                raise ValueError(f"{name} applies to allocator='data' only ({why}), not "
                                 f"{self.allocator!r}: set allocator='data' or leave {name} {off}")
        check_targets(self.target_modules, self.qkv_parts)
        return self

    @property
    def total_rank(self) -> int:
        return self.rank * self.num_slots


def check_targets(target_modules: list[str] | None, qkv_parts: list[str]) -> None:
    """Reject an empty ``qkv_parts`` or an empty (not ``None``) ``target_modules``."""
    if not qkv_parts:
        raise ValueError("qkv_parts must name at least one of 'q', 'k', 'v'")
    if target_modules is not None and not target_modules:
        raise ValueError("target_modules is empty: give module-name patterns or None")


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _finite(**values: float) -> None:
    for name, value in values.items():
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")


@config_dataclass
class BranchLoRAConfig(AdapterTargets):
    """Where branch LoRA goes and how large each experience's branch is.

    Args:
        target_modules: module-name patterns to adapt (see :class:`SubspaceLoRAConfig`);
            ``None`` uses :data:`DEFAULT_TARGETS`.
        qkv_parts: for fused ``qkv`` projections, which of q, k and v are adapted.
        rank: rank of each new branch.
        alpha: LoRA scaling numerator; a branch's update is scaled by ``alpha / rank``.
        dropout: LoRA dropout on the branches' input while training.
        trainable_modules: module-name components trained alongside the adapter (the head).
        seed: seed of the random initialisation of new branches.
    """

    target_modules: list[str] | None = None
    qkv_parts: list[Literal["q", "k", "v"]] = field(default_factory=lambda: ["q", "v"])
    rank: int = 10
    alpha: float = 10.0
    dropout: float = 0.0
    trainable_modules: list[str] = field(default_factory=lambda: ["head", "classifier"])
    seed: int = 0

    @model_validator(mode="after")
    def _check_branch(self) -> BranchLoRAConfig:
        _positive(rank=self.rank)
        _finite(alpha=self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        check_targets(self.target_modules, self.qkv_parts)
        return self
