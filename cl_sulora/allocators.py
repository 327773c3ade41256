"""Subspace allocators: choose the ``A`` rows of a new slot, disjoint from every row in use."""

from __future__ import annotations

import zlib
from typing import ClassVar

import torch
from torch import Tensor

from .layer import SubspaceLoRALinear
from .subspace import (
    batched_top_eigvecs,
    directions_outside,
    extend_bases,
    extend_orthonormal,
    project_matrix,
)


class Allocator:
    """Base class: ``directions`` returns orthonormal rows orthogonal to the layer's rows in use.

    ``needs_data`` allocators receive the new experience's input covariances in ``prepare`` and
    the trained experience's in ``update``.
    """

    name: ClassVar[str]
    needs_data: ClassVar[bool] = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def generator(self, layer_name: str, owner: int) -> torch.Generator:
        """A generator seeded by (seed, layer, owner): allocations are reproducible on resume."""
        key = zlib.crc32(f"{self.seed}/{layer_name}/{owner}".encode())
        return torch.Generator().manual_seed(key)

    def candidates(self, layer_name: str, layer: SubspaceLoRALinear, n: int, owner: int) -> Tensor:
        raise NotImplementedError

    def candidates_for(self, layers: dict[str, SubspaceLoRALinear], n: dict[str, int],
                       owner: int) -> dict[str, Tensor]:
        """Candidates of several layers (subclasses batch their linear algebra here)."""
        return {name: self.candidates(name, layer, n[name], owner)
                for name, layer in layers.items()}

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
        cands = self.candidates_for(layers, n, owner)
        found = {}
        for name, layer in layers.items():
            used = layer.lora_A[layer.used_rows()]
            gen = self.generator(name, owner)
            found[name] = directions_outside(cands[name].to(used.device), used, n[name],
                                             generator=gen)
        return found

    def prepare(self, covariances: dict[str, Tensor]) -> None:
        """Receive the new experience's per-layer input covariances (``needs_data`` only)."""

    def update(self, layers: dict[str, SubspaceLoRALinear], covariances: dict[str, Tensor]) -> None:
        """Receive the trained experience's input covariances (``needs_data`` only)."""


class OrthogonalAllocator(Allocator):
    """Random directions orthogonal to every row in use."""

    name = "orthogonal"

    def candidates(self, layer_name, layer, n, owner):
        gen = self.generator(layer_name, owner)
        return torch.randn(2 * n, layer.in_features, generator=gen, dtype=torch.float64)


class PrincipalAllocator(Allocator):
    """The next unused right-singular directions of the current weight (SRLoRA's re-init)."""

    name = "principal"

    def candidates(self, layer_name, layer, n, owner):
        return self.candidates_for({layer_name: layer}, {layer_name: n}, owner)[layer_name]

    def candidates_for(self, layers, n, owner):
        """Eigenvectors of ``W^T W`` (the right-singular vectors of ``W``, by decreasing
        singular value), on the layers' device, one batched eigendecomposition per shape."""
        grams = []
        for layer in layers.values():
            weight = layer.weight.detach()
            if layer.out_index is not None:
                weight = weight[layer.out_index]
            weight = weight.double()
            grams.append(weight.T @ weight)
        eig = batched_top_eigvecs(grams)
        return {name: vectors for name, (_, vectors) in zip(layers, eig, strict=True)}


class DataAllocator(Allocator):
    """Top input directions of the new experience outside the input subspace of earlier ones.

    Each layer keeps a basis of earlier experiences' inputs (``layer.input_basis``), grown after
    every experience with GPM's energy rule; the new slot takes the top eigenvectors of the new
    experience's input covariance with that basis and the rows in use projected out.
    """

    name = "data"
    needs_data = True

    def __init__(self, seed: int = 0, energy: float = 0.95) -> None:
        super().__init__(seed)
        self.energy = energy
        self._covariances: dict[str, Tensor] = {}

    def prepare(self, covariances):
        self._covariances = covariances

    def candidates_for(self, layers, n, owner):
        """Eigenvectors of the new experience's input covariance with the kept input basis and
        the rows in use projected out, on the layers' device, batched per shape."""
        missing = [name for name in layers if name not in self._covariances]
        if missing:
            raise RuntimeError(f"no input statistics for {missing[0]}: call prepare() first")
        projected = []
        for name, layer in layers.items():
            cov = self._covariances[name].to(layer.lora_A.device)
            used = layer.lora_A[layer.used_rows()]
            # the kept basis is orthonormal (up to its storage dtype): only the rows in use
            # are orthonormalised against it
            basis = extend_orthonormal(layer.input_basis.double(), used)
            projected.append(project_matrix(cov, basis))
        return {name: vectors
                for name, (_, vectors) in zip(layers, batched_top_eigvecs(projected), strict=True)}

    def update(self, layers, covariances):
        names = list(layers)
        grown = extend_bases(
            [layers[name].input_basis for name in names],
            [covariances[name].to(layers[name].lora_A.device) for name in names],
            self.energy,
            [layers[name].in_features - layers[name].lora_A.shape[0] for name in names],
        )
        for name, basis in zip(names, grown, strict=True):
            layers[name].input_basis = basis.to(layers[name].input_basis)
        self._covariances = {}


ALLOCATORS: dict[str, type[Allocator]] = {
    cls.name: cls for cls in (OrthogonalAllocator, PrincipalAllocator, DataAllocator)
}


def build_allocator(name: str, *, seed: int = 0, energy: float = 0.95) -> Allocator:
    """Allocator by name: ``orthogonal``, ``principal`` or ``data``."""
    if name not in ALLOCATORS:
        raise ValueError(f"unknown allocator {name!r}; choose one of {sorted(ALLOCATORS)}")
    if name == "data":
        return DataAllocator(seed, energy)
    return ALLOCATORS[name](seed)
