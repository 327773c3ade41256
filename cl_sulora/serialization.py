"""Save and load the subspace LoRA state on its own (safetensors + JSON), without the backbone."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from .atomic import atomic_write_bytes, atomic_write_json
from .config import SubspaceLoRAConfig
from .injection import add_subspace_lora, subspace_lora_config, subspace_lora_layers

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "adapter_config.json"
_STATE = ("lora_A", "lora_B", "row_owner", "row_importance", "num_fused", "train_rows",
          "importance_ema", "importance_unc", "input_basis")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that differs from the pretrained backbone, keyed ``<layer>.<name>``.

    Adapted rows of a weight that received fused pairs are included (``<layer>.fused_weight``),
    since fusion consolidated knowledge into them.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in subspace_lora_layers(model).items():
        for key in _STATE:
            tensors[f"{name}.{key}"] = getattr(layer, key)
        for key in ("lora_B_train", "lora_magnitude"):
            if getattr(layer, key) is not None:
                tensors[f"{name}.{key}"] = getattr(layer, key).detach()
        if int(layer.num_fused):
            weight = layer.weight.detach()
            if layer.merged:
                weight = layer._weight_backup
            if layer.out_index is not None:
                weight = weight[layer.out_index]
            tensors[f"{name}.fused_weight"] = weight
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def save_subspace_lora(model: nn.Module, directory: str | Path) -> Path:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` into ``directory`` atomically."""
    config = subspace_lora_config(model)
    if config is None:
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
    if subspace_lora_config(model) is None:
        add_subspace_lora(model, config)
    load_adapter_state(model, tensors)
    return model


@torch.no_grad()
def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put tensors from :func:`adapter_state` back into ``model``'s layers."""
    layers = subspace_lora_layers(model)
    expected = {k.rsplit(".", 1)[0] for k in tensors}
    if set(layers) != expected:
        missing, extra = sorted(expected - set(layers)), sorted(set(layers) - expected)
        raise ValueError(f"adapter layers differ: saved-only {missing}, model-only {extra}")
    for name, layer in layers.items():
        layer.unmerge()
        for key in _STATE:
            saved = tensors[f"{name}.{key}"]
            current = getattr(layer, key)
            setattr(layer, key, saved.to(device=current.device, dtype=current.dtype))
        for key in ("lora_B_train", "lora_magnitude"):
            saved = tensors.get(f"{name}.{key}")
            setattr(layer, key, None if saved is None else nn.Parameter(saved.to(layer.lora_A)))
        fused = tensors.get(f"{name}.fused_weight")
        if fused is not None:
            fused = fused.to(layer.weight)
            if layer.out_index is None:
                layer.weight.copy_(fused)
            else:
                layer.weight[layer.out_index] = fused
        layer.reload_buffers()
