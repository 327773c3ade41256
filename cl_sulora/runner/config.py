"""The run config: everything that defines a run, resolved from a preset, flags and ``--set``
values, validated before anything is built."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError

from ..benchmarks import BENCHMARKS, benchmark_options, option_type_errors
from ..benchmarks.common import wants_validation
from ..errors import ConfigError
from ..methods import get_method
from ..models.backbones import DEFAULT_BACKBONES
from ..training.alignment import AlignmentConfig
from .presets import TrainingConfig, describe, load_preset, method_config, method_fields, parse_yaml

#: Benchmark options fixed by the backbone rather than by the user.
BACKBONE_OPTIONS = ("tokenizer", "max_length", "image_size", "mean", "std")
#: Keys set by ``--benchmark``/``--strategy``, not by overrides.
DERIVED_KEYS = ("benchmark", "strategy", "preset_file", "method_name")

#: Command-line flag (argparse dest: ``--data-root`` is ``data_root``) -> run config key.
FLAG_KEYS = {
    "backbone": "backbone.name",
    "backbone_weights": "backbone.weights",
    "device": "device",
    "epochs": "training.epochs",
    "lr": "training.lr",
    "batch_size": "training.batch_size",
    "data_root": "data.data_root",
    "limit_per_class": "data.limit_per_class",
    "num_experiences": "data.num_experiences",
    "class_order_seed": "data.class_order_seed",
    "domain_order": "data.domain_order",
    "task_order": "data.task_order",
    "order_seed": "data.order_seed",
    "protocol": "data.protocol",
    "validation": "data.validation",
    "out": "out",
    "deterministic": "deterministic",
    "compile": "compile",
    "precision": "precision",
}

#: fp32 (torch's defaults), tf32 (float32 tensors, TF32 matrix products; CUDA only), bf16 (autocast)
Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


class BackboneConfig(BaseModel):
    """Which backbone and how it reads its input (see
    :func:`~cl_sulora.models.backbones.build_backbone`)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    weights: str | None = None
    pretrained: bool = False
    pooling: Literal["mean", "cls"] = "mean"
    max_length: PositiveInt = 128
    #: image backbones: false feeds pixels in [0, 1] (the SD-LoRA and InfLoRA reference loaders)
    normalize: bool = True
    #: > 0: RanPAC's random projection to this many ReLU features follows the backbone, seeded
    #: by the run seed (as the ``ranpac`` strategy's); every method's head reads them
    random_features: NonNegativeInt = 0
    kwargs: dict[str, Any] = {}


