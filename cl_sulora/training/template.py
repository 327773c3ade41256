"""The training template every strategy builds on: an Avalanche ``SupervisedTemplate`` that
rebuilds its optimizer per experience, masks absent classes, stops on divergence and trains
data-parallel under ``torchrun``; plus the freezing and optimizer helpers methods use."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from avalanche.benchmarks.utils.data_loader import (
    SingleDatasetDataLoader,
    collate_from_data_or_kwargs,
)
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule
from avalanche.training.plugins import LRSchedulerPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import nn
from torch.nn import CrossEntropyLoss
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset

from ..adapters.injection import adapter_layers
from . import distributed
from .loading import EpochSpanningLoader, EvalInputCache
from .plugins import CurrentClassMask, DivergenceGuard, LRSchedule, Schedule


def reset_optimizer(optimizer: Optimizer, model: nn.Module) -> Optimizer:
    """Point ``optimizer``, in place, at ``model``'s trainable parameters, with its
    hyperparameters (``optimizer.defaults``) and no state: one parameter group, as a new
    optimizer of the same type would hold. The object stays the same, so whatever holds it (a
    learning-rate scheduler, the caller) keeps working. Returns it."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters: nothing to optimize")
    optimizer.state.clear()
    optimizer.param_groups.clear()
    optimizer.add_param_group({"params": params})
    return optimizer


def check_one_group(optimizer: Optimizer) -> None:
    """Refuse an optimizer whose parameter groups set their own hyperparameters:
    :func:`reset_optimizer` rebuilds it with one group and ``optimizer.defaults``, which would
    drop them silently."""
    groups = optimizer.param_groups
    own = sorted({key for group in groups for key, value in group.items()
                  if key in optimizer.defaults and bool(value != optimizer.defaults[key])})
    if len(groups) > 1 or own:
        raise ValueError(
            f"optimizer has {len(groups)} parameter group(s) with their own {own or 'params'}: "
            f"the strategy rebuilds it over each experience's trainable parameters as one group "
            f"with the optimizer's defaults, so those would be dropped. Build it with one group "
            f"and the settings as arguments, e.g. {type(optimizer).__name__}("
            f"model.parameters(), lr=...)")


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


