"""``cl-sulora reproduce TABLE``: every run of a recipe (:mod:`.recipes`), each as its own
``cl-sulora run`` process (``parallel`` at a time), then the table and plots of the records.

A run whose record is already in the results folder under the same config is not run again,
so an interrupted reproduction continues where it stopped."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .config import resolve_config, result_path
from .recipes import Recipe, command_line
from .records import config_differences
from .report import markdown_table, write_report


@dataclass(frozen=True)
class PlannedRun:
    strategy: str
    seed: int
    arguments: list[str]  # of ``cl-sulora``
    record: Path
    config: dict[str, Any]  # the resolved run config, as a record stores it

    @property
    def done(self) -> bool:
        """Whether a record of this run's config is at :attr:`record`."""
        return _record_of(self) is not None

    @property
    def name(self) -> str:
        return self.record.stem


def plan(recipe: Recipe, user: Mapping[str, Any], seeds: list[int] | None = None,
         strategies: list[str] | None = None) -> list[PlannedRun]:
    """The runs of ``recipe``, ``user``'s dotted keys (``--data-root``, ``--device``, ``--out``
    ...) over the recipe's; each run config validated before anything runs."""
    runs = []
    for strategy, seed, overrides in recipe.runs(seeds, strategies):
        merged = {**overrides, **user}
        config = resolve_config(recipe.spec.benchmark, strategy, merged)
        record = result_path(config)
        arguments = command_line(recipe, strategy, merged)
        arguments.insert(1, "--no-report")
        runs.append(PlannedRun(strategy, seed, arguments, record,
                               config.model_dump(mode="json")))
    return runs


def _record_of(run: PlannedRun) -> dict[str, Any] | None:
    """The record at ``run.record`` if a run of ``run.config`` wrote it."""
    try:
        record = json.loads(run.record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = isinstance(record, dict) and not config_differences(record.get("config", {}),
                                                                run.config)
    return record if same else None


def describe(recipe: Recipe, runs: Sequence[PlannedRun], user: Mapping[str, Any]) -> str:
    """What ``--dry-run`` prints: the table, where it was recorded, and each run's command."""
    changed = {k: v for k, v in user.items() if k != "out"}
    lines = [f"{recipe.name}: {recipe.spec.title} ({len(runs)} runs; "
             f"{sum(r.done for r in runs)} already done)",
             "  recorded in: benchmarks/results/accuracy/{"
             + ",".join(recipe.spec.records) + "} of the project repository"]
    if changed:
        lines.append("  your settings over the recipe's: "
                     + ", ".join(f"{k}={v}" for k, v in changed.items()))
    for run in runs:
        mark = "done" if run.done else "todo"
        lines.append(f"  [{mark}] cl-sulora {shlex.join(run.arguments)}")
    return "\n".join(lines)


def execute(runs: Sequence[PlannedRun], parallel: int, logs: Path,
            echo: Callable[[str], None] = print) -> list[PlannedRun]:
    """Run the runs not yet done, ``parallel`` processes at a time, each logging to
    ``logs/<record name>.log``; returns the failed ones (the others' records are written)."""
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: give at least 1")
    logs.mkdir(parents=True, exist_ok=True)
    todo = [run for run in runs if not run.done]
    waiting, running, failed = list(todo), [], []
    finished = 0
    while waiting or running:
        while waiting and len(running) < parallel:
            run = waiting.pop(0)
            log = logs / f"{run.name}.log"
            with log.open("w", encoding="utf-8") as handle:
                process = subprocess.Popen(
                    [sys.executable, "-m", "cl_sulora", *run.arguments],
                    stdout=handle, stderr=subprocess.STDOUT,
                )
            running.append((process, run, log, time.perf_counter()))
        time.sleep(0.5)
        for entry in list(running):
            process, run, log, start = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            finished += 1
            status = "ok" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
            echo(f"[{finished}/{len(todo)}] {run.name}: {status} in "
                 f"{time.perf_counter() - start:.0f}s (log: {log})")
            if process.returncode != 0:
                failed.append(run)
    return failed


def report(runs: Sequence[PlannedRun], out: Path) -> dict[str, Path] | None:
    """The table and plots of the runs' records (those written under the planned config) in
    ``out``; ``None`` when no run has one."""
    records = [record for record in map(_record_of, runs) if record is not None]
    if not records:
        return None
    paths = write_report(records, out, runs[0].record.name.split("__")[0])
    print()
    print(markdown_table(records))
    return paths
