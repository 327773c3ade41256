"""What every adapter strategy shares: the head regime, freezing and the optimizer rebuild."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Sequence

import torch
from avalanche.benchmarks.utils.data_loader import (
    SingleDatasetDataLoader,
    collate_from_data_or_kwargs,
)
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.nn import CrossEntropyLoss
from torch.optim import Optimizer

from .. import distributed
from ..loading import EpochSpanningLoader

MASK_VALUE = -1e4  # finite, so a masked logit never turns the loss into inf or nan in fp16


def rebuild_optimizer(optimizer: Optimizer, model: nn.Module) -> Optimizer:
    """A fresh optimizer of the same type and hyperparameters over ``model``'s trainable params."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters: nothing to optimize")
    accepted = _constructor_arguments(type(optimizer))
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return type(optimizer)(params, **defaults)


@functools.cache
def _constructor_arguments(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls).parameters)


def freeze_except(
    model: nn.Module, params: Iterable[nn.Parameter], module_names: Sequence[str] = ()
) -> None:
    """Freeze ``model`` but ``params`` and the modules whose dotted name has a component in
    ``module_names`` (e.g. ``"head"``). Only the flags that change are written."""
    wanted = set(module_names)
    trainable = {id(p) for p in params}
    named = list(model.named_parameters(remove_duplicate=False))
    for name, p in named:
        if wanted.intersection(name.split(".")[:-1]):
            trainable.add(id(p))
    for _, p in named:
        if p.requires_grad != (id(p) in trainable):
            p.requires_grad_(id(p) in trainable)


