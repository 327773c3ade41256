"""Fusion policies: when, and which, frozen rank-1 pairs of a layer are folded into its weight.

SRLoRA fuses the pairs of lowest importance. A policy is consulted twice per experience: before
it (to free the rows its slot needs) and after it; it also says, before any training, whether a
stream of a given length fits. The choices are made on the host, from each layer's slot table
and a score per row, lowest fused first (``importance``: SRLoRA's recorded importance,
``layer.row_importance.tolist()``, or another score such as ``layer.pair_norms().tolist()``;
callers deciding for many layers fetch them all at once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

from ...adapters.subspace_layer import SubspaceLoRALinear
from ...errors import CapacityError


def lowest_importance(importance: Sequence[float], rows: Sequence[int], count: int) -> list[int]:
    """The ``count`` rows of ``rows`` with the lowest importance (ties: lowest index)."""
    if count <= 0:
        return []
    return sorted(rows, key=lambda row: (importance[row], row))[:count]


class FusionPolicy:
    """Base class: :meth:`make_room` fuses what a new slot needs; :meth:`after_experience`
    fuses what the policy consolidates once an experience is trained."""

    name: ClassVar[str]
    #: whether :meth:`after_experience` may fuse anything
    fuses_after_experience: ClassVar[bool] = False

    def check_capacity(self, num_slots: int, num_experiences: int) -> None:
        """Fail before training when the stream cannot fit (fusing policies always fit)."""

    def make_room(self, layer: SubspaceLoRALinear, needed: int,
                  importance: Sequence[float]) -> list[int]:
        """The lowest-importance frozen rows to fuse so that ``needed`` rows are free."""
        free = len(layer.slots.free_rows())
        frozen = layer.slots.frozen_rows()
        missing = needed - free
        if missing > len(frozen):
            raise RuntimeError(
                f"{needed} rows needed but only {free} free and {len(frozen)} fusable: the slot "
                "is larger than the layer's capacity"
            )
        return lowest_importance(importance, frozen, missing)

    def after_experience(self, layer: SubspaceLoRALinear,
                         importance: Sequence[float]) -> list[int]:
        """Rows to fuse once an experience is trained (none unless the policy says so)."""
        return []


class NeverFusion(FusionPolicy):
    """Never fuse: one slot per experience, so the stream must fit in ``num_slots``."""

    name = "never"

    def check_capacity(self, num_slots: int, num_experiences: int) -> None:
        if num_experiences > num_slots:
            raise CapacityError(
                f"the stream has {num_experiences} experiences but num_slots={num_slots} with "
                f"fusion='never': each experience needs its own slot. Set num_slots >= "
                f"{num_experiences}, or fusion='when_full' (or 'fraction') to reuse fused rows."
            )

    def make_room(self, layer, needed, importance):
        if len(layer.slots.free_rows()) >= needed:
            return []
        raise CapacityError(
            f"a layer has no free slot ({layer.num_slots} slots in use) and fusion='never'. "
            "Raise num_slots or use fusion='when_full'."
        )


class WhenFullFusion(FusionPolicy):
    """Fuse the lowest-importance pairs only when a new experience does not fit."""

    name = "when_full"


class FractionFusion(FusionPolicy):
    """After every experience, fuse the lowest ``ceil(gamma * n)`` of the ``n`` frozen pairs;
    also make room when full."""

    name = "fraction"
    fuses_after_experience = True

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma

    def after_experience(self, layer, importance):
        frozen = layer.slots.frozen_rows()
        return lowest_importance(importance, frozen, math.ceil(self.gamma * len(frozen)))


FUSION_POLICIES: dict[str, type[FusionPolicy]] = {
    cls.name: cls for cls in (NeverFusion, WhenFullFusion, FractionFusion)
}


def build_fusion_policy(name: str, *, gamma: float = 0.25) -> FusionPolicy:
    """Fusion policy by name: ``never``, ``when_full`` or ``fraction`` (which takes ``gamma``)."""
    if name not in FUSION_POLICIES:
        raise ValueError(f"unknown fusion policy {name!r}; choose one of {sorted(FUSION_POLICIES)}")
    if name == "fraction":
        return FractionFusion(gamma)
    return FUSION_POLICIES[name]()
