"""The tables and plots of ``benchmarks/RESULTS.md``, made from the recorded runs (and the
comparison of each table with its reruns by ``cl-sulora reproduce``, where recorded).

    python -m benchmarks.accuracy.tables           # rewrite the tables and plots
    python -m benchmarks.accuracy.tables --check   # exit 1 if RESULTS.md differs from the records

Each table is a shipped recipe (``cl_sulora/recipes/<name>.yaml``, what ``cl-sulora reproduce
NAME`` runs): its strategies and seeds, each run's record taken from the recipe's ``records``
folders (a later folder's record replacing an earlier one's). RESULTS.md holds each table
between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->``; nothing in those blocks is typed
by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from cl_sulora.runner.config import benchmark_label, resolve_config
from cl_sulora.runner.recipes import Recipe, available_recipes, load_recipe
from cl_sulora.runner.report import (
    FORMULAS,
    format_cell,
    markdown_table,
    plot_curves,
    plot_matrices,
    plot_memory,
)

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "results" / "accuracy"
RESULTS = ROOT / "RESULTS.md"
PLOTS = RECORDS / "tables"
#: ``reproductions/<recipe>/``: records of ``cl-sulora reproduce <recipe>``, set against the table
REPRODUCTIONS = RECORDS / "reproductions"


def record_paths(recipe: Recipe) -> list[Path]:
    """The recorded run of each strategy and seed of ``recipe`` (missing ones are an error)."""
    paths, missing = [], []
    for strategy, seed, overrides in recipe.runs():
        config = resolve_config(recipe.spec.benchmark, strategy, {**overrides, "device": "cpu"})
        name = f"{benchmark_label(config)}__{strategy}__seed{seed}.json"
        found = [RECORDS / folder / name for folder in recipe.spec.records
                 if (RECORDS / folder / name).is_file()]
        if found:
            paths.append(found[-1])
        else:
            missing.append(name)
    if missing:
        raise FileNotFoundError(f"{recipe.name}: no record of {missing} in {recipe.spec.records}")
    return paths


def used_records() -> set[Path]:
    """Every record a table of RESULTS.md reads."""
    return {path for name in available_recipes("tables")
            for path in record_paths(load_recipe(name))}


def table(recipe: Recipe) -> str:
    """The Markdown block of one recipe: where its runs come from, then the table."""
    paths = record_paths(recipe)
    records = [json.loads(path.read_text()) for path in paths]
    folders = sorted({str(path.parent.relative_to(RECORDS)) for path in paths})
    devices = sorted({r["device"] for r in records})
    commits = sorted({(r.get("commit") or {}).get("sha", "?")[:7] for r in records})
    metric = "A_avg (the task-aware accuracy)" if recipe.spec.metric == "A_avg" else "A_last"
    lines = [
        f"Main metric: {metric}. Records: {', '.join(f'`{f}/`' for f in folders)}; "
        f"devices: {', '.join(devices)}; commits: {', '.join(commits)}. "
        f"Rerun: `cl-sulora reproduce {recipe.name}`.",
        "",
        markdown_table(records).rstrip("\n"),
        "",
        f"![accuracy matrices](results/accuracy/tables/{recipe.name}__matrices.png)",
        f"![accuracy after each experience](results/accuracy/tables/{recipe.name}__curves.png) "
        f"![accuracy against memory](results/accuracy/tables/{recipe.name}__memory.png)",
    ]
    return "\n".join(lines)


def reproduction(recipe: Recipe) -> str:
    """The Markdown block setting ``reproductions/<recipe>/`` (records of a rerun) against the
    table's records of the same runs (A_last)."""
    recorded = {path.name: json.loads(path.read_text()) for path in record_paths(recipe)}
    pairs = [(recorded[path.name], json.loads(path.read_text()))
             for path in sorted((REPRODUCTIONS / recipe.name).glob("*.json"))]
    again = [new for _, new in pairs]
    lines = [
        f"Records: `reproductions/{recipe.name}/`; devices: "
        f"{', '.join(sorted({r['device'] for r in again}))}; commit: "
        f"{', '.join(sorted({r['commit']['sha'][:7] for r in again}))}.",
        "",
        "| Strategy | A_last recorded (%) | A_last reproduced (%) | Largest difference of one "
        "run (points) | Seeds |",
        "|---|---|---|---|---|",
    ]
    groups: dict[str, list] = {}
    for old, new in pairs:
        groups.setdefault(new["strategy"], []).append((old, new))
    for strategy, group in groups.items():
        before = format_cell([old["A_last"] for old, _ in group], 100.0, 1)
        after = format_cell([new["A_last"] for _, new in group], 100.0, 1)
        worst = max(abs(new["A_last"] - old["A_last"]) for old, new in group)
        seeds = ",".join(str(new["seed"]) for _, new in group)
        lines.append(f"| {strategy} | {before} | {after} | {100 * worst:.2f} | {seeds} |")
    return "\n".join(lines)