class RunConfig(BaseModel):
    """Everything that defines a run. ``strategy`` is the preset name, ``method_name`` the
    registered method it configures; ``method`` is the full resolved method config; ``data``
    holds benchmark builder options."""

    model_config = ConfigDict(extra="forbid")

    benchmark: str
    strategy: str
    preset_file: str
    method_name: str
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    device: str = "auto"
    precision: Precision = "fp32"
    compile: bool = False
    deterministic: bool = False
    out: str = "results"
    backbone: BackboneConfig = BackboneConfig()
    data: dict[str, Any] = {}
    training: TrainingConfig = TrainingConfig()
    alignment: AlignmentConfig = AlignmentConfig()
    method: dict[str, Any] = {}


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["training.lr=3e-4", "method.qkv_parts=[q,k,v]"]`` -> dotted keys to YAML-typed values."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", key):
            raise ConfigError(
                f"--set {item!r}: expected KEY=VALUE with a dotted KEY such as "
                "training.lr=3e-4 or method.rank=8"
            )
        try:
            overrides[key] = parse_yaml(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({err})") from err
    return overrides


def resolve_config(benchmark: str, strategy: str, overrides: Mapping[str, Any] = {}) -> RunConfig:
    """The run config of ``strategy`` (preset name or path) on ``benchmark``: the preset, then
    ``overrides`` (dotted keys, e.g. from flags and ``--set``), validated and fully resolved."""
    check_benchmark(benchmark)
    preset = load_preset(strategy)
    tree: dict[str, Any] = {
        "benchmark": benchmark,
        "strategy": preset.name,
        "preset_file": str(preset.path),
        "method_name": preset.spec.name,
        "training": preset.training.model_dump(),
        "method": dict(preset.method),
    }
    return config_from_tree(tree, overrides)


def check_benchmark(benchmark: str) -> None:
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {benchmark!r}; choose one of {sorted(BENCHMARKS)}")


def config_from_tree(tree: Mapping[str, Any], overrides: Mapping[str, Any] = {}) -> RunConfig:
    """A run config from ``tree`` (a preset's, or one a run saved) with ``overrides`` (dotted
    keys) applied, validated and fully resolved; ``tree`` is left as it was."""
    tree = copy.deepcopy(dict(tree))
    for key, value in overrides.items():
        if key in DERIVED_KEYS:
            raise ConfigError(f"{key} cannot be overridden; use --benchmark/--strategy")
        _set_dotted(tree, key, value)
    where = "command line (flags and --set)"
    try:
        config = RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(
            describe(err, where, "fix the flag or --set value", model=RunConfig)
        ) from err
    benchmark = config.benchmark
    check_benchmark(benchmark)
    spec = get_method(config.method_name)
    if config.alignment.enabled and not spec.alignment:
        raise ConfigError(
            f"{config.strategy!r} solves its head in closed form: classifier alignment would "
            "re-train it; drop alignment.enabled (--set alignment.enabled=false)")
    if config.alignment.random_features:
        if not config.alignment.enabled:
            raise ConfigError("alignment.random_features splits the head that alignment solves: "
                              "set alignment.enabled=true (or alignment.random_features=0)")
        if config.backbone.random_features:
            raise ConfigError(
                "alignment.random_features puts RanPAC's projection under the solved head only; "
                "backbone.random_features puts it under training too: set one of them to 0")

    options = benchmark_options(benchmark)
    for key in config.data:
        if key in BACKBONE_OPTIONS:
            raise ConfigError(f"data.{key} is fixed by the backbone; set backbone.* instead")
        if key not in options:
            accepted = sorted(set(options) - set(BACKBONE_OPTIONS))
            raise ConfigError(
                f"benchmark {benchmark!r} has no option {key!r} (data.{key}); "
                f"its options: {accepted}"
            )
    wrong = option_type_errors(benchmark, config.data)
    if wrong:
        raise ConfigError("; ".join(f"data.{key}: {message}" for key, message in wrong.items())
                          + ": fix the flag or --set value")
    try:
        wants_validation(config.data.get("validation", 0.0))
    except ValueError as err:
        raise ConfigError(f"data.validation: {err}") from err
    if config.backbone.name is None and config.backbone.weights is None:
        name, kwargs = DEFAULT_BACKBONES[modality(benchmark)]
        config.backbone.name = name
        config.backbone.kwargs = {**kwargs, **config.backbone.kwargs}
    if config.device == "auto":
        config.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(config.device)
    except RuntimeError as err:
        raise ConfigError(f"device {config.device!r} is not a torch device ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {config.device!r}: CUDA is not available here; use cpu")

    values = dict(config.method)
    if "seed" in method_fields(spec) and "seed" not in values:
        values["seed"] = config.seed
    resolved = method_config(spec, values, where=where, fix="fix the --set method.* value")
    config.method = dataclasses.asdict(resolved) if resolved is not None else {}
    return config


def modality(benchmark: str) -> str:
    """``text`` for benchmarks that take a tokenizer, else ``image``."""
    return "text" if "tokenizer" in benchmark_options(benchmark) else "image"


def benchmark_label(config: RunConfig) -> str:
    """The benchmark part of result file names; the protocol joins it where it is an option,
    ``-order<k>`` when the stream order is a seeded permutation (``data.order_seed``), and
    ``-val<fraction>`` when evaluating on a validation split (``data.validation``)."""
    options = benchmark_options(config.benchmark)
    label = config.benchmark
    if "protocol" in options:
        label += f"-{config.data.get('protocol', options['protocol'].default)}"
    if config.data.get("order_seed") is not None:
        label += f"-order{config.data['order_seed']}"
    validation = config.data.get("validation", 0.0)
    return f"{label}-val{validation:g}" if validation else label


def result_path(config: RunConfig) -> Path:
    """``<out>/<benchmark label>__<strategy>__seed<k>.json``."""
    name = f"{benchmark_label(config)}__{config.strategy}__seed{config.seed}.json"
    return Path(config.out) / name


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[leaf] = value
