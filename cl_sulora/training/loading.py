"""A training data loader whose workers run ahead across epoch boundaries."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, Sampler


class _Passes(Sampler[list[int]]):
    """``passes`` consecutive passes of ``batch_sampler`` as one sequence of batches."""

    def __init__(self, batch_sampler: Sampler[list[int]], passes: int) -> None:
        self.batch_sampler, self.passes = batch_sampler, passes

    def __len__(self) -> int:
        return self.passes * len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.passes):
            yield from self.batch_sampler


class EpochSpanningLoader:
    """Iterates like a ``DataLoader`` over ``batch_sampler`` (one pass per epoch), but one
    ``DataLoader`` iterator serves all ``epochs`` planned passes.

    With worker processes, the workers start when the loader is made (their start and first
    batches overlap whatever runs before the first epoch) and keep loading across epoch
    boundaries, so no epoch after the first waits for its first batch. ``loader_args`` go to
    the ``DataLoader`` (``num_workers``, ``pin_memory``, ``collate_fn``, ...); workers persist
    until the loader is dropped. An epoch beyond the planned ones starts another round of
    passes."""

    def __init__(self, dataset: Dataset, batch_sampler: Sampler[list[int]], *, epochs: int,
                 **loader_args: Any) -> None:
        if epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        self.batch_sampler = batch_sampler
        self.loader = DataLoader(dataset, batch_sampler=_Passes(batch_sampler, epochs),
                                 **loader_args)
        self._batches = iter(self.loader)

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Any]:
        for _ in range(len(self)):
            try:
                yield next(self._batches)
            except StopIteration:
                self._batches = iter(self.loader)
                yield next(self._batches)
