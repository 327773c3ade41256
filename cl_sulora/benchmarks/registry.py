"""Benchmark registry: names to builders, with option checking."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from ._common import BenchmarkSpec
from .bbc_news import build_bbc_news
from .cifar100 import build_split_cifar100
from .glue import build_split_glue
from .pacs import build_pacs_dil
from .sentiment import build_sentiment_dil

BENCHMARKS: dict[str, Callable[..., BenchmarkSpec]] = {
    "split-cifar100-5": partial(build_split_cifar100, n_splits=5),
    "split-cifar100-10": partial(build_split_cifar100, n_splits=10),
    "split-cifar100-20": partial(build_split_cifar100, n_splits=20),
    "split-cifar100-50": partial(build_split_cifar100, n_splits=50),
    "split-cifar100-100": partial(build_split_cifar100, n_splits=100),
    "pacs-dil": build_pacs_dil,
    "split-glue": build_split_glue,
    "sentiment-dil": build_sentiment_dil,
    "bbc-news": build_bbc_news,
}


def benchmark_options(name: str) -> dict[str, inspect.Parameter]:
    """The options ``build_benchmark(name, ...)`` accepts, by name."""
    builder = _builder(name)
    fixed = builder.keywords if isinstance(builder, partial) else {}
    params = inspect.signature(builder).parameters
    return {k: p for k, p in params.items() if k not in fixed}


def build_benchmark(name: str, **options: Any) -> BenchmarkSpec:
    """Build the registered benchmark ``name`` with the given builder options."""
    accepted = benchmark_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"benchmark {name!r} does not accept option(s) {unknown}; "
            f"accepted options: {sorted(accepted)}"
        )
    missing = [k for k, p in accepted.items() if p.default is p.empty and k not in options]
    if missing:
        raise TypeError(f"benchmark {name!r} requires option(s) {missing}")
    return BENCHMARKS[name](**options)


def _builder(name: str) -> Callable[..., BenchmarkSpec]:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid names: {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]
