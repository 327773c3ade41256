import pytest
import torch
import torch.nn.functional as F

from cl_sulora.slot_linear import slot_linear

SCALE = 0.75


def setup(seed=0, d_in=24, d_out=10, r=3, orthonormal=True):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(r, d_in, generator=g)
    if orthonormal:
        rows = torch.linalg.qr(rows.T)[0].T.contiguous()
    const = torch.randn(d_out, d_in, generator=g)
    B = torch.randn(6, r, generator=g).requires_grad_()
    index = torch.tensor([0, 2, 3, 5, 7, 9])  # B's rows land in these output rows
    x = torch.randn(4, 5, d_in, generator=g).requires_grad_()
    bias = torch.randn(d_out, generator=g)
    return rows, const, B, index, x, bias


def weight(const, B, index, rows):
    """``const + SCALE * P(B) rows``, with a graph to ``B`` when it requires one."""
    if index is None:
        return const + SCALE * B @ rows
    return const.index_add(0, index, SCALE * B @ rows)


@pytest.mark.parametrize("orthonormal", [True, False])
@pytest.mark.parametrize("placed", [True, False])
def test_gradients_equal_plain_autograd(orthonormal, placed):
    rows, const, B, index, x, bias = setup(orthonormal=orthonormal)
    if not placed:
        index, const, bias = None, const[:6], bias[:6]
    with torch.no_grad():
        w = weight(const, B, index, rows)
    y = slot_linear(x, B, w, bias, rows, index, SCALE)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    got = (x.grad.clone(), B.grad.clone())
    x.grad = B.grad = None
    expected_y = F.linear(x, weight(const, B, index, rows), bias)
    (expected_y * dy).sum().backward()
    torch.testing.assert_close(y, expected_y, rtol=0, atol=0)
    torch.testing.assert_close(got[0], x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], B.grad, rtol=1e-5, atol=1e-5)


def test_under_bf16_autocast_matches_autocast_linear():
    rows, const, B, index, x, bias = setup(1)
    with torch.no_grad():
        w = weight(const, B, index, rows)  # built in float32, as the layer does
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = slot_linear(x, B, w, bias, rows, index, SCALE)
        expected = F.linear(x, w, bias)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.float().sum().backward()
    assert x.grad.dtype == x.dtype and B.grad.dtype == B.dtype
    in_bf16 = (x.grad.clone(), B.grad.clone())
    x.grad = B.grad = None
    F.linear(x, weight(const, B, index, rows), bias).sum().backward()  # float32 reference
    for got, ref in zip(in_bf16, (x.grad, B.grad), strict=True):
        assert (got - ref).norm() <= 0.02 * ref.norm()


def test_frozen_B_gets_no_gradient():
    rows, const, B, index, x, bias = setup(2)
    B.requires_grad_(False)
    y = slot_linear(x, B, const, bias, rows, index, SCALE)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(y) @ const)


def test_trainable_bias_or_weight_graph_is_refused():
    rows, const, B, index, x, bias = setup(3)
    with pytest.raises(ValueError, match="freeze"):
        slot_linear(x, B, const, bias.requires_grad_(), rows, index, SCALE)
    with pytest.raises(ValueError, match="no_grad"):
        slot_linear(x, B, weight(const, B, index, rows), None, rows, index, SCALE)
