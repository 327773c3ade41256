"""Subspace allocators: choose the ``A`` rows of a new slot, disjoint from every row in use."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ...adapters.slot_table import FREE
from ...adapters.subspace_layer import SubspaceLoRALinear
from ...linalg import (
    directions_outside_batch,
    grow_bases,
    orthonormal_rows,
    pad_stack,
    project_out,
    random_block,
    span_rows,
    top_eigvecs_block,
)
from ...seeding import keyed_generator
from ..input_statistics import centred


class Allocator:
    """Base class: ``directions`` returns orthonormal rows orthogonal to the layer's rows in use.

    Layers of one shape and device are allocated together, with batched linear algebra. The rows
    in use of ``A`` are orthonormal by construction, so ``A`` with its free rows zeroed serves
    as the basis of their span. ``needs_data`` allocators receive the new experience's input
    covariances and means in ``prepare`` (recorded over its first training batches, before its
    slot gets directions) and keep what they need of them in ``update`` (after its training).
    """

    name: ClassVar[str]
    needs_data: ClassVar[bool] = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def generator(self, layer_name: str, owner: int) -> torch.Generator:
        """A generator seeded by (seed, layer, owner): allocations are reproducible on resume."""
        return keyed_generator(self.seed, layer_name, owner)

    def random_rows(self, names: list[str], owner: int, rows: int, d: int,
                    device: torch.device) -> Tensor:
        """``L x rows x d`` Gaussian rows, those of each layer from its own generator."""
        return torch.stack([torch.randn(rows, d, generator=self.generator(name, owner),
                                        dtype=torch.float64) for name in names]).to(device)

    def candidates(self, names: list[str], layers: list[SubspaceLoRALinear], used: Tensor,
                   n: int, owner: int) -> Tensor:
        """``L x m x d`` candidate rows of layers of one shape, best first; ``used`` is the
        ``L x R x d`` basis of the rows in use."""
        raise NotImplementedError

    @torch.no_grad()
    def directions(
        self, layer_name: str, layer: SubspaceLoRALinear, n: int, owner: int
    ) -> Tensor:
        return self.directions_for({layer_name: layer}, owner, {layer_name: n})[layer_name]

    @torch.no_grad()
    def directions_for(self, layers: dict[str, SubspaceLoRALinear], owner: int,
                       n: dict[str, int] | None = None) -> dict[str, Tensor]:
        """Each layer's new rows (``n[name]``, default its rank), on the layer's device."""
        n = n or {name: layer.rank for name, layer in layers.items()}
        groups: dict[tuple, list[str]] = {}
        for name, layer in layers.items():
            key = (tuple(layer.lora_A.shape), layer.lora_A.device, n[name])
            groups.setdefault(key, []).append(name)
        found = {}
        for (_, _, count), names in groups.items():
            members = [layers[name] for name in names]
            used = self.excluded(members)
            cands = self.candidates(names, members, used, count, owner)
            gens = [self.generator(name, owner) for name in names]
            rows = self.choose(cands, used, count, gens)
            found.update(zip(names, rows.unbind(), strict=True))
        return found

    def excluded(self, layers: list[SubspaceLoRALinear]) -> Tensor:
        """``L x R x d`` orthonormal basis (zero rows allowed) of what new rows must avoid:
        the rows in use."""
        return used_basis(layers)

    def choose(self, candidates: Tensor, used: Tensor, n: int,
               generators: list[torch.Generator]) -> Tensor:
        """``L x n x d`` orthonormal rows outside ``used``, taken greedily from the candidates
        in order (:func:`directions_outside_batch`)."""
        return directions_outside_batch(candidates, used, n, generators)

    def prepare(self, layers: dict[str, SubspaceLoRALinear], covariances: dict[str, Tensor],
                means: dict[str, Tensor] | None = None) -> None:
        """Receive the new experience's per-layer uncentred input covariances ``E[x x^T]`` and
        input means ``E[x]`` (``needs_data`` only)."""

    def update(self, layers: dict[str, SubspaceLoRALinear]) -> None:
        """Fold the prepared experience into the layers' kept state (``needs_data`` only)."""

    def discard(self) -> None:
        """Forget what :meth:`prepare` received (an experience that did not finish)."""

    def gains(self, layers: dict[str, SubspaceLoRALinear],
              directions: dict[str, Tensor]) -> dict[str, Tensor]:
        """The gain each layer's new slot trains with, for the layers that get one (none
        here); see ``SubspaceLoRALinear.set_training_gain``."""
        return {}


