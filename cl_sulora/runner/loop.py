"""One continual-learning run: seed, build, the experience loop (train, evaluate the whole test
stream, checkpoint) and the written record."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from avalanche.core import BasePlugin

from ..benchmarks import BenchmarkSpec
from ..errors import ConfigError
from ..methods import get_method
from ..metrics import accuracy_row
from ..training import distributed
from .build import Experiment, build_experiment, determinism_restored, seed_everything
from .checkpoint import (
    Checkpoint,
    check_writable,
    latest_checkpoint,
    load_checkpoint,
    prepare_directory,
    restore,
    save_checkpoint,
)
from .config import RunConfig, config_from_tree, result_path
from .records import (
    check_result_path,
    config_differences,
    device_name,
    make_record,
    versions,
    write_record,
)


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
    from the newest one (``fallback``: from the newest intact one); ``overwrite`` lets a new
    run discard another run's checkpoints in ``directory``."""

    directory: Path
    resume: bool = False
    fallback: bool = False
    overwrite: bool = False


def run_stream(
    experiment: Experiment,
    echo: Callable[[str], None] | None = None,
    checkpointing: Checkpointing | None = None,
    start: Checkpoint | None = None,
) -> StreamResult:
    """Train on each experience in order; after each, evaluate on the whole test stream and,
    with ``checkpointing``, write a checkpoint. With ``start`` (see :func:`resume_point`), the
    run continues after that checkpoint.

    A joint method (``MethodSpec.joint``) trains once on the whole stream, giving a single-row
    accuracy matrix."""
    strategy = experiment.strategy
    train_stream = experiment.spec.benchmark.train_stream
    test_stream = experiment.spec.benchmark.test_stream
    count = len(train_stream)
    if len(test_stream) != count:
        raise ValueError(f"{count} training but {len(test_stream)} test experiences")
    joint = experiment.method.joint
    steps = 1 if joint else count
    matrix: list[list[float]] = []
    train_seconds, trainable, last, first = 0.0, 0, {}, 0
    timer = experiment.timer
    config = experiment.config.model_dump(mode="json")
    main = distributed.is_main()
    echo = echo if main else None
    if start is not None:
        trained = list(train_stream) if joint else list(train_stream)[:start.position + 1]
        restore(strategy, start, trained, test_stream)
        saved = start.state["extra"]
        matrix, train_seconds = saved["accuracy_matrix"], saved["train_seconds"]
        timer.seconds = saved.get("train_epoch_seconds", 0.0)
        trainable, first = saved["trainable_params"], start.position + 1
        if echo:
            echo(f"  resumed from {start.path} (experiences 1-{first} done)")
    workers = experiment.config.training.num_workers
    loading = {"num_workers": workers, "persistent_workers": workers > 0}
    for index in range(first, steps):
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
            row = " ".join(f"{100 * a:.1f}" for a in matrix[-1][:seen])
            echo(
                f"  {experiment.config.strategy} experience {index + 1}/{steps} "
                f"({name}): train {seconds:.1f}s, accuracy on seen experiences [{row}] %"
            )
    return StreamResult(matrix, train_seconds, timer.seconds, trainable, last)


#: Run config keys a resume may change: the optimizer's hyperparameters, so that a run stopped
#: by divergence can continue from its last good checkpoint at a lower learning rate.
RESUME_MAY_CHANGE = ("training.lr", "training.weight_decay", "training.momentum")


def resume_point(checkpointing: Checkpointing | None,
                 config: Mapping[str, Any]) -> Checkpoint | None:
    """The checkpoint a ``--resume`` run continues from (``None`` when not resuming), checked
    against the run config ``config`` before anything is built."""
    if checkpointing is None or not checkpointing.resume:
        return None
    checkpoint = latest_checkpoint(checkpointing.directory, fallback=checkpointing.fallback)
    if checkpoint is None:
        raise ConfigError(
            f"--resume: no checkpoint in {checkpointing.directory}; run without --resume "
            "to start from the beginning"
        )
    check_same_config(checkpoint.meta.get("config", {}), config, checkpoint.path)
    return checkpoint


