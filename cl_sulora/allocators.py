"""Subspace allocators: choose the ``A`` rows of a new slot, disjoint from every row in use."""

from __future__ import annotations

import zlib
from typing import ClassVar

import torch
from torch import Tensor

from .layer import SubspaceLoRALinear
from .subspace import directions_outside, extend_basis, orthonormal_basis, top_eigvecs


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

    @torch.no_grad()
    def directions(
        self, layer_name: str, layer: SubspaceLoRALinear, n: int, owner: int
    ) -> Tensor:
        used = layer.lora_A[layer.used_rows()]
        cands = self.candidates(layer_name, layer, n, owner)
        gen = self.generator(layer_name, owner)
        return directions_outside(cands.cpu(), used.cpu(), n, generator=gen)

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
        weight = layer.weight.detach()
        if layer.out_index is not None:
            weight = weight[layer.out_index]
        return torch.linalg.svd(weight.double(), full_matrices=False).Vh


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

    def candidates(self, layer_name, layer, n, owner):
        if layer_name not in self._covariances:
            raise RuntimeError(f"no input statistics for {layer_name}: call prepare() first")
        cov = self._covariances[layer_name].cpu()
        old = torch.cat([layer.input_basis.cpu(), layer.lora_A[layer.used_rows()].cpu()])
        basis = orthonormal_basis(old)
        proj = torch.eye(cov.shape[0], dtype=torch.float64) - basis.T @ basis
        _, vectors = top_eigvecs(proj @ cov @ proj)
        return vectors

    def update(self, layers, covariances):
        for name, layer in layers.items():
            room = layer.in_features - layer.lora_A.shape[0]
            cov = covariances[name].cpu()
            basis = extend_basis(layer.input_basis.cpu(), cov, self.energy, room)
            layer.input_basis = basis.to(layer.input_basis)
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
