"""The ``data`` allocator on centred input statistics, observed as ``../confusion.py`` observes.

The allocator gives each new slot the top directions of its experience's uncentred input
covariance ``E[x x^T]`` outside the kept basis. The top direction of ``E[x x^T]`` is close to the
inputs' mean, which texts of every task share; so the first slot takes it, and its ``B``,
trained on the first task alone, acts on every later input too. This runs ``cl-sulora ARGS``
with the covariance centred, ``E[x x^T] - m m^T`` (``m`` the inputs' mean over the same
tokens), for the allocator and the bases it grows, and writes ``../confusion.py``'s record of
where each new task's errors go. A lab check, single process only (no data parallelism).

    python centred.py OUT.json run --benchmark long-text --strategy ... --set method.allocator=data
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from cl_sulora.methods.input_statistics import InputRecorder

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from confusion import observe  # noqa: E402  (../confusion.py)

hook, uncentred = InputRecorder._hook, InputRecorder.covariances


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


def covariances(self, reduce=None):
    if reduce is not None:
        raise RuntimeError("centred.py runs in one process only")
    covs = uncentred(self)
    means = {name: s / self.counts[name] for name, s in self.first_moments.items()}
    return {name: c - torch.outer(means[name], means[name]).to(c) for name, c in covs.items()}


if __name__ == "__main__":
    InputRecorder._hook, InputRecorder.covariances = _hook, covariances
    observe(sys.argv[1], sys.argv[2:])