def check_same_config(saved: Mapping[str, Any], current: Mapping[str, Any], where: Path) -> None:
    """Refuse to resume a checkpoint written under another run config, naming the keys (the
    optimizer's hyperparameters, :data:`RESUME_MAY_CHANGE`, may differ)."""
    differing = config_differences(saved, current, ignore=RESUME_MAY_CHANGE)
    if differing:
        raise ConfigError(
            f"--resume: {where} was written with another run config ({'; '.join(differing)});"
            " resume with the same flags and --set values (only --lr and the optimizer's other "
            "hyperparameters may change), or use another --checkpoint-dir"
        )


def optimized_parameter_count(optimizer: torch.optim.Optimizer) -> int:
    """Elements of the distinct trainable parameters the optimizer updates."""
    params = {id(p): p for g in optimizer.param_groups for p in g["params"] if p.requires_grad}
    return sum(p.numel() for p in params.values())


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
    overwrite: bool = False,
) -> RunResult:
    """Seed, build, run the stream and write ``result_path(config)`` atomically. ``loggers``
    go to the Avalanche evaluator, ``plugins`` to the strategy; ``echo`` gets one line per
    experience; ``checkpointing`` writes (and resumes from) per-experience checkpoints.

    Before anything is built, the output folders are checked (writable; no other run's
    checkpoints; no record of another config at the result path unless ``overwrite``), so a
    finished run always has somewhere to go; a record that cannot be written at the end goes
    to a fallback folder, named on ``echo`` and in a warning.

    Started by ``torchrun`` with several processes, the run is data-parallel (see
    :mod:`cl_sulora.training.distributed`): every rank runs this, only rank 0 echoes and writes
    the results and checkpoints (the returned ``path`` is where rank 0 writes)."""
    with distributed.process_group(config.device):
        return _run(config, spec=spec, command=command, progress=progress, echo=echo,
                    loggers=loggers, plugins=plugins, checkpointing=checkpointing,
                    overwrite=overwrite)


def _run(config, *, spec, command, progress, echo, loggers, plugins, checkpointing,
         overwrite) -> RunResult:
    device = distributed.local_device(config.device)
    method = get_method(config.method_name)
    if distributed.is_distributed():
        check_distributed(config)
    if checkpointing and checkpointing.resume and not method.resumable:
        raise ConfigError(
            f"--resume is not supported for {config.strategy!r}: not all of its state is "
            "checkpointed; run it again without --resume"
        )
    path = result_path(config)
    tree = config.model_dump(mode="json")
    start = resume_point(checkpointing, tree)
    if distributed.is_main():
        check_writable(path.parent, "--out")
        # a resumed run may replace its own record (written by the run it continues)
        own = start.meta.get("config") if start is not None else None
        check_result_path(path, tree, overwrite, own=own)
        if checkpointing:
            prepare_directory(checkpointing.directory, resume=checkpointing.resume,
                              overwrite=checkpointing.overwrite)
    with determinism_restored():
        seed_everything(config.seed, config.deterministic)
        experiment = build_experiment(
            config, spec=spec, progress=progress, loggers=loggers, plugins=plugins
        )
        seed_everything(config.seed, config.deterministic)  # same data order for every method
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = run_stream(experiment, echo, checkpointing, start)
    record = make_record(experiment, result, command)
    if distributed.is_main():
        path = write_record(path, record, echo)
    return RunResult(record, path, experiment, result)


def check_distributed(config: RunConfig) -> None:
    """Refuse, before building anything, what a data-parallel run does not support."""
    distributed.check_batch_size(config.training.batch_size)
    if not get_method(config.method_name).distributed:
        raise ConfigError(
            f"{config.strategy!r} cannot run under torchrun: its method is not data-parallel "
            "safe (a replay buffer mixed in by its own data loader does not shard); run it in "
            "one process"
        )


