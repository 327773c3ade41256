"""Save and load the subspace LoRA state on its own (safetensors + JSON), without the backbone.

What a layer's adapter state is, is the layer's to say
(:meth:`~cl_sulora.adapters.subspace_layer.SubspaceLoRALinear.adapter_state`); here it is only
keyed by layer name and written or read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from ..atomic import atomic_write_bytes, atomic_write_json
from ..errors import ConfigError
from .config import SubspaceLoRAConfig
from .injection import (
    adapter_config,
    add_subspace_lora,
    find_targets,
    qkv_out_index,
    subspace_lora_layers,
)

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that differs from the pretrained backbone, keyed ``<layer>.<name>``
    (fused pairs included, as the layers' ``fused_weight``)."""
    return {f"{name}.{key}": value
            for name, layer in subspace_lora_layers(model).items()
            for key, value in layer.adapter_state().items()}


def save_subspace_lora(model: nn.Module, directory: str | Path) -> Path:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` into ``directory`` atomically."""
    config = adapter_config(model)
    if not isinstance(config, SubspaceLoRAConfig):
        raise ValueError("model has no subspace LoRA: call add_subspace_lora first")
    directory = Path(directory)
    atomic_write_bytes(directory / WEIGHTS_NAME, save(adapter_state(model)))
    meta = {"config": config.to_dict(), "layers": list(subspace_lora_layers(model))}
    atomic_write_json(directory / CONFIG_NAME, meta)
    return directory


def load_subspace_lora(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a state saved by :func:`save_subspace_lora` into ``model`` (adapting it with the
    saved config if it has no adapter yet). Everything is checked first (a model adapted with
    another config, adapted layers other than the saved ones, tensors of other shapes) and a
    mismatch is refused with a :class:`~cl_sulora.errors.ConfigError` that names it, leaving
    ``model`` unchanged."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a saved subspace LoRA directory")
    try:
        meta = json.loads(config_path.read_text())
        config = SubspaceLoRAConfig(**meta["config"])
        saved_layers = list(meta["layers"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"{config_path} is not a valid adapter config: {err}") from err
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{weights_path} is truncated or corrupted: {err}") from err
    existing = adapter_config(model)
    if existing is None:
        _check_targets(model, config, saved_layers, tensors, directory)
        add_subspace_lora(model, config)
    elif not isinstance(existing, SubspaceLoRAConfig) or existing.to_dict() != config.to_dict():
        differing = _differences(existing, config)
        raise ConfigError(f"{directory} was saved from an adapter of another config "
                          f"({differing}); load it into a model adapted like it, or into the "
                          "plain model")
    load_adapter_state(model, tensors)
    return model


def _differences(existing, config: SubspaceLoRAConfig) -> str:
    if not isinstance(existing, SubspaceLoRAConfig):
        return f"the model holds a {type(existing).__name__}"
    old, new = existing.to_dict(), config.to_dict()
    return "; ".join(f"{k}: model {old[k]!r}, saved {new[k]!r}" for k in old if old[k] != new[k])


def _check_targets(model: nn.Module, config: SubspaceLoRAConfig, saved: list[str],
                   tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """The layers ``config`` would adapt in ``model`` are the saved ones, of the saved sizes."""
    try:
        targets = find_targets(model, config.targets)
    except ValueError as err:
        raise ConfigError(f"{directory} does not fit this model: {err}") from err
    if targets != saved:
        missing, extra = sorted(set(saved) - set(targets)), sorted(set(targets) - set(saved))
        raise ConfigError(f"{directory} was saved from a model with other adapted layers "
                          f"(saved only: {missing[:5]}, this model only: {extra[:5]})")
    for name in targets:
        linear = model.get_submodule(name)
        n_out = (len(qkv_out_index(linear, config.qkv_parts)) if name.endswith("qkv")
                 else linear.out_features)
        A, B = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
        if A is None or B is None:
            raise ConfigError(f"{directory} holds no lora_A or lora_B of layer {name}")
        if A.shape[1] != linear.in_features or B.shape[0] != n_out:
            raise ConfigError(
                f"{directory} does not fit layer {name}: saved for {A.shape[1]} inputs and "
                f"{B.shape[0]} adapted outputs, here {linear.in_features} and {n_out}")


@torch.no_grad()
def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put tensors from :func:`adapter_state` back into ``model``'s layers."""
    layers = subspace_lora_layers(model)
    by_length = sorted(layers, key=len, reverse=True)  # a layer's state keys may hold dots
    saved: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in tensors.items():
        name = next((n for n in by_length if key.startswith(n + ".")), None)
        if name is None:
            unknown.append(key)
        else:
            saved.setdefault(name, {})[key[len(name) + 1:]] = value
    if unknown or set(layers) != set(saved):
        raise ConfigError(
            f"adapter layers differ: saved tensors of no model layer {sorted(unknown)[:5]}, "
            f"model layers with nothing saved {sorted(set(layers) - set(saved))[:5]}"
        )
    for name, layer in layers.items():
        mismatch = layer.state_mismatch(saved[name])
        if mismatch:
            raise ConfigError(f"the saved adapter state of layer {name} does not fit it: "
                              f"{mismatch}")
    for name, layer in layers.items():
        layer.load_adapter_state(saved[name])
