"""One method's training-step time at one experience, to compare two commits side by side: run
this module from each commit's checkout, alternately, in one session on one device (each
commit's own ``cl_sulora`` and ``benchmarks.perf`` build the state), and compare the medians.

    python -m benchmarks.perf.step_ab --backbone vit-s4 --method sulora --experience 10 \
        --out step.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from .models import build_template, fresh, random_batch
from .results import environment, resolve_commit
from .settings import FULL_BACKBONES, make_settings
from .states import continual_state
from .steps import Bench
from .timing import progress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=sorted(FULL_BACKBONES), required=True)
    parser.add_argument("--method", default="sulora")
    parser.add_argument("--experience", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--batch-size", type=int, help="instead of the backbone's own")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    settings = make_settings(tiny=False, device=args.device, compile=False,
                             warmup=args.warmup, iters=args.iters)
    spec = FULL_BACKBONES[args.backbone]
    if args.batch_size:
        spec = replace(spec, batch_size=args.batch_size)
    template = build_template(spec, settings)
    bench = Bench(spec, settings, device, template, random_batch(spec, settings, device))
    state = continual_state(args.method, fresh(template, device), settings, device,
                            spec.batch_size)
    state.start(args.experience)
    timing = bench.timed(bench.train_step(state, state.model))
    commit = resolve_commit(None)
    record = {"backbone": spec.to_dict(), "method": args.method, "experience": args.experience,
              **timing, **environment(device, commit)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    progress(f"{commit[:7]} {args.backbone} {args.method} at experience {args.experience}: "
             f"{timing['median_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
