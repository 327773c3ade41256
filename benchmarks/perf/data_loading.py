"""Samples per second of split-cifar100-10's data loaders: torchvision's PIL pipeline against
the array pipeline the benchmark uses (bit-identical outputs), in the main process and with
worker processes.

    python -m benchmarks.perf.data_loading --out benchmarks/perf/results/data_loading
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cl_sulora.benchmarks.array_images import array_image_transforms, chw_tensor
from cl_sulora.benchmarks.cifar100 import DIRNAME, class_order, load_split
from cl_sulora.benchmarks.common import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    LabelledData,
    image_transforms,
    resolve_data_root,
)

from .results import environment, resolve_commit, write_json


def samples_per_second(dataset, batch_size: int, workers: int, limit: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers)
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += len(batch[0])
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def first_experience(data_root: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Training images and labels of split-cifar100-10's first experience (class order 1993)."""
    folder = resolve_data_root(data_root) / DIRNAME
    images, labels = load_split(folder / "train")
    keep = np.isin(labels, class_order(1993)[:10])
    return images[keep], labels[keep]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=2560, help="samples timed per loader")
    parser.add_argument("--workers", default="0,2", help="comma-separated worker counts")
    parser.add_argument("--data-root", type=Path, help="default: $CL_SULORA_DATA")
    parser.add_argument("--commit", help="commit to record when git cannot tell")
    args = parser.parse_args(argv)
    images, labels = first_experience(args.data_root)
    array_tf = array_image_transforms(32, DEFAULT_MEAN, DEFAULT_STD, True)[0]
    pil_tf = image_transforms(32, DEFAULT_MEAN, DEFAULT_STD, True, False)[0]
    pipelines = {
        "array": LabelledData(images, labels, lambda image: array_tf(chw_tensor(image))),
        "pil": LabelledData(images, labels, lambda image: pil_tf(Image.fromarray(image))),
    }
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        for pipeline, dataset in pipelines.items():
            rate = samples_per_second(dataset, args.batch_size, workers, args.samples)
            rows.append({"pipeline": pipeline, "split": "train (crop + flip)",
                         "num_workers": workers, "samples_per_s": rate})
            print(f"{pipeline:5s} train, {workers} workers: {rate:,.0f} samples/s", flush=True)
    payload = {"group": "data_loading", **environment(torch.device("cpu"),
                                                      resolve_commit(args.commit)),
               "settings": {"benchmark": "split-cifar100-10", "experience": 0,
                            "batch_size": args.batch_size, "samples": args.samples,
                            "torch_threads": torch.get_num_threads()},
               "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "data_loading.json", payload)


if __name__ == "__main__":
    main()
