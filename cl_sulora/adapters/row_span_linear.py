"""A linear map whose weight gradient is kept only within the span of given orthonormal rows.

When a weight ``W = C + P(B) A`` depends on a trainable factor ``B`` only through orthonormal
rows ``A`` (``A A^T = I``) and ``C`` is constant, the gradient that reaches ``B`` is
``P^T(dW) A^T`` and ``dW A^T = dY^T (X A^T)``. So the full weight gradient ``dY^T X`` (a GEMM as
large as the forward's, and ``X`` saved for it) is never needed: the backward returns
``dW A^T A``, which gives ``B`` exactly the same gradient, from the rank-``r`` projection
``X A^T`` saved in the forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _RowSpanLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor) -> Tensor:
        y = F.linear(x, weight, bias)  # autocast applies here as to any F.linear
        projected = F.linear(x, rows) if ctx.needs_input_grad[1] else None
        ctx.x_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        ctx.save_for_backward(weight.to(y.dtype), projected, rows)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        weight, projected, rows = ctx.saved_tensors
        dx = d_weight = None
        dy = dy.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            dx = (dy @ weight).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            flat_dy = dy.reshape(-1, dy.shape[-1])
            flat_h = projected.reshape(-1, projected.shape[-1]).to(dy.dtype)
            d_weight = ((flat_dy.T @ flat_h).to(rows.dtype) @ rows).to(ctx.weight_dtype)
        return dx, d_weight, None, None


def row_span_linear(x: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor) -> Tensor:
    """``F.linear(x, weight, bias)`` whose weight gradient is ``dW rows^T rows``.

    Exact for every parameter that reaches ``weight`` only through ``(...) @ rows`` when the rows
    are orthonormal; ``bias`` gets no gradient (it must be frozen). Costs one extra rank-``r``
    projection of ``x`` in the forward and one ``d_out x r`` product in the backward, instead of
    the full ``d_out x d_in`` weight gradient.
    """
    if bias is not None and bias.requires_grad:
        raise ValueError("row_span_linear gives no gradient to the bias: freeze it")
    return _RowSpanLinear.apply(x, weight, bias, rows)
