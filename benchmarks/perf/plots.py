"""The report's figures (matplotlib, Agg): step time and adapter memory against experiences."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"sulora": "SuLoRA", "sdlora": "SD-LoRA", "inflora": "InfLoRA", "olora": "O-LoRA",
          "peft_lora": "PEFT LoRA", "backbone": "bare backbone"}
MIB = 2**20
STYLES = ("-", "--", "-.", ":")  # overlapping curves stay visible


def _series(records: list[dict[str, Any]], method: str, field: str) -> tuple[list, list]:
    points = sorted((r["experience"], r[field]) for r in records
                    if r["method"] == method and r["experience"] is not None)
    return [p[0] for p in points], [p[1] for p in points]


def step_time_plot(train: list[dict[str, Any]], floor_ms: float, title: str,
                   path: Path) -> Path:
    """Eager training step time per continual method against the experience, with PEFT LoRA,
    the bare backbone and the floor as horizontal lines."""
    eager = [r for r in train if not r["compiled"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    checkpoints = sorted({r["experience"] for r in eager if r["experience"] is not None})
    for method in dict.fromkeys(r["method"] for r in eager if r["experience"] is not None):
        xs, ys = _series(eager, method, "median_ms")
        ax.plot(xs, ys, marker="o", label=LABELS.get(method, method))
    flat = [(r["method"], r["median_ms"]) for r in eager if r["experience"] is None]
    for (method, ms), style in zip(flat, ("--", "-."), strict=False):
        ax.axhline(ms, linestyle=style, color="grey", label=LABELS.get(method, method))
    ax.axhline(floor_ms, linestyle=":", color="black", label="floor (FLOPs / matmul rate)")
    ax.set(xscale="log", xlabel="experience", ylabel="training step (ms, median)", title=title)
    ax.set_xticks(checkpoints, [str(c) for c in checkpoints])
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")
    return _save(fig, path)


def memory_plot(curve: list[dict[str, Any]], memory: list[dict[str, Any]], title: str,
                path: Path) -> Path:
    """Adapter tensors at every experience per method (lines) and adapter tensors plus their
    optimizer state at the checkpoints (markers)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    methods = dict.fromkeys(r["method"] for r in curve)
    for method, style in zip(methods, STYLES * len(methods), strict=False):
        xs, ys = _series(curve, method, "adapter_bytes")
        (line,) = ax.plot(xs, [y / MIB for y in ys], style, label=LABELS.get(method, method))
        points = sorted((r["experience"], r["adapter_bytes"] + r["optimizer_state_bytes"])
                        for r in memory if r["method"] == method)
        ax.plot([p[0] for p in points], [p[1] / MIB for p in points], "o",
                color=line.get_color())
    ax.set(xlabel="experience in training", ylabel="MiB", title=title)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small", title="lines: adapter tensors\ndots: + optimizer state",
              title_fontsize="small")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
