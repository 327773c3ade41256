"""Find target ``nn.Linear`` modules by name and wrap them in :class:`SubspaceLoRALinear`."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import torch
from torch import nn

from .config import SubspaceLoRAConfig
from .layer import SubspaceLoRALinear

log = logging.getLogger(__name__)

CONFIG_ATTR = "subspace_lora_config"


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
    patterns: list[str],
    qkv_parts: list[str],
    wrap: Callable[[nn.Linear, torch.Tensor | None], nn.Module],
) -> list[str]:
    """Replace every target ``nn.Linear`` by ``wrap(linear, out_index)`` in place; returns the
    target names. ``out_index`` selects ``qkv_parts`` of fused projections named ``...qkv``."""
    targets = find_targets(model, patterns)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        out_index = qkv_out_index(linear, qkv_parts) if child.endswith("qkv") else None
        setattr(parent, child, wrap(linear, out_index))
    return targets


def add_subspace_lora(model: nn.Module, config: SubspaceLoRAConfig) -> nn.Module:
    """Wrap every target ``nn.Linear`` of ``model`` in place; returns ``model``.

    The adapted names are listed in ``model.subspace_lora_targets`` and logged. Fused ``qkv``
    projections (names ending in ``qkv``) adapt only ``config.qkv_parts``.
    """
    if subspace_lora_layers(model):
        raise ValueError("model already has subspace LoRA layers")
    targets = wrap_linears(
        model,
        config.targets,
        config.qkv_parts,
        lambda linear, out_index: SubspaceLoRALinear(
            linear, rank=config.rank, num_slots=config.num_slots, alpha=config.alpha,
            out_index=out_index, slot_magnitudes=config.slot_magnitudes,
        ),
    )
    setattr(model, CONFIG_ATTR, config)
    model.subspace_lora_targets = targets
    log.info("subspace LoRA on %d layers: %s", len(targets), ", ".join(targets))
    return model


def subspace_lora_layers(model: nn.Module) -> dict[str, SubspaceLoRALinear]:
    """The model's subspace LoRA layers by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SubspaceLoRALinear)}


def subspace_lora_config(model: nn.Module) -> SubspaceLoRAConfig | None:
    return getattr(model, CONFIG_ATTR, None)


def merge_subspace_lora(model: nn.Module) -> None:
    """Fold every live pair into the weights, for inference at the bare backbone's cost."""
    for layer in subspace_lora_layers(model).values():
        layer.merge()


def unmerge_subspace_lora(model: nn.Module) -> None:
    """Restore the weights exactly as they were before :func:`merge_subspace_lora`."""
    for layer in subspace_lora_layers(model).values():
        layer.unmerge()
