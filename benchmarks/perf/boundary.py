"""Time of SuLoRA's work at an experience boundary (end of one experience, allocation and
fusion for the next) for each allocator, against an experience's training time. For the
``data`` allocator it includes its work inside the next experience's first training batches:
the input covariance recorded by their forward passes, and the slot's rows set after them."""

from __future__ import annotations

import math
import statistics
from functools import partial
from typing import Any

import torch

from .models import fresh
from .states import continual_state
from .steps import Bench
from .timing import autocast, progress, time_once


def allocator_boundaries(bench: Bench, allocator: str, *, experiences: int | None = None,
                         data_max_samples: int | None = None) -> list[dict[str, Any]]:
    """Time both plugin hooks at every boundary of a run of ``experiences`` experiences (default
    ``boundary_experiences``: the last boundaries find every slot in use and fuse); for the
    ``data`` allocator also its recording (forward passes of the first training batches with
    the recorder attached, less the same passes without) and the slot's pointing."""
    settings, device = bench.settings, bench.device
    state = continual_state("sulora", fresh(bench.template, device), settings, device,
                            bench.spec.batch_size, allocator=allocator,
                            data_max_samples=data_max_samples)
    x = bench.batch[0]
    batches = math.ceil(state.plugin.config.data_max_samples / bench.spec.batch_size)

    @torch.no_grad()
    def forwards() -> None:
        with autocast(device, settings.precision):
            for _ in range(batches):
                state.model(x)

    def in_training() -> dict[str, float]:
        """The ``data`` allocator's work inside the experience's first batches."""
        if not state.plugin.allocator.needs_data:
            return {"record_ms": 0.0, "point_ms": 0.0}
        state.model.train()
        recording = time_once(forwards, device)
        point_ms = time_once(state.point, device)
        return {"record_ms": max(0.0, recording - time_once(forwards, device)),
                "point_ms": point_ms}

    def fused_pairs() -> int:
        return sum(int(layer.num_fused) for layer in state.adapter_layers())

    state.begin(1)
    in_training()  # also the warm-up of the forward passes
    records = []
    for experience in range(2, (experiences or settings.boundary_experiences) + 1):
        state.fake_train()
        fused = fused_pairs()
        end_ms = time_once(state.finish, device)
        start_ms = time_once(partial(state.begin, experience), device)
        inside = in_training()
        records.append({"allocator": allocator, "experience": experience, "end_ms": end_ms,
                        "start_ms": start_ms, **inside,
                        "total_ms": end_ms + start_ms + sum(inside.values()),
                        "fused_pairs": fused_pairs() - fused})
    return records


def data_sample_sweep(bench: Bench) -> list[dict[str, Any]]:
    """The ``data`` allocator's boundary time for each ``data_max_samples`` of the sweep (the
    median of ``sweep_boundaries`` boundaries that do not fuse)."""
    settings = bench.settings
    rows = []
    for samples in sorted(settings.data_sample_sweep):
        mine = allocator_boundaries(bench, "data", experiences=settings.sweep_boundaries + 1,
                                    data_max_samples=samples)
        row = {"data_max_samples": samples,
               "all_of_experience": samples >= settings.experience_images,
               "boundaries": len(mine),
               "batches": math.ceil(samples / bench.spec.batch_size),
               **{f"median_{k}": statistics.median(r[k] for r in mine)
                  for k in ("end_ms", "start_ms", "record_ms", "point_ms", "total_ms")}}
        rows.append(row)
        progress(f"{bench.spec.key}: data allocator, {samples} samples: "
                 f"{row['median_total_ms']:.1f} ms per boundary")
    return rows


def measure_boundaries(bench: Bench, step_ms: float) -> dict[str, Any]:
    """Boundary records of every allocator, the ``data_max_samples`` sweep, and the training
    time of a realistic experience at SuLoRA's measured step time ``step_ms``: one experience
    of split-cifar100-10 (``experience_images`` images) for the ``sulora`` preset's epochs at
    the measured batch size."""
    settings = bench.settings
    steps_per_epoch = math.ceil(settings.experience_images / bench.spec.batch_size)
    steps = steps_per_epoch * settings.experience_epochs
    records = []
    for allocator in settings.allocators:
        mine = allocator_boundaries(bench, allocator)
        slowest = max(r["total_ms"] for r in mine)
        progress(f"{bench.spec.key}: {len(mine)} boundaries with the {allocator} allocator, "
                 f"slowest {slowest:.1f} ms")
        records.extend(mine)
    return {"records": records, "step_ms": step_ms,
            "experience_images": settings.experience_images,
            "epochs": settings.experience_epochs, "batch_size": bench.spec.batch_size,
            "steps_per_epoch": steps_per_epoch, "steps_per_experience": steps,
            "experience_train_ms": step_ms * steps,
            "experience_train_basis": (
                f"{settings.experience_epochs} epochs (sulora preset) x "
                f"ceil({settings.experience_images} images (one split-cifar100-10 experience) / "
                f"batch {bench.spec.batch_size}) = {steps} steps x the measured step time"),
            "step_source": f"sulora train step at experience {settings.reference_experience}",
            "data_sample_sweep": data_sample_sweep(bench)}
