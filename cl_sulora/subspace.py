"""Linear algebra on row subspaces: orthonormal directions outside a span, input statistics."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

_ACCEPT = 0.5  # a candidate is kept when this fraction of its norm lies outside the span


def orthonormal_basis(rows: Tensor, tol: float = 1e-6) -> Tensor:
    """Orthonormal rows spanning the rows of ``rows`` (float64)."""
    if rows.numel() == 0:
        return rows.new_zeros(0, rows.shape[-1], dtype=torch.float64)
    u, s, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    keep = s > tol * max(float(s.max()), 1.0)
    return vh[keep]


def directions_outside(
    candidates: Tensor, used: Tensor, n: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """``n`` orthonormal rows orthogonal to ``used``, taken greedily from ``candidates`` in order.

    A candidate is accepted when at least half its norm lies outside the span of ``used`` and of
    the rows accepted before it. If the candidates run out, random directions fill the rest.
    """
    d = candidates.shape[-1]
    basis = orthonormal_basis(used)
    if basis.shape[0] + n > d:
        raise ValueError(f"no room for {n} new directions: {basis.shape[0]} of {d} are in use")
    chosen: list[Tensor] = []
    pools = [candidates.double()]
    while len(chosen) < n:
        if not pools:
            pools.append(torch.randn(2 * n, d, generator=generator, dtype=torch.float64))
        pool = pools.pop(0).to(basis.device)
        for c in pool:
            span = torch.cat([basis, *[v[None] for v in chosen]]) if chosen else basis
            v = c - span.T @ (span @ c) if span.shape[0] else c.clone()
            v = v - span.T @ (span @ v) if span.shape[0] else v  # second pass for stability
            norm = v.norm()
            if norm > _ACCEPT * c.norm() and norm > 1e-8:
                chosen.append(v / norm)
                if len(chosen) == n:
                    break
    return torch.stack(chosen)


def projector_outside(rows: Tensor, d: int) -> Tensor:
    """The ``d x d`` projector onto the orthogonal complement of the span of ``rows``."""
    basis = orthonormal_basis(rows)
    return torch.eye(d, dtype=torch.float64, device=rows.device) - basis.T @ basis


def top_eigvecs(sym: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors as rows of a symmetric matrix."""
    values, vectors = torch.linalg.eigh(sym.double())
    order = torch.argsort(values, descending=True)
    return values[order], vectors[:, order].T


def extend_basis(basis: Tensor, cov: Tensor, energy: float, max_rows: int) -> Tensor:
    """Add to ``basis`` the fewest top directions of ``cov`` so it holds ``energy`` of its trace.

    GPM's rule: directions already in ``basis`` count towards the energy; new ones come from the
    covariance with the basis projected out. At most ``max_rows`` rows are kept in all.
    """
    cov = cov.double()
    total = float(torch.trace(cov))
    if total <= 0 or basis.shape[0] >= max_rows:
        return basis
    basis = basis.double()
    kept = float(torch.trace(basis @ cov @ basis.T)) if basis.shape[0] else 0.0
    if kept >= energy * total:
        return basis
    proj = projector_outside(basis, cov.shape[0])
    values, vectors = top_eigvecs(proj @ cov @ proj)
    need = energy * total - kept
    count = int(torch.searchsorted(torch.cumsum(values.clamp_min(0), 0), need).item()) + 1
    count = min(count, max_rows - basis.shape[0], vectors.shape[0])
    return orthonormal_basis(torch.cat([basis, vectors[:count]]))


@torch.no_grad()
def input_covariances(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable,
    forward: Callable[[object], object],
    max_samples: int,
) -> dict[str, Tensor]:
    """Uncentred covariance ``E[x x^T]`` (float64) of each layer's inputs over ``max_samples``.

    ``forward(batch)`` runs the model on one batch; its first dimension counts samples. Token
    dimensions are flattened, so every token of a sample contributes.
    """
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            acc = x.T @ x
            sums[name] = sums[name] + acc.double() if name in sums else acc.double()
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for batch in batches:
            forward(batch)
            seen += len(batch[0])
            if seen >= max_samples:
                break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not sums:
        raise RuntimeError("no inputs reached the adapted layers: is the experience empty?")
    return {name: sums[name] / counts[name] for name in sums}
