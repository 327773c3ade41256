"""Comparison reports over results records: a Markdown table (mean +- std over seeds) and PNG
plots (accuracy-matrix heatmaps, accuracy after each experience)."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .. import metrics
from ..atomic import atomic_write_bytes

Record = dict[str, Any]

#: (record key, column title, scale, decimals) of the comparison table.
#: How the table's metrics are computed (``R[i][j]``: accuracy on experience ``j`` after
#: training experience ``i``, ``T`` experiences).
FORMULAS = (
    "A_last: mean_j R[T-1][j]; A_avg: mean_i of mean_{j<=i} R[i][j]; "
    "Forgetting: mean_{j<T-1} of max_{j<=i<T-1} R[i][j] - R[T-1][j] (from the experience's "
    "training on); Forgetting, all rows: the same with max over every earlier row i < T-1 "
    "(Chaudhry et al., 2018); BWT: mean_{j<T-1} of R[T-1][j] - R[j][j]"
)

COLUMNS = (
    ("A_last", "A_last (%)", 100.0, 1),
    ("A_avg", "A_avg (%)", 100.0, 1),
    ("forgetting", "Forgetting (%)", 100.0, 1),
    ("forgetting_all_rows", "Forgetting, all rows (%)", 100.0, 1),
    ("bwt", "BWT (%)", 100.0, 1),
    ("live_adapter_params", "Live adapter params", 1.0, 0),
    ("stored_state_params", "Stored params", 1.0, 0),
    ("train_seconds", "Train (s)", 1.0, 1),
)


def by_strategy(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Records grouped by strategy, in order of first appearance."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(record["strategy"], []).append(record)
    return groups


def value(record: Record, key: str) -> float | None:
    """``record[key]``, or, for a metric a record lacks, its value from the accuracy matrix."""
    if key in record:
        return record[key]
    summary = metrics.summarize(record["accuracy_matrix"])
    return summary.get(key)


def mean_std(values: Sequence[float | None]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (0 for one value) of the defined values."""
    defined = [float(v) for v in values if v is not None]
    if not defined:
        return None
    return float(np.mean(defined)), float(np.std(defined, ddof=1)) if len(defined) > 1 else 0.0


def format_cell(values: Sequence[float | None], scale: float, decimals: int) -> str:
    stats = mean_std(values)
    if stats is None:
        return "n/a"
    mean, std = stats[0] * scale, stats[1] * scale
    text = f"{mean:,.{decimals}f}"
    return text if len(values) == 1 else f"{text} ± {std:,.{decimals}f}"


def markdown_table(records: Sequence[Record]) -> str:
    """One row per strategy: mean ± std over seeds of each column of :data:`COLUMNS`."""
    header = ["Strategy", *(title for _, title, _, _ in COLUMNS), "Seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for strategy, group in by_strategy(records).items():
        cells = [
            format_cell([value(r, key) for r in group], scale, decimals)
            for key, _, scale, decimals in COLUMNS
        ]
        seeds = ",".join(str(r["seed"]) for r in group)
        lines.append("| " + " | ".join([strategy, *cells, seeds]) + " |")
    return "\n".join(lines) + "\n"


def mean_matrix(group: Sequence[Record]) -> np.ndarray:
    """The accuracy matrix averaged over a strategy's runs."""
    return np.mean([np.asarray(r["accuracy_matrix"], dtype=float) for r in group], axis=0)


def plot_matrices(records: Sequence[Record], path: str | Path) -> Path:
    """One heatmap per strategy of its mean accuracy matrix (percent), the benchmark in the
    title, experiences numbered from 1 as in the tables; the cells of experiences not trained
    yet (above the diagonal) are blank."""
    groups = by_strategy(records)
    fig = Figure(figsize=(3.6 * len(groups) + 0.8, 3.9), layout="constrained")
    fig.suptitle(benchmark_title(records[0]))
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    image = None
    for ax, (strategy, group) in zip(axes, groups.items(), strict=True):
        r = 100 * mean_matrix(group)
        joint = is_joint(group[0])
        if not joint:
            r = np.where(np.triu(np.ones_like(r, dtype=bool), k=1), np.nan, r)
        image = ax.imshow(r, vmin=0, vmax=100, cmap="viridis")
        if r.size <= 100:
            for (i, j), value in np.ndenumerate(r):
                if np.isnan(value):
                    continue
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if value < 60 else "black")
        ax.set_title(strategy)
        ax.set_xlabel("test experience")
        ax.set_ylabel("after joint training" if joint else "after training experience")
        ax.set_xticks(range(r.shape[1]), [str(j + 1) for j in range(r.shape[1])])
        ax.set_yticks(range(r.shape[0]),
                      ["all"] if joint else [str(i + 1) for i in range(r.shape[0])])
    fig.colorbar(image, ax=list(axes), label="accuracy (%)", shrink=0.8)
    return _save(fig, path)


