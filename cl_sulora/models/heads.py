"""A backbone plus a continual-learning head, in the three head regimes of the benchmarks, and
RanPAC's split of a head into a trained one and a solved one on random features."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Literal

import torch
from avalanche.models import (
    DynamicModule,
    IncrementalClassifier,
    MultiHeadClassifier,
    MultiTaskModule,
)
from torch import Tensor, nn

from .backbones import RandomFeatures

Protocol = Literal["class-incremental", "domain-incremental", "task-incremental"]
PROTOCOLS: tuple[str, ...] = ("class-incremental", "domain-incremental", "task-incremental")


def make_head(protocol: str, in_features: int, num_classes: int | None = None, *,
              auto_adapt: bool = True) -> nn.Module:
    """The head of a protocol: growing (class-), fixed (domain-) or one per task (task-incr.).

    The growing head is Avalanche's ``IncrementalClassifier``: it adds units for new classes and
    masks units of classes not seen yet; :class:`~cl_sulora.training.plugins.CurrentClassMask`
    additionally masks the classes outside the current experience during training. With
    ``num_classes`` it starts with that many units (each masked until its class is seen);
    without, with one, and grows. The domain-incremental head needs ``num_classes``; the
    task-incremental heads grow per task, so ``num_classes`` (the total over tasks) is checked
    but does not size them. ``auto_adapt=False`` leaves a growing head's growth to the module
    that holds it (Avalanche's flag).
    """
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if protocol == "class-incremental":
        return IncrementalClassifier(in_features, initial_out_features=num_classes or 1,
                                     auto_adapt=auto_adapt)
    if protocol == "domain-incremental":
        if not num_classes:
            raise ValueError("a domain-incremental head needs num_classes")
        return nn.Linear(in_features, num_classes)
    if protocol == "task-incremental":
        return MultiHeadClassifier(in_features, initial_out_features=2, masking=False)
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")


def head_structure(head: nn.Module) -> dict:
    """What :func:`grow_head` needs to give a fresh head of the same protocol the units this
    one grew: the class count of a growing head, or of each task's head."""
    if isinstance(head, SolvedHead):
        return {"kind": "solved", "trained": head_structure(head.trained),
                "solved": head_structure(head.solved)}
    if isinstance(head, MultiHeadClassifier):
        return {"kind": "multi-head", "classes": {
            task: int(h.classifier.out_features) for task, h in head.classifiers.items()}}
    if isinstance(head, IncrementalClassifier):
        return {"kind": "incremental", "classes": int(head.classifier.out_features)}
    return {"kind": "fixed"}


@torch.no_grad()
def grow_head(head: nn.Module, structure: dict) -> None:
    """Grow a fresh head to a :func:`head_structure` through Avalanche's own adaptation (as if
    it had seen experiences of those classes and tasks), ready for a ``load_state_dict`` of the
    grown head's tensors."""
    kind = structure["kind"]
    if kind == "solved":
        if not isinstance(head, SolvedHead):
            raise ValueError("saved from a head split into trained and solved parts "
                             f"(alignment.random_features), loaded into a {type(head).__name__}")
        grow_head(head.trained, structure["trained"])
        grow_head(head.solved, structure["solved"])
        return
    if kind == "multi-head":
        if not isinstance(head, MultiHeadClassifier):
            raise ValueError(f"saved from a multi-head model, loaded into a {type(head).__name__}")
        grown = [(int(task), count) for task, count in structure["classes"].items()]
    elif kind == "incremental":
        if not isinstance(head, IncrementalClassifier):
            raise ValueError(f"saved from a growing head, loaded into a {type(head).__name__}")
        grown = [(0, structure["classes"])]
    else:
        return
    for task, count in grown:
        head.adaptation(SimpleNamespace(classes_in_this_experience=list(range(count)),
                                        task_labels=[task]))


class SolvedHead(DynamicModule):
    """RanPAC's split of a classifier: training reads the backbone's features through the
    protocol's head (``trained``), as RanPAC's first session trains a plain head; inference
    reads random ReLU features of them (``random_features``, a fixed projection) through a
    second head of the same protocol (``solved``), which classifier alignment solves in closed
    form after each experience. The projection so shapes the classifier only, never the loss
    that trains the adapters (``backbone.random_features`` puts it under both).

    Which head answers follows the module's mode: ``train()`` the trained one, ``eval()`` the
    solved one, which is the classifier every evaluation measures. The solved head is made and
    grown on a forked random state, so a run trains exactly as it would with the trained head
    alone. Make it with :func:`split_head` (a growing solved head must not grow by itself:
    ``auto_adapt=False``).
    """

    def __init__(self, trained: nn.Module, random_features: RandomFeatures,
                 solved: nn.Module) -> None:
        super().__init__()
        if isinstance(trained, MultiTaskModule) or isinstance(solved, MultiTaskModule):
            raise ValueError("a solved head on random features is single-head (class- or "
                             "domain-incremental); a multi-head model's heads never compete")
        self.trained = trained
        self.random_features = random_features
        self.solved = solved  # written by alignment; training never reads it

    def adaptation(self, experience) -> None:
        """Grow the solved head with the trained one (which Avalanche adapts itself)."""
        if isinstance(self.solved, DynamicModule):
            with torch.random.fork_rng(devices=[]):
                self.solved.adaptation(experience)

    def solved_input(self, features: Tensor) -> Tensor:
        """What the solved head reads of the backbone's ``features``: their random features."""
        return self.random_features(features)

    def forward(self, features: Tensor) -> Tensor:
        if self.training:
            return self.trained(features)
        return self.solved(self.solved_input(features))


def split_head(protocol: str, in_features: int, width: int, generator: torch.Generator,
               num_classes: int | None = None) -> SolvedHead:
    """A protocol's head (:func:`make_head`) for training, and one on ``width`` random features
    of the backbone's ``in_features`` (RanPAC's projection, drawn from ``generator``) for
    inference: :class:`SolvedHead`."""
    trained = make_head(protocol, in_features, num_classes)
    with torch.random.fork_rng(devices=[]):
        solved = make_head(protocol, width, num_classes, auto_adapt=False)
    return SolvedHead(trained, RandomFeatures(in_features, width, generator), solved)


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
        return self.classify(self.backbone(x), task_labels)

    def classify(self, features: Tensor, task_labels: Tensor | int | None = None
                 ) -> Tensor | dict:
        """:meth:`forward` from the backbone's ``features`` of the batch: the head's logits."""
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
