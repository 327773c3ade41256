"""The floor of a training step: the backbone's forward and backward FLOPs over the device's
measured bf16 matmul rate."""

from __future__ import annotations

from typing import Any

import torch

from .models import fresh
from .steps import Bench
from .timing import autocast, count_flops, matmul_rate


def measure_floor(bench: Bench) -> dict[str, Any]:
    """FLOPs of the backbone's forward, of forward + backward with frozen weights (gradients of
    the activations only, what adapter training needs) and with trained weights; the floor is
    the frozen forward + backward at the measured matmul rate."""
    settings, device = bench.settings, bench.device
    backbone = fresh(bench.template, device).backbone.requires_grad_(False)
    x = bench.batch[0]

    def forward_backward() -> None:
        with autocast(device, settings.precision):
            out = backbone(x.detach().requires_grad_())
        out.float().sum().backward()

    def forward() -> None:
        with torch.no_grad(), autocast(device, settings.precision):
            backbone(x)

    frozen = count_flops(forward_backward)
    backbone.requires_grad_(True)
    full = count_flops(forward_backward)
    rate = matmul_rate(device, settings.matmul_size, warmup=settings.warmup,
                       iters=settings.iters)
    per_ms = rate["tflops"] * 1e9  # FLOPs per millisecond
    return {
        "matmul": rate,
        "flops": {"forward": count_flops(forward), "forward_backward_frozen": frozen,
                  "forward_backward_full": full},
        "floor_ms": frozen / per_ms,
        "floor_full_ms": full / per_ms,
    }
