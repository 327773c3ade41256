"""Run the measurement suite: ``python -m benchmarks.perf.suite --out DIR [--tiny]
[--backbones vit-s4,vit-b16] [--compile]``.

Each backbone is measured in its own process; every measurement group is written to
``DIR/<backbone>.<group>.json`` and the headline ratios to ``DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from .boundary import measure_boundaries
from .floor import measure_floor
from .methods import measure_methods
from .models import build_template, random_batch
from .results import ROOT, environment, resolve_commit, write_group
from .settings import BackboneSpec, Settings, backbone_specs, make_settings
from .states import method_configs
from .steps import Bench
from .summary import write_summary
from .timing import progress

PEFT_NOTE = ("PEFT's LoRA adapts the whole fused qkv output (q, k and v: B has 3 x dim rows); "
             "SuLoRA, SD-LoRA, InfLoRA and O-LoRA adapt q and v (2 x dim rows).")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.suite",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory of the JSON files")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny ViTs on the CPU, few iterations (a check, not a measurement)")
    parser.add_argument("--backbones", default="vit-s4,vit-b16",
                        help="comma-separated: vit-s4, vit-b16")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile'd backbones at experience 10")
    parser.add_argument("--commit", help="commit to record when git cannot tell")
    parser.add_argument("--batch-size", type=int, help="override every backbone's batch size")
    parser.add_argument("--warmup", type=int, help="untimed calls before each timing")
    parser.add_argument("--iters", type=int, help="timed calls per timing (median reported)")
    parser.add_argument("--ddp-summary", type=Path,
                        help="JSON with the DDP run's ddp_2gpu_* entries for summary.json")
    parser.add_argument("--no-summary", action="store_true", help="do not write summary.json")
    return parser.parse_args(argv)


def run_backbone(spec: BackboneSpec, settings: Settings, commit: str, out: Path) -> None:
    """Every measurement group of one backbone, written as it completes."""
    device = torch.device(settings.device)
    env = environment(device, commit)
    progress(f"{spec.key}: {env['device']}, batch {spec.batch_size}, torch {env['torch']}")
    bench = Bench(spec, settings, device, build_template(spec, settings),
                  random_batch(spec, settings, device))
    recorded = {"suite": settings.to_dict(), "backbone": spec.to_dict(),
                "methods": method_configs(settings)}

    def write(group: str, results: dict) -> None:
        path = write_group(out, spec.key, group, env, recorded, results)
        progress(f"{spec.key}: wrote {path}")

    floor = measure_floor(bench)
    progress(f"{spec.key}: floor {floor['floor_ms']:.2f} ms at "
             f"{floor['matmul']['tflops']:.3g} TFLOP/s")
    write("floor", floor)
    collected = measure_methods(bench)
    write("train_step", {"records": collected.train, "note": PEFT_NOTE})
    write("inference", {"records": collected.inference})
    write("memory", {"records": collected.memory, "curve": collected.curve})
    write("profile", collected.profile or {})
    step_ms = collected.step_ms("sulora", settings.reference_experience)
    write("boundary", measure_boundaries(bench, step_ms))


def child_argv(args: argparse.Namespace, backbone: str, commit: str) -> list[str]:
    """The arguments measuring one backbone in its own process."""
    argv = ["--out", str(args.out.resolve()), "--backbones", backbone, "--commit", commit,
            "--no-summary"]
    for flag in ("tiny", "compile"):
        if getattr(args, flag):
            argv.append(f"--{flag}")
    for option in ("batch_size", "warmup", "iters"):
        if getattr(args, option) is not None:
            argv += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    return argv


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    keys = [k.strip() for k in args.backbones.split(",") if k.strip()]
    specs = backbone_specs(keys, tiny=args.tiny, batch_size=args.batch_size)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("the full suite needs a CUDA device; use --tiny for a CPU check")
    settings = make_settings(tiny=args.tiny, device="cpu" if args.tiny else "cuda",
                             compile=args.compile, warmup=args.warmup, iters=args.iters)
    if args.tiny:  # tiny ops on one thread: steadier timings on a small, shared CPU
        torch.set_num_threads(1)
    commit = resolve_commit(args.commit)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    if len(specs) == 1:
        run_backbone(specs[0], settings, commit, args.out)
    else:
        for spec in specs:
            command = [sys.executable, "-m", "benchmarks.perf.suite",
                       *child_argv(args, spec.key, commit)]
            if subprocess.run(command, cwd=ROOT).returncode:
                failed.append(spec.key)
    if not args.no_summary:
        summary = write_summary(args.out, args.ddp_summary)
        for key, entry in summary.items():
            progress(f"{key}: {entry['value']} (target {entry['target']}, pass {entry['pass']})")
    if failed:
        raise SystemExit(f"the run of {', '.join(failed)} failed: see its output above")


if __name__ == "__main__":
    main()
