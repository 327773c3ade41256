"""SRLoRA / AdaLoRA importance of rank-1 pairs: EMA sensitivity times EMA uncertainty."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ...adapters.subspace_layer import SubspaceLoRALinear


@torch.no_grad()
def update_importance(layers: Iterable[SubspaceLoRALinear], beta1: float, beta2: float) -> None:
    """Accumulate one step of importance for each layer's training slot from
    ``lora_B_train.grad`` (layers without a training slot or gradient are skipped).

    ``I = |w * grad|``; ``I_ema = b1 I_ema + (1 - b1) I``; ``U = b2 U + (1 - b2) |I - I_ema|``
    (AdaLoRA, Zhang et al. 2023). ``A`` is frozen, so a pair's score is that of its ``B`` column.
    All layers are updated together by multi-tensor (``_foreach``) kernels.
    """
    layers = [layer for layer in layers
              if layer.lora_B_train is not None and layer.lora_B_train.grad is not None]
    if not layers:
        return
    params = [layer.lora_B_train for layer in layers]
    ema = [layer.importance_ema for layer in layers]
    unc = [layer.importance_unc for layer in layers]
    sensitivity = torch._foreach_mul(params, [p.grad for p in params])
    torch._foreach_abs_(sensitivity)
    sensitivity = [s.to(e.dtype) for s, e in zip(sensitivity, ema, strict=True)]
    torch._foreach_lerp_(ema, sensitivity, 1 - beta1)
    deviation = torch._foreach_sub(sensitivity, ema)
    torch._foreach_abs_(deviation)
    torch._foreach_lerp_(unc, deviation, 1 - beta2)


def pair_scores(layer: SubspaceLoRALinear) -> Tensor:
    """Score of each training-slot pair: mean over its ``B`` column of ``I_ema * U``."""
    return (layer.importance_ema * layer.importance_unc).mean(dim=0)
