"""Where a training step's time goes: the PyTorch profiler's operators by device time (CPU time
on a CPU), grouped into categories."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity

from .timing import synchronize

#: Operator categories, first match wins (matched against the lower-case operator name).
CATEGORIES = (
    ("attention", r"attention|sdpa|softmax|flash"),
    ("matmul", r"mm|matmul|linear|conv"),
    ("normalisation", r"norm"),
    ("activation", r"gelu"),
    ("optimizer", r"foreach|adam"),
    ("copy / cast / gather", r"copy|clone|cat|index|_to|contiguous"),
    ("elementwise / reduction", r"add|mul|div|sub|abs|sum|mean|neg|fill|zero|where|sqrt|pow"),
)


def category(name: str) -> str:
    lowered = name.lower()
    return next((cat for cat, pattern in CATEGORIES if re.search(pattern, lowered)), "other")


def profile_step(step: Callable[[], None], device: torch.device, steps: int,
                 top: int = 15) -> dict[str, Any]:
    """Profile ``steps`` calls of a warmed-up ``step``: per-step time of the ``top`` operators,
    of every category, and of all operators together (the device's busy time)."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = [
        {"name": e.key, "calls_per_step": e.count / steps,
         "ms_per_step": getattr(e, attr) / 1e3 / steps, "category": category(e.key)}
        for e in prof.key_averages() if e.device_type == DeviceType.CPU  # operators, not kernels
    ]
    ops = sorted((op for op in ops if op["ms_per_step"] > 0), key=lambda op: -op["ms_per_step"])
    busy = sum(op["ms_per_step"] for op in ops)
    categories: dict[str, float] = {}
    for op in ops:
        categories[op["category"]] = categories.get(op["category"], 0.0) + op["ms_per_step"]
    return {"clock": "device" if cuda else "cpu", "steps": steps, "busy_ms_per_step": busy,
            "top_ops": ops[:top],
            "categories": dict(sorted(categories.items(), key=lambda kv: -kv[1]))}
