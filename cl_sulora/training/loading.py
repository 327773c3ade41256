"""Data loading for the template: a training loader whose workers run ahead across epoch
boundaries, and the cache that keeps evaluation batches on the device between evaluations."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
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


class EvalInputCache:
    """Evaluation batches kept on the device after a dataset's first evaluation.

    The runner evaluates the whole test stream after every experience, so a stream of ``T``
    experiences loads each test sample ``T`` times; for small inputs the per-sample loading and
    transforms cost more than the forward pass. Evaluation transforms are deterministic, so
    the batches of a dataset's first evaluation are what every later one would load: they are
    kept, on the device, and later evaluations of the same dataset object replay them (a new
    list per batch, the same tensors).

    Results do not change: a data loader draws from the global random generator when it starts
    (a seed for its workers), and a replay makes the same draws, so everything after an
    evaluation (the next experience's data order, initialisations) is what it was without the
    cache. The draws are measured on the first pass; a loader whose draws cannot be replayed
    (more than a few, or during the pass) is not cached. The cache holds at most
    ``budget_bytes`` in all; a dataset that does not fit is loaded as usual every time, and an
    evaluation that stops part-way keeps nothing. Datasets whose evaluation transform is random
    must not be cached (``budget_bytes=0``)."""

    def __init__(self, budget_bytes: int, device: torch.device | str) -> None:
        if budget_bytes < 0:
            raise ValueError(f"the evaluation cache budget must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.device = torch.device(device)
        self.used_bytes = 0
        # id -> (dataset, batches, draws); the dataset is held so that its id is not reused
        self._kept: dict[int, tuple[Any, list[list[torch.Tensor]], int]] = {}
        self._refused: dict[int, Any] = {}

    def loader(self, dataset: Any, loader: Iterable[Any]) -> Iterable[Any]:
        """What to iterate to evaluate ``dataset``: its kept batches, or ``loader`` (recorded
        on the way, when it may fit)."""
        key = id(dataset)
        if key in self._kept:
            return _Replay(*self._kept[key][1:])
        if key in self._refused or self.used_bytes >= self.budget_bytes:
            return loader
        return _Recording(self, dataset, loader)

    def keep(self, dataset: Any, batches: list[list[torch.Tensor]], size: int,
             draws: int) -> None:
        """Keep ``dataset``'s ``batches`` (``size`` bytes; ``draws`` random draws a pass)."""
        self._kept[id(dataset)] = (dataset, batches, draws)
        self.used_bytes += size

    def refuse(self, dataset: Any) -> None:
        """Never cache ``dataset`` (too large, or not replayable)."""
        self._refused[id(dataset)] = dataset


def _draw() -> None:
    """One draw as a data loader makes when it starts (its workers' base seed)."""
    torch.empty((), dtype=torch.int64).random_()


def _draws_between(before: torch.Tensor, after: torch.Tensor, most: int = 3) -> int | None:
    """How many :func:`_draw` calls take the global CPU generator from state ``before`` to
    ``after`` (None: not up to ``most``). Leaves the generator in state ``after``."""
    found = None
    for count in range(most + 1):
        torch.set_rng_state(before)
        for _ in range(count):
            _draw()
        if torch.equal(torch.get_rng_state(), after):
            found = count
            break
    torch.set_rng_state(after)
    return found


class _Replay:
    def __init__(self, batches: list[list[torch.Tensor]], draws: int) -> None:
        self.batches, self.draws = batches, draws

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        for _ in range(self.draws):
            _draw()
        for batch in self.batches:
            yield list(batch)


class _Recording:
    """Iterates ``loader``, moving each batch to the cache's device and keeping it, with the
    random draws the loader makes; kept in the cache when the pass completes, replayably and
    within the budget."""

    def __init__(self, cache: EvalInputCache, dataset: Any, loader: Iterable[Any]) -> None:
        self.cache, self.dataset, self.loader = cache, dataset, loader

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        cache = self.cache
        room = cache.budget_bytes - cache.used_bytes
        batches: list[list[torch.Tensor]] | None = []
        size, draws = 0, 0
        iterator = iter(self.loader)
        while True:
            before = torch.get_rng_state()
            batch = next(iterator, _END)
            after = torch.get_rng_state()
            if batches is not None and not torch.equal(before, after):
                count = _draws_between(before, after)
                if count is None or batches:  # unknown draws, or draws during the pass
                    batches = None
                    cache.refuse(self.dataset)
                else:
                    draws += count
            if batch is _END:
                break
            if batches is not None and isinstance(batch, (list, tuple)) and all(
                    isinstance(t, torch.Tensor) for t in batch):
                batch = [t.to(cache.device, non_blocking=True) for t in batch]
                size += sum(t.nbytes for t in batch)
                batches.append(batch)
                if size > room:
                    batches = None
                    cache.refuse(self.dataset)
                yield list(batch)
            else:
                batches = None
                yield batch
        if batches is not None:
            cache.keep(self.dataset, batches, size, draws)


_END = object()
