"""O-LoRA (Wang et al., Findings of EMNLP 2023): a new LoRA per experience, kept orthogonal to
the frozen earlier ones by a penalty on the overlap of their down-projections."""

from __future__ import annotations

import torch
from pydantic import model_validator
from torch import Tensor, nn

from ..adapters.config import BranchLoRAConfig, config_dataclass
from ..adapters.injection import branch_lora_layers
from .lora import BranchLoRAStrategy, IncLoRAPlugin
from .registry import MethodSpec, register


@config_dataclass
class OLoRAConfig(BranchLoRAConfig):
    """O-LoRA: loss += ``lambda1 * sum_old |A_old A_new^T|`` (sum of absolute entries, over
    every layer and earlier branch) ``+ lambda2 * (||A_new||_F + ||B_new||_F)`` (summed over
    layers), as the reference code's ``UIETrainer.training_step``.

    Args:
        rank: rank of each experience's LoRA (8 in the paper and ``lora_dim`` in the code).
        alpha: LoRA scaling numerator: the update is scaled by ``alpha / rank``; the code's
            ``lora_alpha=32`` (``src/run_uie_lora.py``), scale 4 at rank 8.
        dropout: LoRA dropout on the branches' input (the code's ``lora_dropout=0.1``).
        lambda1: weight of the orthogonality penalty (0.5 in the code's scripts).
        lambda2: weight of the L2 term: the (unsquared) Frobenius norms of the new LoRA's
            ``A`` and ``B`` (0 in the code's standard scripts).
    """

    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.1
    lambda1: float = 0.5
    lambda2: float = 0.0

    @model_validator(mode="after")
    def _check_olora(self) -> OLoRAConfig:
        if self.lambda1 < 0 or self.lambda2 < 0:
            raise ValueError("lambda1 and lambda2 must be >= 0")
        return self


class OLoRAPlugin(IncLoRAPlugin, supports_distributed=True):
    """IncLoRA plus O-LoRA's penalty, added to the loss before the backward pass."""

    config: OLoRAConfig

    def penalty(self, model: nn.Module) -> Tensor:
        """``lambda1 * sum_old |A_old A_new^T| + lambda2 * (||A_new|| + ||B_new||)`` over all
        layers."""
        terms: list[Tensor] = []
        for layer in branch_lora_layers(model).values():
            if not len(layer.branches) or layer.branches[-1].frozen:
                continue
            *old, new = layer.branches
            if old and self.config.lambda1:
                A_old = torch.cat([b.A for b in old])
                terms.append(self.config.lambda1 * (A_old @ new.A.T).abs().sum())
            if self.config.lambda2:
                terms.append(self.config.lambda2 * (new.A.norm() + new.B.norm()))
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def before_backward(self, strategy, **kwargs):
        strategy.loss = strategy.loss + self.penalty(strategy.model).to(strategy.loss)


class OLoRA(BranchLoRAStrategy):
    """O-LoRA: orthogonal LoRA branches, summed at test."""

    config_cls = OLoRAConfig
    plugin_cls = OLoRAPlugin


register(MethodSpec(
    name="olora",
    strategy=OLoRA,
    config_cls=OLoRAConfig,
    paper="O-LoRA (Wang et al., Findings of EMNLP 2023)",
    trains="the new LoRA (A_t, B_t) under an orthogonality penalty to earlier A, and the head",
    stores="one rank-8 LoRA per experience",
))
