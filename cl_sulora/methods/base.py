"""What every adapter strategy shares: the head regime, freezing and the optimizer rebuild."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence

import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.nn import CrossEntropyLoss
from torch.optim import Optimizer

MASK_VALUE = -1e4  # finite, so a masked logit never turns the loss into inf or nan in fp16


def rebuild_optimizer(optimizer: Optimizer, model: nn.Module) -> Optimizer:
    """A fresh optimizer of the same type and hyperparameters over ``model``'s trainable params."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters: nothing to optimize")
    accepted = inspect.signature(type(optimizer)).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return type(optimizer)(params, **defaults)


def freeze_except(
    model: nn.Module, params: Iterable[nn.Parameter], module_names: Sequence[str] = ()
) -> None:
    """Freeze ``model`` but ``params`` and the modules whose dotted name has a component in
    ``module_names`` (e.g. ``"head"``)."""
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if module_names and set(name.split(".")) & set(module_names):
            module.requires_grad_(True)
    for p in params:
        p.requires_grad_(True)


def task_label(experience) -> int:
    """The experience's task label, 0 for benchmarks without task labels."""
    try:
        return int(experience.task_label)
    except AttributeError:
        return 0


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class CurrentClassMask(SupervisedPlugin):
    """During training, mask the logits of classes absent from the experience's dataset.

    With a growing head this is the usual class-incremental regime: old classes are masked while
    a new experience trains. Rehearsal that mixes a buffer in through the data loader extends
    the allowed classes (see ``ReplayClassMask``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._allowed: torch.Tensor | None = None

    def before_training_exp(self, strategy, **kwargs):
        targets = strategy.adapted_dataset.targets
        self._allowed = torch.as_tensor(sorted(set(int(t) for t in targets)))

    def after_forward(self, strategy, **kwargs):
        logits = strategy.mb_output
        if self._allowed is None or logits.dim() != 2:
            return
        keep = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        allowed = self._allowed[self._allowed < logits.shape[1]].to(logits.device)
        keep[allowed] = True
        strategy.mb_output = logits.masked_fill(~keep, MASK_VALUE)

    def after_training_exp(self, strategy, **kwargs):
        self._allowed = None


class NonFiniteLossError(RuntimeError):
    """The training loss became inf or nan."""


class NonFiniteLossGuard(SupervisedPlugin):
    """Stop training with a clear message as soon as the loss is not finite."""

    def before_backward(self, strategy, **kwargs):
        if not torch.isfinite(strategy.loss).all():
            raise NonFiniteLossError(
                f"non-finite loss ({float(strategy.loss.detach())}) at experience "
                f"{strategy.experience.current_experience}, epoch {strategy.clock.train_exp_epochs}"
                f", iteration {strategy.clock.train_epoch_iterations}: lower the learning rate or "
                "use fp32; the last checkpoint is left as it was"
            )


class AdapterTemplate(SupervisedTemplate):
    """``SupervisedTemplate`` that rebuilds its optimizer over the trainable parameters of each
    experience, applies the class-incremental training mask and stops on a non-finite loss.
    Keyword-only arguments."""

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: Optimizer,
        criterion: nn.Module | None = None,
        train_mb_size: int = 32,
        train_epochs: int = 1,
        eval_mb_size: int | None = None,
        device: str | torch.device = "cpu",
        plugins: Sequence[SupervisedPlugin] | None = None,
        evaluator=default_evaluator,
        eval_every: int = -1,
        mask_logits: bool = True,
        **kwargs,
    ) -> None:
        plugins = [*(plugins or []), NonFiniteLossGuard()]
        if mask_logits:
            plugins.append(CurrentClassMask())
        super().__init__(
            model=model,
            optimizer=optimizer,
            criterion=criterion if criterion is not None else CrossEntropyLoss(),
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size or train_mb_size,
            device=device,
            plugins=plugins,
            evaluator=evaluator,
            eval_every=eval_every,
            **kwargs,
        )

    def make_optimizer(self, **kwargs):
        self.optimizer = rebuild_optimizer(self.optimizer, self.model)
