"""SuLoRA: one fresh, disjoint subspace of a frozen-``A`` LoRA per experience, SRLoRA fusion;
its Avalanche plugin, its strategy and its registry entry."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiHeadClassifier
from torch import nn

from ...adapters.config import SubspaceLoRAConfig
from ...adapters.injection import (
    adapt_once,
    add_subspace_lora,
    check_trainable_modules,
    experience_tasks,
    record_experience_tasks,
    subspace_lora_layers,
)
from ...adapters.slots import (
    deferred_refresh,
    discard_slots,
    end_slots,
    fuse_rows,
    point_slots,
    start_slots,
)
from ...adapters.subspace_layer import SubspaceLoRALinear
from ...errors import CapacityError
from ...training import distributed
from ...training.template import AdapterTemplate, freeze_except, reset_optimizer, task_label
from ..input_statistics import InputRecorder
from ..registry import MethodSpec, register
from .allocators import PrincipalAllocator, build_allocator
from .fusion import build_fusion_policy
from .importance import pair_scores, update_importance

Inference = Literal["agnostic", "task-aware"]


def require_multi_head(model: nn.Module) -> None:
    """Refuse task-aware inference on a model without a multi-head classifier."""
    if not any(isinstance(m, MultiHeadClassifier) for m in model.modules()):
        raise ValueError("inference='task-aware' evaluates each task with its own head: the "
                         "model needs a multi-head classifier (make_head('task-incremental', "
                         "...))")


def check_capacity(config: SubspaceLoRAConfig, num_experiences: int) -> None:
    """Fail before training when ``num_experiences`` cannot fit under ``config``'s fusion
    policy."""
    build_fusion_policy(config.fusion, gamma=config.fusion_gamma).check_capacity(
        config.num_slots, num_experiences)


class SuLoRAPlugin(SupervisedPlugin, supports_distributed=True):
    """Allocates a slot before each training experience, trains only it (and the head), tracks
    SRLoRA importance, and applies the fusion policy after the experience.

    Args:
        config: the adapter configuration (must be the one the model was adapted with).
        inference: ``agnostic`` uses every live slot (the only mode for class- and
            domain-incremental evaluation); ``task-aware`` evaluates a task with the adapter as
            it was when the task was trained: the slots of the experiences up to the task's
            last one (:meth:`task_owners`), on the current (possibly fused) backbone. Training
            experience ``t`` uses every live slot, which are then exactly those, so a task's
            task-aware output right after its training is its training-time output, and later
            experiences' slots never enter it.

    Which task each experience was (:attr:`owner_task`) is recorded on the model too
    (:func:`~cl_sulora.adapters.injection.record_experience_tasks`), so that
    :func:`~cl_sulora.saving.save_model` keeps it with the slots; a plugin that has trained
    nothing takes it from the model it meets (:meth:`adopt_experience_tasks`), so a model
    restored by :func:`~cl_sulora.saving.load_model` evaluates task-aware as it did when saved.
    """

    def __init__(self, config: SubspaceLoRAConfig, *, inference: Inference = "agnostic") -> None:
        super().__init__()
        if inference not in ("agnostic", "task-aware"):
            raise ValueError(f"inference must be 'agnostic' or 'task-aware', got {inference!r}")
        self.config = config
        self.inference = inference
        self.allocator = build_allocator(config.allocator, seed=config.seed,
                                         energy=config.data_energy,
                                         keep_slot_rows=config.data_keep_slot_rows,
                                         gain_limit=config.data_gain_limit,
                                         centred_rows=config.data_centred_rows)
        self.fusion = build_fusion_policy(config.fusion, gamma=config.fusion_gamma)
        self._principal = PrincipalAllocator(config.seed)
        self.owner_task: dict[int, int] = {}
        self.steps = 0
        self._found: tuple[nn.Module, dict[str, SubspaceLoRALinear]] | None = None
        self._recorder: InputRecorder | None = None
        self._record_steps = 0

    # ------------------------------------------------------------------ training hooks
    def before_training_exp(self, strategy, **kwargs):
        check_trainable_modules(strategy.model, self.config.trainable_modules)
        if self.inference == "task-aware":
            require_multi_head(strategy.model)
        layers = self._layers(strategy.model)
        owner = int(strategy.experience.current_experience)
        deferred = self.allocator.needs_data
        with deferred_refresh(layers.values()):
            self._make_room(layers, owner)
            directions = None
            if not deferred:
                found = self.allocator.directions_for(layers, owner)
                directions = [found[name] for name in layers]
            start_slots(list(layers.values()), owner, directions)
        self.owner_task[owner] = task_label(strategy.experience)
        record_experience_tasks(strategy.model, self.owner_task)
        trained = [p for layer in layers.values()
                   for p in (layer.lora_B_train, layer.lora_magnitude) if p is not None]
        freeze_except(strategy.model, trained, self.config.trainable_modules)
        reset_optimizer(strategy.optimizer, strategy.model)
        self.steps = 0
        if deferred:
            self._recorder = InputRecorder(layers, training_only=True)
            self._record_steps = math.ceil(self.config.data_max_samples / strategy.train_mb_size)

    def after_backward(self, strategy, **kwargs):
        update_importance(self._layers(strategy.model).values(), self.config.importance_beta1,
                          self.config.importance_beta2)

    def after_training_iteration(self, strategy, **kwargs):
        self.steps += 1
        if self._recorder is not None:
            if self.steps >= self._record_steps:
                self.point_slot(strategy)
            return
        every = self.config.recompose_every
        if every and self.steps % every == 0:
            self.recompose(strategy)

    def after_training_epoch(self, strategy, **kwargs):
        if self._recorder is not None:  # an experience of fewer batches than the sample needs
            self.point_slot(strategy)

    def after_training_exp(self, strategy, **kwargs):
        layers = self._layers(strategy.model)
        if self._recorder is not None:
            self.point_slot(strategy)
        members = list(layers.values())
        with deferred_refresh(members):
            end_slots(members, [pair_scores(layer) for layer in members])
            if self.allocator.needs_data:
                self.allocator.update(layers)
            if self.fusion.fuses_after_experience:
                fuse_rows(members, [self.fusion.after_experience(layer, scores)
                                    for layer, scores in zip(members, self._scores(members),
                                                             strict=True)])

    @torch.no_grad()
    def point_slot(self, strategy) -> None:
        """Give the training slot its ``data`` directions, from the input covariances recorded
        over the experience's first training batches (summed over data-parallel ranks).

        Until then the slot's rows are zero: they add nothing to the forward pass and its ``B``
        gets zero gradients, so those batches train the head alone. No extra pass over the
        data is made. The slots take the allocator's gains (``data_gain_limit``)."""
        recorder, self._recorder = self._recorder, None
        recorder.close()
        layers = self._layers(strategy.model)
        reduce = distributed.sum_over_ranks if distributed.is_distributed() else None
        self.allocator.prepare(layers, recorder.covariances(reduce), recorder.means(reduce))
        owner = next(iter(layers.values())).training_owner
        directions = self.allocator.directions_for(layers, owner)
        point_slots(list(layers.values()), [directions[name] for name in layers])
        for name, gain in self.allocator.gains(layers, directions).items():
            layers[name].set_training_gain(gain)
        for layer in layers.values():
            strategy.optimizer.state.pop(layer.lora_B_train, None)

    def abort_training_exp(self, strategy) -> None:
        """Undo the unfinished experience (its training failed): its slot is discarded, so
        the next experience starts as if it had never begun (pairs fused to make room for it
        stay fused)."""
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None
        layers = self._layers(strategy.model)
        owners = {layer.training_owner for layer in layers.values()} - {None}
        discard_slots(list(layers.values()))
        self.allocator.discard()
        for owner in owners:
            self.owner_task.pop(owner, None)
        record_experience_tasks(strategy.model, self.owner_task)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {"owner_task": dict(self.owner_task), "steps": self.steps}

    def load_state_dict(self, state: dict, strategy=None) -> None:
        self.owner_task = {int(k): int(v) for k, v in state["owner_task"].items()}
        self.steps = int(state["steps"])
        if strategy is not None:
            record_experience_tasks(strategy.model, self.owner_task)

    def adopt_experience_tasks(self, model: nn.Module) -> None:
        """Take the experience tasks ``model`` records (one restored by
        :func:`~cl_sulora.saving.load_model`, or trained under another plugin) when this plugin
        has trained none itself: without them task-aware inference would know no task's slots
        and evaluate every task with every live slot. Called on meeting a model; a plugin that
        has trained keeps its own map (and records it on the model as it trains)."""
        if not self.owner_task:
            self.owner_task = experience_tasks(model)

    # ------------------------------------------------------------------ evaluation hooks
    def task_owners(self, task: int) -> list[int] | None:
        """The slots task-aware inference uses for ``task``: every owner up to the task's last
        trained experience (``None``, every live slot, for a task not trained yet)."""
        trained = [owner for owner, t in self.owner_task.items() if t == task]
        if not trained:
            return None
        return [owner for owner in self.owner_task if owner <= max(trained)]

    def before_eval_exp(self, strategy, **kwargs):
        if self.inference != "task-aware":
            return
        layers = self._layers(strategy.model)  # first: a new model's experience tasks
        owners = self.task_owners(task_label(strategy.experience))
        for layer in layers.values():
            layer.set_owner_filter(owners)

    def after_eval_exp(self, strategy, **kwargs):
        if self.inference == "task-aware":
            for layer in self._layers(strategy.model).values():
                layer.set_owner_filter(None)

    # ------------------------------------------------------------------ SRLoRA recomposition
    @torch.no_grad()
    def recompose(self, strategy) -> None:
        """Fuse the lowest ``recompose_gamma`` of the training slot's pairs into ``W0`` and point
        them at the next unused principal directions, with fresh optimizer state."""
        count = math.ceil(self.config.recompose_gamma * self.config.rank)
        training = {name: layer for name, layer in self._layers(strategy.model).items()
                    if layer.lora_B_train is not None}
        if not training:
            return
        scores = torch.stack([pair_scores(layer) for layer in training.values()]).tolist()
        for (name, layer), score in zip(training.items(), scores, strict=True):
            local = sorted(range(len(score)), key=lambda i: (score[i], i))[:count]
            rows = list(layer.slots.training_rows)
            with deferred_refresh([layer]):
                layer.fuse([rows[i] for i in local])
                owner = layer.training_owner
                directions = self._principal.directions(name, layer, count, owner)
                layer.reset_training_rows(local, directions)
            _reset_optimizer_columns(strategy.optimizer, layer.lora_B_train, local)

    # ------------------------------------------------------------------ helpers
    def _layers(self, model: nn.Module) -> dict[str, SubspaceLoRALinear]:
        """The model's layers, found once per model object (and again if one was replaced); a
        model met for the first time also gives its experience tasks
        (:meth:`adopt_experience_tasks`)."""
        if self._found is not None and self._found[0] is model:
            layers = self._found[1]
            if all(model.get_submodule(name) is layer for name, layer in layers.items()):
                return layers
        layers = subspace_lora_layers(model)
        if not layers:
            raise RuntimeError("the model has no subspace LoRA layers: call add_subspace_lora")
        self._found = (model, layers)
        self.adopt_experience_tasks(model)
        return layers

    def _scores(self, layers: Iterable[SubspaceLoRALinear]) -> list[list[float]]:
        """Each layer's per-row score that fusion ranks by (``fusion_score``), fetched from the
        device at once."""
        layers = list(layers)
        if not layers:
            return []
        if self.config.fusion_score == "norm":
            rows = [layer.pair_norms() for layer in layers]
        else:
            rows = [layer.row_importance for layer in layers]
        return torch.stack([r.to(rows[0].device) for r in rows]).tolist()

    def _make_room(self, layers: dict[str, SubspaceLoRALinear], owner: int) -> None:
        """Fuse, by the fusion policy, what each full layer needs for the new slot."""
        full = {name: layer for name, layer in layers.items()
                if len(layer.slots.free_rows()) < layer.rank}
        rows = []
        for (name, layer), scores in zip(full.items(), self._scores(full.values()),
                                         strict=True):
            try:
                rows.append(self.fusion.make_room(layer, layer.rank, scores))
            except CapacityError as err:
                raise CapacityError(f"experience {owner}, layer {name}: {err}") from err
        fuse_rows(list(full.values()), rows)