def used_basis(layers: list[SubspaceLoRALinear]) -> Tensor:
    """``L x R x d`` float64 stack of the layers' ``A`` with the free rows zeroed: an orthonormal
    basis (with zero rows) of each layer's rows in use."""
    A = torch.stack([layer.lora_A for layer in layers]).double()
    owners = torch.stack([layer.slots.row_owner for layer in layers])
    return A * (owners != FREE).unsqueeze(-1)


class OrthogonalAllocator(Allocator):
    """Random directions orthogonal to every row in use."""

    name = "orthogonal"

    def candidates(self, names, layers, used, n, owner):
        return self.random_rows(names, owner, 2 * n, used.shape[-1], used.device)


class PrincipalAllocator(Allocator):
    """The next unused right-singular directions of the current weight (SRLoRA's re-init).

    They are the top eigenvectors of ``P W^T W P``, ``P`` the projector outside the rows in use,
    found by block subspace iteration (:func:`top_eigvecs_block`): when the rows in use are
    right-singular directions of ``W``, these are the next ones.
    """

    name = "principal"

    def candidates(self, names, layers, used, n, owner):
        weights = []
        for layer in layers:
            weight = layer.weight.detach()
            if layer.out_index is not None:
                weight = weight[layer.out_index]
            weights.append(weight)
        weight = project_out(torch.stack(weights).double(), used)  # W P
        return _top_block(weight.mT @ weight)


class DataAllocator(Allocator):
    """Top input directions of the new experience outside the input subspace of earlier ones.

    Each layer keeps a basis of earlier experiences' inputs (``layer.input_basis``), grown after
    every experience with GPM's energy rule. One block subspace iteration on the experience's
    input covariance with that basis projected out serves both (:func:`grow_bases`): the
    fewest of its Ritz vectors that reach the energy grow the basis (further rounds when they
    do not), and the new slot takes the top directions of the covariance within their span
    with the rows in use projected out (Rayleigh-Ritz on that span). ``prepare`` computes both
    from the covariance recorded over the experience's first training batches; ``update``
    stores the grown bases after its training.

    The energy rule may keep fewer directions than a slot has rows: the slot's other rows then
    lie outside the basis, excluded from later slots only while they are in use. With
    ``keep_slot_rows`` ``update`` adds the slot's rows to the basis too, so rows that fusion
    frees are never handed out again (while the basis has room: it stops at the input
    dimension less the rows of ``A``).

    Rows outside the basis may hold a few percent of the experience's input energy. With
    ``gain_limit`` above 1, :meth:`gains` gives each slot the gain ``sqrt(E_top / E_slot)``
    (at most ``gain_limit``): ``E_slot`` the energy along its rows, ``E_top`` the most any
    ``rank`` rows could hold, so that its update moves the layer's output per Adam step about
    as much as a slot on the top directions would.

    The top direction of ``E[x x^T]`` lies close to the inputs' mean, which every input shares
    (texts of every task, for instance). With ``centred_rows`` the slot's rows and gains come
    from the centred covariance ``E[x x^T] - E[x] E[x]^T`` within the same span: they follow
    the experience's spread rather than its mean, while the basis still grows from
    ``E[x x^T]``, so it keeps the mean direction out of every later slot's reach.
    """

    name = "data"
    needs_data = True

    def __init__(self, seed: int = 0, energy: float = 0.95, keep_slot_rows: bool = False,
                 gain_limit: float = 1.0, centred_rows: bool = False) -> None:
        super().__init__(seed)
        self.energy = energy
        self.keep_slot_rows = keep_slot_rows
        self.gain_limit = gain_limit
        self.centred_rows = centred_rows
        self._covariances: dict[str, Tensor] = {}
        self._top: dict[str, Tensor] = {}
        self._grown: dict[str, Tensor] = {}
        self._given: dict[str, Tensor] = {}

    @property
    def prepared(self) -> bool:
        """Whether an experience's input statistics are held (from ``prepare`` to ``update``)."""
        return bool(self._covariances)

    def prepare(self, layers, covariances, means=None):
        names = list(layers)
        covs = [c.to(layers[name].lora_A.device)
                for name, c in zip(names, _lookup(covariances, names, "recorded"), strict=True)]
        grown, top = grow_bases(
            [layers[name].input_basis for name in names], covs, self.energy,
            [_basis_room(layers[name]) for name in names],
        )
        self._covariances = dict(zip(names, covs, strict=True))
        if self.centred_rows:
            if means is None:
                raise ValueError("centred_rows needs the input means: prepare(layers, "
                                 "covariances, means)")
            self._covariances = centred(self._covariances, dict(
                zip(names, _lookup(means, names, "recorded mean"), strict=True)))
        self._grown = dict(zip(names, grown, strict=True))
        self._top = dict(zip(names, top, strict=True))

    def candidates(self, names, layers, used, n, owner):
        span = span_rows(project_out(torch.stack(_lookup(self._top, names, "prepared")), used))
        cov = torch.stack(_lookup(self._covariances, names, "prepared")).double()
        vectors = torch.linalg.eigh(span @ cov @ span.mT)[1]
        return vectors.flip(-1).mT @ span

    def excluded(self, layers):
        """The rows in use and, with ``keep_slot_rows``, the kept input basis (which then holds
        every earlier slot's rows): a slot that has fewer input directions left than rows
        fills the rest outside both."""
        used = used_basis(layers)
        if not self.keep_slot_rows:
            return used
        bases = [layer.input_basis for layer in layers]
        if max(basis.shape[0] for basis in bases) == 0:
            return used
        return span_rows(torch.cat([used, pad_stack(bases, used.shape[-1], used.device)], -2))

    def directions_for(self, layers, owner, n=None):
        """As the base class; with ``keep_slot_rows`` the rows are kept until :meth:`update`."""
        found = super().directions_for(layers, owner, n)
        if self.keep_slot_rows:
            self._given.update(found)
        return found

    def choose(self, candidates, used, n, generators):
        """The first ``n`` candidates: orthonormal and outside ``used`` by construction (Ritz
        vectors of an orthonormal span outside it), unless the span had fewer than ``n``
        directions (one host synchronisation checks it), then the greedy choice."""
        rows = candidates[:, :n]
        if bool((rows.norm(dim=-1) > 0.5).all()):
            return rows
        return super().choose(candidates, used, n, generators)

    def gains(self, layers, directions):
        if self.gain_limit <= 1.0:
            return {}
        names = list(layers)
        found = {}
        for name, cov in zip(names, _lookup(self._covariances, names, "prepared"), strict=True):
            cov = cov.double()
            rows = directions[name].to(cov)
            top = torch.linalg.eigvalsh(cov)[-rows.shape[0]:].sum()
            held = ((rows @ cov) * rows).sum()
            ratio = top / held.clamp_min(torch.finfo(cov.dtype).tiny)
            found[name] = ratio.sqrt().clamp(1.0, self.gain_limit)
        return found

    def discard(self):
        self._covariances, self._top, self._grown, self._given = {}, {}, {}, {}

    def update(self, layers):
        for name, basis in zip(layers, _lookup(self._grown, list(layers), "prepared"),
                               strict=True):
            if name in self._given:
                room = _basis_room(layers[name]) - basis.shape[0]
                rows = orthonormal_rows(project_out(self._given[name].to(basis), basis))
                basis = torch.cat([basis, rows[:max(room, 0)]])
            layers[name].input_basis = basis.to(layers[name].input_basis)
        self.discard()


