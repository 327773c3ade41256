"""Data-parallel speedup and accuracy: the same ``cl-sulora run`` on one GPU, then under
``torchrun`` on ``--nproc`` GPUs of this machine.

    python -m benchmarks.perf.ddp --out benchmarks/perf/results/ddp.json \\
        --backbone-weights DIR --precision bf16 --batch-size 256 --epochs 2 --seeds 0,1,2

Arguments it does not know are passed to both runs (``training.batch_size`` is the global batch
in both). One pair of runs per seed, one after the other, after a discarded warm-up pair
(``--warmup-experiences``). Writes ``--out``: every run's training
throughput (training samples x epochs / ``train_epoch_seconds`` of the results record: the time
inside the training epochs) and its stream throughput (the same samples / ``train_seconds``,
which adds each experience's allocation, fusion, classifier alignment and loader start), the
speedups and A_last delta averaged over seeds, plus the summary entries ``ddp_2gpu_speedup``
(training throughput) and ``ddp_2gpu_a_last_delta`` that ``benchmarks.perf.summary`` takes
(from ``<run dir>/ddp.json`` or ``suite.py --ddp-summary``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .results import ROOT, resolve_commit

SPEEDUP_TARGET = 1.8  # lower bound
A_LAST_DELTA_TARGET = 0.5  # percentage points, upper bound on |delta|


def run(command: list[str], out: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``command`` (a ``cl-sulora run`` writing to ``out``); its results record."""
    print("+", " ".join(command), flush=True)
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    records = sorted(out.glob("*.json"))
    if len(records) != 1:
        raise SystemExit(f"expected one results record in {out}, found {records}")
    return json.loads(records[0].read_text(encoding="utf-8"))


def throughput(record: dict[str, Any], seconds: str = "train_epoch_seconds") -> float:
    """Training samples per second: inside the training epochs (``train_epoch_seconds``) or
    over the whole training calls (``train_seconds``)."""
    epochs = record["config"]["training"]["epochs"]
    return record["train_samples"] * epochs / record[seconds]


def summarize(single: list[dict[str, Any]], parallel: list[dict[str, Any]],
              commands: dict[str, list[str]], nproc: int) -> dict[str, Any]:
    """Speedups (mean over seeds of the per-seed throughput ratios) and A_last delta (mean over
    seeds of parallel - single, percentage points) of paired runs, one pair per seed."""
    pairs = list(zip(single, parallel, strict=True))
    speedups = [throughput(p) / throughput(s) for s, p in pairs]
    stream = statistics.mean(throughput(p, "train_seconds") / throughput(s, "train_seconds")
                             for s, p in pairs)
    deltas = [100 * (p["A_last"] - s["A_last"]) for s, p in pairs]
    speedup, delta = statistics.mean(speedups), statistics.mean(deltas)
    last = parallel[-1]
    sha = (last.get("commit") or {}).get("sha") or resolve_commit(None)
    device = f"{nproc} x {last['device']}"
    seeds = [r["seed"] for r in parallel]
    batch = last["config"]["training"]["batch_size"]
    setting = f"global batch {batch} ({batch // nproc} per GPU), one GPU {batch}"
    return {
        f"ddp_{nproc}gpu_speedup": {
            "value": speedup, "device": device, "commit": sha, "target": SPEEDUP_TARGET,
            "pass": speedup >= SPEEDUP_TARGET,
            "note": f"training samples/s inside the training epochs on {nproc} GPUs (torchrun, "
                    f"DDP) / on one GPU, {setting}, mean over seeds {seeds}; over the whole "
                    "training calls (with each experience's boundary work and classifier "
                    f"alignment): {stream:.2f}x"},
        f"ddp_{nproc}gpu_a_last_delta": {
            "value": delta, "device": device, "commit": sha, "target": A_LAST_DELTA_TARGET,
            "pass": abs(delta) <= A_LAST_DELTA_TARGET,
            "note": f"A_last on {nproc} GPUs - A_last on one GPU, percentage points, mean over "
                    f"seeds {seeds} (target on the absolute value)"},
        "stream_speedup": stream,
        "benchmark": last["benchmark"],
        "batch_size": batch,
        "strategy": last["strategy"],
        "world_size": last["world_size"],
        "commit": sha,
        "devices": {"single": single[-1]["device"], "parallel": device},
        "commands": commands,
        "runs": [
            {"seed": r["seed"], "mode": name, "train_samples_per_s": throughput(r),
             "stream_samples_per_s": throughput(r, "train_seconds"),
             "train_epoch_seconds": r["train_epoch_seconds"],
             "train_seconds": r["train_seconds"], "train_samples": r["train_samples"],
             "A_last": r["A_last"], "world_size": r["world_size"],
             "peak_memory_mb": r["peak_memory_mb"]}
            for s, p in zip(single, parallel, strict=True)
            for name, r in (("single", s), ("parallel", p))],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write")
    parser.add_argument("--nproc", type=int, default=2, help="GPUs of the DDP run")
    parser.add_argument("--benchmark", default="split-cifar100-10")
    parser.add_argument("--strategy", default="sulora")
    parser.add_argument("--seeds", default="0", help="comma-separated; one pair of runs each")
    parser.add_argument("--warmup-experiences", type=int, default=2,
                        help="first a discarded pair of runs of this many experiences, so that "
                             "the measured runs start on a warm machine (0: none)")
    args, extra = parser.parse_known_args(argv)
    import torch

    if torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"needs {args.nproc} GPUs, {torch.cuda.device_count()} visible")
    common = ["-m", "cl_sulora", "run", "--benchmark", args.benchmark,
              "--strategy", args.strategy, "--device", "cuda", *extra]
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}

    def pair(tag: str, flags: list[str], tmp: str) -> tuple[dict[str, list[str]], list[dict]]:
        """The single-GPU and the DDP run of ``flags``; their commands and records."""
        outs = {mode: Path(tmp, f"{mode}{tag}") for mode in ("single", "parallel")}
        commands = {
            "single": [sys.executable, *common, *flags, "--out", str(outs["single"])],
            "parallel": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                         "--nproc_per_node", str(args.nproc), *common, *flags, "--out",
                         str(outs["parallel"])],
        }
        return commands, [run(commands[mode], outs[mode], env) for mode in outs]

    seeds = [int(s) for s in args.seeds.split(",")]
    single, parallel = [], []
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as tmp:
        if args.warmup_experiences > 0:
            pair("-warmup", ["--seed", str(seeds[0]),
                             "--num-experiences", str(args.warmup_experiences)], tmp)
        for seed in seeds:
            commands, (one, two) = pair(str(seed), ["--seed", str(seed)], tmp)
            single.append(one)
            parallel.append(two)
    result = summarize(single, parallel, commands, args.nproc)
    result["warmup_experiences"] = args.warmup_experiences
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    for key in (f"ddp_{args.nproc}gpu_speedup", f"ddp_{args.nproc}gpu_a_last_delta"):
        entry = result[key]
        print(f"{key}: {entry['value']:.3f} (target {entry['target']}, "
              f"{'pass' if entry['pass'] else 'FAIL'})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
