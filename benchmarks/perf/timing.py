"""Timing primitives: per-call times (CUDA events on a GPU), one-off timings, FLOP counts, the
device's measured bf16 matmul rate, and progress lines."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

_START = time.perf_counter()


def progress(message: str) -> None:
    """Print ``message`` with the seconds since the process started."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast on ``device`` (disabled for ``fp32``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def time_calls(fn: Callable[[], Any], device: torch.device, *, warmup: int,
               iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed calls.

    On a GPU each call is bracketed by CUDA events on the current stream, with a single
    synchronisation at the end; on the CPU by ``perf_counter``.
    """
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    torch.cuda.synchronize(device)
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call of ``fn``, synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


def summarise(times_ms: list[float]) -> dict[str, Any]:
    """Median and raw times of a timing run."""
    return {"median_ms": statistics.median(times_ms), "times_ms": times_ms}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmuls, convolutions and attention run by ``fn`` (forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_rate(device: torch.device, size: int, *, warmup: int, iters: int,
                dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """The measured rate of a ``size``-cubed matmul in ``dtype``, in TFLOP/s (median call)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    times = time_calls(lambda: torch.mm(a, b), device, warmup=warmup, iters=iters)
    median = statistics.median(times)
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), **summarise(times),
            "tflops": 2 * size**3 / (median * 1e-3) / 1e12}
