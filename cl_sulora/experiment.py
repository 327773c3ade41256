"""One continual-learning run: the validated run config, everything built from it, the stream
loop and the results record."""

from __future__ import annotations

import dataclasses
import inspect
import os
import platform
import random
import re
import resource
import subprocess
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from avalanche.core import BasePlugin, SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
from avalanche.training.plugins import EvaluationPlugin
from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError

from . import distributed, metrics
from .alignment import AlignmentConfig, ClassifierAlignment
from .atomic import atomic_write_json
from .backbones import DEFAULT_BACKBONES, Backbone, build_backbone
from .benchmarks import BENCHMARKS, BenchmarkSpec, benchmark_options, build_benchmark
from .benchmarks._common import wants_validation
from .checkpoint import latest_checkpoint, restore, save_checkpoint
from .methods.avalanche_baselines import ReplayBaseline
from .methods.lora_baselines import JointLoRA, joint_experience
from .methods.registry import METHODS
from .methods.sulora import SuLoRA, check_capacity
from .models import ContinualClassifier, make_head
from .plugins import Autocast, BatchAugment, EpochTimer, LRSchedule, Progress
from .presets import (
    ConfigError,
    TrainingConfig,
    describe,
    load_preset,
    method_config,
    method_fields,
    parse_yaml,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: Benchmark options fixed by the backbone rather than by the user.
BACKBONE_OPTIONS = ("tokenizer", "max_length", "image_size", "mean", "std")
#: Keys set by ``--benchmark``/``--strategy``, not by overrides.
DERIVED_KEYS = ("benchmark", "strategy", "preset_file", "method_name")
ACCURACY_KEY = re.compile(r"^Top1_Acc_Exp/eval_phase/test_stream/Task\d+/Exp(\d+)$")


# ------------------------------------------------------------------------------------- config
class BackboneConfig(BaseModel):
    """Which backbone and how it reads its input (see ``backbones.build_backbone``)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    weights: str | None = None
    pretrained: bool = False
    pooling: Literal["mean", "cls"] = "mean"
    max_length: PositiveInt = 128
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
    seed: int = 0
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
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
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {benchmark!r}; choose one of {sorted(BENCHMARKS)}")
    preset = load_preset(strategy)
    tree: dict[str, Any] = {
        "benchmark": benchmark,
        "strategy": preset.name,
        "preset_file": str(preset.path),
        "method_name": preset.spec.name,
        "training": preset.training.model_dump(),
        "method": dict(preset.method),
    }
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
    if "seed" in method_fields(preset.spec) and "seed" not in values:
        values["seed"] = config.seed
    resolved = method_config(preset.spec, values, where=where, fix="fix the --set method.* value")
    config.method = dataclasses.asdict(resolved) if resolved is not None else {}
    return config


def modality(benchmark: str) -> str:
    """``text`` for benchmarks that take a tokenizer, else ``image``."""
    return "text" if "tokenizer" in benchmark_options(benchmark) else "image"


def benchmark_label(config: RunConfig) -> str:
    """The benchmark part of result file names; the protocol joins it where it is an option,
    and ``-val<fraction>`` when evaluating on a validation split (``data.validation``)."""
    options = benchmark_options(config.benchmark)
    label = config.benchmark
    if "protocol" in options:
        label += f"-{config.data.get('protocol', options['protocol'].default)}"
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


# -------------------------------------------------------------------------------------- build
@dataclass
class Experiment:
    """A built run: benchmark, backbone, model and Avalanche strategy."""

    config: RunConfig
    spec: BenchmarkSpec
    backbone: Backbone
    model: ContinualClassifier
    strategy: Any


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic)


def make_optimizer(training: TrainingConfig, params) -> torch.optim.Optimizer:
    """The optimizer of the recipe; strategies rebuild it over each experience's parameters."""
    if training.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay
        )
    # AdamW as Adam(decoupled_weight_decay=True): the same update, and its ``defaults`` can
    # rebuild it (torch's AdamW rejects its own ``decoupled_weight_decay`` default).
    return torch.optim.Adam(
        params,
        lr=training.lr,
        weight_decay=training.weight_decay,
        decoupled_weight_decay=training.optimizer == "adamw",
    )


