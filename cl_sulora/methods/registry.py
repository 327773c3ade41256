"""Registry of continual-learning methods: a preset's ``strategy`` name to the strategy class,
its config class and what the runner needs to know about it.

Each method registers itself where it is defined (``register(MethodSpec(...))`` beside its
strategy class); importing :mod:`cl_sulora.methods` registers them all. The runner reads the
declared capabilities and never inspects a strategy's class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class MethodSpec:
    """A method the runner can build.

    Args:
        name: the name presets give in ``strategy:``.
        strategy: the Avalanche strategy class (keyword-only constructor taking ``model``,
            ``optimizer``, ``config``, ``train_mb_size``, ``train_epochs``, ``eval_mb_size``,
            ``device``, ``evaluator``, ``plugins``; and ``inference`` when
            ``task_aware_inference``).
        config_cls: the method's config class (a pydantic dataclass rejecting unknown keys), or
            ``None`` for methods without one.
        paper: the source.
        trains: what is trained per experience.
        stores: what is stored per experience.
        defaults: config values that make this entry differ from ``config_cls()``.
        joint: trains once, on the whole stream (``strategy.train(stream)``), so its accuracy
            matrix has a single row.
        resumable: a run can resume from its checkpoints (all of its state is checkpointed).
        distributed: can train data-parallel under ``torchrun``.
        task_aware_inference: takes ``inference="task-aware"``, which the runner passes on
            task-incremental benchmarks.
        protocols: the benchmark protocols it runs on (the runner refuses the others).
        alignment: classifier alignment may re-train its head (a head solved in closed form
            must not be).
        stream_check: ``stream_check(config, num_experiences)`` raises a
            :class:`~cl_sulora.errors.ConfigError` when the method cannot run a stream of that
            length; run once, before training.
    """

    name: str
    strategy: type
    config_cls: type | None
    paper: str
    trains: str
    stores: str
    defaults: dict = field(default_factory=dict)
    joint: bool = False
    resumable: bool = True
    distributed: bool = True
    task_aware_inference: bool = False
    protocols: tuple[str, ...] = ("class-incremental", "domain-incremental", "task-incremental")
    alignment: bool = True
    stream_check: Callable[[Any, int], None] | None = None


METHODS: dict[str, MethodSpec] = {}


def checked_config(strategy: object, config_cls: type | None, config: Any) -> Any:
    """The config a strategy constructor was given, checked against its ``config_cls``: that
    class's defaults when ``None``, a TypeError for an instance of another class; a ValueError
    for any config when the strategy takes none (``config_cls`` None)."""
    if config_cls is None:
        if config is not None:
            raise ValueError(f"{type(strategy).__name__} takes no config")
        return None
    config = config if config is not None else config_cls()
    if not isinstance(config, config_cls):
        raise TypeError(f"expected a {config_cls.__name__}, got a {type(config).__name__}")
    return config


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to :data:`METHODS`; names are unique."""
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``; a :class:`ConfigError` listing the names otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]
