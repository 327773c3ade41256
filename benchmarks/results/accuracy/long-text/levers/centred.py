"""The ``data`` allocator on centred input statistics, observed as ``../confusion.py`` observes.

The allocator gives each new slot the top directions of its experience's uncentred input
covariance ``E[x x^T]`` outside the kept basis. The top direction of ``E[x x^T]`` is close to the
inputs' mean, which texts of every task share; so the first slot takes it, and its ``B``,
trained on the first task alone, acts on every later input too. This runs ``cl-sulora ARGS``
with every covariance the allocator receives centred, ``E[x x^T] - m m^T`` (``m`` the inputs'
mean over the same tokens, :meth:`InputRecorder.means`), for the slot's rows and the kept basis
alike, and writes ``../confusion.py``'s record of where each new task's errors go. A lab check.

Centring the basis too takes the mean direction out of it, so later slots may take it and move
every earlier task's inputs. Centring only the choice of the slot's rows is the library's
``method.data_centred_rows=true`` (run it through ``../confusion.py``).

``--first-slot`` instead runs ``method.data_centred_rows=true`` for the first experience only
(while the kept basis is empty): after it the basis holds the inputs' mean direction, and each
later slot's rows lie outside the basis, so that the mean can only reach the first slot. Does
the first slot carry what centring changes?

    python centred.py [--first-slot] OUT.json run --benchmark long-text --strategy ... \
        --set method.allocator=data [method.data_centred_rows=true]
"""

from __future__ import annotations

import sys
from pathlib import Path

from cl_sulora.methods.input_statistics import InputRecorder, centred
from cl_sulora.methods.sulora.allocators import DataAllocator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from confusion import observe  # noqa: E402  (../confusion.py)

uncentred = InputRecorder.covariances


def covariances(self, reduce=None):
    """``E[x x^T] - m m^T``: for the slot's rows and the bases alike."""
    return centred(uncentred(self, reduce), self.means(reduce))


prepare = DataAllocator.prepare


def prepare_first_centred(self, layers, covariances, means=None):
    """``prepare`` with ``centred_rows`` as configured while every layer's basis is empty (the
    first experience), off after it."""
    configured = self.centred_rows
    self.centred_rows = configured and all(
        layer.input_basis.shape[0] == 0 for layer in layers.values())
    try:
        prepare(self, layers, covariances, means)
    finally:
        self.centred_rows = configured


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[0] == "--first-slot":
        argv = argv[1:]
        DataAllocator.prepare = prepare_first_centred
    else:
        InputRecorder.covariances = covariances
    observe(argv[0], argv[1:], command=["python", "centred.py", *sys.argv[1:]])