def build_experiment(
    config: RunConfig,
    *,
    spec: BenchmarkSpec | None = None,
    progress: bool = False,
    loggers: Sequence[Any] = (),
    plugins: Sequence[BasePlugin] = (),
) -> Experiment:
    """Build backbone, benchmark (unless ``spec`` is given), head, model and strategy, the same
    way for every method: only the method and its config differ between strategies."""
    bb = config.backbone
    backbone = build_backbone(
        bb.name,
        weights=bb.weights,
        pretrained=bb.pretrained,
        pooling=bb.pooling,
        max_length=bb.max_length,
        **bb.kwargs,
    )
    if spec is None:
        spec = load_benchmark(config, backbone)
    if spec.modality != backbone.modality:
        raise ConfigError(
            f"benchmark {spec.name!r} is {spec.modality} but backbone "
            f"{backbone.name!r} is a {backbone.modality} backbone"
        )
    head = make_head(spec.protocol, backbone.feature_dim, spec.num_classes)
    model = ContinualClassifier(backbone.module, head)
    method = METHODS[config.method_name]
    device = distributed.local_device(config.device)
    training = config.training
    extra: list[SupervisedPlugin] = [LRSchedule(training.lr, training.lr_schedule), EpochTimer()]
    if spec.batch_augment is not None:  # first: every other plugin sees the augmented inputs
        extra.insert(0, BatchAugment(spec.batch_augment, seed=config.seed))
    if config.precision == "bf16":
        extra.append(Autocast(device.type))
    if config.alignment.enabled:
        extra.append(ClassifierAlignment(config.alignment, seed=config.seed))
    if progress and distributed.is_main():
        extra.append(Progress(len(spec.benchmark.train_stream), f"{config.strategy} "))
    kwargs: dict[str, Any] = dict(
        model=model,
        optimizer=make_optimizer(training, model.parameters()),
        train_mb_size=training.batch_size,
        train_epochs=training.epochs,
        eval_mb_size=training.eval_batch_size,
        device=device,
        evaluator=make_evaluator(loggers),
        plugins=[*extra, *plugins],
    )
    if method.config_cls is not None:
        kwargs["config"] = method.config_cls(**config.method)
    if (
        spec.protocol == "task-incremental"
        and "inference" in inspect.signature(method.strategy).parameters
    ):
        kwargs["inference"] = "task-aware"
    try:
        strategy = method.strategy(**kwargs)
    except ValueError as err:  # e.g. target_modules matching nothing, rank x num_slots > d_in
        raise ConfigError(
            f"method config of strategy {config.strategy!r} does not fit backbone "
            f"{backbone.name!r}: {err} (fix the method.* keys in the preset or with --set)"
        ) from err
    if isinstance(strategy, SuLoRA):
        check_capacity(strategy.config, len(spec.benchmark.train_stream))
    if config.compile:
        model.backbone.compile()
    return Experiment(config, spec, backbone, model, strategy)


def load_benchmark(config: RunConfig, backbone: Backbone) -> BenchmarkSpec:
    """The benchmark of ``config``, fed the way ``backbone`` needs."""
    try:
        return build_benchmark(config.benchmark, **config.data, **backbone.benchmark_options())
    except (TypeError, ValueError) as err:
        raise ConfigError(f"benchmark {config.benchmark!r}: {err}") from err


def make_evaluator(loggers: Sequence[Any] = ()) -> EvaluationPlugin:
    """Avalanche accuracy (experience and stream), forgetting and BWT metrics."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No loggers specified")
        return EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True),
            forgetting_metrics(experience=True, stream=True),
            bwt_metrics(experience=True, stream=True),
            loggers=list(loggers),
        )


# -------------------------------------------------------------------------------- stream loop
@dataclass
class StreamResult:
    """What the stream loop measured; ``last_metrics`` is Avalanche's final metrics dict."""

    accuracy_matrix: list[list[float]]
    train_seconds: float
    train_epoch_seconds: float
    trainable_params: int
    last_metrics: dict[str, Any]


@dataclass
class Checkpointing:
    """Where the runner writes a checkpoint after every experience, and whether it resumes
    from the newest one (``fallback``: from the newest intact one)."""

    directory: Path
    resume: bool = False
    fallback: bool = False


