"""The plugin/strategy skeleton every branch-LoRA method builds on, and the plain LoRA baselines
(SeqLoRA, IncLoRA, JointLoRA) with their registry entries."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.scenarios.task_aware import with_task_labels
from avalanche.benchmarks.utils.utils import concat_datasets
from avalanche.core import SupervisedPlugin
from torch import nn

from ..adapters.branch_layer import (
    BranchLoRALinear,
    LoRABranch,
    branch_structure,
    rebuild_branches,
)
from ..adapters.config import BranchLoRAConfig
from ..adapters.injection import (
    adapt_once,
    add_branch_lora,
    branch_lora_layers,
    check_trainable_modules,
)
from ..seeding import keyed_generator
from ..training.template import AdapterTemplate, freeze_except, reset_optimizer
from .registry import MethodSpec, register

Layers = dict[str, BranchLoRALinear]


def branch_generator(seed: int, layer_name: str, experience: int) -> torch.Generator:
    """A generator seeded by (seed, layer, experience): initialisations are reproducible."""
    return keyed_generator(seed, layer_name, experience)


def kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """LoRA's default init of ``A``: ``U(-1/sqrt(cols), 1/sqrt(cols))`` (Kaiming, a = sqrt 5)."""
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound


def lora_branch(config: BranchLoRAConfig, layer_name: str, layer: BranchLoRALinear,
                experience: int) -> LoRABranch:
    """A standard LoRA branch: Kaiming-uniform ``A``, zero ``B``, scale ``alpha / rank``."""
    gen = branch_generator(config.seed, layer_name, experience)
    A = kaiming_uniform(config.rank, layer.in_features, gen)
    return LoRABranch(A, torch.zeros(layer.n_out, config.rank), scale=config.scaling,
                      owner=experience)


class BranchLoRAPlugin(SupervisedPlugin, supports_distributed=True):
    """Skeleton of a branch-LoRA method: :meth:`prepare` the layers before each training
    experience, train the branch tensors flagged trainable plus ``config.trainable_modules``,
    and :meth:`finish` after the experience."""

    def __init__(self, config: BranchLoRAConfig) -> None:
        super().__init__()
        self.config = config
        self._model: nn.Module | None = None

    def before_training_exp(self, strategy, **kwargs):
        check_trainable_modules(strategy.model, self.config.trainable_modules)
        self._model = strategy.model
        layers = adapted_layers(strategy.model)
        for layer in layers.values():  # a merged weight would train nothing of the branches
            layer.require_unmerged("train")
        self.prepare(strategy, layers, int(strategy.experience.current_experience))
        params = [p for layer in layers.values() for p in layer.trainable_parameters()]
        freeze_except(strategy.model, params, self.config.trainable_modules)
        reset_optimizer(strategy.optimizer, strategy.model)

    def after_training_exp(self, strategy, **kwargs):
        layers = adapted_layers(strategy.model)
        self.finish(strategy, layers, int(strategy.experience.current_experience))

    def abort_training_exp(self, strategy) -> None:
        """Undo the unfinished experience (its training failed): the branches it added and
        was training are removed (a branch trained through several experiences, as SeqLoRA's,
        keeps its partial update)."""
        experience = int(strategy.experience.current_experience)
        for layer in adapted_layers(strategy.model).values():
            for index in reversed(range(len(layer.branches))):
                branch = layer.branches[index]
                if branch.owner == experience and not branch.frozen:
                    layer.remove_branch(index)

    def state_dict(self) -> dict:
        """The branch structure of the model this plugin trains
        (:func:`~cl_sulora.adapters.branch_layer.branch_structure`; the tensors are in the
        model's state)."""
        layers = branch_lora_layers(self._model) if self._model is not None else {}
        return {"layers": branch_structure(layers)}

    def load_state_dict(self, state: dict, strategy) -> None:
        """Rebuild the saved branches in ``strategy.model``, ready for the model's
        ``load_state_dict``."""
        rebuild_branches(adapted_layers(strategy.model), state["layers"])
        self._model = strategy.model

    def prepare(self, strategy, layers: Layers, experience: int) -> None:
        """Add or reconfigure branches for ``experience``."""
        raise NotImplementedError

    def finish(self, strategy, layers: Layers, experience: int) -> None:
        """Update the method's state once ``experience`` is trained."""


