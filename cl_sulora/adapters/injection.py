"""Put adapters into a model and take them out: find target ``nn.Linear`` modules by name, wrap
them in an adapter layer, list the adapter layers, merge and unmerge them, and unload them
into a plain model.

A model adapted here remembers its adapter config (:func:`adapter_config`) and the names it
adapted (``model.adapter_targets``); one model holds one kind of adapter. A model SuLoRA trained
also remembers the task of each experience its slots belong to (:func:`experience_tasks`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn

from .base import AdaptedLinear
from .branch_layer import BranchLoRALinear
from .config import BranchLoRAConfig, SubspaceLoRAConfig
from .subspace_layer import SubspaceLoRALinear

log = logging.getLogger(__name__)

CONFIG_ATTR = "adapter_config"
TARGETS_ATTR = "adapter_targets"
TASKS_ATTR = "adapter_experience_tasks"
Layer = TypeVar("Layer", bound=AdaptedLinear)
Config = TypeVar("Config", SubspaceLoRAConfig, BranchLoRAConfig)


def matches(name: str, pattern: str) -> bool:
    """Whether a dotted module name matches a target pattern (suffix match, or ``re:`` regex)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def find_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules matching any pattern; a clear error if none does."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    found = [n for n in linears if any(matches(n, p) for p in patterns)]
    if not found:
        shown = ", ".join(linears[:40]) + (" ..." if len(linears) > 40 else "")
        raise ValueError(
            f"target_modules {patterns} match no nn.Linear in {type(model).__name__}. "
            f"Candidate Linear modules: {shown or '(none)'}"
        )
    return found


def qkv_out_index(linear: nn.Linear, parts: list[str]) -> torch.Tensor:
    """Output rows of the chosen parts of a fused ``qkv`` projection (q, k, v stacked)."""
    if linear.out_features % 3:
        raise ValueError(f"fused qkv needs out_features divisible by 3: {linear.out_features}")
    width = linear.out_features // 3
    offsets = {"q": 0, "k": width, "v": 2 * width}
    return torch.cat([torch.arange(offsets[p], offsets[p] + width) for p in sorted(set(parts))])


def wrap_linears(
    model: nn.Module,
    config: SubspaceLoRAConfig | BranchLoRAConfig,
    wrap: Callable[[nn.Linear, torch.Tensor | None], AdaptedLinear],
) -> nn.Module:
    """Replace every target ``nn.Linear`` of ``config`` by ``wrap(linear, out_index)`` in place
    and record the config and the targets on ``model``; returns ``model``. ``out_index``
    selects ``config.qkv_parts`` of fused projections named ``...qkv``."""
    if adapter_layers(model):
        kind = type(adapter_config(model)).__name__
        raise ValueError(f"model already has adapter layers ({kind})")
    targets = find_targets(model, config.targets)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        out_index = qkv_out_index(linear, config.qkv_parts) if child.endswith("qkv") else None
        setattr(parent, child, wrap(linear, out_index))
    setattr(model, CONFIG_ATTR, config)
    setattr(model, TARGETS_ATTR, targets)
    log.info("%s on %d layers: %s", type(config).__name__, len(targets), ", ".join(targets))
    return model


def add_subspace_lora(model: nn.Module, config: SubspaceLoRAConfig) -> nn.Module:
    """Wrap every target ``nn.Linear`` of ``model`` in a :class:`SubspaceLoRALinear` in place;
    returns ``model``. Fused ``qkv`` projections (names ending in ``qkv``) adapt only
    ``config.qkv_parts``."""
    return wrap_linears(model, config, lambda linear, out_index: SubspaceLoRALinear(
        linear, rank=config.rank, num_slots=config.num_slots, alpha=config.alpha,
        out_index=out_index, slot_magnitudes=config.slot_magnitudes,
    ))


def add_branch_lora(model: nn.Module, config: BranchLoRAConfig) -> nn.Module:
    """Wrap every target ``nn.Linear`` of ``model`` in a branch-less :class:`BranchLoRALinear`
    in place; returns ``model``. Fused ``qkv`` projections adapt only ``config.qkv_parts``."""
    return wrap_linears(model, config, lambda linear, out_index: BranchLoRALinear(
        linear, out_index=out_index, dropout=config.dropout))


