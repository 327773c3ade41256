"""Fusion policies: which frozen rank-1 pairs of a layer to fold into its weight."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .layer import SubspaceLoRALinear


def lowest_importance(layer: SubspaceLoRALinear, rows: Tensor, count: int) -> Tensor:
    """The ``count`` rows of ``rows`` with the lowest recorded importance (ties: lowest index)."""
    if count <= 0 or rows.numel() == 0:
        return rows[:0]
    order = torch.argsort(layer.row_importance[rows], stable=True)
    return rows[order[:count]]


def rows_to_make_room(layer: SubspaceLoRALinear, needed: int) -> Tensor:
    """Lowest-importance frozen rows to fuse so that ``needed`` rows are free (``when_full``)."""
    missing = needed - layer.free_rows().numel()
    frozen = layer.frozen_rows()
    if missing > frozen.numel():
        raise RuntimeError(
            f"{needed} rows needed but only {layer.free_rows().numel()} free and "
            f"{frozen.numel()} fusable: the slot is larger than the layer's capacity"
        )
    return lowest_importance(layer, frozen, missing)


def rows_fraction(layer: SubspaceLoRALinear, gamma: float) -> Tensor:
    """The lowest ``ceil(gamma * n)`` of the layer's ``n`` frozen rows (``fraction``)."""
    frozen = layer.frozen_rows()
    return lowest_importance(layer, frozen, math.ceil(gamma * frozen.numel()))
