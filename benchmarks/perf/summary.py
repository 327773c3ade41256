"""``summary.json``: the headline ratios, each with its target and pass/fail, from the group
files of a run directory. A ratio's value is the worst (largest) over the measured backbones;
``by_backbone`` gives each one."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .results import SUMMARY, read_groups, write_json
from .settings import CHECKPOINTS, REFERENCE_EXPERIENCE

Groups = dict[str, dict[str, Any]]
REF, LAST = REFERENCE_EXPERIENCE, max(CHECKPOINTS)
ENTRY_KEYS = ("value", "device", "commit", "target", "pass")
DDP_KEYS = ("ddp_2gpu_speedup", "ddp_2gpu_a_last_delta")
DDP_NOTE = "measured by the DDP run"
DDP_FILE = "ddp.json"  # written by ``python -m benchmarks.perf.ddp --out``


def _records(groups: Groups, group: str) -> list[dict[str, Any]]:
    return groups[group]["results"]["records"] if group in groups else []


def _pick(records: list[dict[str, Any]], field: str, **match: Any) -> float | None:
    for record in records:
        if all(record.get(k) == v for k, v in match.items()):
            return record[field]
    return None


def train_ms(groups: Groups, method: str, experience: int | None) -> float | None:
    return _pick(_records(groups, "train_step"), "median_ms", method=method,
                 experience=experience, compiled=False)


def eval_ms(groups: Groups, method: str, experience: int | None, mode: str) -> float | None:
    return _pick(_records(groups, "inference"), "median_ms", method=method,
                 experience=experience, mode=mode, compiled=False)


def adapter_total_bytes(groups: Groups, method: str, experience: int) -> float | None:
    """Adapter tensors plus their optimizer state while training ``experience``."""
    records = _records(groups, "memory")
    adapter = _pick(records, "adapter_bytes", method=method, experience=experience)
    state = _pick(records, "optimizer_state_bytes", method=method, experience=experience)
    return None if adapter is None or state is None else adapter + state


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def boundary_fractions(groups: Groups) -> dict[str, float]:
    """Per allocator: median time of the boundaries that fuse (all, if none does) over an
    experience's training time."""
    if "boundary" not in groups:
        return {}
    results = groups["boundary"]["results"]
    fractions = {}
    for allocator in dict.fromkeys(r["allocator"] for r in results["records"]):
        mine = [r for r in results["records"] if r["allocator"] == allocator]
        fusing = [r for r in mine if r["fused_pairs"] > 0] or mine
        median = statistics.median(r["total_ms"] for r in fusing)
        fractions[allocator] = median / results["experience_train_ms"]
    return fractions


def worst_boundary_fraction(groups: Groups) -> float | None:
    return max(boundary_fractions(groups).values(), default=None)


#: key: (target, how the value is computed from one backbone's groups, description)
HEADLINES: dict[str, tuple[float, Callable[[Groups], float | None], str]] = {
    "train_step_vs_peft_lora_exp10": (
        1.05, lambda g: ratio(train_ms(g, "sulora", REF), train_ms(g, "peft_lora", None)),
        "SuLoRA training step at experience 10 / PEFT LoRA's (same rank; PEFT adapts all of "
        "qkv, SuLoRA q and v)"),
    "train_step_vs_sdlora_exp10": (
        0.9, lambda g: ratio(train_ms(g, "sulora", REF), train_ms(g, "sdlora", REF)),
        "SuLoRA training step / SD-LoRA's, both at experience 10"),
    "merged_inference_vs_backbone": (
        1.02, lambda g: ratio(eval_ms(g, "sulora", REF, "merged"),
                              eval_ms(g, "backbone", None, "bare")),
        "SuLoRA inference forward, merged, after 10 experiences / the bare backbone's"),
    "unmerged_inference_vs_backbone_10_slots": (
        1.15, lambda g: ratio(eval_ms(g, "sulora", REF, "unmerged"),
                              eval_ms(g, "backbone", None, "bare")),
        "SuLoRA inference forward, unmerged with 10 live slots / the bare backbone's"),
    "adapter_memory_100_vs_10_experiences": (
        1.0, lambda g: ratio(adapter_total_bytes(g, "sulora", LAST),
                             adapter_total_bytes(g, "sulora", REF)),
        "SuLoRA adapter tensors + their optimizer state while training experience 100 / "
        "experience 10"),
    "boundary_time_fraction": (
        0.02, worst_boundary_fraction,
        "allocation + fusion at a boundary that fuses (median), worst allocator, / training "
        "time of one split-cifar100-10 experience (5,000 images) at the sulora preset's epochs "
        "and SuLoRA's measured step time"),
}


def _joined(groups_by_backbone: dict[str, Groups], field: str) -> str | None:
    values = {g[field] for groups in groups_by_backbone.values() for g in groups.values()}
    return ", ".join(sorted(values)) or None


def headline(key: str, groups_by_backbone: dict[str, Groups]) -> dict[str, Any]:
    target, compute, note = HEADLINES[key]
    by_backbone = {b: compute(groups) for b, groups in groups_by_backbone.items()}
    measured = [v for v in by_backbone.values() if v is not None]
    value = max(measured) if measured else None
    return {"value": value, "device": _joined(groups_by_backbone, "device"),
            "commit": _joined(groups_by_backbone, "commit"), "target": target,
            "pass": None if value is None else value <= target, "note": note,
            "by_backbone": by_backbone}


def ddp_entries(path: Path | None) -> dict[str, dict[str, Any]]:
    """The DDP run's entries from ``path`` (a summary-like JSON), else placeholders."""
    given = json.loads(path.read_text(encoding="utf-8")) if path else {}
    entries = {}
    for key in DDP_KEYS:
        entry = given.get(key)
        if entry is None:
            entry = {"value": None, "device": None, "commit": None, "target": None,
                     "pass": None, "note": DDP_NOTE}
        missing = [k for k in ENTRY_KEYS if k not in entry]
        if missing:
            raise SystemExit(f"{path}: entry {key!r} lacks {missing}")
        entries[key] = entry
    return entries


def build_summary(directory: Path, ddp: Path | None = None) -> dict[str, dict[str, Any]]:
    """The headlines of ``directory``; the DDP entries from ``ddp``, else from the
    ``benchmarks.perf.ddp`` output ``directory/ddp.json`` when present."""
    if ddp is None and (directory / DDP_FILE).exists():
        ddp = directory / DDP_FILE
    groups_by_backbone = read_groups(directory)
    summary = {key: headline(key, groups_by_backbone) for key in HEADLINES}
    return {**summary, **ddp_entries(ddp)}


def write_summary(directory: Path, ddp: Path | None = None) -> dict[str, dict[str, Any]]:
    summary = build_summary(directory, ddp)
    write_json(directory / SUMMARY, summary)
    return summary
