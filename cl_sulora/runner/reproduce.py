"""``cl-sulora reproduce TABLE``: every run of a recipe (:mod:`.recipes`), each as its own
``cl-sulora run`` process (``parallel`` at a time), then the table and plots of the records.

A run whose record is already in the results folder under the same config is not run again,
so an interrupted reproduction continues where it stopped."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import metrics
from ..atomic import atomic_write_bytes
from ..errors import ConfigError
from .config import resolve_config, result_path
from .recipes import Recipe, command_line
from .records import same_run
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
         strategies: list[str] | None = None, overwrite: bool = False) -> list[PlannedRun]:
    """The runs of ``recipe``, ``user``'s dotted keys (``--data-root``, ``--device``, ``--out``
    ...) over the recipe's; each run config validated before anything runs. ``overwrite``: a
    run may replace a record of another config at its path (``cl-sulora run --overwrite``)."""
    runs = []
    for strategy, seed, overrides in recipe.runs(seeds, strategies):
        merged = {**overrides, **user}
        if "backbone.weights" in user:  # local weights replace the recipe's hub download
            merged["backbone.pretrained"] = False
        config = resolve_config(recipe.spec.benchmark, strategy, merged)
        record = result_path(config)
        arguments = command_line(recipe, strategy, merged)
        arguments.insert(1, "--no-report")
        if overwrite:
            arguments.insert(2, "--overwrite")
        runs.append(PlannedRun(strategy, seed, arguments, record,
                               config.model_dump(mode="json")))
    return runs


def _record_of(run: PlannedRun) -> dict[str, Any] | None:
    """The record at ``run.record`` if a run of ``run.config`` wrote it (however its paths were
    spelt: :func:`~.records.same_run`)."""
    try:
        record = json.loads(run.record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    return record if same_run(record.get("config", {}), run.config) else None


def describe(recipe: Recipe, runs: Sequence[PlannedRun], user: Mapping[str, Any]) -> str:
    """What ``--dry-run`` prints: the table, where it was recorded, and each run's command."""
    changed = {k: v for k, v in user.items() if k != "out"}
    done = [run.done for run in runs]  # each reads its record once
    lines = [f"{recipe.name}: {recipe.spec.title} ({len(runs)} runs; "
             f"{sum(done)} already done)",
             "  recorded in: benchmarks/results/accuracy/{"
             + ",".join(recipe.spec.records) + "} of the project repository"
             if recipe.spec.records else "  not recorded in the project repository"]
    if changed:
        lines.append("  your settings over the recipe's: "
                     + ", ".join(f"{k}={v}" for k, v in changed.items()))
    for run, finished in zip(runs, done, strict=True):
        lines.append(f"  [{'done' if finished else 'todo'}] cl-sulora {shlex.join(run.arguments)}")
    return "\n".join(lines)


