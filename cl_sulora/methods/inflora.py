"""InfLoRA (Liang and Li, CVPR 2024): per experience a branch whose frozen down-projection is
designed from the experience's inputs outside the old tasks' input subspace (DualGPM)."""

from __future__ import annotations

import torch
from avalanche.models.utils import avalanche_forward
from pydantic import model_validator
from torch import Tensor

from ..adapters.branch_layer import BranchLoRALinear, LoRABranch
from ..adapters.config import BranchLoRAConfig, config_dataclass
from ..linalg import directions_outside, extend_basis, projector_outside, top_eigvecs
from .input_statistics import input_covariances
from .lora import BranchLoRAStrategy, IncLoRAPlugin, branch_generator
from .registry import MethodSpec, register


@config_dataclass
class InfLoRAConfig(BranchLoRAConfig):
    """InfLoRA: ``A_t`` (frozen) spans the top input directions of experience ``t`` with the old
    tasks' input subspace projected out; only ``B_t`` (and the head) trains.

    Args:
        energy: DualGPM energy threshold after the first experience (the reference code's
            ``lamb``; the paper: 0.95 to 0.99).
        energy_final: the threshold the stream's last experience would reach (the reference
            code's ``lame``, 1.0): after experience ``t`` of ``T`` the threshold is
            ``energy + (energy_final - energy) * t / T`` (``methods/inflora.py``,
            ``update_DualGPM``).
        num_experiences: ``T`` of that rule; ``None``: the length of the stream the trained
            experience belongs to.
        covariance_samples: samples used to estimate an experience's input covariance; ``None``
            uses the whole experience, as the paper does.
    """

    energy: float = 0.95
    energy_final: float = 1.0
    num_experiences: int | None = None
    covariance_samples: int | None = None

    @model_validator(mode="after")
    def _check_inflora(self) -> InfLoRAConfig:
        if not 0.0 < self.energy <= self.energy_final <= 1.0:
            raise ValueError(f"need 0 < energy <= energy_final <= 1, got energy={self.energy}, "
                             f"energy_final={self.energy_final}")
        if self.num_experiences is not None and self.num_experiences < 1:
            raise ValueError("num_experiences must be >= 1 or None")
        if self.covariance_samples is not None and self.covariance_samples < 1:
            raise ValueError("covariance_samples must be >= 1 or None")
        return self

    def energy_at(self, experience: int, num_experiences: int) -> float:
        """The DualGPM threshold applied after ``experience`` (0-based) of ``num_experiences``
        (``self.num_experiences`` when set)."""
        total = self.num_experiences or num_experiences
        return self.energy + (self.energy_final - self.energy) * experience / total


def designed_rows(cov: Tensor, old: Tensor, rank: int,
                  generator: torch.Generator | None = None) -> Tensor:
    """InfLoRA's down-projection: the top ``rank`` left singular vectors of ``P C`` (``C`` the
    experience's input covariance, ``P`` the projector outside the old basis ``old``), i.e. the
    top eigenvectors of ``P C^2 P`` (the reference code: ``torch.linalg.svd`` of
    ``cur_matrix - feature_mat @ cur_matrix``, ``U[:, :rank]``), as orthonormal rows (float64)."""
    proj = projector_outside(old, cov.shape[-1]).to(cov.device)
    projected = proj @ cov.double()
    _, candidates = top_eigvecs(projected @ projected.T)
    return directions_outside(candidates, old, rank, generator=generator)


def grown_basis(old: Tensor, cov: Tensor, energy: float, max_rows: int) -> Tensor:
    """DualGPM's update: ``old`` grown by the fewest top directions of the experience's inputs
    outside it that hold ``energy`` of the squared singular values of the covariance ``C``
    (the reference code thresholds ``S**2`` of ``svd(C)``), i.e. GPM's energy rule on
    ``C^2``."""
    cov = cov.double()
    return extend_basis(old, cov @ cov, energy, max_rows)


def old_input_basis(layer: BranchLoRALinear) -> Tensor:
    """Orthonormal rows (float64) spanning the old tasks' input subspace of ``layer``."""
    stored = layer.input_basis.double()
    if not bool(layer.basis_is_complement):
        return stored
    return _complement(stored, layer.in_features)


def store_input_basis(layer: BranchLoRALinear, basis: Tensor) -> None:
    """Store ``basis`` or, when smaller, its orthogonal complement (DualGPM)."""
    complement = basis.shape[0] > layer.in_features / 2
    rows = _complement(basis, layer.in_features) if complement else basis
    layer.input_basis = rows.to(layer.input_basis)
    layer.basis_is_complement.fill_(complement)


def _complement(rows: Tensor, d: int) -> Tensor:
    values, vectors = top_eigvecs(projector_outside(rows, d))
    return vectors[values > 0.5]


class InfLoRAPlugin(IncLoRAPlugin, supports_distributed=True):
    """Designs each new branch's ``A`` from the experience's inputs before training; grows the
    DualGPM subspace with the experience's inputs (through the trained model) after it."""

    config: InfLoRAConfig

    def __init__(self, config: InfLoRAConfig) -> None:
        super().__init__(config)
        self._covariances: dict[str, Tensor] = {}

    def prepare(self, strategy, layers, experience):
        self._covariances = experience_covariances(strategy, layers, self.config, experience)
        super().prepare(strategy, layers, experience)
        self._covariances = {}

    def new_branch(self, strategy, layer_name, layer, experience):
        rank = self.config.rank
        old = old_input_basis(layer)
        cov = self._covariances[layer_name].to(old.device)
        gen = branch_generator(self.config.seed, layer_name, experience)
        A = designed_rows(cov, old, rank, generator=gen).float()
        return LoRABranch(A, torch.zeros(layer.n_out, rank), scale=self.config.scaling,
                          train_A=False, owner=experience)

    def finish(self, strategy, layers, experience):
        covariances = experience_covariances(strategy, layers, self.config, experience)
        energy = self.config.energy_at(experience, len(strategy.experience.origin_stream))
        for name, layer in layers.items():
            room = layer.in_features - self.config.rank  # keep room for the next branch
            old = old_input_basis(layer)
            store_input_basis(layer, grown_basis(old, covariances[name].to(old.device), energy,
                                                 room))


def experience_covariances(strategy, layers: dict[str, BranchLoRALinear],
                           config: InfLoRAConfig, experience: int) -> dict[str, Tensor]:
    """Per-layer input covariance over the current experience's data (eval transforms)."""
    dataset = strategy.experience.dataset.eval()
    gen = torch.Generator().manual_seed(config.seed * 100_003 + experience)
    loader = strategy.experience_loader(dataset, shuffle=True, generator=gen)
    device = strategy.device

    def forward(batch):
        return avalanche_forward(strategy.model, batch[0].to(device), batch[-1].to(device))

    samples = config.covariance_samples or len(dataset)
    return input_covariances(strategy.model, layers, loader, forward, samples)


class InfLoRA(BranchLoRAStrategy):
    """InfLoRA: interference-free LoRA branches, summed at test."""

    config_cls = InfLoRAConfig
    plugin_cls = InfLoRAPlugin


register(MethodSpec(
    name="inflora",
    strategy=InfLoRA,
    config_cls=InfLoRAConfig,
    paper="InfLoRA (Liang and Li, CVPR 2024)",
    trains="the new branch's B_t and the head; A_t designed from the data and frozen",
    stores="one rank-10 branch per experience, plus a DualGPM input basis per layer",
))
