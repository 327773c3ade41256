"""Benchmark registry: names to builders, with option checking. Each builder registers itself
where it is defined (:func:`register_benchmark`); importing :mod:`cl_sulora.benchmarks` registers
them all."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from pydantic import TypeAdapter, ValidationError

from .common import BenchmarkSpec, check_seed

Builder = Callable[..., BenchmarkSpec]
BENCHMARKS: dict[str, Builder] = {}


def register_benchmark(name: str, **fixed: Any) -> Callable[[Builder], Builder]:
    """Register the decorated builder as ``name``, with ``fixed`` options bound (e.g.
    ``n_splits=10``); returns the builder unchanged, so one builder can serve several names."""

    def decorate(builder: Builder) -> Builder:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} is already registered")
        BENCHMARKS[name] = partial(builder, **fixed) if fixed else builder
        return builder

    return decorate


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
    wrong = option_type_errors(name, options)
    if wrong:
        raise TypeError(f"benchmark {name!r}: " + "; ".join(f"{k}: {m}" for k, m in wrong.items()))
    for key, value in options.items():
        if key.endswith("seed") and value is not None:
            check_seed(key, value)
    return BENCHMARKS[name](**options)


def option_type_errors(name: str, options: Mapping[str, Any]) -> dict[str, str]:
    """What is wrong with each option value that is not of the type its builder's signature
    gives, by option name (empty if none). Values are checked strictly, without conversion: a
    builder would take ``augment="flase"`` as a true string and augment silently."""
    builder = _builder(name)
    hints = typing.get_type_hints(builder.func if isinstance(builder, partial) else builder)
    errors = {}
    for key, value in options.items():
        hint = hints.get(key, Any)
        if hint is Any:
            continue
        try:
            TypeAdapter(hint).validate_python(value, strict=True)
        except ValidationError as err:
            errors[key] = f"{err.errors()[0]['msg']}, not {value!r}"
    return errors


def _builder(name: str) -> Builder:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid names: {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]
