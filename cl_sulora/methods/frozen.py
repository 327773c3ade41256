"""The adapter-free baseline: the backbone stays as pretrained and only the head trains (with
classifier alignment, when the run enables it, on the same frozen features).

It answers whether adapting the backbone helps at all on a benchmark: an adapter method that
does not beat it is measuring its head, not its adapters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from avalanche.core import SupervisedPlugin
from pydantic import Field
from torch import nn

from ..adapters.config import config_dataclass
from ..adapters.injection import check_trainable_modules
from ..training.template import AdapterTemplate, freeze_except
from .registry import MethodSpec, checked_config, register


@config_dataclass
class FrozenConfig:
    """Args:
        trainable_modules: module-name components that train (the head); everything else of
            the model is frozen.
    """

    trainable_modules: list[str] = Field(
        default_factory=lambda: ["head", "classifier"], min_length=1
    )


class FrozenBackbone(AdapterTemplate):
    """Trains only ``config.trainable_modules`` (the head) of ``model``, on every experience;
    the backbone is never updated and nothing is stored besides the head."""

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: FrozenConfig | None = None,
        plugins: Sequence[SupervisedPlugin] | None = None,
        **kwargs,
    ) -> None:
        self.config = checked_config(self, FrozenConfig, config)
        check_trainable_modules(model, self.config.trainable_modules)
        super().__init__(model=model, optimizer=optimizer, plugins=plugins, **kwargs)

    def make_optimizer(self, **kwargs):
        # after model adaptation: the units the head grew for this experience train too
        freeze_except(self.model, (), self.config.trainable_modules)
        super().make_optimizer(**kwargs)


register(MethodSpec(
    name="frozen",
    strategy=FrozenBackbone,
    config_cls=FrozenConfig,
    paper="adapter-free baseline (a linear probe trained continually)",
    trains="the head only (the backbone stays as pretrained)",
    stores="nothing",
))