def run_processes(jobs: Sequence[tuple[list[str], Path]], parallel: int,
                  finished: Callable[[int, int, float], None]) -> None:
    """Run each job, ``(arguments of cl-sulora, log file)``, as a process of its own,
    ``parallel`` at a time; ``finished(index, exit status, seconds)`` after each. The CPU
    threads are shared out (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = cores // parallel, unless
    set), so side-by-side runs do not oversubscribe the cores; logs are appended to.

    If this process is stopped (``SIGTERM`` sent to it alone, e.g. ``kill PID`` or a process
    supervisor; Ctrl-C; an error), the runs in progress are stopped with it and waited for,
    rather than left running unsupervised, where a campaign started again would run them a
    second time beside them (their checkpoints then resume them: :mod:`.checkpoint` writes each
    one whole or not at all)."""
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: give at least 1")
    threads = str(max(1, (os.cpu_count() or 1) // parallel))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **os.environ}
    waiting = list(enumerate(jobs))
    running: list[tuple[subprocess.Popen, int, float]] = []
    with _stopped_on_exit(running):
        while waiting or running:
            while waiting and len(running) < parallel:
                index, (arguments, log) = waiting.pop(0)
                log.parent.mkdir(parents=True, exist_ok=True)
                with log.open("a", encoding="utf-8") as handle:
                    process = subprocess.Popen([sys.executable, "-m", "cl_sulora", *arguments],
                                               stdout=handle, stderr=subprocess.STDOUT, env=env)
                running.append((process, index, time.perf_counter()))
            time.sleep(0.5)
            for entry in list(running):
                process, index, start = entry
                if process.poll() is not None:
                    running.remove(entry)
                    finished(index, process.returncode, time.perf_counter() - start)


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _stopped_on_exit(running: list[tuple[subprocess.Popen, int, float]]) -> Iterator[None]:
    """Within it ``SIGTERM`` exits this process through its ``finally`` blocks (status 143), as
    Ctrl-C does (on the main thread: no handler can be set elsewhere); however it is left, the
    processes still in ``running`` are stopped (:func:`_stop`) and the handler before it is put
    back."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit) if main else None
    try:
        yield
    finally:
        _stop([process for process, _, _ in running])
        if main:  # None: a handler not set from Python, which SIG_DFL stands for here
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _stop(processes: Sequence[subprocess.Popen], grace: float = 30.0) -> None:
    """Terminate ``processes`` and wait for them, killing those still there after ``grace``
    seconds."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def execute(runs: Sequence[PlannedRun], parallel: int, logs: Path,
            echo: Callable[[str], None] = print) -> list[PlannedRun]:
    """Run the runs not yet done (:func:`run_processes`), each logging to
    ``logs/<record name>.log``; returns the failed ones (the others' records are written)."""
    todo = [run for run in runs if not run.done]
    failed: list[PlannedRun] = []
    ended: list[PlannedRun] = []

    def finished(index: int, status: int, seconds: float) -> None:
        run = todo[index]
        ended.append(run)
        echo(f"[{len(ended)}/{len(todo)}] {run.name}: "
             f"{'ok' if status == 0 else f'FAILED (exit {status})'} in {seconds:.0f}s "
             f"(log: {logs / f'{run.name}.log'})")
        if status != 0:
            failed.append(run)

    run_processes([(run.arguments, logs / f"{run.name}.log") for run in todo], parallel,
                  finished)
    return failed


def report(recipe: Recipe, runs: Sequence[PlannedRun], out: Path) -> dict[str, Path] | None:
    """The table and plots of the runs' records (those written under the planned config) in
    ``out``, and beside a paper recipe's published numbers the same metrics of the records
    (``published``: ``<benchmark>__published.md``); ``None`` when no run has one."""
    records = [record for record in map(_record_of, runs) if record is not None]
    if not records:
        return None
    stem = runs[0].record.name.split("__")[0]
    paths = write_report(records, out, stem)
    print()
    print(markdown_table(records))
    if recipe.spec.published:
        paths["published"] = out / f"{stem}__published.md"
        atomic_write_bytes(paths["published"], published_table(recipe, records).encode())
        print()
        print(paths["published"].read_text(encoding="utf-8"))
    return paths


def published_table(recipe: Recipe, records: Sequence[Mapping[str, Any]]) -> str:
    """Each published number of ``recipe`` beside the records' value of the same metric: the
    accuracy over all seen test samples (:func:`~cl_sulora.metrics.sample_weighted_curve`),
    after the last experience (final) and averaged over the experiences, mean and standard
    deviation over the recorded seeds."""
    lines = [f"# {recipe.spec.title}: measured against published", "",
             "| Strategy | Seeds | Final (%) | Published final (%) | Average (%) | "
             "Published average (%) | Source |", "|---|---|---|---|---|---|---|"]
    for strategy, paper in recipe.spec.published.items():
        curves = [metrics.sample_weighted_curve(r["accuracy_matrix"], r["notes"]["test_sizes"])
                  for r in records if r["strategy"] == strategy]
        final = _mean_std([100 * c[-1] for c in curves])
        average = _mean_std([100 * float(np.mean(c)) for c in curves])
        lines.append(f"| {strategy} | {len(curves)} | {final} | {paper.final:.2f} | {average} | "
                     f"{'-' if paper.average is None else f'{paper.average:.2f}'} | "
                     f"{paper.source} |")
    lines += ["", "Not matched of the official code:", ""]
    lines += [f"- {deviation}" for deviation in recipe.spec.deviations] or ["- nothing listed"]
    return "\n".join(lines) + "\n"


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "not run"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"
