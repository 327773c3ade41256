"""One run with the evaluation cache against the same run without it, side by side in one
process: wall time, training time, the rest (mostly evaluating the whole test stream after
every experience), and whether the two accuracy matrices are equal. ``--modes on`` times the
run with the cache alone (the runner's default path), under any ``--set`` values;
``--profile`` profiles one run on the host instead. For SimpleCIL and RanPAC (``--strategy``)
"the cache" includes the backbone features they keep of each test set.

    python -m benchmarks.perf.eval_cache --benchmark split-cifar100-50 --epochs 2 \
        --batch-size 128 --device cuda --precision bf16 --backbone-weights DIR \
        --out benchmarks/perf/results/eval_cache
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path
from typing import Any

from cl_sulora.runner.build import build_experiment, determinism_restored, seed_everything
from cl_sulora.runner.config import parse_overrides, resolve_config
from cl_sulora.runner.loop import run_stream
from cl_sulora.training.distributed import local_device

from .results import environment, resolve_commit, write_json


def timed_run(config, cached: bool, profile: Path | None = None) -> dict[str, Any]:
    """One run of ``config`` through the runner's stream loop, the cache on or off; with
    ``profile``, the host's time by function (cProfile, cumulative) is written there: on a GPU
    a run of small steps waits on the host, so that says where its time goes (the profiler
    itself slows Python-heavy parts, so the run's times are not recorded then)."""
    with determinism_restored():
        seed_everything(config.seed, config.deterministic)
        experiment = build_experiment(config)
        strategy = experiment.strategy
        if not cached:
            strategy.set_eval_cache(0)
        seed_everything(config.seed, config.deterministic)
        profiler = cProfile.Profile() if profile else None
        start = time.perf_counter()
        if profiler:
            profiler.enable()
        result = run_stream(experiment)
        if profiler:
            profiler.disable()
        wall = time.perf_counter() - start
    if profiler:
        with profile.open("w") as handle:
            pstats.Stats(profiler, stream=handle).sort_stats("cumulative").print_stats(80)
    return {"cache": cached, "wall_s": wall, "train_s": result.train_seconds,
            "rest_s": wall - result.train_seconds, "cached_mb": strategy.eval_cache.used_bytes
            / 2**20, "accuracy_matrix": result.accuracy_matrix}


def ratio(off: list[dict[str, Any]], on: list[dict[str, Any]], field: str) -> float | None:
    """Time without the cache over time with it, summed over the runs (None: one side ran)."""
    if not off or not on:
        return None
    return sum(r[field] for r in off) / sum(r[field] for r in on)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", default="split-cifar100-50")
    parser.add_argument("--strategy", default="sulora")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-batch-size", type=int, default=512)
    parser.add_argument("--limit-per-class", type=int)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--backbone-weights")
    parser.add_argument("--data-root")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of runs, alternating")
    parser.add_argument("--modes", default="off,on",
                        help="the cache settings of a round, in order: off,on (the A/B), or "
                        "one of them (a timing of that path alone)")
    parser.add_argument("--set", dest="sets", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE", help="other run config values, as cl-sulora run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--commit", help="commit to record when git cannot tell")
    parser.add_argument("--profile", action="store_true",
                        help="profile one run on the host instead (cProfile, written to "
                        "--out/profile.txt); nothing else is written")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if not modes or any(m not in ("off", "on") for m in modes) or len(set(modes)) < len(modes):
        parser.error(f"--modes {args.modes!r}: give off,on, on,off, off or on")
    overrides = {"training.epochs": args.epochs, "training.batch_size": args.batch_size,
                 "training.eval_batch_size": args.eval_batch_size, "device": args.device,
                 "precision": args.precision, "data.limit_per_class": args.limit_per_class,
                 "backbone.weights": args.backbone_weights, "data.data_root": args.data_root}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    config = resolve_config(args.benchmark, args.strategy,
                            {**overrides, **parse_overrides(args.sets)})
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile:
        timed_run(config, modes[-1] == "on", profile=args.out / "profile.txt")
        print(f"wrote {args.out / 'profile.txt'}", flush=True)
        return
    env = environment(local_device(config.device), resolve_commit(args.commit))  # before runs
    runs = []
    for _ in range(args.repeats):
        for cached in (mode == "on" for mode in modes):
            runs.append(timed_run(config, cached))
            run = runs[-1]
            print(f"cache {'on ' if cached else 'off'}: {run['wall_s']:.1f} s in all, "
                  f"{run['train_s']:.1f} s training, {run['rest_s']:.1f} s the rest", flush=True)
    off = [r for r in runs if not r["cache"]]
    on = [r for r in runs if r["cache"]]
    payload = {"group": "eval_cache", **env,
               "settings": {"benchmark": args.benchmark, "strategy": args.strategy,
                            "config": config.model_dump(mode="json"), "repeats": args.repeats},
               "matrices_equal": all(r["accuracy_matrix"] == runs[0]["accuracy_matrix"]
                                     for r in runs),
               "wall_ratio": ratio(off, on, "wall_s"), "rest_ratio": ratio(off, on, "rest_s"),
               "runs": runs}
    if off and on:
        print(f"matrices equal: {payload['matrices_equal']}; without/with the cache: wall "
              f"{payload['wall_ratio']:.2f}x, the rest {payload['rest_ratio']:.2f}x", flush=True)
    write_json(args.out / "eval_cache.json", payload)


if __name__ == "__main__":
    main()
