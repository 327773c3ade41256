"""Batched subspace linear algebra: orthonormal spans, block eigenvectors, the energy rule."""

import torch
from torch import nn

from cl_sulora.linalg import (
    BLOCK,
    directions_outside,
    directions_outside_batch,
    extend_bases,
    span_rows,
    top_eigvecs_block,
)
from cl_sulora.methods.input_statistics import InputRecorder


def gapped(d: int, values: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric PSD matrix with the given top eigenvalues (the rest 0.01) and its
    eigenvectors as rows, best first."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q.T
    spectrum = torch.full((d,), 0.01, dtype=torch.float64)
    spectrum[: len(values)] = torch.tensor(values, dtype=torch.float64)
    return q.T @ torch.diag(spectrum) @ q, q


def test_span_rows_is_orthonormal_with_zero_rows_beyond_the_rank():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(2, 3, 10, generator=g, dtype=torch.float64)
    rows = torch.cat([rows, rows[:, :2] * 2 + rows[:, 1:3]], dim=1)  # rank 3 of 5 rows
    spanned = span_rows(rows)
    assert spanned.shape == rows.shape
    norms = spanned.norm(dim=-1)
    assert ((norms - 1).abs() < 1e-12).sum(-1).tolist() == [3, 3]
    assert (norms < 1e-12).sum(-1).tolist() == [2, 2]
    gram = spanned @ spanned.mT
    torch.testing.assert_close(gram, torch.diag_embed(norms**2), rtol=0, atol=1e-12)
    # the span is the same: the original rows lie in it
    residual = rows - (rows @ spanned.mT) @ spanned
    assert residual.abs().max() < 1e-10


def test_span_rows_decomposes_large_gram_matrices_too():
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(40, 50, generator=g)
    spanned = span_rows(rows)
    torch.testing.assert_close(spanned @ spanned.T, torch.eye(40, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_top_eigvecs_block_finds_the_top_directions_behind_a_gap():
    sym, q = gapped(60, [9.0, 7.0, 5.0, 4.0], seed=2)
    start = torch.randn(3, 8, 60, generator=torch.Generator().manual_seed(3))
    values, vectors = top_eigvecs_block(sym.expand(3, -1, -1), start)
    torch.testing.assert_close(values[:, :4], torch.tensor([[9.0, 7.0, 5.0, 4.0]] * 3,
                                                           dtype=torch.float64))
    torch.testing.assert_close(vectors @ vectors.mT, torch.eye(8, dtype=torch.float64)
                               .expand(3, -1, -1), rtol=0, atol=1e-12)
    overlap = (vectors[:, :4] @ q[:4].T).abs()
    torch.testing.assert_close(overlap, torch.eye(4, dtype=torch.float64).expand(3, -1, -1),
                               rtol=0, atol=1e-8)


def test_top_eigvecs_block_of_a_low_rank_matrix_is_finite_and_exact_on_its_range():
    g = torch.Generator().manual_seed(4)
    q = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64)).Q.T
    sym = q[:3].T @ torch.diag(torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64)) @ q[:3]
    values, vectors = top_eigvecs_block(sym[None], torch.randn(1, 8, 40, generator=g))
    assert torch.isfinite(values).all() and torch.isfinite(vectors).all()
    torch.testing.assert_close(values[0, :3], torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64))
    assert values[0, 3:].abs().max() < 1e-10
    overlap = (vectors[0, :3] @ q[:3].T).abs()
    torch.testing.assert_close(overlap, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-8)


def test_directions_outside_batch_equals_one_at_a_time_and_falls_back_to_the_greedy_choice():
    g = torch.Generator().manual_seed(4)
    used = torch.linalg.qr(torch.randn(2, 30, 7, generator=g, dtype=torch.float64)).Q.mT
    candidates = torch.randn(2, 12, 30, generator=g, dtype=torch.float64)
    candidates[1, 1] = used[1, 0] * 3  # rejected by the greedy choice: the fallback path
    batch = directions_outside_batch(candidates, used, 4)
    for i in range(2):
        alone = directions_outside(candidates[i], used[i], 4)
        torch.testing.assert_close(batch[i], alone, rtol=0, atol=1e-12)
        torch.testing.assert_close(batch[i] @ batch[i].T, torch.eye(4, dtype=torch.float64))
        assert (batch[i] @ used[i].T).abs().max() < 1e-12
    # zero rows of the basis are ignored
    padded = torch.cat([used, torch.zeros(2, 3, 30, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(directions_outside_batch(candidates, padded, 4), batch,
                               rtol=0, atol=1e-12)


def test_extend_bases_satisfies_the_energy_rule_over_several_rounds():
    d, energy = 96, 0.9
    top = [float(v) for v in torch.linspace(10.0, 5.0, BLOCK + 20)]  # needs more than a block
    cov, _ = gapped(d, top, seed=5)
    total = float(cov.trace())
    old = torch.linalg.qr(torch.randn(d, 3, generator=torch.Generator().manual_seed(6),
                                      dtype=torch.float64)).Q.T
    grown, fresh = extend_bases([old, torch.zeros(0, d)], [cov, cov], energy, [80, 80])
    for basis, before in ((grown, old), (fresh, old[:0])):
        rows = basis.shape[0]
        torch.testing.assert_close(basis @ basis.T, torch.eye(rows, dtype=torch.float64),
                                   rtol=0, atol=1e-10)
        torch.testing.assert_close(basis[: before.shape[0]], before)
        captured = float(((basis @ cov) * basis).sum())
        assert captured >= energy * total - 1e-9
        # one direction fewer would not reach the energy: the count is minimal
        assert captured - float(basis[-1] @ cov @ basis[-1]) < energy * total
        assert BLOCK < rows <= 80


def test_extend_bases_keeps_at_most_max_rows_and_stops_when_nothing_is_left():
    cov, _ = gapped(20, [5.0, 4.0, 3.0], seed=7)
    capped, = extend_bases([torch.zeros(0, 20)], [cov], 0.999, [2])
    assert capped.shape[0] == 2
    zero, = extend_bases([torch.zeros(0, 20)], [torch.zeros(20, 20)], 0.9, [10])
    assert zero.shape[0] == 0


def test_input_recorder_gives_the_uncentred_covariance_and_the_mean_of_every_token():
    """``E[x x^T]`` and ``E[x]`` over all tokens of the recorded passes, eval-mode passes
    skipped with ``training_only``, and unchanged when the sums and counts are summed over equal
    ranks."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    recorder = InputRecorder({"l": layer}, training_only=True)
    batches = [torch.randn(4, 5, 6), torch.randn(2, 5, 6) + 1.0]
    for x in batches:
        layer(x)
    layer.eval()
    layer(torch.randn(3, 5, 6) * 10)  # skipped: eval mode
    recorder.close()
    layer.train()
    layer(torch.randn(3, 5, 6) * 10)  # not recorded: the hooks are gone
    tokens = torch.cat([x.reshape(-1, 6) for x in batches]).double()
    expected = tokens.T @ tokens / len(tokens)
    torch.testing.assert_close(recorder.covariances()["l"], expected)
    torch.testing.assert_close(recorder.covariances(lambda t: 2 * t)["l"], expected)
    torch.testing.assert_close(recorder.means()["l"], tokens.mean(0))
    torch.testing.assert_close(recorder.means(lambda t: 2 * t)["l"], tokens.mean(0))
