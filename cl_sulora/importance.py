"""SRLoRA / AdaLoRA importance of rank-1 pairs: EMA sensitivity times EMA uncertainty."""

from __future__ import annotations

import torch
from torch import Tensor

from .layer import SubspaceLoRALinear


@torch.no_grad()
def update_importance(layer: SubspaceLoRALinear, beta1: float, beta2: float) -> None:
    """Accumulate one step of importance for the training slot from ``lora_B_train.grad``.

    ``I = |w * grad|``; ``I_ema = b1 I_ema + (1 - b1) I``; ``U = b2 U + (1 - b2) |I - I_ema|``
    (AdaLoRA, Zhang et al. 2023). ``A`` is frozen, so a pair's score is that of its ``B`` column.
    """
    param = layer.lora_B_train
    if param is None or param.grad is None:
        return
    sensitivity = (param * param.grad).abs().float()
    layer.importance_ema.mul_(beta1).add_(sensitivity, alpha=1 - beta1)
    deviation = (sensitivity - layer.importance_ema).abs()
    layer.importance_unc.mul_(beta2).add_(deviation, alpha=1 - beta2)


def pair_scores(layer: SubspaceLoRALinear) -> Tensor:
    """Score of each training-slot pair: mean over its ``B`` column of ``I_ema * U``."""
    return (layer.importance_ema * layer.importance_unc).mean(dim=0)