def adapt_once(model: nn.Module, config: Config | None, config_cls: type[Config],
               add: Callable[[nn.Module, Config], nn.Module]) -> Config:
    """Adapt ``model`` with ``config`` (default ``config_cls()``) by ``add`` unless it already
    has adapter layers; returns the config in force. A config of another class, or a model
    adapted with another config, is refused."""
    existing = adapter_config(model)
    if existing is None:
        config = config if config is not None else config_cls()
        if not isinstance(config, config_cls):
            raise TypeError(f"config must be a {config_cls.__name__}, got a "
                            f"{type(config).__name__}")
        check_trainable_modules(model, config.trainable_modules)
        add(model, config)
        return config
    if not isinstance(existing, config_cls):
        raise ValueError(f"model is already adapted with a {type(existing).__name__}, "
                         f"this method needs a {config_cls.__name__}")
    if config is not None and config != existing:
        raise ValueError(f"model is already adapted with a different {config_cls.__name__}")
    return existing


def check_trainable_modules(model: nn.Module, names: list[str]) -> None:
    """Refuse ``trainable_modules`` that name no module of ``model`` (a component of a dotted
    module name, e.g. ``head``): the head would stay frozen, silently."""
    components = {part for name, _ in model.named_modules() for part in name.split(".") if part}
    if names and not components.intersection(names):
        top = [name for name, _ in model.named_children()]
        raise ValueError(
            f"trainable_modules {names} name no module of {type(model).__name__} (its top "
            f"modules: {top}): set the config's trainable_modules to your head's name"
        )


def adapter_config(model: nn.Module) -> SubspaceLoRAConfig | BranchLoRAConfig | None:
    """The config ``model`` was adapted with (``None`` if it was not)."""
    return getattr(model, CONFIG_ATTR, None)


def experience_tasks(model: nn.Module) -> dict[int, int]:
    """The task label of each experience that trained ``model``'s subspace LoRA, by experience
    index (the owner ids its slots record), as :func:`record_experience_tasks` left it; empty if
    none was recorded. A copy."""
    return dict(getattr(model, TASKS_ATTR, {}))


def record_experience_tasks(model: nn.Module, tasks: Mapping[int, int]) -> None:
    """Record on ``model`` the task label of each experience its slots belong to (experience
    index -> task label).

    The slots record their owner experience, not its task; task-aware inference needs the task
    to pick a task's slots. Kept on the model, beside its adapter config, so that the map
    travels with the slots it describes: :func:`~cl_sulora.saving.save_model` writes it and
    :func:`~cl_sulora.saving.load_model` restores it, and a plugin that wraps a restored
    model takes it from there."""
    setattr(model, TASKS_ATTR, {int(owner): int(task) for owner, task in tasks.items()})


def adapter_layers(model: nn.Module, kind: type[Layer] = AdaptedLinear) -> dict[str, Layer]:
    """The model's adapter layers (of class ``kind``) by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


def subspace_lora_layers(model: nn.Module) -> dict[str, SubspaceLoRALinear]:
    """The model's subspace LoRA layers by module name."""
    return adapter_layers(model, SubspaceLoRALinear)


def branch_lora_layers(model: nn.Module) -> dict[str, BranchLoRALinear]:
    """The model's branch LoRA layers by module name."""
    return adapter_layers(model, BranchLoRALinear)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter layer's update into its weight, for inference at the bare backbone's
    cost; returns ``model``."""
    for layer in adapter_layers(model).values():
        layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Restore the weights exactly as they were before :func:`merge_adapters`; returns
    ``model``."""
    for layer in adapter_layers(model).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by a plain ``nn.Linear`` holding its merged weight, in place,
    and forget the adapter config and experience tasks; returns ``model``, which computes the
    same function with no adapter module left (its ``state_dict`` keys are those of the model
    before adaptation)."""
    for name, layer in adapter_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.to_linear())
    for attr in (CONFIG_ATTR, TARGETS_ATTR, TASKS_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
