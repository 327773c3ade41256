"""Epoch time and wait for the first batch: a training loader restarted every epoch (a plain
``DataLoader`` with persistent workers) against the epoch-spanning loader training uses, on
split-cifar100-10's first experience, with a simulated training step (the host sleeps for
``--step-ms`` per batch, as it does while it waits on the GPU).

    python -m benchmarks.perf.epoch_loading --out benchmarks/perf/results/epoch_loading
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cl_sulora.benchmarks.array_images import array_image_transforms, chw_tensor
from cl_sulora.benchmarks.common import DEFAULT_MEAN, DEFAULT_STD, LabelledData
from cl_sulora.training.distributed import ShardedBatchSampler
from cl_sulora.training.loading import EpochSpanningLoader

from .data_loading import first_experience
from .results import environment, resolve_commit, write_json


def time_epochs(loader, epochs: int, step_seconds: float) -> list[dict[str, float]]:
    """Per epoch: seconds until the first batch arrived and seconds in all."""
    timings = []
    for _ in range(epochs):
        start = time.perf_counter()
        first = None
        for _batch in loader:
            if first is None:
                first = time.perf_counter() - start
            time.sleep(step_seconds)
        timings.append({"first_batch_s": first, "epoch_s": time.perf_counter() - start})
    return timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--step-ms", type=float, default=40.0)
    parser.add_argument("--data-root", type=Path, help="default: $CL_SULORA_DATA")
    parser.add_argument("--commit", help="commit to record when git cannot tell")
    args = parser.parse_args(argv)
    images, labels = first_experience(args.data_root)
    normalise = array_image_transforms(32, DEFAULT_MEAN, DEFAULT_STD, True, on_device=True)[0]
    dataset = LabelledData(images, labels, lambda image: normalise(chw_tensor(image)))

    def sampler() -> ShardedBatchSampler:
        return ShardedBatchSampler(len(dataset), args.batch_size, rank=0, world=1, seed=0)

    loaders = {
        "restarted every epoch": lambda: DataLoader(
            dataset, batch_sampler=sampler(), num_workers=args.workers, persistent_workers=True),
        "epoch-spanning": lambda: EpochSpanningLoader(
            dataset, sampler(), epochs=args.epochs, num_workers=args.workers),
    }
    rows = []
    for name, make in loaders.items():
        start = time.perf_counter()
        epochs = time_epochs(make(), args.epochs, args.step_ms / 1000)
        later = epochs[1:]
        row = {"loader": name, "first_epoch_s": epochs[0]["epoch_s"],
               "later_epoch_s": statistics.median(e["epoch_s"] for e in later),
               "later_first_batch_s": statistics.median(e["first_batch_s"] for e in later),
               "total_s": time.perf_counter() - start, "epochs": epochs}
        rows.append(row)
        print(f"{name}: first epoch {row['first_epoch_s']:.3f} s; later epochs (median) "
              f"{row['later_epoch_s']:.3f} s, of which {row['later_first_batch_s']:.3f} s "
              "waiting for the first batch", flush=True)
    steps = len(sampler())
    payload = {"group": "epoch_loading", **environment(torch.device("cpu"),
                                                       resolve_commit(args.commit)),
               "settings": {"benchmark": "split-cifar100-10", "experience": 0,
                            "samples": len(dataset), "batch_size": args.batch_size,
                            "steps_per_epoch": steps, "epochs": args.epochs,
                            "num_workers": args.workers, "step_ms": args.step_ms,
                            "transform": "uint8 to normalised float (data.augment_on_device)"},
               "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "epoch_loading.json", payload)


if __name__ == "__main__":
    main()
