"""The ``data`` allocator on centred input statistics, observed as ``../confusion.py`` observes.

The allocator gives each new slot the top directions of its experience's uncentred input
covariance ``E[x x^T]`` outside the kept basis. The top direction of ``E[x x^T]`` is close to the
inputs' mean, which texts of every task share; so the first slot takes it, and its ``B``,
trained on the first task alone, acts on every later input too. This runs ``cl-sulora ARGS``
with the covariance centred, ``E[x x^T] - m m^T`` (``m`` the inputs' mean over the same
tokens), and writes ``../confusion.py``'s record of where each new task's errors go. A lab
check, single process only (no data parallelism).

Centring everything also takes the mean direction out of the kept basis, so later slots may take
it and move every earlier task's inputs. ``--rows-only`` centres only the choice of the slot's
rows (and their gains): the basis still grows from ``E[x x^T]``, so the rows follow the inputs'
spread rather than their mean, and the mean direction, kept in the basis, is out of every later
slot's reach.

    python centred.py [--rows-only] OUT.json run --benchmark long-text --strategy ... \
        --set method.allocator=data
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from cl_sulora.methods.input_statistics import InputRecorder
from cl_sulora.methods.sulora.allocators import DataAllocator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from confusion import observe  # noqa: E402  (../confusion.py)

hook, uncentred, prepare = InputRecorder._hook, InputRecorder.covariances, DataAllocator.prepare
recorded_means: dict[str, torch.Tensor] = {}  # the last experience's input means, by layer


def _hook(self, name):
    record = hook(self, name)

    def both(module, inputs):
        record(module, inputs)
        if self.training_only and not module.training:
            return
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double().sum(0)
        sums = self.__dict__.setdefault("first_moments", {})
        sums[name] = sums[name] + x if name in sums else x

    return both


def _centre(covs: dict[str, torch.Tensor], means: dict[str, torch.Tensor]):
    return {name: c - torch.outer(means[name], means[name]).to(c) for name, c in covs.items()}


def covariances_keeping_means(self, reduce=None):
    """``E[x x^T]``, as recorded; the means are kept in ``recorded_means``."""
    if reduce is not None:
        raise RuntimeError("centred.py runs in one process only")
    recorded_means.clear()
    recorded_means.update(
        {name: s / self.counts[name] for name, s in self.first_moments.items()})
    return uncentred(self)


def covariances(self, reduce=None):
    """``E[x x^T] - m m^T``: for the slot's rows and the bases alike."""
    return _centre(covariances_keeping_means(self, reduce), recorded_means)


def prepare_centred_rows(self, layers, covariances):
    """Grow the bases from ``E[x x^T]``; choose the slot's rows from ``E[x x^T] - m m^T``."""
    prepare(self, layers, covariances)
    self._covariances = _centre(self._covariances, recorded_means)


def patch(rows_only: bool) -> None:
    InputRecorder._hook = _hook
    if rows_only:
        InputRecorder.covariances = covariances_keeping_means
        DataAllocator.prepare = prepare_centred_rows
    else:
        InputRecorder.covariances = covariances


if __name__ == "__main__":
    rows_only = sys.argv[1] == "--rows-only"
    args = sys.argv[2:] if rows_only else sys.argv[1:]
    patch(rows_only)
    observe(args[0], args[1:], command=["python", "centred.py", *sys.argv[1:]])
