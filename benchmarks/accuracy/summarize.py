"""Tables and plots of recorded accuracy runs, one set per benchmark (and protocol).

    python -m benchmarks.accuracy.summarize benchmarks/results/accuracy

reads every ``*.json`` result there and writes ``<label>__compare.md`` and the two PNG plots
beside them, with :func:`cl_sulora.runner.report.write_report`. ``--orders`` reads the records
of the folder's subfolders too and pools the stream orders of a benchmark (``-order<k>`` in
the file names) into one table, adding the accuracy-against-memory plots: against live adapter
values (``<label>__memory.png``) and against every value a run keeps besides the backbone and
the head (``<label>__memory-kept.png``), and prints, for each, the SuLoRA points that a
baseline dominates (higher mean A_last at equal or lower memory). ``--with DIR STRATEGY...``
joins the runs of those strategies in ``DIR`` (read as with ``--orders``) that the folder does not
hold, for the same benchmark and protocol, to every table and plot: e.g. the closed-form
baselines, whose heads no alignment setting touches, beside the runs of a head regime recorded
in a folder of its own. It may be given more than once; a strategy comes from the first folder
that holds it.

A pooled table compares like with like: it keeps the runs made in the stream orders and seeds
(:func:`cell`) that every strategy of the table has, and its header names the runs it leaves out
(a campaign cut short leaves some strategies with more runs than others).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from cl_sulora.runner.report import dominated, plot_memory, write_report


def group_results(directory: Path, orders: bool = False) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(directory.glob("**/*.json" if orders else "*.json")):
        record = json.loads(path.read_text())
        if "accuracy_matrix" not in record:
            continue
        label = path.name.split("__")[0]
        groups[re.sub(r"-order\d+", "", label) if orders else label].append(record)
    return dict(groups)


def cell(record: dict) -> str:
    """The stream order (the ``*order*`` fields of the record's data config, e.g.
    ``class_order_seed``) and the run seed a record was made in."""
    order = sorted((k, v) for k, v in record["config"]["data"].items() if "order" in k)
    return ", ".join([*(f"{k} {v}" for k, v in order), f"seed {record['seed']}"])


def paired(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(kept, left_out)``: the records of the cells every strategy has, and the others."""
    cells: dict[str, set[str]] = defaultdict(set)
    for record in records:
        cells[record["strategy"]].add(cell(record))
    common = set.intersection(*cells.values())
    return ([r for r in records if cell(r) in common],
            [r for r in records if cell(r) not in common])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--orders", action="store_true",
                        help="pool the stream orders of the subfolders into one table")
    parser.add_argument("--with", dest="joined", nargs="+", action="append", default=[],
                        metavar=("DIR", "STRATEGY"),
                        help="join the runs of these strategies in DIR that DIRECTORY (and an "
                             "earlier --with) lacks; repeatable")
    args = parser.parse_args(argv)
    groups = group_results(args.directory, args.orders)
    for joined in args.joined:
        if len(joined) < 2:
            parser.error("--with needs a folder and at least one strategy")
        folder, wanted = Path(joined[0]), set(joined[1:])
        for label, records in group_results(folder, orders=True).items():
            if label in groups:
                have = {r["strategy"] for r in groups[label]}
                groups[label] += [r for r in records
                                  if r["strategy"] in wanted - have]
    for label, records in groups.items():
        notes = []
        if args.orders:
            records, left_out = paired(records)
            if left_out:
                runs = "; ".join(f"{r['strategy']} ({cell(r)})" for r in left_out)
                notes.append(f"paired: only the {len({cell(r) for r in records})} stream orders "
                             f"x seeds that every strategy has; left out: {runs}")
        paths = write_report(records, args.directory, label, notes=notes)
        print(f"{label}: {len(records)} runs -> {paths['table']}", *notes, sep="\n  ")
        if args.orders:
            for measure, suffix in (("live", ""), ("kept", "-kept")):
                plot_memory(records, args.directory / f"{label}__memory{suffix}.png", measure)
                pairs = dominated(records, measure)
                print(f"  {measure} memory: " + ("; ".join(f"{a} dominates {b}" for a, b in pairs)
                                                 or "no baseline dominates a SuLoRA point"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