def equal_budget() -> str:
    """The Markdown block setting SuLoRA against SD-LoRA at SuLoRA's rank per experience (4,
    the same live adapter values; ``sdlora-r4`` of ``official-baselines/``) and at its own
    (10), on the main metric of each table that has those runs."""
    lines = [
        "| Table | Metric | SuLoRA, rank 4 | SD-LoRA, rank 4 | SD-LoRA, rank 10 | Live adapter "
        "params (SuLoRA / SD-LoRA 4 / SD-LoRA 10) |",
        "|---|---|---|---|---|---|",
    ]
    for name in available_recipes("tables"):
        recipe = load_recipe(name)
        paths = {path.name: path for path in record_paths(recipe)}
        folders = [RECORDS / f for f in recipe.spec.records if f.startswith("official-baselines")]
        label = next(iter(paths)).split("__")[0]
        rank4 = sorted(p for f in folders for p in f.glob(f"{label}__sdlora-r4__seed*.json"))
        if not rank4 or "sdlora" not in recipe.spec.strategies:
            continue
        groups = [
            [json.loads(p.read_text()) for n, p in paths.items() if f"__{s}__" in n]
            for s in ("sulora", "sdlora")
        ]
        groups.insert(1, [json.loads(p.read_text()) for p in rank4])
        metric = recipe.spec.metric
        cells = [format_cell([r[metric] for r in g], 100.0, 1) for g in groups]
        params = " / ".join(f"{g[0]['live_adapter_params']:,}" for g in groups)
        lines.append(f"| {name} | {metric} | {' | '.join(cells)} | {params} |")
    return "\n".join(lines)


def plots(recipe: Recipe) -> None:
    records = [json.loads(path.read_text()) for path in record_paths(recipe)]
    plot_matrices(records, PLOTS / f"{recipe.name}__matrices.png")
    plot_curves(records, PLOTS / f"{recipe.name}__curves.png")
    plot_memory(records, PLOTS / f"{recipe.name}__memory.png")


def render(text: str) -> str:
    """``text`` (RESULTS.md) with every generated block made anew: each recipe's table
    (``table:NAME``) and the metric formulas (``formulas``)."""
    blocks = {f"table:{name}": table(load_recipe(name)) for name in available_recipes("tables")}
    blocks |= {f"reproduction:{folder.name}": reproduction(load_recipe(folder.name))
               for folder in sorted(REPRODUCTIONS.iterdir()) if folder.is_dir()}
    blocks["formulas"] = FORMULAS + "."
    blocks["equal-budget"] = equal_budget()
    for key, content in blocks.items():
        block = re.compile(rf"(<!-- {re.escape(key)} -->\n).*?(<!-- /{re.escape(key)} -->)",
                           re.S)
        if not block.search(text):
            raise ValueError(f"RESULTS.md has no block <!-- {key} --> ... <!-- /{key} -->")
        text = block.sub(lambda m, c=content: m.group(1) + c + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only compare RESULTS.md with the records")
    args = parser.parse_args(argv)
    text = RESULTS.read_text()
    new = render(text)
    if args.check:
        if new != text:
            print("benchmarks/RESULTS.md differs from the records: run "
                  "python -m benchmarks.accuracy.tables", file=sys.stderr)
            return 1
        return 0
    RESULTS.write_text(new)
    for name in available_recipes("tables"):
        plots(load_recipe(name))
        print(f"{name}: {len(record_paths(load_recipe(name)))} records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