def run_stream(
    experiment: Experiment,
    echo: Callable[[str], None] | None = None,
    checkpointing: Checkpointing | None = None,
) -> StreamResult:
    """Train on each experience in order; after each, evaluate on the whole test stream and,
    with ``checkpointing``, write a checkpoint (resuming first from the last one if asked).

    A joint strategy (:class:`~cl_sulora.methods.lora_baselines.JointLoRA`) trains once on the
    whole stream, giving a single-row accuracy matrix."""
    strategy = experiment.strategy
    train_stream = experiment.spec.benchmark.train_stream
    test_stream = experiment.spec.benchmark.test_stream
    count = len(train_stream)
    if len(test_stream) != count:
        raise ValueError(f"{count} training but {len(test_stream)} test experiences")
    joint = isinstance(strategy, JointLoRA)
    matrix: list[list[float]] = []
    train_seconds, trainable, last, first = 0.0, 0, {}, 0
    timer = next(p for p in strategy.plugins if isinstance(p, EpochTimer))
    config = experiment.config.model_dump(mode="json")
    main = distributed.is_main()
    echo = echo if main else None
    if checkpointing and checkpointing.resume:
        checkpoint = latest_checkpoint(checkpointing.directory, fallback=checkpointing.fallback)
        if checkpoint is None:
            raise ConfigError(
                f"--resume: no checkpoint in {checkpointing.directory}; run without --resume "
                "to start from the beginning"
            )
        check_same_config(checkpoint.meta.get("config", {}), config, checkpoint.path)
        adapted = [joint_experience(train_stream)] if joint else train_stream
        restore(strategy, checkpoint, adapted, test_stream)
        saved = checkpoint.state["extra"]
        matrix, train_seconds = saved["accuracy_matrix"], saved["train_seconds"]
        timer.seconds = saved.get("train_epoch_seconds", 0.0)
        trainable, first = saved["trainable_params"], checkpoint.position + 1
        if echo:
            echo(f"  resumed from {checkpoint.path} (experiences 1-{first} done)")
    workers = experiment.config.training.num_workers
    loading = {"num_workers": workers, "persistent_workers": workers > 0}
    for index in range(first, 1 if joint else count):
        start = time.perf_counter()
        strategy.train(train_stream if joint else train_stream[index], **loading)
        seconds = time.perf_counter() - start
        train_seconds += seconds
        trainable = max(trainable, optimized_parameter_count(strategy.optimizer))
        last = strategy.eval(test_stream, **loading)
        matrix.append(accuracy_row(last, count))
        if checkpointing and main:
            extra = {"accuracy_matrix": matrix, "train_seconds": train_seconds,
                     "train_epoch_seconds": timer.seconds, "trainable_params": trainable}
            save_checkpoint(checkpointing.directory, position=index, strategy=strategy,
                            extra=extra, meta={"config": config})
        if echo:
            seen = count if joint else index + 1
            name = "all experiences" if joint else experiment.spec.experience_names[index]
            row = " ".join(f"{a:.3f}" for a in matrix[-1][:seen])
            echo(
                f"  {experiment.config.strategy} step {index + 1}/{1 if joint else count} "
                f"({name}): train {seconds:.1f}s, accuracy on seen experiences [{row}]"
            )
    return StreamResult(matrix, train_seconds, timer.seconds, trainable, last)


def check_same_config(saved: Mapping[str, Any], current: Mapping[str, Any], where: Path) -> None:
    """Refuse to resume a checkpoint written under another run config, naming the keys."""
    old, new = _flatten(saved), _flatten(current)
    differing = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if differing:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differing)
        raise ConfigError(
            f"--resume: {where} was written with another run config ({details}); resume with "
            "the same flags and --set values, or use another --checkpoint-dir"
        )


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def accuracy_row(metrics_dict: Mapping[str, Any], count: int) -> list[float]:
    """Per-experience test accuracies from Avalanche's metrics dict."""
    row: list[float | None] = [None] * count
    for key, value in metrics_dict.items():
        match = ACCURACY_KEY.match(key)
        if match and int(match.group(1)) < count:
            row[int(match.group(1))] = float(value)
    if any(a is None for a in row):
        raise RuntimeError(f"missing experience accuracies in the evaluation metrics: {row}")
    return row  # type: ignore[return-value]


def optimized_parameter_count(optimizer: torch.optim.Optimizer) -> int:
    """Elements of the distinct trainable parameters the optimizer updates."""
    params = {id(p): p for g in optimizer.param_groups for p in g["params"] if p.requires_grad}
    return sum(p.numel() for p in params.values())


# ------------------------------------------------------------------------------------- record
@dataclass
class RunResult:
    """The written record and its path, plus the built experiment and the raw stream result."""

    record: dict[str, Any]
    path: Path
    experiment: Experiment
    stream: StreamResult


