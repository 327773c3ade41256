import pytest
import torch
import torch.nn.functional as F

from cl_sulora.adapters.row_span_linear import row_span_linear


def setup(seed=0, d_in=24, d_out=10, r=3):
    g = torch.Generator().manual_seed(seed)
    rows = torch.linalg.qr(torch.randn(d_in, r, generator=g))[0].T.contiguous()  # orthonormal
    const = torch.randn(d_out, d_in, generator=g)
    B = torch.randn(6, r, generator=g).requires_grad_()
    index = torch.tensor([0, 2, 3, 5, 7, 9])  # B's rows land in these output rows
    x = torch.randn(4, 5, d_in, generator=g).requires_grad_()
    bias = torch.randn(d_out, generator=g)
    return rows, const, B, index, x, bias


def weight(const, B, index, rows):
    return const.index_add(0, index, B @ rows)


def test_gradients_equal_plain_autograd():
    rows, const, B, index, x, bias = setup()
    y = row_span_linear(x, weight(const, B, index, rows), bias, rows)
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
    w = weight(const, B, index, rows)  # built in float32, as the layer does
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = row_span_linear(x, w, bias, rows)
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


def test_no_weight_gradient_when_weight_is_constant():
    rows, const, _, _, x, bias = setup(2)
    y = row_span_linear(x, const, bias, rows)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(y) @ const)


def test_trainable_bias_is_refused():
    rows, const, _, _, x, bias = setup(3)
    with pytest.raises(ValueError, match="freeze"):
        row_span_linear(x, const, bias.requires_grad_(), rows)