def benchmark_title(record: Record) -> str:
    """``benchmark (protocol)``, marked when its test sets are subsampled."""
    return f"{record['benchmark']} ({record['protocol']}){subsampled(record)}"


def subsampled(record: Record) -> str:
    """`` [test subsampled: at most N per class]`` when the run capped its data, else ``""``."""
    notes = record.get("notes") or {}
    limit = notes.get("limit_per_class")
    if limit is None or notes.get("evaluated_stream") == "validation":
        return ""
    return f" [test subsampled: at most {limit} per class]"


def plot_curves(records: Sequence[Record], path: str | Path) -> Path:
    """Mean accuracy on the experiences seen so far after each experience, one line per
    strategy (mean ± std band over seeds; a joint run is a single point at the end)."""
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    for strategy, group in by_strategy(records).items():
        if is_joint(group[0]):
            mean, std = mean_std([100 * r["A_last"] for r in group])
            ax.errorbar(
                [len(group[0]["accuracy_matrix"][0])],
                [mean],
                yerr=[std],
                marker="*",
                markersize=10,
                label=strategy,
            )
            continue
        curves = 100 * np.asarray([metrics.accuracy_curve(r["accuracy_matrix"]) for r in group])
        steps = np.arange(1, curves.shape[1] + 1)
        mean = curves.mean(axis=0)
        line = ax.plot(steps, mean, marker="o", label=strategy)[0]
        if len(group) > 1:
            std = curves.std(axis=0, ddof=1)
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_title(benchmark_title(records[0]))
    ax.set_xlabel("experiences trained")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("accuracy on seen experiences (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


#: what the accuracy-against-memory plot counts: ``live``, the adapter values in use after the
#: stream (the issue's measure); ``kept``, every value a run keeps besides the backbone's
#: weights and the head: live adapter values, stored state (input bases, statistics, random
#: projections) and classifier alignment's class statistics
MEMORY_MEASURES = {
    "live": ("live adapter values after the stream", ("live_adapter_params",)),
    "kept": ("values kept besides the backbone and the head (adapters, state, alignment)",
             ("live_adapter_params", "stored_state_params", "alignment_stored_params")),
}


def memory_points(records: Sequence[Record], measure: str = "live",
                  ) -> list[tuple[str, float, float, float, int]]:
    """Per strategy: ``(strategy, memory, A_last mean, A_last sample std, runs)`` over its runs
    (seeds, and stream orders where a study has several); ``memory`` as ``measure`` counts it
    (:data:`MEMORY_MEASURES`), averaged over the runs."""
    fields = MEMORY_MEASURES[measure][1]
    points = []
    for strategy, group in by_strategy(records).items():
        stats = mean_std([value(r, "A_last") for r in group])
        memory = float(np.mean([sum(r.get(f) or 0 for f in fields) for r in group]))
        if stats is not None:
            points.append((strategy, memory, stats[0], stats[1], len(group)))
    return points


def dominated(records: Sequence[Record], measure: str = "live",
              ours: str = "sulora") -> list[tuple[str, str]]:
    """``(baseline, ours)`` for every point of ours (strategies named ``ours`` or
    ``ours-...``) that a baseline dominates in :func:`memory_points` of ``measure``: a higher
    mean A_last at equal or lower memory. Joint runs (:func:`is_joint`: upper bounds, trained
    on the whole stream at once) are not baselines."""
    def mine(name: str) -> bool:
        return name == ours or name.startswith(ours + "-")

    bounds = {r["strategy"] for r in records if is_joint(r)}
    points = memory_points(records, measure)
    return [(other, name) for name, memory, acc, *_ in points if mine(name)
            for other, other_memory, other_acc, *_ in points
            if not mine(other) and other not in bounds
            and other_acc > acc and other_memory <= memory]


def plot_memory(records: Sequence[Record], path: str | Path, measure: str = "live") -> Path:
    """Accuracy against memory: A_last (mean, error bar one sample std over the runs) against
    the memory that ``measure`` counts (:data:`MEMORY_MEASURES`), a point per strategy."""
    fig = Figure(figsize=(7.0, 4.5))
    ax = fig.add_subplot()
    for k, (strategy, memory, mean, std, runs) in enumerate(memory_points(records, measure)):
        ax.errorbar(memory, 100 * mean, yerr=100 * std, fmt="o", capsize=3)
        ax.annotate(f"{strategy} ({runs})", (memory, 100 * mean), textcoords="offset points",
                    xytext=(5, 4 if k % 2 else -11), fontsize=8)  # neighbours above, below
    ax.set_xscale("symlog", linthresh=1e4)
    ax.set_xlabel(MEMORY_MEASURES[measure][0])
    ax.set_ylabel("A_last (%)")
    ax.set_title(f"{benchmark_title(records[0])}: accuracy against memory", fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def is_joint(record: Record) -> bool:
    """Whether the record is of a joint run (a single row after training on the whole stream)."""
    matrix = record["accuracy_matrix"]
    return len(matrix) == 1 and len(matrix[0]) > 1


def _save(fig: Figure, path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight", pad_inches=0.1)
    return atomic_write_bytes(path, buffer.getvalue())


def devices(records: list[dict]) -> str:
    """The records' device, or each device with its number of runs where they differ (their
    training times are then not comparable across devices)."""
    counts = Counter(str(r.get("device")) for r in records)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{device} ({n} run{'s' * (n > 1)})" for device, n in counts.most_common())


def write_report(records: Sequence[Record], out: str | Path, label: str, *,
                 notes: Sequence[str] = ()) -> dict[str, Path]:
    """``<out>/<label>__compare.md`` (table and settings, then ``notes``, one bullet each) and
    the two plots; returns the paths."""
    out = Path(out)
    paths = {
        "matrices": plot_matrices(records, out / f"{label}__matrices.png"),
        "curves": plot_curves(records, out / f"{label}__curves.png"),
    }
    first = records[0]
    training = first["config"]["training"]
    lines = [
        f"# {label}: {', '.join(by_strategy(records))}",
        "",
        f"- benchmark: {first['benchmark']} ({first['protocol']}), "
        f"experiences: {len(first['accuracy_matrix'][0])}{subsampled(first)}",
        f"- backbone: {first['backbone']}",
        f"- training: {', '.join(f'{k}={v}' for k, v in training.items())}",
        f"- device: {devices(records)}",
        "- accuracies in percent, mean ± sample std over seeds; " + FORMULAS,
        *(f"- {note}" for note in notes),
        "",
        markdown_table(records),
        f"![accuracy matrices]({paths['matrices'].name})",
        "",
        f"![accuracy after each experience]({paths['curves'].name})",
        "",
    ]
    paths["table"] = atomic_write_bytes(out / f"{label}__compare.md", "\n".join(lines).encode())
    return paths