def run(
    config: RunConfig,
    *,
    spec: BenchmarkSpec | None = None,
    command: Sequence[str] = (),
    progress: bool = False,
    echo: Callable[[str], None] | None = None,
    loggers: Sequence[Any] = (),
    plugins: Sequence[BasePlugin] = (),
    checkpointing: Checkpointing | None = None,
) -> RunResult:
    """Seed, build, run the stream and write ``result_path(config)`` atomically. ``loggers``
    go to the Avalanche evaluator, ``plugins`` to the strategy; ``echo`` gets one line per
    experience; ``checkpointing`` writes (and resumes from) per-experience checkpoints.

    Started by ``torchrun`` with several processes, the run is data-parallel (see
    :mod:`cl_sulora.distributed`): every rank runs this, only rank 0 echoes and writes the
    results and checkpoints (the returned ``path`` is where rank 0 writes)."""
    with distributed.process_group(config.device):
        return _run(config, spec=spec, command=command, progress=progress, echo=echo,
                    loggers=loggers, plugins=plugins, checkpointing=checkpointing)


def _run(config, *, spec, command, progress, echo, loggers, plugins, checkpointing) -> RunResult:
    device = distributed.local_device(config.device)
    if distributed.is_distributed():
        check_distributed(config)
    if (
        checkpointing
        and checkpointing.resume
        and issubclass(METHODS[config.method_name].strategy, ReplayBaseline)
    ):
        raise ConfigError(
            f"--resume is not supported for {config.strategy!r}: its replay buffer is not "
            "checkpointed; run it again without --resume"
        )
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        seed_everything(config.seed, config.deterministic)
        experiment = build_experiment(
            config, spec=spec, progress=progress, loggers=loggers, plugins=plugins
        )
        seed_everything(config.seed, config.deterministic)  # same data order for every method
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = run_stream(experiment, echo, checkpointing)
    finally:
        torch.use_deterministic_algorithms(previous)
    record = make_record(experiment, result, command)
    path = result_path(config)
    if distributed.is_main():
        atomic_write_json(path, record)
    return RunResult(record, path, experiment, result)


def check_distributed(config: RunConfig) -> None:
    """Refuse, before building anything, what a data-parallel run does not support."""
    distributed.check_batch_size(config.training.batch_size)
    if issubclass(METHODS[config.method_name].strategy, ReplayBaseline):
        raise ConfigError(
            f"{config.strategy!r} cannot run under torchrun: its replay buffer is mixed in by "
            "its own data loader, which does not shard like the others; run it in one process"
        )


def make_record(
    experiment: Experiment, result: StreamResult, command: Sequence[str]
) -> dict[str, Any]:
    """The results JSON of a run."""
    config, spec = experiment.config, experiment.spec
    device = distributed.local_device(config.device)
    report = getattr(experiment.strategy, "adapter_report", None)
    adapters = report() if report else {}
    aligners = [p for p in experiment.strategy.plugins if isinstance(p, ClassifierAlignment)]
    return {
        "benchmark": spec.name,
        "protocol": spec.protocol,
        "strategy": config.strategy,
        "seed": config.seed,
        "backbone": experiment.backbone.name,
        "commit": git_commit(),
        "device": device_name(device),
        # data-parallel ranks; training.batch_size is the global batch, split over them
        "world_size": distributed.world_size(),
        "command": list(command),
        "config": config.model_dump(mode="json"),
        "experience_names": list(spec.experience_names),
        "accuracy_matrix": result.accuracy_matrix,
        **metrics.summarize(result.accuracy_matrix),
        "trainable_params": result.trainable_params,
        "live_adapter_params": adapters.get("live_adapter_params"),
        "stored_state_params": adapters.get("stored_state_params"),
        "alignment_stored_params": aligners[0].stored_state_params() if aligners else None,
        "train_seconds": result.train_seconds,
        # the part of train_seconds inside training epochs (see plugins.EpochTimer)
        "train_epoch_seconds": result.train_epoch_seconds,
        # training samples in one pass over the stream (the joint run's pass included)
        "train_samples": sum(len(e.dataset) for e in spec.benchmark.train_stream),
        "peak_memory_mb": peak_memory_mb(device),
        "notes": _jsonable(spec.notes),
    }


def git_commit(root: Path = PROJECT_ROOT) -> dict[str, Any] | None:
    """``{"sha", "dirty"}`` of the project checkout. ``CL_SULORA_COMMIT`` names the commit
    instead (``{"sha", "dirty": None}``) where the tree was copied without, or with a stale,
    git directory."""
    sha = os.environ.get("CL_SULORA_COMMIT")
    if sha:
        return {"sha": sha, "dirty": None}
    if not (root / ".git").exists():
        return None
    try:
        sha = _git(root, "rev-parse", "HEAD")
        dirty = bool(_git(root, "status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"sha": sha, "dirty": dirty}


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads"
    )


def peak_memory_mb(device: torch.device) -> float:
    """CUDA peak allocated memory of the run; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
