"""Where a method's A_last comes from, per stream order: learning or keeping.

A_last is the last row of the accuracy matrix. Its diagonal ``R[i][i]`` is each task's accuracy
right after its own training (among every class seen so far); forgetting is what is lost after.
This prints, per order, each strategy's A_last, mean diagonal and forgetting (means over its
seeds), then the per-task difference of the diagonal between two strategies:

    python diagonals.py study-rfsplit/class-ridge-rfsplit sulora sdlora [ranpac=study/class]

``NAME=FOLDER`` takes that strategy's records from another folder (RanPAC has no split-head
runs: its head is the split head's classifier already).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def records(folder: Path, order: int, strategy: str) -> list[dict]:
    paths = sorted((folder / f"order{order}").glob(f"*-order{order}__{strategy}__seed*.json"))
    return [json.loads(p.read_text()) for p in paths]


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    here = Path(__file__).parent
    folder, names = here / argv[0], argv[1:]
    sources = {}
    for name in names:
        strategy, _, other = name.partition("=")
        sources[strategy] = here / other if other else folder
    for order in range(3):
        print(f"order {order}: A_last / mean diagonal / forgetting (%), seeds")
        diagonals = {}
        for strategy, source in sources.items():
            runs = records(source, order, strategy)
            if not runs:
                raise SystemExit(f"no records of {strategy} in {source}/order{order}")
            matrices = [100 * np.asarray(r["accuracy_matrix"]) for r in runs]
            diagonals[strategy] = np.mean([np.diag(m) for m in matrices], axis=0)
            print(f"  {strategy:<16} {np.mean([m[-1].mean() for m in matrices]):5.1f} / "
                  f"{diagonals[strategy].mean():5.1f} / "
                  f"{np.mean([100 * r['forgetting'] for r in runs]):4.1f}, {len(runs)}")
        tasks = runs[0]["experience_names"]
        first, *others = sources
        print("  " + " ".join(f"{t[:7]:>7}" for t in tasks))
        for other in others:
            gap = diagonals[first] - diagonals[other]
            print("  " + " ".join(f"{g:+7.0f}" for g in gap) + f"  diagonal, {first} - {other}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
