"""Build a run from its config: backbone, benchmark, head, model, the runner's plugins and the
method's strategy, the same way for every method (only the method and its config differ)."""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from avalanche.core import BasePlugin, SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
from avalanche.training.plugins import EvaluationPlugin

from ..benchmarks import BenchmarkSpec, build_benchmark
from ..errors import ConfigError
from ..methods import MethodSpec, get_method
from ..models.backbones import Backbone, build_backbone, with_random_features
from ..models.heads import ContinualClassifier, make_head, split_head
from ..seeding import projection_generator
from ..training import distributed
from ..training.alignment import ClassifierAlignment
from ..training.plugins import TF32, Autocast, BatchAugment, EpochTimer, LRSchedule, Progress
from .config import RunConfig, modality
from .presets import TrainingConfig
from .records import git_commit


@dataclass
class Experiment:
    """A built run: benchmark, backbone, model, the method and its Avalanche strategy, the
    runner's own plugins whose state the records read, and the commit of the code it runs
    (read when it is built: a checkout that changes during a long run does not change it)."""

    config: RunConfig
    spec: BenchmarkSpec
    backbone: Backbone
    model: ContinualClassifier
    method: MethodSpec
    strategy: Any
    timer: EpochTimer
    alignment: ClassifierAlignment | None = None
    commit: dict[str, Any] | None = field(default_factory=git_commit)


@contextmanager
def determinism_restored() -> Iterator[None]:
    """Give torch's deterministic-algorithms flag back as it was on exit (a run's
    :func:`seed_everything` sets it to the run's ``deterministic``)."""
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


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
    device = distributed.local_device(config.device)
    if config.precision == "tf32" and device.type != "cuda":
        raise ConfigError(f"precision tf32 runs matrix products on CUDA tensor cores, but the "
                          f"device is {device}: use --precision fp32 (or a CUDA device)")
    bb = config.backbone
    backbone = build_backbone(
        bb.name,
        weights=bb.weights,
        pretrained=bb.pretrained,
        pooling=bb.pooling,
        max_length=bb.max_length,
        normalize=bb.normalize,
        **bb.kwargs,
    )
    if bb.random_features:
        backbone = with_random_features(
            backbone, bb.random_features, projection_generator(config.seed))
    kind = modality(config.benchmark) if spec is None else spec.modality
    if kind != backbone.modality:  # before the benchmark is built for the wrong inputs
        raise ConfigError(
            f"benchmark {config.benchmark!r} is {kind} but backbone {backbone.name!r} is for "
            f"{backbone.modality}: give a backbone for {kind} (--backbone or "
            "--backbone-weights), or leave both out for the benchmark's default"
        )
    if spec is None:
        spec = load_benchmark(config, backbone)
    method = get_method(config.method_name)
    if spec.protocol not in method.protocols:
        raise ConfigError(
            f"{config.strategy!r} runs on {' or '.join(method.protocols)} benchmarks, not on "
            f"{spec.name!r} ({spec.protocol}): choose another strategy or protocol")
    # the class-incremental head grows from one unit as classes arrive (every record was made
    # so); only the domain-incremental head is sized up front
    sized = spec.num_classes if spec.protocol == "domain-incremental" else None
    width = config.alignment.random_features
    if width and spec.protocol == "task-incremental":
        raise ConfigError(
            "alignment.random_features splits a single head; a task-incremental model has a "
            "head per task: set alignment.random_features=0 (backbone.random_features puts the "
            "projection under every task's head)")
    head = (split_head(spec.protocol, backbone.feature_dim, width,
                       projection_generator(config.seed), sized) if width
            else make_head(spec.protocol, backbone.feature_dim, sized))
    model = ContinualClassifier(backbone.module, head)
    training = config.training
    timer = EpochTimer()
    extra: list[SupervisedPlugin] = [timer]
    if spec.batch_augment is not None:  # first: every other plugin sees the augmented inputs
        extra.insert(0, BatchAugment(spec.batch_augment, seed=config.seed))
    if config.precision == "bf16":
        extra.append(Autocast(device.type))
    elif config.precision == "tf32":
        extra.append(TF32())
    alignment = None
    if config.alignment.enabled:
        alignment = ClassifierAlignment(config.alignment, seed=config.seed)
        extra.append(alignment)
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
        lr_schedule=LRSchedule(training.lr, training.lr_schedule,
                               milestones=training.lr_milestones, gamma=training.lr_gamma,
                               first_lr=training.first_lr),
        divergence_check_every=training.divergence_check_every,
    )
    method_config = None
    if method.config_cls is not None:
        method_config = kwargs["config"] = method.config_cls(**config.method)
    if spec.protocol == "task-incremental" and method.task_aware_inference:
        kwargs["inference"] = "task-aware"
    try:
        strategy = method.strategy(**kwargs)
    except ValueError as err:  # e.g. target_modules matching nothing, rank x num_slots > d_in
        raise ConfigError(
            f"method config of strategy {config.strategy!r} does not fit backbone "
            f"{backbone.name!r}: {err} (fix the method.* keys in the preset or with --set)"
        ) from err
    if method.stream_check is not None:
        method.stream_check(method_config, len(spec.benchmark.train_stream))
    if config.compile:
        model.backbone.compile()
    return Experiment(config, spec, backbone, model, method, strategy, timer, alignment)


def load_benchmark(config: RunConfig, backbone: Backbone) -> BenchmarkSpec:
    """The benchmark of ``config``, fed the way ``backbone`` needs."""
    try:
        return build_benchmark(config.benchmark, **config.data, **backbone.benchmark_options())
    except ConfigError:
        raise
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