def _reset_optimizer_columns(optimizer, param: nn.Parameter, columns: torch.Tensor) -> None:
    state = optimizer.state.get(param, {})
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value[:, columns] = 0


class SuLoRA(AdapterTemplate):
    """Avalanche strategy: a ``SupervisedTemplate`` with :class:`SuLoRAPlugin`.

    Adapts ``model`` with ``config`` unless it already has subspace LoRA layers (then their
    config is used). ``optimizer`` gives the optimizer type and hyperparameters; it is rebuilt over
    the trainable parameters of each experience.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: SubspaceLoRAConfig | None = None,
        inference: Inference = "agnostic",
        plugins: Sequence[SupervisedPlugin] | None = None,
        **kwargs,
    ) -> None:
        if inference == "task-aware":
            require_multi_head(model)
        self.config = adapt_once(model, config, SubspaceLoRAConfig, add_subspace_lora)
        self.sulora = SuLoRAPlugin(self.config, inference=inference)
        self.sulora.adopt_experience_tasks(model)  # a restored model's, known from the start
        super().__init__(model=model, optimizer=optimizer,
                         plugins=[self.sulora, *(plugins or [])], **kwargs)

    def train(self, experiences, eval_streams=None, **kwargs):
        if isinstance(experiences, Sequence) or hasattr(experiences, "__len__"):
            try:
                count = len(experiences)
            except TypeError:
                count = 1
            check_capacity(self.config, count)
        return super().train(experiences, eval_streams, **kwargs)


register(MethodSpec(
    name="sulora",
    strategy=SuLoRA,
    config_cls=SubspaceLoRAConfig,
    paper="SuLoRA (Findings of ACL 2025) + SRLoRA (arXiv 2505.12433), combined here",
    trains="the new experience's slot B (rank columns) and the head; A frozen",
    stores="rank rows of A and columns of B per live slot; fused pairs live in W0",
    task_aware_inference=True,
    stream_check=check_capacity,
))
register(MethodSpec(
    name="sulora-nofusion",
    strategy=SuLoRA,
    config_cls=SubspaceLoRAConfig,
    paper="ablation of SuLoRA",
    trains="as sulora",
    stores="as sulora, never fused (one slot per experience)",
    defaults={"fusion": "never"},
    task_aware_inference=True,
    stream_check=check_capacity,
))