def task_label(experience) -> int:
    """The experience's task label, 0 for benchmarks without task labels."""
    try:
        return int(experience.task_label)
    except AttributeError:
        return 0


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class CurrentClassMask(SupervisedPlugin, supports_distributed=True):
    """During training, mask the logits of classes absent from the experience's dataset.

    With a growing head this is the usual class-incremental regime: old classes are masked while
    a new experience trains. Rehearsal that mixes a buffer in through the data loader extends
    the allowed classes (see ``ReplayClassMask``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._allowed: list[int] | None = None
        self._keep: torch.Tensor | None = None  # on the logits' device, built once per size

    def before_training_exp(self, strategy, **kwargs):
        targets = strategy.adapted_dataset.targets
        self._allowed = sorted(set(int(t) for t in targets))
        self._keep = None

    def after_forward(self, strategy, **kwargs):
        logits = strategy.mb_output
        if self._allowed is None or logits.dim() != 2:
            return
        if (self._keep is None or self._keep.shape[0] != logits.shape[1]
                or self._keep.device != logits.device):
            keep = torch.zeros(logits.shape[1], dtype=torch.bool)
            keep[[c for c in self._allowed if c < logits.shape[1]]] = True
            self._keep = keep.to(logits.device)
        strategy.mb_output = logits.masked_fill(~self._keep, MASK_VALUE)

    def after_training_exp(self, strategy, **kwargs):
        self._allowed = self._keep = None


class NonFiniteLossError(RuntimeError):
    """The training loss became inf or nan."""


class NonFiniteLossGuard(SupervisedPlugin, supports_distributed=True):
    """Stop training with a clear message when the loss is not finite.

    The first non-finite step of an experience is recorded on the device. Every
    ``check_every`` iterations and at every epoch end the record is gathered over the
    data-parallel ranks and copied to the host without waiting; each such check raises on the
    copy of the check before it, which is done by then, so the training loop does not wait for
    the device in mid-experience. The end of the last epoch waits for its own record, so an
    experience with a non-finite loss stops before its end-of-experience work (fusion,
    checkpoint). All ranks read the same record at the same iteration, so they stop together.
    """

    def __init__(self, check_every: int = 32) -> None:
        super().__init__()
        self.check_every = check_every
        self._first: torch.Tensor | None = None  # (step in the experience, loss), -1: none
        self._pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self._epochs = 0

    def before_training_exp(self, strategy, **kwargs):
        self._first = torch.tensor([-1.0, 0.0], device=strategy.device)  # nothing flagged
        self._pending = None
        self._epochs = 0

    def before_backward(self, strategy, **kwargs):
        loss = strategy.loss.detach().float().reshape(-1)[:1]
        step = torch.cat([torch.full_like(loss, strategy.clock.train_exp_iterations), loss])
        fresh = ~torch.isfinite(loss) & (self._first[:1] < 0)
        self._first = torch.where(fresh, step, self._first)
        if (strategy.clock.train_epoch_iterations + 1) % self.check_every == 0:
            self._check(strategy, wait=False)

    def after_training_epoch(self, strategy, **kwargs):
        self._epochs += 1
        self._check(strategy, wait=self._epochs >= strategy.train_epochs)

    def after_training_exp(self, strategy, **kwargs):
        if self._pending is not None:  # training stopped before its last epoch
            self._check(strategy, wait=True)

    def _check(self, strategy, *, wait: bool) -> None:
        """Raise on the previous check's record; gather this one, and raise on it at once if
        ``wait``."""
        if self._pending is not None:
            record, copied = self._pending
            self._pending = None
            if copied is not None:
                copied.synchronize()
            self._raise_if_flagged(record, strategy)
        record = distributed.first_flagged(self._first)
        if wait:
            self._raise_if_flagged(record.cpu(), strategy)
        elif record.is_cuda:
            copied = torch.cuda.Event()
            self._pending = (record.to("cpu", non_blocking=True), copied)
            copied.record()
        else:
            self._pending = (record.clone(), None)

    @staticmethod
    def _raise_if_flagged(record: torch.Tensor, strategy) -> None:
        step, loss = record.tolist()
        if step < 0:
            return
        epoch, iteration = divmod(int(step), max(1, len(strategy.dataloader)))
        raise NonFiniteLossError(
            f"non-finite loss ({loss}) at experience {strategy.experience.current_experience}, "
            f"epoch {epoch}, iteration {iteration}: lower the learning rate or use fp32; the "
            "last checkpoint is left as it was"
        )


class AdapterTemplate(SupervisedTemplate):
    """``SupervisedTemplate`` that rebuilds its optimizer over the trainable parameters of each
    experience, applies the class-incremental training mask and stops on a non-finite loss.
    Keyword-only arguments.

    Under ``torchrun`` (see :mod:`cl_sulora.distributed`) it trains data-parallel:
    ``train_mb_size`` is the global batch, each rank trains on its shard of it, and the
    experience's training forward passes go through a DistributedDataParallel wrapper built once
    the experience's adapters are allocated (``self.model`` stays the plain model, so plugins,
    checkpoints and evaluation see it unchanged). Every rank evaluates the whole stream."""

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
        self._ddp: nn.Module | None = None

    def make_optimizer(self, **kwargs):
        self.optimizer = rebuild_optimizer(self.optimizer, self.model)

    # ------------------------------------------------------------------ data parallel
    def _before_training_exp(self, **kwargs):
        # boundary decisions drawn from the global RNG (by plugins) must agree on every rank
        distributed.align_rng()
        super()._before_training_exp(**kwargs)
        if distributed.is_distributed():
            # the trainable set is final now (plugins allocated this experience's adapters);
            # wrapping broadcasts rank 0's parameters and buffers to every rank
            self._ddp = distributed.wrap(self.model, self.device, self._has_unused_parameters())

    def _after_training_exp(self, **kwargs):
        self._ddp = None
        distributed.align_rng()
        super()._after_training_exp(**kwargs)

    def _has_unused_parameters(self) -> bool:
        """Task-aware heads leave the other tasks' heads unused in a forward pass."""
        return any(isinstance(m, MultiTaskModule) and m is not self.model
                   for m in self.model.modules())

    def forward(self):
        if self._ddp is None or not self.is_training:
            return super().forward()
        if isinstance(self.model, MultiTaskModule):
            return self._ddp(self.mb_x, self.mb_task_id)
        return self._ddp(self.mb_x)

    def backward(self):
        loss = self.loss
        sampler = getattr(self.dataloader, "batch_sampler", None)
        if self._ddp is not None and isinstance(sampler, distributed.ShardedBatchSampler):
            size = sampler.global_sizes[self.clock.train_epoch_iterations]
            loss = loss * distributed.loss_weight(len(self.mb_y), size)
        loss.backward(retain_graph=self.retain_graph)

    def make_train_dataloader(self, num_workers=0, shuffle=True, pin_memory=None,
                              persistent_workers=False, drop_last=False, **kwargs):
        """One loader over all of the experience's epochs, its workers started now
        (:class:`~cl_sulora.loading.EpochSpanningLoader`). Under ``torchrun`` each rank loads its
        shard of every global batch; batches are drawn from the whole experience (no task
        balancing). ``persistent_workers`` is implied: the workers live for the experience."""
        if distributed.is_distributed():
            distributed.check_batch_size(self.train_mb_size)
        seed = int(torch.randint(0, 2**31 - 1, (1,)))  # the same on every rank (align_rng)
        sampler = distributed.ShardedBatchSampler(
            len(self.adapted_dataset), self.train_mb_size, rank=distributed.rank(),
            world=distributed.world_size(), seed=seed, shuffle=shuffle, drop_last=drop_last)
        args = {"num_workers": num_workers, "pin_memory": self.device.type == "cuda"
                if pin_memory is None else pin_memory}
        collate_from_data_or_kwargs(self.adapted_dataset, args)
        self.dataloader = EpochSpanningLoader(self.adapted_dataset, sampler,
                                              epochs=self.train_epochs, **args)

    def make_eval_dataloader(self, num_workers=0, shuffle=False, pin_memory=None,
                             persistent_workers=False, **kwargs):
        if not distributed.is_distributed():
            return super().make_eval_dataloader(
                num_workers=num_workers, shuffle=shuffle, pin_memory=pin_memory,
                persistent_workers=persistent_workers, **kwargs)
        # every rank evaluates the whole stream: metrics equal a single process's
        args = self._obtain_common_dataloader_parameters(
            batch_size=self.eval_mb_size, num_workers=num_workers, shuffle=shuffle,
            pin_memory=pin_memory, persistent_workers=persistent_workers)
        collate_from_data_or_kwargs(self.adapted_dataset, args)
        self.dataloader = SingleDatasetDataLoader(
            self.adapted_dataset, distributed_sampling=False, **args)
