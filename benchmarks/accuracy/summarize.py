"""Tables and plots of recorded accuracy runs, one set per benchmark (and protocol).

    python -m benchmarks.accuracy.summarize benchmarks/results/accuracy

reads every ``*.json`` result there and writes ``<label>__compare.md`` and the two PNG plots
beside them, with :func:`cl_sulora.runner.report.write_report`.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from cl_sulora.runner.report import write_report


def group_results(directory: Path) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(directory.glob("*.json")):
        record = json.loads(path.read_text())
        groups[path.name.split("__")[0]].append(record)
    return dict(groups)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    for label, records in group_results(args.directory).items():
        paths = write_report(records, args.directory, label)
        print(f"{label}: {len(records)} runs -> {paths['table']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
