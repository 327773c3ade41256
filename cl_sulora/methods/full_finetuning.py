"""Avalanche's Naive, EWC, LwF and Replay on the shared backbone and head, for context: full
fine-tuning with Avalanche's own plugins, keyword-only arguments and the class-incremental mask."""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule
from avalanche.training.plugins import EWCPlugin, LwFPlugin, ReplayPlugin
from avalanche.training.utils import ParamData
from pydantic import model_validator
from torch import nn

from ..adapters.config import config_dataclass
from ..training.plugins import CurrentClassMask
from ..training.template import AdapterTemplate
from .registry import MethodSpec, checked_config, register


@config_dataclass
class EWCConfig:
    """EWC (Kirkpatrick et al., PNAS 2017) through Avalanche's ``EWCPlugin``.

    Args:
        ewc_lambda: weight of the quadratic penalty (tune per benchmark).
        mode: ``separate`` (one penalty per earlier experience) or ``online``.
        decay_factor: importance decay of the ``online`` mode (required there only).
    """

    ewc_lambda: float = 100.0
    mode: Literal["separate", "online"] = "separate"
    decay_factor: float | None = None

    @model_validator(mode="after")
    def _check(self) -> EWCConfig:
        if (self.mode == "online") != (self.decay_factor is not None):
            raise ValueError("decay_factor is required by, and only by, mode='online'")
        return self


@config_dataclass
class LwFConfig:
    """LwF (Li and Hoiem, TPAMI 2017) through Avalanche's ``LwFPlugin``.

    Args:
        alpha: weight of the distillation loss.
        temperature: softmax temperature of the distillation.
    """

    alpha: float = 1.0
    temperature: float = 2.0


@config_dataclass
class ReplayConfig:
    """Experience replay through Avalanche's ``ReplayPlugin`` (experience-balanced buffer).

    Args:
        mem_size: samples kept in the rehearsal buffer.
    """

    mem_size: int = 2000


class ReplayClassMask(CurrentClassMask):
    """:class:`CurrentClassMask` that also keeps the classes of the replay buffer unmasked
    (``ReplayPlugin`` mixes the buffer in through the dataloader, not the adapted dataset)."""

    def __init__(self, replay: ReplayPlugin) -> None:
        super().__init__()
        self.replay = replay

    def allowed_classes(self, strategy) -> set[int]:
        buffer = self.replay.storage_policy.buffer
        buffered = {int(t) for t in buffer.targets} if len(buffer) else set()
        return super().allowed_classes(strategy) | buffered


class UnmaskedLogitsForDistillation(SupervisedPlugin, supports_distributed=True):
    """Hands LwF the unmasked logits: the class mask applies to the cross-entropy (computed
    before the ``before_backward`` hooks) but not to LwF's distillation of the old classes'
    logits; the masked logits are back after the backward pass. Must precede the mask and the
    LwF plugin."""

    def __init__(self) -> None:
        super().__init__()
        self._other: torch.Tensor | None = None

    def after_forward(self, strategy, **kwargs):
        self._other = strategy.mb_output  # before the mask

    def before_backward(self, strategy, **kwargs):
        strategy.mb_output, self._other = self._other, strategy.mb_output

    def after_backward(self, strategy, **kwargs):
        strategy.mb_output, self._other = self._other, None


