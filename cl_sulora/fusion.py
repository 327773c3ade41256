"""Fusion policies: which frozen rank-1 pairs of a layer to fold into its weight.

The policies choose on the host, from the layer's host copy of the owners and the recorded
importance of each row (``importance``, e.g. ``layer.row_importance.tolist()``; callers
deciding for many layers fetch them all at once).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .layer import SubspaceLoRALinear


def lowest_importance(importance: Sequence[float], rows: Sequence[int], count: int) -> list[int]:
    """The ``count`` rows of ``rows`` with the lowest importance (ties: lowest index)."""
    if count <= 0:
        return []
    return sorted(rows, key=lambda row: (importance[row], row))[:count]


def rows_to_make_room(layer: SubspaceLoRALinear, needed: int,
                      importance: Sequence[float]) -> list[int]:
    """Lowest-importance frozen rows to fuse so that ``needed`` rows are free (``when_full``)."""
    free = len(layer.free_rows())
    frozen = layer.frozen_rows()
    missing = needed - free
    if missing > len(frozen):
        raise RuntimeError(
            f"{needed} rows needed but only {free} free and {len(frozen)} fusable: the slot is "
            "larger than the layer's capacity"
        )
    return lowest_importance(importance, frozen, missing)


def rows_fraction(layer: SubspaceLoRALinear, gamma: float,
                  importance: Sequence[float]) -> list[int]:
    """The lowest ``ceil(gamma * n)`` of the layer's ``n`` frozen rows (``fraction``)."""
    frozen = layer.frozen_rows()
    return lowest_importance(importance, frozen, math.ceil(gamma * len(frozen)))
