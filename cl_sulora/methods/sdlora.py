"""SD-LoRA (Wu et al., ICLR 2025): LoRA directions frozen once learned, their magnitudes trained
on, with the rank-reduction (RR) and direction-distillation (KD) variants."""

from __future__ import annotations

from dataclasses import field
from typing import Literal

import torch
from pydantic import model_validator
from torch import nn

from ..adapters.branch_layer import BranchLoRALinear, LoRABranch
from ..adapters.config import BranchLoRAConfig, config_dataclass
from .lora import BranchLoRAStrategy, IncLoRAPlugin, branch_generator, kaiming_uniform
from .registry import MethodSpec, register

#: The magnitude the reference code gives every branch at the start of each task.
REFERENCE_MAGNITUDE = 0.8
#: SD-LoRA-KD's residual threshold (the paper's value).
KD_THRESHOLD = 9e-4


@config_dataclass
class SDLoRAConfig(BranchLoRAConfig):
    """SD-LoRA: ``W = W0 + alpha * sum_t m_t B_t A_t / ||B_t A_t||_F``.

    At experience ``t`` the new pair ``(A_t, B_t)`` and every magnitude ``m_1 .. m_t`` train;
    earlier directions are frozen. Magnitudes carry over between experiences (the paper).

    Args:
        rank: rank of a new direction (10 in the paper and the reference code); see
            ``rank_schedule``.
        alpha: constant factor of every branch (1 in the paper and the reference code).
        magnitude_scope: ``model``: one magnitude per experience, shared by every adapted
            layer (the reference code, ``backbone/lora.py``: ``LoRA_ViT_timm`` passes one
            ``scaling_factor`` to every block, for q and v alike); ``layer``: one per experience
            and layer.
        rank_schedule: SD-LoRA-RR: ``{first experience index: rank}``; the rank of experience
            ``t`` is that of the largest key ``<= t`` (``rank`` before the first key). The
            reference code's schedule (``models/sdlora.py``, ``update_network``, a block left
            commented out there) is ``{4: 8, 8: 6}``: rank 10 for experiences 0-3, 8 for 4-7,
            6 from 8 on (0-based, ``_cur_task >= 4`` and ``>= 8``).
        kd_threshold: SD-LoRA-KD: after each experience, the new direction is least-squares fitted
            on the earlier ones (per layer); if the squared residual of the unit direction is at
            most this (the paper: 9e-4), the coefficients are folded into the earlier magnitudes
            and the new direction is dropped. ``None`` disables it. Folding is per layer, so it
            needs ``magnitude_scope="layer"`` (the reference code has no KD).
        magnitude_init: initial magnitude of a new direction (and, with
            ``reference_code_behaviour``, the value every magnitude is reset to at each
            experience). ``None``: 0 in paper mode (each experience starts from the previous
            model's function; the paper does not say), 0.8 with ``reference_code_behaviour``.
        reference_code_behaviour: follow the public reference code instead of the paper: the new
            pair is trained unnormalised (``m_t B_t A_t`` with ``B_t = 0`` at first), earlier
            pairs are normalised by ``||B|| ||A||`` instead of ``||B A||``, and every magnitude is
            re-initialised to 0.8 at each experience. The code also uses SGD where the paper
            uses Adam: the optimizer is the caller's, pass ``torch.optim.SGD`` to match it.
    """

    rank: int = 10
    alpha: float = 1.0
    magnitude_scope: Literal["model", "layer"] = "model"
    rank_schedule: dict[int, int] = field(default_factory=dict)
    kd_threshold: float | None = None
    magnitude_init: float | None = None
    reference_code_behaviour: bool = False

    @model_validator(mode="after")
    def _check_sdlora(self) -> SDLoRAConfig:
        for start, rank in self.rank_schedule.items():
            if start < 0 or rank < 1:
                raise ValueError(f"rank_schedule needs experience >= 0 and rank >= 1: "
                                 f"{start}: {rank}")
        if self.kd_threshold is not None and self.kd_threshold < 0:
            raise ValueError(f"kd_threshold must be >= 0, got {self.kd_threshold}")
        if self.kd_threshold is not None and self.magnitude_scope != "layer":
            raise ValueError("kd_threshold folds a dropped direction into each layer's "
                             "magnitudes: it needs magnitude_scope='layer'")
        return self

    def rank_at(self, experience: int) -> int:
        """The rank of the direction learned at ``experience`` (0-based)."""
        starts = [s for s in self.rank_schedule if s <= experience]
        return self.rank_schedule[max(starts)] if starts else self.rank

    @property
    def initial_magnitude(self) -> float:
        if self.magnitude_init is not None:
            return self.magnitude_init
        return REFERENCE_MAGNITUDE if self.reference_code_behaviour else 0.0


