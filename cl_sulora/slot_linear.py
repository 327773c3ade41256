"""A linear map whose weight holds a low-rank term ``scale * P(B) A`` and whose backward gives
``B`` its gradient directly.

For ``W = C + scale * P(B) A`` (``C`` constant, ``A`` the ``r x d_in`` rows of ``B``'s
columns, ``P`` placing ``B``'s rows at ``out_index`` of ``W``'s output rows), the gradient of
``B`` is ``scale * P^T(dY^T (X A^T))``. So neither the full weight gradient ``dY^T X`` (a GEMM
as large as the forward's, and ``X`` saved for it) nor an autograd graph through the weight is
needed: the forward saves the rank-``r`` projection ``X A^T`` and the weight it used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _SlotLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, B: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor,
                out_index: Tensor | None, scale: float) -> Tensor:
        y = F.linear(x, weight, bias)  # autocast applies here as to any F.linear
        projected = F.linear(x, rows) if ctx.needs_input_grad[1] else None
        ctx.x_dtype, ctx.B_dtype, ctx.out_index, ctx.scale = x.dtype, B.dtype, out_index, scale
        ctx.save_for_backward(weight.to(y.dtype), projected)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        weight, projected = ctx.saved_tensors
        dx = d_B = None
        dy = dy.to(weight.dtype)
        if ctx.needs_input_grad[0]:
            dx = (dy @ weight).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            flat_dy = dy.reshape(-1, dy.shape[-1])
            if ctx.out_index is not None:
                flat_dy = flat_dy.index_select(1, ctx.out_index)
            flat_h = projected.reshape(-1, projected.shape[-1]).to(dy.dtype)
            d_B = (flat_dy.T @ flat_h).to(ctx.B_dtype).mul_(ctx.scale)
        return dx, d_B, None, None, None, None, None


def slot_linear(x: Tensor, B: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor,
                out_index: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """``F.linear(x, weight, bias)`` where ``weight`` (given without a graph) contains
    ``scale * P(B) rows``; ``B`` (``n_out x r``) gets that term's exact gradient.

    ``rows`` (``r x d_in``) are the directions of ``B``'s columns and ``out_index`` the output
    rows of ``weight`` that ``B``'s rows land in (``None``: all, in order). Only ``x`` and ``B``
    get gradients (``bias`` must be frozen). Costs one extra rank-``r`` projection of ``x`` in
    the forward and one ``n_out x r`` product in the backward.
    """
    if bias is not None and bias.requires_grad:
        raise ValueError("slot_linear gives no gradient to the bias: freeze it")
    if weight.requires_grad:
        raise ValueError("slot_linear takes the weight without a graph: build it under no_grad")
    return _SlotLinear.apply(x, B, weight, bias, rows, out_index, scale)
