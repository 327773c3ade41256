"""How much of each new experience's input energy the ``data`` allocator's rows can reach.

Runs ``cl-sulora ARGS`` (a SuLoRA run with ``method.allocator=data``) with the allocator's
``prepare`` observed: for every experience and adapted layer, before the slot takes its rows,
it records the size of the kept input basis, the share of the experience's input energy (the
trace of its recorded input covariance) that basis already holds, the share the top ``rank``
eigendirections of the covariance hold (the most any ``rank`` rows could reach), and the share
the rows the slot is given hold; and how much of those rows lies in the span of every row given
to an earlier slot (rows still in use are excluded by construction, so this is the overlap with
rows that fusion freed). The file is rewritten after every experience, so a run cut short keeps
what it measured.

    python allocator_energy.py OUT.json run --benchmark long-text --strategy sulora ... \
        --set method.allocator=data
"""

from __future__ import annotations

import json
import sys

import torch

from cl_sulora.linalg import project_out, span_rows
from cl_sulora.methods.sulora.allocators import DataAllocator
from cl_sulora.runner.cli import main
from cl_sulora.runner.records import git_commit, versions


def energy_share(rows: torch.Tensor, cov: torch.Tensor) -> float:
    """Share of ``trace(cov)`` that the orthonormal ``rows`` hold."""
    return float(((rows @ cov) * rows).sum() / cov.diagonal().sum())


def span_share(rows: torch.Tensor, earlier: torch.Tensor | None) -> float:
    """Mean squared norm of the unit ``rows`` inside the span of ``earlier`` (0 without any),
    however many of ``earlier`` are linearly dependent."""
    if earlier is None:
        return 0.0
    outside = project_out(rows, span_rows(earlier))
    return float(1 - outside.square().sum() / rows.shape[0])


def observe(out: str, argv: list[str]) -> None:
    record = {"command": ["python", "allocator_energy.py", out, *argv], "commit": git_commit(),
              "versions": versions(), "torch_threads": torch.get_num_threads(),
              "experiences": []}
    prepare = DataAllocator.prepare
    given: dict[str, torch.Tensor] = {}  # every row given to a slot so far, per layer

    def observed(self, layers, covariances):
        before, covs = {}, {}
        for name, layer in layers.items():
            cov = covs[name] = covariances[name].double()
            basis = layer.input_basis.double().to(cov.device)
            top = torch.linalg.eigvalsh(cov).flip(0)[: layer.rank].sum()
            before[name] = dict(basis_rows=basis.shape[0], in_features=layer.in_features,
                                basis_share=energy_share(basis, cov),
                                top_rank_share=float(top / cov.diagonal().sum()))
        prepare(self, layers, covariances)
        rows = self.directions_for(layers, owner=len(record["experiences"]))
        for name in layers:
            new = rows[name].double().to(covs[name].device)
            before[name]["slot_share"] = energy_share(new, covs[name])
            before[name]["earlier_rows_share"] = span_share(new, given.get(name))
            given[name] = new if name not in given else torch.cat([given[name], new])
        record["experiences"].append(before)
        with open(out, "w") as f:
            json.dump(record, f, indent=1)

    DataAllocator.prepare = observed
    main(argv)


if __name__ == "__main__":
    observe(sys.argv[1], sys.argv[2:])