def _lookup(store: dict[str, Tensor], names: list[str], what: str) -> list[Tensor]:
    """``store``'s tensors of ``names``, in order; a clear error for a layer without one."""
    missing = [name for name in names if name not in store]
    if missing:
        raise RuntimeError(f"no {what} input statistics for layer {missing[0]!r}: the data "
                           "allocator needs prepare() with the experience's covariances first")
    return [store[name] for name in names]


def _basis_room(layer: SubspaceLoRALinear) -> int:
    """The most rows a layer's kept input basis may have: the input dimension less ``A``'s rows,
    so the basis and every row of ``A`` always fit side by side."""
    return layer.in_features - layer.lora_A.shape[0]


def _top_block(sym: Tensor) -> Tensor:
    """Ritz vectors of ``sym`` (``L x d x d``), best first, from the fixed random start."""
    start = random_block(sym.shape[-1], sym.device)
    return top_eigvecs_block(sym, start.expand(sym.shape[0], -1, -1))[1]


ALLOCATORS: dict[str, type[Allocator]] = {
    cls.name: cls for cls in (OrthogonalAllocator, PrincipalAllocator, DataAllocator)
}


def build_allocator(name: str, *, seed: int = 0, energy: float = 0.95,
                    keep_slot_rows: bool = False, gain_limit: float = 1.0,
                    centred_rows: bool = False) -> Allocator:
    """Allocator by name: ``orthogonal``, ``principal`` or ``data``."""
    if name not in ALLOCATORS:
        raise ValueError(f"unknown allocator {name!r}; choose one of {sorted(ALLOCATORS)}")
    if name == "data":
        return DataAllocator(seed, energy, keep_slot_rows, gain_limit, centred_rows)
    return ALLOCATORS[name](seed)
