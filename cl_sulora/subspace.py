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


def orthonormal_rows(rows: Tensor, tol: float = 1e-6) -> Tensor:
    """Orthonormal rows (float64, on ``rows``' device) spanning ``rows``, for few rows.

    Through the eigendecomposition of the small Gram matrix ``rows rows^T`` (on the CPU: a
    ``k x k`` problem), twice for accuracy; singular values below ``tol * max(s_max, 1)`` are
    dropped, as in :func:`orthonormal_basis`.
    """
    rows = rows.double()
    if rows.shape[0] == 0:
        return rows
    for _ in range(2):
        if rows.shape[0] == 0:
            break
        values, vectors = torch.linalg.eigh((rows @ rows.T).cpu())
        cut = (tol * max(float(values[-1].clamp_min(0).sqrt()), 1.0)) ** 2
        keep = values > cut
        vectors = vectors[:, keep].to(rows.device)
        rows = (vectors.T @ rows) / values[keep].sqrt().to(rows.device)[:, None]
    return rows


def project_out(rows: Tensor, basis: Tensor) -> Tensor:
    """``rows`` minus their components in the span of the orthonormal ``basis`` (two passes)."""
    if basis.shape[0] == 0:
        return rows
    for _ in range(2):
        rows = rows - (rows @ basis.T) @ basis
    return rows


def extend_orthonormal(basis: Tensor, rows: Tensor) -> Tensor:
    """The orthonormal ``basis`` followed by an orthonormal basis of what ``rows`` add to it."""
    basis = basis.double()
    extra = orthonormal_rows(project_out(rows.double().to(basis.device), basis))
    return torch.cat([basis, extra])


def directions_outside(
    candidates: Tensor, used: Tensor, n: int, *, generator: torch.Generator | None = None,
    basis: Tensor | None = None,
) -> Tensor:
    """``n`` orthonormal rows orthogonal to ``used``, taken greedily from ``candidates`` in order.

    A candidate is accepted when at least half its norm lies outside the span of ``used`` and of
    the rows accepted before it. If the candidates run out, random directions fill the rest.
    ``basis``, when given, is an orthonormal basis of the span of ``used`` (then ``used`` is only
    read for its device).

    The projection out of ``used`` runs on ``used``'s device, for all candidates at once; only the
    greedy choice among the few projected candidates runs on the CPU. Returns float64 rows on
    ``used``'s device.
    """
    device = used.device
    d = candidates.shape[-1]
    if basis is None:
        basis = orthonormal_rows(used.to(device))
    basis = basis.to(device, torch.float64)
    if basis.shape[0] + n > d:
        raise ValueError(f"no room for {n} new directions: {basis.shape[0]} of {d} are in use")
    chunk = basis.shape[0] + 2 * n
    chosen: list[Tensor] = []
    pools = [candidates.to(device, torch.float64)]
    while len(chosen) < n:
        if not pools:
            pools.append(torch.randn(2 * n, d, generator=generator, dtype=torch.float64)
                         .to(device))
        pool = pools.pop(0)
        if pool.shape[0] > chunk:  # most candidates are never looked at: project a few
            pools.insert(0, pool[chunk:])
            pool = pool[:chunk]
        norms = pool.norm(dim=1).cpu()
        outside = project_out(pool, basis).cpu()  # the one transfer of this pool
        for c_norm, v in zip(norms, outside, strict=True):
            for u in chosen:
                v = v - (u @ v) * u
            for u in chosen:  # second pass for stability
                v = v - (u @ v) * u
            norm = v.norm()
            if norm > _ACCEPT * c_norm and norm > 1e-8:
                chosen.append(v / norm)
                if len(chosen) == n:
                    break
    return torch.stack(chosen).to(device)


def projector_outside(rows: Tensor, d: int) -> Tensor:
    """The ``d x d`` projector onto the orthogonal complement of the span of ``rows``."""
    basis = orthonormal_basis(rows)
    return torch.eye(d, dtype=torch.float64, device=rows.device) - basis.T @ basis


