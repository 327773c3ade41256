"""Ridge regression of one-hot targets, as RanPAC solves its classifier: ``W^T = (G + r I)^-1 Q``
from the accumulated ``G = H^T H`` and ``Q = H^T Y``, with the ridge ``r`` chosen among
candidates on a held-out part of the newest samples (its ``optimise_ridge_parameter``), and
RanPAC's random features ``H = ReLU(f R)``. Used by the RanPAC strategy, by classifier
alignment's closed-form fit and by a backbone's random features (``backbone.random_features``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

#: RanPAC's ridge candidates (its ``optimise_ridge_parameter``): 1e-8 ... 1e8.
RANPAC_RIDGES = [10.0**k for k in range(-8, 9)]

#: A config's ridge candidates: at least one, each positive and finite.
Ridges = Annotated[list[Annotated[float, Field(gt=0, allow_inf_nan=False)]], Field(min_length=1)]
#: The part of the newest samples the candidates are fit on, strictly between 0 and 1 (the rest
#: scores them).
FitFraction = Annotated[float, Field(gt=0, lt=1)]


def random_projection(in_features: int, width: int, generator: torch.Generator) -> Tensor:
    """RanPAC's fixed random projection ``R``: ``in_features`` x ``width``, standard Gaussian."""
    return torch.randn(in_features, width, generator=generator)


def random_features(x: Tensor, projection: Tensor) -> Tensor:
    """RanPAC's random features ``ReLU(x R)``, in float32 whatever the autocast."""
    with torch.autocast(x.device.type, enabled=False):
        return F.relu(x.float() @ projection)


def solve_ridge(gram: Tensor, targets: Tensor, ridge: float) -> Tensor:
    """``(gram + ridge I)^-1 targets``, for a symmetric positive semi-definite ``gram``: by
    Cholesky, or where a ridge too small for the floating point leaves the matrix not
    positive definite, by its pseudo-inverse (the least-squares solution) rather than an
    error at the end of an experience."""
    system = gram + ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) == 0:
        return torch.cholesky_solve(targets, factor)
    return torch.linalg.pinv(system, hermitian=True) @ targets


def select_ridge(h: Tensor, y: Tensor, ridges: Sequence[float], fit_fraction: float,
                 generator: torch.Generator) -> float:
    """RanPAC's ridge choice: the candidate of least :func:`ridge_losses` (the middle one when
    the experience is too small to split)."""
    losses = ridge_losses(h, y, ridges, fit_fraction, generator)
    if losses is None:
        return float(ridges[len(ridges) // 2])
    return float(ridges[min(range(len(ridges)), key=losses.__getitem__)])


def ridge_losses(h: Tensor, y: Tensor, ridges: Sequence[float], fit_fraction: float,
                 generator: torch.Generator) -> list[float] | None:
    """Per candidate ridge, the mean squared error of the one-hot targets ``y`` on a held-out
    part of the experience's samples ``h``, fit on ``fit_fraction`` of them (a seeded random
    part; the official code's loader is shuffled); None when a part would be empty. One
    eigendecomposition serves every candidate (the official code solves once per candidate),
    of the smaller of ``H^T H`` and ``H H^T`` (``(H^T H + r I)^-1 H^T = H^T (H H^T + r I)^-1``)."""
    order = torch.randperm(len(h), generator=generator).to(h.device)
    cut = int(len(h) * fit_fraction)
    if cut < 1 or cut >= len(h):
        return None
    fit, held = h[order[:cut]], h[order[cut:]]
    y_fit, y_held = y[order[:cut]], y[order[cut:]]
    if len(fit) < fit.shape[1]:  # fewer samples than features: the kernel form
        values, vectors = torch.linalg.eigh(fit @ fit.T)
        left, right = held @ fit.T @ vectors, vectors.T @ y_fit
    else:
        values, vectors = torch.linalg.eigh(fit.T @ fit)
        left, right = held @ vectors, vectors.T @ (fit.T @ y_fit)
    return [float(F.mse_loss(left @ (right / (values.clamp_min(0) + ridge).unsqueeze(1)), y_held))
            for ridge in ridges]
