"""Time of SuLoRA's work at an experience boundary (end of one experience, allocation and
fusion for the next) for each allocator, against an experience's training time."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from .models import fresh, random_images
from .states import ImageDataset, continual_state
from .steps import Bench
from .timing import progress, time_once


def covariance_dataset(bench: Bench) -> ImageDataset:
    """The random images the ``data`` allocator estimates input covariances from."""
    count = bench.settings.covariance_samples
    x = random_images(bench.spec, count, seed=bench.settings.seed + 2)
    labels = torch.zeros(count, dtype=torch.long)
    return ImageDataset(x, labels, labels)


def allocator_boundaries(bench: Bench, allocator: str) -> list[dict[str, Any]]:
    """Time both plugin hooks at every boundary of a run of ``boundary_experiences``
    experiences; the last boundaries find every slot in use and fuse."""
    settings, device = bench.settings, bench.device
    dataset = covariance_dataset(bench) if allocator == "data" else None
    state = continual_state("sulora", fresh(bench.template, device), settings, device,
                            bench.spec.batch_size, allocator=allocator, dataset=dataset)

    def fused_pairs() -> int:
        return sum(int(layer.num_fused) for layer in state.adapter_layers())

    state.begin(1)
    records = []
    for experience in range(2, settings.boundary_experiences + 1):
        state.fake_train()
        fused = fused_pairs()
        end_ms = time_once(state.finish, device)
        start_ms = time_once(partial(state.begin, experience), device)
        records.append({"allocator": allocator, "experience": experience, "end_ms": end_ms,
                        "start_ms": start_ms, "total_ms": end_ms + start_ms,
                        "fused_pairs": fused_pairs() - fused})
    return records


def measure_boundaries(bench: Bench, step_ms: float) -> dict[str, Any]:
    """Boundary records of every allocator, and the training time of a realistic experience
    (``experience_images`` images, one epoch) at SuLoRA's measured step time ``step_ms``."""
    settings = bench.settings
    steps = math.ceil(settings.experience_images / bench.spec.batch_size)
    records = []
    for allocator in settings.allocators:
        mine = allocator_boundaries(bench, allocator)
        slowest = max(r["total_ms"] for r in mine)
        progress(f"{bench.spec.key}: {len(mine)} boundaries with the {allocator} allocator, "
                 f"slowest {slowest:.1f} ms")
        records.extend(mine)
    return {"records": records, "step_ms": step_ms, "steps_per_experience": steps,
            "experience_train_ms": step_ms * steps,
            "step_source": f"sulora train step at experience {settings.reference_experience}"}