class IncLoRAPlugin(BranchLoRAPlugin, supports_distributed=True):
    """A new LoRA branch per experience; earlier branches frozen, no constraint."""

    def prepare(self, strategy, layers, experience):
        for name, layer in layers.items():
            layer.freeze_directions()
            layer.add_branch(self.new_branch(strategy, name, layer, experience))

    def new_branch(self, strategy, layer_name: str, layer: BranchLoRALinear,
                   experience: int) -> LoRABranch:
        return lora_branch(self.config, layer_name, layer, experience)


class SeqLoRAPlugin(BranchLoRAPlugin, supports_distributed=True):
    """One LoRA branch, created before the first experience and fine-tuned on every one."""

    def prepare(self, strategy, layers, experience):
        for name, layer in layers.items():
            if not len(layer.branches):
                layer.add_branch(lora_branch(self.config, name, layer, experience))


def adapted_layers(model: nn.Module) -> Layers:
    layers = branch_lora_layers(model)
    if not layers:
        raise RuntimeError("the model has no branch LoRA layers: call add_branch_lora")
    return layers


class BranchLoRAStrategy(AdapterTemplate):
    """A ``SupervisedTemplate`` with the method's branch-LoRA plugin (``plugin_cls``).

    Adapts ``model`` with ``config`` unless it already has branch LoRA layers (then their config
    is used). ``optimizer`` gives the optimizer type and hyperparameters; it is rebuilt over the
    trainable parameters of each experience.
    """

    config_cls: ClassVar[type[BranchLoRAConfig]] = BranchLoRAConfig
    plugin_cls: ClassVar[type[BranchLoRAPlugin]]

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: BranchLoRAConfig | None = None,
        plugins: Sequence[SupervisedPlugin] | None = None,
        **kwargs,
    ) -> None:
        self.config = adapt_once(model, config, self.config_cls, add_branch_lora)
        self.method_plugin = self.plugin_cls(self.config)
        super().__init__(model=model, optimizer=optimizer,
                         plugins=[self.method_plugin, *(plugins or [])], **kwargs)


class IncLoRA(BranchLoRAStrategy):
    """IncLoRA: a new LoRA per experience, earlier ones frozen and summed at test."""

    plugin_cls = IncLoRAPlugin


class SeqLoRA(BranchLoRAStrategy):
    """SeqLoRA: one LoRA fine-tuned through the whole stream (the lower bound)."""

    plugin_cls = SeqLoRAPlugin


class JointLoRA(BranchLoRAStrategy):
    """JointLoRA: one LoRA trained once on the union of every experience (the upper bound).

    :meth:`train` concatenates the given experiences into a single experience, so the growing
    head sees every class before training; it may be called only once.
    """

    plugin_cls = SeqLoRAPlugin
    #: set once :meth:`train` has run
    trained: bool = False

    def train(self, experiences, eval_streams=None, **kwargs):
        if self.trained:
            raise RuntimeError("JointLoRA trains once, on the whole stream, and has: build a "
                               "new JointLoRA (on a fresh model) to train it again")
        joint = joint_experience(experiences)
        result = super().train(joint, eval_streams, **kwargs)
        self.trained = True
        return result


def joint_experience(experiences):
    """One experience holding the training data of every experience given (with task labels
    when the datasets carry them, as any Avalanche classification stream may not)."""
    if hasattr(experiences, "dataset"):
        experiences = [experiences]
    datasets = [exp.dataset for exp in experiences]
    if not datasets:
        raise ValueError("no experiences to train on")
    scenario = with_classes_timeline(benchmark_from_datasets(train=[concat_datasets(datasets)]))
    if all(hasattr(dataset, "targets_task_labels") for dataset in datasets):
        scenario = with_task_labels(scenario)
    return scenario.train_stream[0]


register(MethodSpec(
    name="seqlora",
    strategy=SeqLoRA,
    config_cls=BranchLoRAConfig,
    paper="sequential LoRA fine-tuning (lower bound)",
    trains="one LoRA (A, B) through the whole stream, and the head",
    stores="one LoRA",
))
register(MethodSpec(
    name="inclora",
    strategy=IncLoRA,
    config_cls=BranchLoRAConfig,
    paper="incremental LoRA (a new LoRA per experience, no constraint)",
    trains="the new LoRA (A_t, B_t) and the head",
    stores="one LoRA per experience",
))
register(MethodSpec(
    name="jointlora",
    strategy=JointLoRA,
    config_cls=BranchLoRAConfig,
    paper="joint LoRA training on the whole stream (upper bound)",
    trains="one LoRA and the head, once, on every experience's data",
    stores="one LoRA",
    joint=True,
))
