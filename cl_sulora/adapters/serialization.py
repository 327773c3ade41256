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
from .config import SubspaceLoRAConfig
from .injection import adapter_config, add_subspace_lora, subspace_lora_layers

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
    """Load a state saved by :func:`save_subspace_lora` into ``model`` (adapting it if needed)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a saved subspace LoRA directory")
    try:
        meta = json.loads(config_path.read_text())
        config = SubspaceLoRAConfig(**meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{config_path} is not a valid adapter config: {err}") from err
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights_path} is truncated or corrupted: {err}") from err
    if adapter_config(model) is None:
        add_subspace_lora(model, config)
    load_adapter_state(model, tensors)
    return model


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
        raise ValueError(
            f"adapter layers differ: saved tensors of no model layer {sorted(unknown)[:5]}, "
            f"model layers with nothing saved {sorted(set(layers) - set(saved))[:5]}"
        )
    for name, layer in layers.items():
        layer.load_adapter_state(saved[name])