#: Run config keys ``cl-sulora eval`` may change: where things are read and written
#: (``data.data_root``, ``out``) and how the evaluation computes (``device``, ``precision``,
#: ``training.eval_batch_size``, ``training.num_workers``). None of them changes the model a
#: checkpoint restores or the test stream it is scored on. Every other key is refused
#: (:func:`check_eval_overrides`): ``benchmark``, ``seed`` and ``data.*`` choose the stream (and
#: its classes); ``backbone.*``, ``method.*`` and ``alignment.*`` shape the model, whose saved
#: tensors would not fit it (or would be read as something they are not); the other
#: ``training.*`` keys only say how the checkpoint was trained, which an evaluation cannot
#: change, so its record would misstate it; ``compile`` and ``deterministic`` stay as trained
#: (compiling costs more than one pass over the test stream saves, and the evaluation stays as
#: reproducible as the run was).
EVAL_MAY_CHANGE = ("data.data_root", "out", "device", "precision",
                   "training.eval_batch_size", "training.num_workers")


def check_eval_overrides(overrides: Mapping[str, Any]) -> None:
    """Refuse, before anything is read or built, an evaluation override outside
    :data:`EVAL_MAY_CHANGE`, naming it and the accepted keys."""
    refused = [key for key in overrides if key not in EVAL_MAY_CHANGE]
    if refused:
        raise ConfigError(
            f"eval --set {', '.join(refused)}: an evaluation scores the checkpoint as it was "
            "trained, so it may change only where data are read and results written and how "
            f"the evaluation runs ({', '.join(EVAL_MAY_CHANGE)}); to change anything else, "
            "train a run with it"
        )


def evaluate_checkpoint(path: Path, overrides: Mapping[str, Any] = {},
                        echo: Callable[[str], None] | None = None,
                        command: Sequence[str] = ()) -> tuple[dict, Path]:
    """Evaluate a checkpoint of ``cl-sulora run --checkpoint-dir`` on its run's test stream,
    without training: the run is rebuilt from the config the checkpoint holds (``overrides``,
    dotted keys, may change only :data:`EVAL_MAY_CHANGE`: others are refused before anything
    is read), the checkpoint restored, the stream evaluated. ``path`` is one checkpoint
    (``exp-XXXX``) or a checkpoint folder (its newest). Writes and returns the record
    (``<label>__<strategy>__seed<k>__eval-expN.json``; its ``config`` is the one evaluated,
    ``config_changes`` how that differs from the checkpoint's) and its path."""
    check_eval_overrides(overrides)
    checkpoint = (load_checkpoint(path) if (path / "meta.json").is_file()
                  else latest_checkpoint(path))
    if checkpoint is None:
        raise ConfigError(f"--checkpoint {path}: no checkpoint there (a folder exp-XXXX, or a "
                          "--checkpoint-dir of cl-sulora run)")
    saved = checkpoint.meta.get("config", {})
    config = config_from_tree(saved, overrides)
    with determinism_restored():
        seed_everything(config.seed, config.deterministic)
        experiment = build_experiment(config)
        stream = experiment.spec.benchmark
        trained = (list(stream.train_stream) if experiment.method.joint
                   else list(stream.train_stream)[: checkpoint.position + 1])
        restore(experiment.strategy, checkpoint, trained, stream.test_stream)
        metrics_dict = experiment.strategy.eval(stream.test_stream)
    row = accuracy_row(metrics_dict, len(stream.test_stream))
    seen = row if experiment.method.joint else row[: checkpoint.position + 1]
    record = {
        "evaluated_checkpoint": str(checkpoint.path),
        "experiences_trained": len(trained),
        "accuracy": row,
        "accuracy_on_trained": sum(seen) / len(seen),
        "benchmark": experiment.spec.name,
        "strategy": config.strategy,
        "seed": config.seed,
        "config": config.model_dump(mode="json"),
        "config_changes": config_differences(saved, config.model_dump(mode="json")),
        "command": list(command),
        "commit": experiment.commit,
        "versions": versions(),
        "device": device_name(distributed.local_device(config.device)),
    }
    base = result_path(config)
    out = base.with_name(f"{base.stem}__eval-exp{checkpoint.position + 1}.json")
    if echo:
        echo(f"  {config.strategy} after experience {checkpoint.position + 1}: accuracy "
             f"[{' '.join(f'{100 * a:.1f}' for a in row)}] %")
    return record, write_record(out, record, echo)