class _PlainForward(nn.Module):
    """``model(x)`` for a wrapped model, hiding that it is a ``MultiTaskModule``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _previous(model: nn.Module) -> nn.Module:
    """The model LwF distils from: as it is when multi-head, else behind a plain forward."""
    head = getattr(model, "head", None)
    return model if isinstance(head, MultiTaskModule) else _PlainForward(model)


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, _PlainForward) else model


class CheckpointedEWCPlugin(EWCPlugin, supports_distributed=True):
    """``EWCPlugin`` whose saved parameters and importances go into checkpoints as tensors."""

    def state_dict(self) -> dict:
        def tensors(store):
            return {t: {k: p.data.detach().cpu() for k, p in params.items()}
                    for t, params in store.items()}

        return {"saved_params": tensors(self.saved_params),
                "importances": tensors(self.importances)}

    def load_state_dict(self, state: dict, strategy) -> None:
        def params(saved):
            store = defaultdict(dict)
            for t, values in saved.items():
                store[int(t)] = {k: ParamData(k, init_tensor=v.to(strategy.device),
                                              device=strategy.device) for k, v in values.items()}
            return store

        self.saved_params = params(state["saved_params"])
        self.importances = params(state["importances"])


class ClassifierLwFPlugin(LwFPlugin, supports_distributed=True):
    """``LwFPlugin`` for :class:`~cl_sulora.models.ContinualClassifier`, in every head regime.

    Avalanche's LwF asks any ``MultiTaskModule`` for every head's output (``task_labels=None``).
    A multi-head classifier gives them (LwF distils each earlier task's head on its classes); a
    single-head one has only one head, so its previous model is kept behind a plain forward and
    LwF distils that head on its previously seen classes.
    """

    def after_training_exp(self, strategy, **kwargs):
        dataset = strategy.experience.dataset
        if hasattr(dataset, "targets_task_labels"):
            super().after_training_exp(strategy, **kwargs)
        else:  # Avalanche's LwF reads task labels; a stream without them is one task, 0
            self.lwf.expcount += 1
            self.lwf.prev_model = copy.deepcopy(strategy.model)
            self.lwf.prev_classes_by_task[0] |= {int(t) for t in dataset.targets}
        self.lwf.prev_model = _previous(self.lwf.prev_model)

    def state_dict(self) -> dict:
        """The previous model's tensors, the classes seen per task and the experience count."""
        previous = self.lwf.prev_model
        return {
            "expcount": self.lwf.expcount,
            "prev_classes": {t: sorted(c) for t, c in self.lwf.prev_classes_by_task.items()},
            "prev_model": None if previous is None else _unwrapped(previous).state_dict(),
        }

    def load_state_dict(self, state: dict, strategy) -> None:
        """The previous model: a copy of ``strategy.model`` with the saved tensors."""
        self.lwf.expcount = int(state["expcount"])
        self.lwf.prev_classes_by_task = defaultdict(
            set, {int(t): set(c) for t, c in state["prev_classes"].items()})
        self.lwf.prev_model = None
        if state["prev_model"] is not None:
            previous = copy.deepcopy(strategy.model)
            previous.load_state_dict(state["prev_model"], strict=True)
            self.lwf.prev_model = _previous(previous)


class FullFineTuning(AdapterTemplate):
    """Fine-tunes the whole model (backbone and head) with the given Avalanche plugins.

    Subclasses build their plugins in :meth:`method_plugins` from ``config`` (an instance of
    ``config_cls``; ``None``: its defaults). ``mask_logits`` applies the class-incremental
    training mask (:meth:`class_mask`, last among the plugins).
    """

    config_cls: type | None = None

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config=None,
        plugins: Sequence[SupervisedPlugin] | None = None,
        mask_logits: bool = True,
        **kwargs,
    ) -> None:
        self.config = checked_config(self, self.config_cls, config)
        model.requires_grad_(True)
        own = [*self.method_plugins(mask_logits), *(plugins or [])]
        mask = self.class_mask() if mask_logits else None
        super().__init__(model=model, optimizer=optimizer, plugins=own + ([mask] if mask else []),
                         mask_logits=mask_logits and mask is None, **kwargs)

    def method_plugins(self, mask_logits: bool) -> list[SupervisedPlugin]:
        return []

    def class_mask(self) -> CurrentClassMask | None:
        """The training mask, when the method needs its own (``None``: the standard one)."""
        return None



class NaiveBaseline(FullFineTuning):
    """Naive fine-tuning (no protection against forgetting)."""


class EWCBaseline(FullFineTuning):
    """EWC: quadratic penalty on the parameters weighted by their Fisher importance."""

    config_cls = EWCConfig

    def method_plugins(self, mask_logits):
        self.ewc = CheckpointedEWCPlugin(
            self.config.ewc_lambda, self.config.mode, self.config.decay_factor
        )
        return [self.ewc]

    def method_state_params(self):
        stored = [*self.ewc.saved_params.values(), *self.ewc.importances.values()]
        return sum(math.prod(p.shape) for params in stored for p in params.values())


class LwFBaseline(FullFineTuning):
    """LwF: distillation of the previous model's outputs on the old classes (single head:
    class- or domain-incremental)."""

    config_cls = LwFConfig

    def method_plugins(self, mask_logits):
        self.lwf = ClassifierLwFPlugin(self.config.alpha, self.config.temperature)
        return [UnmaskedLogitsForDistillation(), self.lwf] if mask_logits else [self.lwf]

    def method_state_params(self):
        previous = self.lwf.lwf.prev_model
        return 0 if previous is None else sum(p.numel() for p in previous.parameters())


class ReplayBaseline(FullFineTuning):
    """Experience replay with an experience-balanced buffer."""

    config_cls = ReplayConfig

    def method_plugins(self, mask_logits):
        self.replay = ReplayPlugin(mem_size=self.config.mem_size)
        return [self.replay]

    def class_mask(self):
        return ReplayClassMask(self.replay)

    def method_state_params(self):
        """Values of the buffered inputs (assumes inputs of equal size)."""
        buffer = self.replay.storage_policy.buffer
        return len(buffer) * buffer[0][0].numel() if len(buffer) else 0


register(MethodSpec(
    name="naive",
    strategy=NaiveBaseline,
    config_cls=None,
    paper="naive fine-tuning (Avalanche's Naive)",
    trains="the whole backbone and the head",
    stores="nothing",
))
register(MethodSpec(
    name="ewc",
    strategy=EWCBaseline,
    config_cls=EWCConfig,
    paper="EWC (Kirkpatrick et al., PNAS 2017), Avalanche's EWCPlugin",
    trains="the whole backbone and the head, under the EWC penalty",
    stores="parameters and Fisher importances per experience (separate mode)",
))
register(MethodSpec(
    name="lwf",
    strategy=LwFBaseline,
    config_cls=LwFConfig,
    paper="LwF (Li and Hoiem, TPAMI 2017), Avalanche's LwFPlugin",
    trains="the whole backbone and the head, with distillation from the previous model",
    stores="a copy of the previous model",
))
register(MethodSpec(
    name="replay",
    strategy=ReplayBaseline,
    config_cls=ReplayConfig,
    paper="experience replay, Avalanche's ReplayPlugin",
    trains="the whole backbone and the head on new data plus the buffer",
    stores="an experience-balanced buffer of mem_size samples",
    resumable=False,
    distributed=False,
))