class AdapterTemplate(SupervisedTemplate):
    """``SupervisedTemplate`` that rebuilds its optimizer over the trainable parameters of each
    experience, applies the class-incremental training mask and stops when training diverges
    (:class:`~cl_sulora.training.plugins.DivergenceGuard`, checked before every
    ``divergence_check_every``-th update). Keyword-only arguments.

    Under ``torchrun`` (see :mod:`cl_sulora.training.distributed`) it trains data-parallel:
    ``train_mb_size`` is the global batch, each rank trains on its shard of it, and the
    experience's training forward passes go through a DistributedDataParallel wrapper built once
    the experience's adapters are allocated (``self.model`` stays the plain model, so plugins,
    checkpoints and evaluation see it unchanged). Every rank evaluates the whole stream.

    Evaluation batches are kept on the device after a dataset's first evaluation, up to
    ``eval_cache_gb`` in all (:class:`~cl_sulora.training.loading.EvalInputCache`): later
    evaluations of the same test experiences skip loading. Use ``eval_cache_gb=0`` for a
    benchmark whose evaluation transform is random.

    ``lr_schedule`` names a schedule of the optimizer's rate (``constant``, ``cosine``), or is
    an :class:`~cl_sulora.training.plugins.LRSchedule` with its own settings."""

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
        lr_schedule: Schedule | LRSchedule | None = None,
        divergence_check_every: int = 1,
        eval_cache_gb: float = 1.0,
        **kwargs,
    ) -> None:
        check_one_group(optimizer)
        plugins = list(plugins or [])
        if lr_schedule is not None:
            if any(isinstance(p, LRSchedulerPlugin) for p in plugins):
                raise ValueError("two learning-rate schedules: lr_schedule and an "
                                 "LRSchedulerPlugin; keep one")
            if isinstance(lr_schedule, str):
                lr_schedule = LRSchedule(optimizer.defaults["lr"], lr_schedule)
            plugins.insert(0, lr_schedule)
        plugins.append(DivergenceGuard(divergence_check_every))
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
        self.set_eval_cache(eval_cache_gb)
        #: loader worker processes of the current training call (its ``num_workers``)
        self.loader_workers = 0

    def train(self, experiences, eval_streams=None, **kwargs):
        """Avalanche's training loop; if it fails part-way through an experience (an error,
        divergence, an interrupt), the plugins undo that experience's unfinished state
        (``abort_training_exp``) before the error propagates, so the strategy can train
        again."""
        try:
            return super().train(experiences, eval_streams, **kwargs)
        except BaseException:
            if self.experience is not None:
                self._ddp = None
                for plugin in self.plugins:
                    abort = getattr(plugin, "abort_training_exp", None)
                    if abort is not None:
                        abort(self)
            raise

    def set_eval_cache(self, budget_gb: float) -> None:
        """Keep at most ``budget_gb`` of evaluation batches from now on (0: none); what was
        kept before is dropped."""
        #: evaluation batches kept between evaluations
        self.eval_cache = EvalInputCache(int(budget_gb * 2**30), self.device)

    def make_optimizer(self, **kwargs):
        reset_optimizer(self.optimizer, self.model)

    def adapter_report(self) -> dict[str, int]:
        """``live_adapter_params``: values held by the model's adapter layers for their live
        update (learned magnitudes counted once, also where layers share them);
        ``stored_state_params``: values of every other state kept for the method (the
        layers' input bases, and :meth:`method_state_params`)."""
        layers = adapter_layers(self.model).values()
        magnitudes = {id(p): p for layer in layers for p in layer.magnitude_parameters()}
        live = sum(layer.live_adapter_params() for layer in layers)
        return {"live_adapter_params": live + sum(p.numel() for p in magnitudes.values()),
                "stored_state_params": sum(layer.stored_state_params() for layer in layers)
                + self.method_state_params()}

    def method_state_params(self) -> int:
        """Values of state the method keeps outside the adapter layers (old models,
        importances, buffers); 0 unless a method says otherwise."""
        return 0

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
        self.loader_workers = num_workers
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

    def experience_loader(self, dataset: Dataset, *, shuffle: bool = False,
                          generator: torch.Generator | None = None) -> DataLoader:
        """A loader for a method's own pass over the experience's data (input statistics,
        features for a closed-form head or for classifier alignment): the evaluation batch
        size and the training call's worker processes, so that a pass over large images
        (resized to 224 px, say) is not decoded in the main process alone. The batches are
        those of a loader without workers."""
        return DataLoader(dataset, batch_size=self.eval_mb_size, shuffle=shuffle,
                          generator=generator, num_workers=self.loader_workers,
                          pin_memory=self.device.type == "cuda")

    def make_eval_dataloader(self, num_workers=0, shuffle=False, pin_memory=None,
                             persistent_workers=False, **kwargs):
        if not distributed.is_distributed():
            super().make_eval_dataloader(
                num_workers=num_workers, shuffle=shuffle, pin_memory=pin_memory,
                persistent_workers=persistent_workers, **kwargs)
        else:  # every rank evaluates the whole stream: metrics equal a single process's
            args = self._obtain_common_dataloader_parameters(
                batch_size=self.eval_mb_size, num_workers=num_workers, shuffle=shuffle,
                pin_memory=pin_memory, persistent_workers=persistent_workers)
            collate_from_data_or_kwargs(self.adapted_dataset, args)
            self.dataloader = SingleDatasetDataLoader(
                self.adapted_dataset, distributed_sampling=False, **args)
        if not shuffle:
            self.dataloader = self.eval_cache.loader(self.experience.dataset, self.dataloader)
