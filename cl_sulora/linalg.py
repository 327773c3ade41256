"""Linear algebra on row subspaces: orthonormal directions outside a span, projections, top
eigenvectors, and growing a basis by an energy rule."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

_ACCEPT = 0.5  # a candidate is kept when this fraction of its norm lies outside the span
_EIGH_BLOCK = 32  # CUDA decomposes batches of symmetric matrices up to this size at once
BLOCK = 32  # rows of the block subspace iteration
OVERSAMPLE = 8  # trailing rows of a block never added to a basis before the energy is reached
ITERATIONS = 8  # products of the block subspace iteration


def orthonormal_basis(rows: Tensor, tol: float = 1e-6) -> Tensor:
    """Orthonormal rows spanning the rows of ``rows`` (float64)."""
    if rows.numel() == 0:
        return rows.new_zeros(0, rows.shape[-1], dtype=torch.float64)
    u, s, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    keep = s > tol * max(float(s.max()), 1.0)
    return vh[keep]


def span_rows(rows: Tensor, tol: float = 1e-6, floor: float = 1.0, passes: int = 2) -> Tensor:
    """Orthonormal rows spanning ``rows`` (``... x r x d``), float64, as many rows as given:
    directions beyond the numerical rank come out as zero rows, so the shape (and the batch)
    never depends on the data and nothing is synchronised with the host.

    Through the eigendecomposition of the small Gram matrix ``rows rows^T``, ``passes`` times
    (twice: orthonormal to working precision); singular values below
    ``tol * max(s_max, floor)`` are dropped. Rows are taken in blocks of at most 32 (the size
    CUDA decomposes in one batched call), each block with the earlier ones projected out.
    """
    rows = rows.double()
    if rows.shape[-2] > _EIGH_BLOCK:
        done: list[Tensor] = []
        for start in range(0, rows.shape[-2], _EIGH_BLOCK):
            block = rows[..., start:start + _EIGH_BLOCK, :]
            if done:
                block = project_out(block, torch.cat(done, dim=-2))
            done.append(span_rows(block, tol, floor, passes))
        return torch.cat(done, dim=-2)
    if rows.shape[-2] == 0:
        return rows
    for _ in range(passes):
        values, vectors = torch.linalg.eigh(rows @ rows.mT)
        cut = (tol * values[..., -1:].clamp_min(0).sqrt().clamp_min(floor)) ** 2
        scale = torch.where(values > cut, values.clamp_min(1e-300).rsqrt(), 0.0)
        rows = (vectors * scale.unsqueeze(-2)).mT @ rows
    return rows


def orthonormal_rows(rows: Tensor, tol: float = 1e-6) -> Tensor:
    """Orthonormal rows (float64, on ``rows``' device) spanning the rows of ``rows``, without
    the zero rows that :func:`span_rows` keeps for directions beyond the rank."""
    spanned = span_rows(rows, tol)
    return spanned[spanned.norm(dim=-1) > 0.5]


def project_out(rows: Tensor, basis: Tensor) -> Tensor:
    """``rows`` minus their components in the span of the orthonormal ``basis`` (two passes).

    Batched over leading dimensions; zero rows of ``basis`` are ignored.
    """
    if basis.shape[-2] == 0:
        return rows
    for _ in range(2):
        rows = rows - (rows @ basis.mT) @ basis
    return rows


def directions_outside(
    candidates: Tensor, used: Tensor, n: int, *, generator: torch.Generator | None = None,
    basis: Tensor | None = None,
) -> Tensor:
    """``n`` orthonormal rows orthogonal to ``used``, taken greedily from ``candidates`` in order.

    A candidate is accepted when at least half its norm lies outside the span of ``used`` and of
    the rows accepted before it. If the candidates run out, random directions fill the rest.
    ``basis``, when given, is an orthonormal basis of the span of ``used`` (zero rows allowed;
    then ``used`` is only read for its device). Returns float64 rows on ``used``'s device.
    """
    device = used.device
    if basis is None:
        basis = orthonormal_rows(used.to(device))
    basis = basis.to(device, torch.float64)
    return directions_outside_batch(candidates.to(device)[None], basis[None], n,
                                    [generator])[0]


def directions_outside_batch(
    candidates: Tensor, basis: Tensor, n: int,
    generators: Sequence[torch.Generator | None] | None = None,
) -> Tensor:
    """:func:`directions_outside` of a batch (``L x m x d`` candidates, ``L x k x d``
    orthonormal bases with zero rows allowed): ``L x n x d`` float64 rows.

    The greedy choice is vectorised: all candidates are projected out of the basis at once and
    the first ``n`` are orthonormalised in order (Gram-Schmidt, twice), which is the greedy
    result when each of them keeps half its norm, as random or eigen- candidates almost always
    do. That is checked with one host synchronisation; the layers where it fails take the
    sequential greedy choice (``generators[i]`` fills their rows when candidates run out).
    """
    batch, m, d = candidates.shape
    candidates = candidates.double()
    outside = project_out(candidates, basis)
    norms = candidates.norm(dim=-1)
    chosen = outside.new_zeros(batch, n, d)
    ok = outside.new_full((batch,), m >= n, dtype=torch.bool)
    for j in range(min(n, m)):
        v = outside[:, j:j + 1]
        for _ in range(2):
            v = v - (v @ chosen.mT) @ chosen
        norm = v.norm(dim=-1)
        ok &= ((norm > _ACCEPT * norms[:, j:j + 1]) & (norm > 1e-8)).squeeze(-1)
        chosen[:, j:j + 1] = v / norm.clamp_min(1e-300).unsqueeze(-1)
    rank = (basis.norm(dim=-1) > 0.5).sum(-1)
    passed, rank = torch.stack([ok.long(), rank]).cpu().tolist()  # the one synchronisation
    if max(rank) + n > d:
        raise ValueError(f"no room for {n} new directions: {max(rank)} of {d} are in use")
    generators = generators or [None] * batch
    for i, good in enumerate(passed):
        if not good:
            chosen[i] = _greedy(outside[i], norms[i], basis[i], n, generators[i])
    return chosen


def _greedy(outside: Tensor, norms: Tensor, basis: Tensor, n: int,
            generator: torch.Generator | None) -> Tensor:
    """The sequential greedy choice among candidates already projected out of ``basis``, on the
    host; random directions (projected likewise) fill the rest."""
    device, d = outside.device, outside.shape[-1]
    chosen: list[Tensor] = []
    pools = [(norms.cpu(), outside.cpu())]
    while len(chosen) < n:
        if not pools:
            fresh = torch.randn(2 * n, d, generator=generator, dtype=torch.float64)
            pools.append((fresh.norm(dim=1), project_out(fresh.to(device), basis).cpu()))
        pool_norms, pool = pools.pop(0)
        for c_norm, v in zip(pool_norms, pool, strict=True):
            for _ in range(2):
                for u in chosen:
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
    """``P sym P`` with ``P`` the projector outside the orthonormal ``basis`` (float64; batched
    over leading dimensions, zero rows of ``basis`` ignored)."""
    sym = sym.double()
    if basis.shape[-2] == 0:
        return sym
    eye = torch.eye(sym.shape[-1], dtype=torch.float64, device=sym.device)
    proj = eye - basis.mT @ basis
    return proj @ sym @ proj


def top_eigvecs(sym: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors as rows of a symmetric matrix, or of a batch
    of them (``... x d x d``), computed on its device."""
    values, vectors = torch.linalg.eigh(sym.double())
    return values.flip(-1), vectors.flip(-1).transpose(-1, -2)


def top_eigvecs_block(sym: Tensor, start: Tensor, iters: int = ITERATIONS) -> tuple[Tensor, Tensor]:
    """Approximate top eigenpairs of symmetric positive semi-definite matrices (``... x d x d``)
    by block subspace iteration from the ``... x b x d`` rows ``start``: ``iters`` products with
    ``sym``, taken in pairs as products with ``sym^2``, each followed by a re-orthonormalisation
    (shifted Cholesky QR before and in between, :func:`span_rows` after the last product), then
    Rayleigh-Ritz on the ``b x b`` problem.

    Returns ``b`` Ritz values (descending) and orthonormal Ritz vectors as rows, on ``sym``'s
    device, with batched matrix products only (no ``d x d`` eigendecomposition). The values are
    the exact Rayleigh quotients of the returned vectors; the vectors converge to the top
    eigenvectors at the rate of ``lambda_{b+1} / lambda_i`` per iteration, so with a clear
    spectral gap after the wanted ones they are the top eigenvectors to working precision.
    Directions of (numerically) zero eigenvalue may come out as zero rows with value 0.
    """
    sym = sym.double()
    # the products in pairs, with ``sym^2``: half the re-orthonormalisations, the same subspace
    products = [sym @ sym] * (iters // 2) + [sym] * (iters % 2)
    block = _cholesky_qr(start.to(sym))
    for matrix in products[:-1]:
        block = _cholesky_qr(block @ matrix)
    block = span_rows(block @ products[-1], tol=1e-12, floor=0.0)
    values, vectors = torch.linalg.eigh(block @ sym @ block.mT)
    return values.flip(-1), vectors.flip(-1).mT @ block


def _cholesky_qr(rows: Tensor) -> Tensor:
    """Rows spanning ``rows`` (``... x b x d``, float64), orthonormal up to the conditioning of
    ``rows``: ``L^-1 rows`` with ``L L^T`` the Gram matrix plus a shift of ``1e-13`` of its
    trace, so rank-deficient rows stay finite. Cheaper than :func:`span_rows` on the device;
    good between the products of a subspace iteration, whose last step uses ``span_rows``."""
    gram = rows @ rows.mT
    diagonal = gram.diagonal(dim1=-2, dim2=-1)
    diagonal.add_(1e-13 * diagonal.sum(-1, keepdim=True).clamp_min(1e-300))
    factor = torch.linalg.cholesky_ex(gram)[0]
    return torch.linalg.solve_triangular(factor, rows, upper=False)


def extend_basis(basis: Tensor, cov: Tensor, energy: float, max_rows: int) -> Tensor:
    """Add to ``basis`` the fewest top directions of ``cov`` so it holds ``energy`` of its trace.

    GPM's rule: directions already in ``basis`` count towards the energy; new ones come from the
    covariance with the basis projected out. At most ``max_rows`` rows are kept in all.
    """
    return extend_bases([basis], [cov], energy, [max_rows])[0]


def extend_bases(bases: list[Tensor], covs: list[Tensor], energy: float,
                 max_rows: list[int]) -> list[Tensor]:
    """:func:`extend_basis` of several (orthonormal basis, covariance) pairs, on their device,
    batched over the pairs of one dimension and device (see :func:`grow_bases`)."""
    return grow_bases(bases, covs, energy, max_rows)[0]


def grow_bases(bases: list[Tensor], covs: list[Tensor], energy: float,
               max_rows: list[int]) -> tuple[list[Tensor], list[Tensor]]:
    """The grown bases of :func:`extend_bases` and, for each pair, the Ritz vectors of its
    first round: the top ``BLOCK`` directions of the covariance outside the old basis, best
    first, as unit rows (zero rows where the covariance has nothing left). The first round
    runs even when no basis needs to grow.

    The new directions are found in rounds of :func:`top_eigvecs_block` (blocks of
    ``BLOCK`` rows from a fixed seed) on the covariance with the basis and the directions of
    earlier rounds projected out; a round adds the fewest of its Ritz directions that reach the
    energy, or its best ``BLOCK - OVERSAMPLE`` and another round follows. Ritz values are the
    exact energies of the added directions, so the rule holds exactly; the count may exceed
    the exact eigendecomposition's by the few directions the iteration has not converged on.
    Rounds stop when a round finds no energy left. One host synchronisation per round.
    """
    out = [b.double().to(c.device) for b, c in zip(bases, covs, strict=True)]
    tops = list(out)  # replaced group by group
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(covs):
        groups.setdefault((c.shape[-1], c.device), []).append(i)
    for members in groups.values():
        grown, top = _extend_group([out[i] for i in members],
                                   torch.stack([covs[i].double() for i in members]), energy,
                                   [max_rows[i] for i in members])
        for i, basis, vectors in zip(members, grown, top.unbind(), strict=True):
            out[i], tops[i] = basis, vectors
    return out, tops


def _extend_group(bases: list[Tensor], cov: Tensor, energy: float,
                  max_rows: list[int]) -> tuple[list[Tensor], Tensor]:
    """:func:`grow_bases` of pairs of one dimension, ``cov`` stacked (``L x d x d``)."""
    d = cov.shape[-1]
    stacked = pad_stack(bases, d, cov.device)
    total = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    kept = ((stacked @ cov) * stacked).sum((-2, -1))
    totals, kept = torch.stack([total, kept]).cpu().tolist()
    need = [energy * t - k if t > 0 and bases[i].shape[0] < max_rows[i] else 0.0
            for i, (t, k) in enumerate(zip(totals, kept, strict=True))]
    room = [m - b.shape[0] for m, b in zip(max_rows, bases, strict=True)]
    added: list[list[Tensor]] = [[] for _ in bases]
    start = random_block(d, cov.device)
    block = start.shape[0]
    first: Tensor | None = None
    while first is None or any(n > 0 and r > 0 for n, r in zip(need, room, strict=True)):
        values, vectors = top_eigvecs_block(project_matrix(cov, stacked), start.expand(
            len(bases), -1, -1))
        vectors = project_out(vectors, stacked)
        vectors = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        first = vectors if first is None else first
        energies = values.clamp_min(0).cpu()
        found = False
        for i, n in enumerate(need):
            if n <= 0 or room[i] <= 0:
                continue
            cumulative = torch.cumsum(energies[i], 0)
            live = int((energies[i] > 1e-12 * max(totals[i], 1e-300)).sum())
            reach = int(torch.searchsorted(cumulative, torch.tensor(n, dtype=torch.float64)))
            count = reach + 1 if reach < block else block - OVERSAMPLE
            count = min(count, live, room[i])
            if count == 0:
                need[i] = 0.0
                continue
            found = True
            added[i].append(vectors[i, :count])
            need[i] = n - float(cumulative[count - 1]) if reach >= block else 0.0
            room[i] -= count
        if not found:
            break
        stacked = pad_stack([torch.cat([b, *a]) for b, a in zip(bases, added, strict=True)],
                             d, cov.device)
    return [torch.cat([b, *a]) for b, a in zip(bases, added, strict=True)], first


@functools.lru_cache(maxsize=16)
def random_block(d: int, device: torch.device) -> Tensor:
    """The fixed start of every block subspace iteration on ``d`` dimensions: ``min(BLOCK, d)``
    Gaussian rows (float64, seed 0), drawn once per dimension and device. Do not modify it."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(min(BLOCK, d), d, generator=gen, dtype=torch.float64).to(device)


def pad_stack(rows: list[Tensor], d: int, device: torch.device) -> Tensor:
    """``L x k x d`` float64 stack of row sets padded with zero rows to the longest."""
    k = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), k, d, dtype=torch.float64, device=device)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r
    return out
