"""The float32 ceiling of a training loop at the field's scale: how fast can any method train
ViT-B/16 at 224 px, batch 128, in float32 (TF32 off, as the official SD-LoRA loop runs), when
only the step itself runs (no data loading, inputs already on the device)?

    python -m benchmarks.perf.step_ceiling \
        --out benchmarks/perf/results/step_ceiling/vit-b16-fp32.json

Times the median step (forward, cross-entropy, backward, AdamW) of three models on one random
batch: the frozen backbone with a trained head, whose backward still runs down to the input as
it must for any adapter in the first block (``bare``: the floor every adapter method stands on),
and SuLoRA and SD-LoRA at their second experience (rank 10). Each with PyTorch's default
attention kernel and with the plain ``math`` one, and with and without a host synchronisation
after every step (what a loop that reads the loss every step pays). Also the device's float32
matrix-multiply rate and a profile of SuLoRA's step by operator category. Set against the
official loop's training images per second (``official_sdlora``), the bare step's rate is the
most any method on this backbone can reach at equal precision. ``--tiny`` is the CPU smoke test.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .models import build_template, fresh, random_batch
from .profiling import profile_step
from .results import environment, resolve_commit, write_json
from .settings import FULL_BACKBONES, TINY_BACKBONES, make_settings
from .states import Adapted, Bare, continual_state
from .steps import Bench
from .timing import matmul_rate, synchronize

BACKENDS = {"default": None, "math": SDPBackend.MATH}


def states(template: torch.nn.Module, settings: Any, device: torch.device,
           batch_size: int) -> Any:
    """(name, state) of the bare backbone, then SuLoRA and SD-LoRA at their second experience."""
    yield "bare", Bare(fresh(template, device))
    for method in ("sulora", "sdlora"):
        state = continual_state(method, fresh(template, device), settings, device, batch_size)
        state.start(2)
        yield method, state


def measure(bench: Bench, state: Adapted, batch_size: int) -> list[dict[str, Any]]:
    """The state's step under each attention kernel, with and without a per-step sync."""
    base = bench.train_step(state, state.model)
    rows = []
    for kernel, backend in BACKENDS.items():
        for sync in (False, True):
            def step(backend: SDPBackend | None = backend, sync: bool = sync) -> None:
                if backend is None:
                    base()
                else:
                    with sdpa_kernel(backend):
                        base()
                if sync:
                    synchronize(bench.device)

            timing = bench.timed(step)
            rows.append({"sdpa": kernel, "sync": sync, "median_ms": timing["median_ms"],
                         "images_per_s": batch_size / timing["median_ms"] * 1e3})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.step_ceiling",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: a tiny ViT")
    parser.add_argument("--commit", help="commit to record when git cannot tell")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    settings = replace(make_settings(tiny=args.tiny, device=device.type, compile=False,
                                     warmup=3, iters=10),
                       precision="fp32", rank=4 if args.tiny else 10)
    table = TINY_BACKBONES if args.tiny else FULL_BACKBONES
    spec = replace(table["vit-b16"], batch_size=4 if args.tiny else 128)
    template = build_template(spec, settings)
    bench = Bench(spec, settings, device, template, random_batch(spec, settings, device))
    record: dict[str, Any] = {
        "group": "step_ceiling", **environment(device, resolve_commit(args.commit)),
        "settings": {"backbone": spec.to_dict(), "precision": "fp32", "tf32": False,
                     "rank": settings.rank, "experience": 2, "warmup": settings.warmup,
                     "iters": settings.iters},
        "matmul_tflops": matmul_rate(device, settings.matmul_size, warmup=settings.warmup,
                                     iters=settings.iters, dtype=torch.float32)["tflops"],
        "rows": []}
    for name, state in states(template, settings, device, spec.batch_size):
        for row in measure(bench, state, spec.batch_size):
            record["rows"].append({"state": name, **row})
            print(record["rows"][-1], flush=True)
        if name == "sulora":
            record["profile_sulora"] = profile_step(bench.train_step(state, state.model),
                                                    device, settings.profile_steps)
        del state
    write_json(args.out, record)
    return record


if __name__ == "__main__":
    main()
