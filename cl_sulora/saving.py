"""Save and load a whole continual model: backbone, adapters (of any method) and the grown head,
as ``model.safetensors`` plus ``model.json`` (the adapter config and structure, the task of
each experience its slots belong to, and the head's size or its closed-form kind), so that a
fresh model built the same way gets it back exactly.

Where :func:`~cl_sulora.adapters.serialization.save_subspace_lora` keeps SuLoRA's adapter alone,
this keeps everything a model of any method needs to predict as it did.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from .adapters.branch_layer import branch_structure, rebuild_branches
from .adapters.config import BranchLoRAConfig, SubspaceLoRAConfig
from .adapters.injection import (
    adapter_config,
    adapter_layers,
    add_branch_lora,
    add_subspace_lora,
    branch_lora_layers,
    experience_tasks,
    record_experience_tasks,
)
from .atomic import atomic_write_bytes, atomic_write_json
from .errors import ConfigError
from .methods import METHODS
from .methods.closed_form import closed_form_head_to_load, closed_form_structure
from .models.heads import grow_head, head_structure

WEIGHTS_NAME = "model.safetensors"
STRUCTURE_NAME = "model.json"
FORMAT = 1


def separate_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` on the CPU, contiguous, with a copy of each tensor whose storage an earlier one
    uses (a parameter shared between modules appears under several keys; safetensors stores
    each key's own bytes)."""
    seen: set[int] = set()
    out = {}
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    return out


def save_model(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model`` (a :class:`~cl_sulora.models.ContinualClassifier`, or any module with a
    ``head``) into ``directory``: every tensor, and the structure :func:`load_model` rebuilds
    first. Atomic per file; returns ``directory``. Adapters merged into their weights
    (:func:`~cl_sulora.adapters.injection.merge_adapters`) are saved unmerged, ``W0`` beside
    the adapter, so the model loads unmerged, with the same predictions."""
    directory = Path(directory)
    state = model.state_dict()
    for name, layer in adapter_layers(model).items():
        if layer.merged:  # its weight holds the update that the adapter's tensors hold too
            state[f"{name}.base.weight"] = layer.unmerged_weight()
    config = adapter_config(model)
    structure = {
        "format": FORMAT,
        "adapter": None if config is None else {
            "class": type(config).__name__, "config": dataclasses.asdict(config),
            "branches": branch_structure(branch_lora_layers(model)) or None,
            # SuLoRA's task-aware inference picks a task's slots by it (JSON keys are strings)
            "experience_tasks": {str(owner): task
                                 for owner, task in experience_tasks(model).items()} or None,
        },
        "head": _head_structure(model.head) if hasattr(model, "head") else None,
    }
    atomic_write_bytes(directory / WEIGHTS_NAME, save(separate_storage(state)))
    atomic_write_json(directory / STRUCTURE_NAME, structure)
    return directory


def load_model(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a model saved by :func:`save_model` into ``model``, a fresh one built as the saved
    one was (the same backbone and head regime, not adapted yet): it is adapted with the
    saved config, given the saved branches and head size (or the saved closed-form head in
    place of its protocol head: SimpleCIL's and RanPAC's), then every tensor is loaded exactly
    (``strict``), and it is given the saved experience tasks. Returns ``model``."""
    directory = Path(directory)
    paths = directory / STRUCTURE_NAME, directory / WEIGHTS_NAME
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: not a folder written by save_model")
    try:
        structure = json.loads(paths[0].read_text())
        tensors = load_file(paths[1])
    except (json.JSONDecodeError, SafetensorError, OSError) as err:
        raise ConfigError(f"{directory}: damaged saved model ({err})") from err
    if structure.get("format") != FORMAT:
        raise ConfigError(f"{paths[0]}: format {structure.get('format')!r}, this library "
                          f"reads {FORMAT}")
    if adapter_config(model) is not None:
        raise ConfigError("load_model needs a fresh model (built as the saved one, without "
                          "adapters): this one is adapted already")
    adapter = structure["adapter"]
    if adapter is not None:
        config = _config_class(adapter["class"])(**adapter["config"])
        if isinstance(config, SubspaceLoRAConfig):
            add_subspace_lora(model, config)
        else:
            add_branch_lora(model, config)
            rebuild_branches(branch_lora_layers(model), adapter["branches"] or {})
    head = structure["head"]
    if head is not None and head["kind"] == "closed-form":
        model.head = closed_form_head_to_load(model, head)
    elif head is not None:
        grow_head(model.head, head)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        details = " ".join(line.strip() for line in str(err).splitlines()[1:6])
        raise ConfigError(f"{directory} does not fit this model: {details} (build a fresh "
                          f"model as the saved one was: this one is adapted now)") from err
    if adapter is not None and adapter.get("experience_tasks"):
        record_experience_tasks(model, {int(owner): task for owner, task
                                        in adapter["experience_tasks"].items()})
    return model


def _head_structure(head: nn.Module) -> dict:
    """What :func:`load_model` needs to give a fresh model's head the saved one's shape: a
    closed-form head's kind (a strategy put it in place of the protocol head the model was
    built with), or the units a protocol head grew."""
    closed_form = closed_form_structure(head)
    return head_structure(head) if closed_form is None else closed_form


def _config_class(name: str) -> type:
    """The adapter config class of that name: the two adapters' and every method's."""
    known = {cls.__name__: cls for cls in (SubspaceLoRAConfig, BranchLoRAConfig)}
    known.update({spec.config_cls.__name__: spec.config_cls for spec in METHODS.values()
                  if spec.config_cls is not None})
    if name not in known:
        raise ConfigError(f"saved with an adapter config {name!r} this library does not know")
    return known[name]