class SDLoRAPlugin(IncLoRAPlugin, supports_distributed=True):
    """Before each experience: freeze the earlier directions, keep (paper) or reset (reference
    code) their magnitudes trainable, add a new direction, with one magnitude for every layer
    or one per layer (``magnitude_scope``); after it: SD-LoRA-KD if enabled."""

    config: SDLoRAConfig

    def __init__(self, config: SDLoRAConfig) -> None:
        super().__init__(config)
        self._shared: nn.Parameter | None = None  # the new experience's magnitude (model scope)

    def prepare(self, strategy, layers, experience):
        reference = self.config.reference_code_behaviour
        reset: set[int] = set()
        for branch in (b for layer in layers.values() for b in layer.branches):
            branch.train_magnitude = True
            if reference:
                branch.normalise = "factors"
                if id(branch.magnitude) not in reset:  # a shared magnitude is reset once
                    reset.add(id(branch.magnitude))
                    with torch.no_grad():
                        branch.magnitude.fill_(self.config.initial_magnitude)
        self._shared = None
        super().prepare(strategy, layers, experience)

    def new_branch(self, strategy, layer_name, layer, experience):
        rank = self.config.rank_at(experience)
        gen = branch_generator(self.config.seed, layer_name, experience)
        A = kaiming_uniform(rank, layer.in_features, gen)
        if self.config.reference_code_behaviour:
            B, normalise = torch.zeros(layer.n_out, rank), "none"
        else:  # a zero B has no direction: start from a random one
            B, normalise = kaiming_uniform(layer.n_out, rank, gen), "product"
        magnitude: float | nn.Parameter = self.config.initial_magnitude
        if self.config.magnitude_scope == "model":
            if self._shared is None:
                self._shared = nn.Parameter(layer.weight.new_tensor(magnitude))
            magnitude = self._shared
        return LoRABranch(A, B, scale=self.config.alpha, normalise=normalise,
                          magnitude=magnitude, owner=experience)

    def finish(self, strategy, layers, experience):
        self._shared = None
        if self.config.kd_threshold is None:
            return
        for layer in layers.values():
            distil_new_direction(layer, self.config.kd_threshold)


def _inner(a: LoRABranch, b: LoRABranch) -> torch.Tensor:
    """``<B_a A_a, B_b A_b>_F`` without forming the products."""
    return ((a.B.T @ b.B) * (a.A @ b.A.T)).sum()


@torch.no_grad()
def distil_new_direction(layer: BranchLoRALinear, threshold: float) -> bool:
    """SD-LoRA-KD on one layer: fit the last branch's unit direction ``D_t`` on the earlier
    ones' by least squares; if ``||D_t - sum_i c_i D_i||^2 <= threshold``, add its contribution
    to the earlier magnitudes and drop it. Returns whether it was dropped."""
    *old, new = layer.branches
    if not old or any(b.magnitude is None for b in layer.branches):
        return False
    norms = torch.stack([_inner(b, b) for b in layer.branches]).double().sqrt()
    if float(norms[-1]) == 0.0 or bool((norms[:-1] == 0).any()):
        return False
    gram = torch.stack([torch.stack([_inner(a, b) for b in old]) for a in old]).double()
    gram = gram / torch.outer(norms[:-1], norms[:-1])
    rhs = torch.stack([_inner(b, new) for b in old]).double() / (norms[:-1] * norms[-1])
    coefs = torch.linalg.lstsq(gram.cpu(), rhs.cpu()[:, None], driver="gelsd").solution
    coefs = coefs.flatten().to(rhs)
    residual = float(1.0 - 2.0 * rhs @ coefs + coefs @ gram @ coefs)
    if residual > threshold:
        return False
    # the new branch adds carried * D_t ~ sum_i carried * c_i D_i; branch i adds
    # magnitude * per_unit * D_i, so its magnitude grows by carried * c_i / per_unit
    carried = float(new.coefficient()) * norms[-1]
    for i, branch in enumerate(old):
        per_unit = float(branch.scale / branch.norm()) * norms[i]
        branch.magnitude.add_((carried * coefs[i] / per_unit).to(branch.magnitude))
    layer.remove_branch(len(old))
    return True


class SDLoRA(BranchLoRAStrategy):
    """SD-LoRA (and its RR / KD variants through :class:`SDLoRAConfig`)."""

    config_cls = SDLoRAConfig
    plugin_cls = SDLoRAPlugin


register(MethodSpec(
    name="sdlora",
    strategy=SDLoRA,
    config_cls=SDLoRAConfig,
    paper="SD-LoRA (Wu et al., ICLR 2025)",
    trains="the new LoRA pair (A_t, B_t) and every magnitude m_1..m_t, and the head",
    stores="one rank-10 pair and a magnitude per experience (earlier directions frozen)",
))
register(MethodSpec(
    name="sdlora-rr",
    strategy=SDLoRA,
    config_cls=SDLoRAConfig,
    paper="SD-LoRA-RR (Wu et al., ICLR 2025)",
    trains="as sdlora",
    stores="as sdlora, with ranks 10, then 8 from the 5th experience, 6 from the 9th",
    defaults={"rank_schedule": {4: 8, 8: 6}},
))
register(MethodSpec(
    name="sdlora-kd",
    strategy=SDLoRA,
    config_cls=SDLoRAConfig,
    paper="SD-LoRA-KD (Wu et al., ICLR 2025)",
    trains="as sdlora",
    stores="as sdlora, minus the new directions fitted by earlier ones (residual <= 9e-4)",
    defaults={"kd_threshold": KD_THRESHOLD, "magnitude_scope": "layer"},
))