def project_matrix(sym: Tensor, basis: Tensor) -> Tensor:
    """``P sym P`` with ``P`` the projector outside the orthonormal ``basis`` (float64)."""
    sym = sym.double()
    if basis.shape[0] == 0:
        return sym
    proj = torch.eye(sym.shape[-1], dtype=torch.float64, device=sym.device) - basis.T @ basis
    return proj @ sym @ proj


def top_eigvecs(sym: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors as rows of a symmetric matrix, or of a batch
    of them (``... x d x d``), computed on its device."""
    values, vectors = torch.linalg.eigh(sym.double())
    return values.flip(-1), vectors.flip(-1).transpose(-1, -2)


def batched_top_eigvecs(matrices: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """:func:`top_eigvecs` of each matrix, with one batched call per distinct shape and device."""
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(matrices):
        groups.setdefault((tuple(m.shape), m.device), []).append(i)
    results: list[tuple[Tensor, Tensor] | None] = [None] * len(matrices)
    for members in groups.values():
        values, vectors = top_eigvecs(torch.stack([matrices[i] for i in members]))
        for j, i in enumerate(members):
            results[i] = (values[j], vectors[j])
    return results  # type: ignore[return-value]


def extend_basis(basis: Tensor, cov: Tensor, energy: float, max_rows: int) -> Tensor:
    """Add to ``basis`` the fewest top directions of ``cov`` so it holds ``energy`` of its trace.

    GPM's rule: directions already in ``basis`` count towards the energy; new ones come from the
    covariance with the basis projected out. At most ``max_rows`` rows are kept in all.
    """
    return extend_bases([basis], [cov], energy, [max_rows])[0]


def extend_bases(bases: list[Tensor], covs: list[Tensor], energy: float,
                 max_rows: list[int]) -> list[Tensor]:
    """:func:`extend_basis` of several (orthonormal basis, covariance) pairs, on their device,
    with the eigendecompositions batched and one transfer of their small results."""
    bases = [b.double().to(c.device) for b, c in zip(bases, covs, strict=True)]
    covs = [c.double() for c in covs]
    todo = [i for i, b in enumerate(bases) if b.shape[0] < max_rows[i]]
    if not todo:
        return bases
    # traces (total, and kept by the basis): one transfer for all
    stats = torch.stack([torch.stack([torch.trace(covs[i]),
                                      torch.trace(bases[i] @ covs[i] @ bases[i].T)])
                         for i in todo]).cpu().tolist()
    need = {i: energy * total - kept for i, (total, kept) in zip(todo, stats, strict=True)
            if total > 0 and kept < energy * total}
    todo = list(need)
    if not todo:
        return bases
    eig = batched_top_eigvecs([project_matrix(covs[i], bases[i]) for i in todo])
    cumulative = [torch.cumsum(values.clamp_min(0), 0) for values, _ in eig]
    cumulative = torch.cat(cumulative).cpu().split([c.numel() for c in cumulative])
    for i, energies, (_, vectors) in zip(todo, cumulative, eig, strict=True):
        count = int(torch.searchsorted(energies, torch.tensor(need[i], dtype=energies.dtype)))
        count = min(count + 1, max_rows[i] - bases[i].shape[0], vectors.shape[0])
        bases[i] = extend_orthonormal(bases[i], vectors[:count])
    return bases


@torch.no_grad()
def input_covariances(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable,
    forward: Callable[[object], object],
    max_samples: int,
) -> dict[str, Tensor]:
    """Uncentred covariance ``E[x x^T]`` (float64) of each layer's inputs over the first
    ``max_samples`` samples of ``batches`` (the last batch is cut to fit).

    ``forward(batch)`` runs the model on one batch; its first dimension counts samples. Token
    dimensions are flattened, so every token of a sample contributes. The sums stay on the
    layers' device; nothing is synchronised with the host.
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
            left = max_samples - seen
            if len(batch[0]) > left:
                batch = [b[:left] if torch.is_tensor(b) else b for b in batch]
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
