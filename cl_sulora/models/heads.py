"""A backbone plus a continual-learning head, in the three head regimes of the benchmarks."""

from __future__ import annotations

from typing import Literal

import torch
from avalanche.models import IncrementalClassifier, MultiHeadClassifier, MultiTaskModule
from torch import Tensor, nn

Protocol = Literal["class-incremental", "domain-incremental", "task-incremental"]
PROTOCOLS: tuple[str, ...] = ("class-incremental", "domain-incremental", "task-incremental")


def make_head(protocol: str, in_features: int, num_classes: int | None = None) -> nn.Module:
    """The head of a protocol: growing (class-), fixed (domain-) or one per task (task-incr.).

    The growing head is Avalanche's ``IncrementalClassifier``: it adds units for new classes and
    masks units of classes not seen yet; :class:`~cl_sulora.training.plugins.CurrentClassMask`
    additionally masks the classes outside the current experience during training.
    """
    if protocol == "class-incremental":
        return IncrementalClassifier(in_features, initial_out_features=1)
    if protocol == "domain-incremental":
        if not num_classes:
            raise ValueError("a domain-incremental head needs num_classes")
        return nn.Linear(in_features, num_classes)
    if protocol == "task-incremental":
        return MultiHeadClassifier(in_features, initial_out_features=2, masking=False)
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")


class ContinualClassifier(MultiTaskModule):
    """``head(backbone(x))``; the task label reaches the head only in the multi-head regime.

    ``backbone`` maps an input batch to features of size ``feature_dim``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def adaptation(self, experience) -> None:
        """Nothing to adapt here; Avalanche adapts the head (a child module) itself."""

    def forward(self, x: Tensor, task_labels: Tensor | int | None = None) -> Tensor | dict:
        """Logits. In the multi-head regime ``task_labels`` picks each sample's head; ``None``
        gives every known task's logits, by task (as Avalanche's ``MultiTaskModule`` does)."""
        features = self.backbone(x)
        if isinstance(self.head, MultiTaskModule):
            # Avalanche gathers the heads' outputs into an fp32 tensor: keep them fp32
            with torch.autocast(features.device.type, enabled=False):
                if task_labels is None:
                    return self.head.forward_all_tasks(features.float())
                return self.head(features.float(), task_labels)
        return self.head(features)

    def forward_all_tasks(self, x: Tensor) -> dict:
        """Every known task's logits (multi-head regime), from one pass of the backbone."""
        if not isinstance(self.head, MultiTaskModule):
            return {0: self.forward(x)}
        return self.forward(x, None)

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self.forward(x, task_label)
