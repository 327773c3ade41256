"""Continual-learning metrics of an accuracy matrix.

``R[i][j]`` is the accuracy on experience ``j``'s test set after training experience ``i``; the
matrix is square (``T x T``) and every row covers the whole test stream. A joint run (one
training on the whole stream) has a single row instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Matrix = Sequence[Sequence[float]]

#: Avalanche's metric key of the accuracy on one experience of the evaluated stream.
ACCURACY_KEY = re.compile(r"^Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)$")



def accuracy_row(metrics_dict: Mapping[str, Any], count: int) -> list[float]:
    """One row of the accuracy matrix: the accuracy on each of the ``count`` experiences of
    the test stream, from the metrics dict ``strategy.eval(test_stream)`` returns (Avalanche's
    ``accuracy_metrics(experience=True)``, which the strategies' default evaluator has)."""
    row: list[float | None] = [None] * count
    for key, value in metrics_dict.items():
        match = ACCURACY_KEY.match(key)
        if match and int(match.group(1)) < count:
            row[int(match.group(1))] = float(value)
    if any(a is None for a in row):
        raise RuntimeError(f"missing experience accuracies in the evaluation metrics: {row}")
    return row  # type: ignore[return-value]


def _square(matrix: Matrix) -> np.ndarray:
    r = np.asarray(matrix, dtype=float)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square and non-empty, got shape {r.shape}")
    return r


def a_last(matrix: Matrix) -> float:
    """Mean accuracy over all experiences after the last one."""
    return float(_square(matrix)[-1].mean())


def a_avg(matrix: Matrix) -> float:
    """Mean over ``i`` of the mean accuracy on experiences ``0..i`` after training ``i``."""
    return float(np.mean(accuracy_curve(matrix)))


def accuracy_curve(matrix: Matrix) -> list[float]:
    """Mean accuracy on the experiences seen so far, after each experience."""
    r = _square(matrix)
    return [float(r[i, : i + 1].mean()) for i in range(len(r))]


def sample_weighted_curve(matrix: Matrix, sizes: Sequence[int]) -> list[float]:
    """Accuracy over all test samples of the experiences seen so far, after each experience:
    row ``i``'s accuracies on ``0..i`` weighted by the test set sizes ``sizes``. This is the
    accuracy the reference continual-learning codebases report (SD-LoRA's and InfLoRA's
    ``_evaluate``: correct predictions over the seen classes' test samples); its last value is
    their final accuracy ("Acc", "A_T"), its mean their averaged one ("AAA", "A-bar"). It equals
    :func:`accuracy_curve` where the experiences' test sets have one size."""
    r = _square(matrix)
    n = np.asarray(sizes, dtype=float)
    if n.shape != (len(r),) or (n <= 0).any():
        raise ValueError(f"sizes must give {len(r)} positive test set sizes, got {list(sizes)}")
    return [float(r[i, : i + 1] @ n[: i + 1] / n[: i + 1].sum()) for i in range(len(r))]


def forgetting(matrix: Matrix) -> float | None:
    """Forgetting from the experience's own training on: mean over ``j < T-1`` of
    ``max_{j <= i < T-1} R[i][j] - R[T-1][j]`` (the best accuracy on ``j`` once it was trained,
    minus the last); None when ``T == 1``."""
    r = _square(matrix)
    t = len(r)
    if t == 1:
        return None
    return float(np.mean([r[j : t - 1, j].max() - r[t - 1, j] for j in range(t - 1)]))


def forgetting_all_rows(matrix: Matrix) -> float | None:
    """Forgetting as Chaudhry et al. (ECCV 2018) define it: mean over ``j < T-1`` of
    ``max_{0 <= i < T-1} R[i][j] - R[T-1][j]``, the maximum over every earlier row, also those
    before ``j`` was trained (they matter where an untrained experience is already solved in
    part: domain-incremental streams); None when ``T == 1``."""
    r = _square(matrix)
    t = len(r)
    if t == 1:
        return None
    return float(np.mean([r[: t - 1, j].max() - r[t - 1, j] for j in range(t - 1)]))


def bwt(matrix: Matrix) -> float | None:
    """Backward transfer: mean over ``j < T-1`` of ``R[T-1][j] - R[j][j]``; None when ``T == 1``."""
    r = _square(matrix)
    t = len(r)
    if t == 1:
        return None
    return float(np.mean([r[t - 1, j] - r[j, j] for j in range(t - 1)]))


def summarize(matrix: Matrix) -> dict[str, float | None]:
    """``A_last``, ``A_avg``, ``forgetting``, ``forgetting_all_rows`` and ``bwt`` of the matrix;
    of a joint run's single row only ``A_last`` (its mean) is defined."""
    r = np.asarray(matrix, dtype=float)
    if r.ndim == 2 and r.shape[0] == 1 and r.shape[1] > 1:
        return {"A_last": float(r.mean()), "A_avg": None, "forgetting": None,
                "forgetting_all_rows": None, "bwt": None}
    return {
        "A_last": a_last(matrix),
        "A_avg": a_avg(matrix),
        "forgetting": forgetting(matrix),
        "forgetting_all_rows": forgetting_all_rows(matrix),
        "bwt": bwt(matrix),
    }
