"""The branch LoRA layer: a frozen ``nn.Linear`` plus a list of low-rank branches ``c_t B_t A_t``,
the adapter of the branch-LoRA methods (SD-LoRA, InfLoRA, O-LoRA, plain LoRA)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdaptedLinear

_EPS = 1e-12

#: How a branch's product ``B A`` is normalised: not at all, by ``||B A||_F`` (SD-LoRA's paper) or
#: by ``||B||_F ||A||_F`` (SD-LoRA's reference code, for earlier tasks).
Normalisation = Literal["none", "product", "factors"]


class LoRABranch(nn.Module):
    """One low-rank pair contributing ``scale * magnitude * B A / norm`` to the weight.

    ``A`` is ``r x d_in`` and ``B`` ``n_out x r``; ``magnitude`` is an optional scalar parameter
    (1 when absent): a value makes a parameter of this branch's own, a given ``nn.Parameter``
    is used as is, so branches of several layers can share one (SD-LoRA's reference code).
    ``norm`` follows ``normalise``; ``owner`` is the experience that created the branch. The
    ``train_*`` flags say which of the tensors the owning method trains;
    :meth:`BranchLoRALinear.refresh` must follow a change.
    """

    def __init__(
        self,
        A: Tensor,
        B: Tensor,
        *,
        scale: float = 1.0,
        magnitude: float | nn.Parameter | None = None,
        normalise: Normalisation = "none",
        train_A: bool = True,
        train_B: bool = True,
        train_magnitude: bool = True,
        owner: int = 0,
    ) -> None:
        super().__init__()
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"A (r x d_in) and B (n_out x r) do not fit: {A.shape}, {B.shape}")
        self.A = nn.Parameter(A.detach().clone())
        self.B = nn.Parameter(B.detach().clone())
        if magnitude is not None and not isinstance(magnitude, nn.Parameter):
            magnitude = nn.Parameter(torch.tensor(float(magnitude), dtype=A.dtype,
                                                  device=A.device))
        self.magnitude = magnitude
        self.owner = owner
        self.scale = scale
        self.normalise: Normalisation = normalise
        self.train_A = train_A
        self.train_B = train_B
        self.train_magnitude = train_magnitude and magnitude is not None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def frozen(self) -> bool:
        """Whether both ``A`` and ``B`` are frozen (the magnitude may still train)."""
        return not (self.train_A or self.train_B)

    def norm(self) -> Tensor:
        """The normaliser of ``B A`` (differentiable)."""
        if self.normalise == "product":  # ||BA||_F^2 = <B^T B, A A^T>, without forming B A
            return ((self.B.T @ self.B) * (self.A @ self.A.T)).sum().clamp_min(_EPS).sqrt()
        if self.normalise == "factors":
            return (self.B.norm() * self.A.norm()).clamp_min(_EPS)
        return self.A.new_ones(())

    def coefficient(self) -> Tensor:
        """``scale * magnitude / norm``: what multiplies ``B A``."""
        coef = self.scale / self.norm()
        return coef if self.magnitude is None else coef * self.magnitude

    def trainable_parameters(self) -> list[nn.Parameter]:
        flagged = [(self.A, self.train_A), (self.B, self.train_B),
                   (self.magnitude, self.train_magnitude)]
        return [p for p, on in flagged if on]

    def num_values(self) -> int:
        """Values of ``A`` and ``B`` (a magnitude may be shared: see
        :meth:`BranchLoRALinear.magnitude_parameters`)."""
        return self.A.numel() + self.B.numel()

    def extra_repr(self) -> str:
        flags = "".join(n for n, on in (("A", self.train_A), ("B", self.train_B),
                                        ("m", self.train_magnitude)) if on)
        return (f"owner={self.owner}, rank={self.rank}, normalise={self.normalise}, "
                f"trains={flags or '-'}")


class BranchLoRALinear(AdaptedLinear):
    """``y = W0 x + sum over branches t of c_t B_t A_t x``, ``c_t`` the branch coefficient.

    When ``out_index`` is given only those output features of ``W0`` are adapted (e.g. the q and
    v parts of a fused ``qkv``); every ``B`` then has ``len(out_index)`` rows.

    The frozen branches (``A`` and ``B`` both frozen) are concatenated into cached matrices, so
    all branches are applied with one pair of matmuls; only their magnitudes are read live. The
    caches are rebuilt by :meth:`refresh`, which every structural change calls. Without
    gradients (evaluation, ``torch.no_grad``) the branches are applied to the weight instead: one
    ``F.linear`` with ``W0 + sum_t c_t B_t A_t``, built per call (nothing is merged into ``W0``).

    ``dropout`` is LoRA dropout on the branches' input while training (gradient path only).
    ``input_basis`` holds rows of an input subspace a method keeps for this layer (InfLoRA's
    DualGPM; the complement of that subspace when ``basis_is_complement``): stored state.
    """

    def __init__(self, base: nn.Linear, *, out_index: Tensor | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__(base, out_index=out_index)
        self.dropout = dropout
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.branches = nn.ModuleList()
        self.register_buffer("input_basis", torch.zeros(0, base.in_features, **factory))
        self.register_buffer("basis_is_complement", torch.zeros((), dtype=torch.bool))
        self._has_magnitudes = False
        self._frozen: list[LoRABranch] = []
        self._training: list[LoRABranch] = []
        self.register_buffer("_A_frozen", torch.zeros(0, base.in_features, **factory),
                             persistent=False)
        self.register_buffer("_B_frozen", torch.zeros(base.out_features, 0, **factory),
                             persistent=False)
        # branch index of each cached frozen row: gathers the magnitudes row by row
        self.register_buffer("_frozen_branch_of_row", torch.zeros(0, dtype=torch.long),
                             persistent=False)
        self.register_load_state_dict_post_hook(_refresh)

    # ------------------------------------------------------------------ properties
    def live_adapter_params(self) -> int:
        """Values of ``A`` and ``B`` held by the branches."""
        return sum(branch.num_values() for branch in self.branches)

    def magnitude_parameters(self) -> list[nn.Parameter]:
        """The branches' magnitudes (a parameter may be shared with other layers)."""
        return [b.magnitude for b in self.branches if b.magnitude is not None]

    def stored_state_params(self) -> int:
        """Values of the input subspace basis a method keeps (InfLoRA's DualGPM)."""
        return self.input_basis.numel()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for branch in self.branches for p in branch.trainable_parameters()]

    # ------------------------------------------------------------------ branch lifecycle
    def add_branch(self, branch: LoRABranch) -> LoRABranch:
        """Append ``branch`` (moved to this layer's device and dtype); returns it."""
        self.require_unmerged("add a branch")
        if branch.A.shape[1] != self.in_features or branch.B.shape[0] != self.n_out:
            raise ValueError(
                f"branch of shape A {tuple(branch.A.shape)}, B {tuple(branch.B.shape)} does not "
                f"fit a layer with d_in={self.in_features} and {self.n_out} adapted outputs"
            )
        self.branches.append(branch.to(self.base.weight))
        self.refresh()
        return branch

    def remove_branch(self, index: int) -> None:
        self.require_unmerged("remove a branch")
        del self.branches[index]
        self.refresh()

    def freeze_directions(self) -> None:
        """Freeze ``A`` and ``B`` of every branch (magnitude flags are left as they are)."""
        for branch in self.branches:
            branch.train_A = branch.train_B = False
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the caches of the frozen branches after any change of branches or flags."""
        self._frozen = [b for b in self.branches if b.frozen]
        self._training = [b for b in self.branches if not b.frozen]
        ref = self.base.weight
        if self._frozen:
            self._A_frozen = torch.cat([b.A for b in self._frozen]).to(ref)
            # the constant part of each coefficient (scale / norm) is folded into B
            B = torch.cat([b.B * (b.scale / b.norm()) for b in self._frozen], dim=1)
            self._B_frozen = self.place(B.to(ref))
        else:
            self._A_frozen = ref.new_zeros(0, self.in_features)
            self._B_frozen = ref.new_zeros(self.out_features, 0)
        ranks = torch.tensor([b.rank for b in self._frozen], dtype=torch.long)
        self._frozen_branch_of_row = torch.arange(len(self._frozen)).repeat_interleave(
            ranks).to(ref.device)
        self._has_magnitudes = any(b.magnitude is not None for b in self._frozen)

    # ------------------------------------------------------------------ weight
    def effective_weight(self) -> Tensor:
        """``W0`` plus every branch's update, in ``W0``'s dtype; ``W0`` untouched. Computed
        outside autocast, so under bf16 autocast the forward casts what :meth:`merge` leaves."""
        weight = self.base.weight
        if self.merged or not len(self.branches):
            return weight
        A, coef, B = self._stacked()
        with torch.autocast(weight.device.type, enabled=False):
            return torch.addmm(weight, (B * coef).to(weight.dtype), A.to(weight.dtype))

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if self.merged or not len(self.branches):
            return self.base(x)
        if torch.is_grad_enabled():
            return self.forward_activations(x)
        return self.forward_weight(x)

    def forward_activations(self, x: Tensor) -> Tensor:
        """``W0 x + B (coef * A dropout(x))``: the path that gives the branches their
        gradients (LoRA dropout acts on the branches' input, in training mode only)."""
        A, coef, B = self._stacked()
        lora_x = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return self.base(x) + F.linear(F.linear(lora_x, A) * coef, B)

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept ``input_basis`` at its saved size (it grows with the experiences)."""
        saved = state_dict.get(prefix + "input_basis")
        if saved is not None:
            self.input_basis = self.input_basis.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ internals
    def _stacked(self) -> tuple[Tensor, Tensor, Tensor]:
        """All branches as ``A`` (``R x d_in``), per-row coefficients (``R``) and embedded ``B``
        (``d_out x R``): cached frozen rows first, then the training branches."""
        A_parts, coef_parts, B_parts = [self._A_frozen], [], [self._B_frozen]
        if self._frozen:
            if self._has_magnitudes:
                one = self._A_frozen.new_ones(())
                magnitudes = torch.stack([one if b.magnitude is None else b.magnitude
                                          for b in self._frozen])
                coef_parts.append(magnitudes[self._frozen_branch_of_row])
            else:
                coef_parts.append(self._A_frozen.new_ones(self._A_frozen.shape[0]))
        for branch in self._training:
            A_parts.append(branch.A)
            coef_parts.append(branch.coefficient().expand(branch.rank))
            B_parts.append(self.place(branch.B))
        coef = torch.cat(coef_parts) if coef_parts else self._A_frozen.new_zeros(0)
        return torch.cat(A_parts), coef, torch.cat(B_parts, dim=1)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, adapted_out={self.n_out}, "
                f"branches={len(self.branches)}")


def branch_structure(layers: dict[str, BranchLoRALinear]) -> dict[str, list[dict]]:
    """Per layer, each branch's owner, rank, scale, normalisation and trainable flags, and which
    magnitude it uses (an index into the layers' distinct magnitudes, so that shared ones stay
    shared): what :func:`rebuild_branches` needs to give a fresh model the same structure."""
    groups: dict[int, int] = {}
    for layer in layers.values():
        for parameter in layer.magnitude_parameters():
            groups.setdefault(id(parameter), len(groups))
    return {
        name: [{"owner": b.owner, "rank": b.rank, "scale": float(b.scale),
                "magnitude": None if b.magnitude is None else groups[id(b.magnitude)],
                "normalise": b.normalise, "train_A": b.train_A, "train_B": b.train_B,
                "train_magnitude": b.train_magnitude} for b in layer.branches]
        for name, layer in layers.items()
    }


def rebuild_branches(layers: dict[str, BranchLoRALinear], structure: dict[str, list[dict]]) -> None:
    """Replace each layer's branches by zero branches of the saved ``structure``, magnitudes
    shared as they were, ready for a ``load_state_dict`` of the saved tensors."""
    if set(structure) != set(layers):
        raise ValueError(f"saved branch layers {sorted(structure)} differ from the model's "
                         f"{sorted(layers)}")
    magnitudes: dict[int, nn.Parameter] = {}
    for name, layer in layers.items():
        while len(layer.branches):
            layer.remove_branch(-1)
        for b in structure[name]:
            group = b["magnitude"]
            magnitude = None if group is None else magnitudes.setdefault(
                group, nn.Parameter(layer.weight.new_zeros(())))
            layer.add_branch(LoRABranch(
                torch.zeros(b["rank"], layer.in_features), torch.zeros(layer.n_out, b["rank"]),
                scale=b["scale"], magnitude=magnitude, normalise=b["normalise"],
                train_A=b["train_A"], train_B=b["train_B"],
                train_magnitude=b["train_magnitude"], owner=b["owner"],
            ))


def _refresh(layer: BranchLoRALinear, incompatible_keys) -> None:
    """Post-hook of ``load_state_dict``: the caches follow the loaded branches."""
    layer.refresh()
