"""Run an accuracy campaign: many ``cl-sulora run`` processes side by side on one GPU.

Each (benchmark, strategy, seed) is one process writing its result JSON and log into ``--out``;
``--parallel`` processes share the device. Extra arguments after ``--`` go to every run. A
strategy is a preset name or a preset file (e.g. a variant under ``benchmarks/accuracy/variants``).
With ``--checkpoint-root`` every run checkpoints after each experience and, when the campaign is
started again, finished runs are skipped and unfinished ones resume. A run's checkpoints serve
that resumption only: once the run has written its record they are removed
(``--keep-checkpoints`` keeps them), so the disk holds those of the runs in progress, not of
every run made (a checkpoint can be large: a ridge head on 10,000 random features keeps an
800 MB moment matrix). ``--retries N`` starts the runs that failed again once the others have
ended, up to N times, each time with half as many side by side: runs that failed because those
beside them filled the GPU's memory then finish (resuming from their checkpoints, if any). The
processes run as ``cl-sulora reproduce`` runs them
(:func:`cl_sulora.runner.reproduce.run_processes`).

    python -m benchmarks.accuracy.campaign --benchmarks split-cifar100-10 \
        --strategies sulora,sdlora --seeds 0,1,2 --parallel 6 --out results/ -- --device cuda

``--jobs FILE`` instead lists the runs one per line, ``FOLDER BENCHMARK STRATEGY SEED
[ARGS...]`` (shell words; ``#`` starts a comment): each run writes into ``--out/FOLDER`` with
its own arguments, then those after ``--``.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

from cl_sulora.runner.checkpoint import checkpoints
from cl_sulora.runner.reproduce import run_processes


def jobs(benchmarks: list[str], strategies: list[str], seeds: list[int]):
    """``(folder, benchmark, strategy, seed, args)`` of every combination."""
    for benchmark in benchmarks:
        for seed in seeds:
            for strategy in strategies:
                yield ".", benchmark, strategy, seed, []


def jobs_from_file(path: Path):
    """The runs listed in ``path`` (see the module's docstring)."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if len(words) < 4 or not words[3].isdigit():
            raise SystemExit(f"{path}:{number}: expected FOLDER BENCHMARK STRATEGY SEED [ARGS]")
        folder, benchmark, strategy, seed, *args = words
        yield folder, benchmark, strategy, int(seed), args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmarks")
    parser.add_argument("--strategies")
    parser.add_argument("--jobs", type=Path, help="a file listing the runs, one per line")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint-root", type=Path, default=None)
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep a finished run's checkpoints (default: removed once its "
                        "record is written)")
    parser.add_argument("--retries", type=int, default=0,
                        help="start the failed runs again up to this many times, each time "
                        "with half as many side by side (default: 0)")
    args = parser.parse_args(argv)
    if args.jobs is not None:
        todo = list(jobs_from_file(args.jobs))
    elif args.benchmarks and args.strategies:
        todo = list(jobs(args.benchmarks.split(","), args.strategies.split(","),
                         [int(s) for s in args.seeds.split(",")]))
    else:
        parser.error("give --benchmarks and --strategies, or --jobs")
    if args.retries < 0:
        parser.error(f"--retries {args.retries}: give 0 (no retry) or more")
    parallel, start = args.parallel, time.time()
    for attempt in range(args.retries + 1):
        runs = planned(todo, args, extra)
        if attempt:
            print(f"starting the {len(runs)} failed run(s) again, {parallel} side by side",
                  flush=True)
        failed = run_all(runs, parallel, args, start)
        print(f"done in {time.time() - start:.0f}s; {len(failed)} failed: {failed}", flush=True)
        if not failed:
            return 0
        parallel = max(1, parallel // 2)
    return 1


def planned(todo: list[tuple], args: argparse.Namespace, extra: list[str]) -> list[tuple]:
    """``(arguments, log, folder, name, checkpoint folder or None)`` of each run of ``todo``
    without a ``.done`` file, resuming from its checkpoints where it has some."""
    runs = []
    for folder, benchmark, strategy, seed, own in todo:
        out = args.out / folder
        name = f"{benchmark}__{Path(strategy).stem}__seed{seed}"
        if (out / f"{name}.done").exists():
            continue
        arguments = ["run", "--benchmark", benchmark, "--strategy", strategy, "--seed",
                     str(seed), "--out", str(out), *own, *extra]
        directory = None
        if args.checkpoint_root:
            directory = args.checkpoint_root / folder / name
            arguments += ["--checkpoint-dir", str(directory)]
            if checkpoints(directory):  # not just the leftovers of a write cut short
                arguments.append("--resume-fallback")
        runs.append((arguments, out / f"{name}.log", out, name, directory))
    return runs


def run_all(runs: list[tuple], parallel: int, args: argparse.Namespace,
            start: float) -> list[str]:
    """Run ``runs``, ``parallel`` side by side; mark each finished one done (removing its
    checkpoints unless ``--keep-checkpoints``) and return the names of the failed ones."""
    failed = []

    def finished(index: int, status: int, seconds: float) -> None:
        _, _, out, name, directory = runs[index]
        if status:
            failed.append(name)
        else:
            (out / f"{name}.done").touch()
            if directory is not None and not args.keep_checkpoints:
                shutil.rmtree(directory, ignore_errors=True)
        state = "ok" if status == 0 else f"FAILED ({status})"
        print(f"[{time.time() - start:7.1f}s] {out.relative_to(args.out)}/{name}: {state} in "
              f"{seconds:.0f}s", flush=True)

    run_processes([(arguments, log) for arguments, log, *_ in runs], parallel, finished)
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
