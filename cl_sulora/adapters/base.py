"""What every adapter layer shares: a frozen ``nn.Linear`` whose output rows (all, or those in
``out_index``) an adapter updates, and exact merging of that update into its weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AdaptedLinear(nn.Module):
    """A frozen ``base`` linear layer plus an adapter update given by :meth:`effective_weight`.

    :meth:`merge` writes ``effective_weight()`` into ``W0`` (restorable bit-exactly by
    :meth:`unmerge`); :meth:`forward_weight` applies it without merging. Subclasses say how
    many values their adapter holds (:meth:`live_adapter_params`) and how many values of other
    state they keep for their method (:meth:`stored_state_params`).
    """

    def __init__(self, base: nn.Linear, *, out_index: Tensor | None = None) -> None:
        super().__init__()
        self.base = base
        base.requires_grad_(False)
        if out_index is not None:
            out_index = torch.as_tensor(out_index, dtype=torch.long, device=base.weight.device)
        self.register_buffer("out_index", out_index)
        self.merged = False
        self._weight_backup: Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def n_out(self) -> int:
        """Number of adapted output features (rows of the adapter's ``B``)."""
        return self.out_features if self.out_index is None else self.out_index.numel()

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    def effective_weight(self) -> Tensor:
        """``W0`` plus the adapter's update, in ``W0``'s dtype; ``W0`` untouched."""
        raise NotImplementedError

    def live_adapter_params(self) -> int:
        """Values the adapter holds for its live update."""
        raise NotImplementedError

    def magnitude_parameters(self) -> list[nn.Parameter]:
        """Learned scales of the update, counted as live adapter values once per model (a
        parameter may be shared between layers)."""
        return []

    def stored_state_params(self) -> int:
        """Values of the other state the layer keeps for its method (e.g. input bases)."""
        return 0

    def unmerged_weight(self) -> Tensor:
        """``W0`` as it is without the adapter's update (also while merged)."""
        return self._weight_backup if self.merged else self.base.weight

    @torch.no_grad()
    def merge(self) -> AdaptedLinear:
        """Fold the adapter's update into ``W0`` (kept exactly restorable by :meth:`unmerge`)."""
        if not self.merged:
            self._weight_backup = self.base.weight.detach().clone()
            self.base.weight.copy_(self.effective_weight())
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self) -> AdaptedLinear:
        """Restore ``W0`` bit-exactly as it was before :meth:`merge`."""
        if self.merged:
            self.base.weight.copy_(self._weight_backup)
            self._weight_backup = None
            self.merged = False
        return self

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing this layer's function (``W0`` plus the update folded
        into its weight), detached from the adapter."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight if self.merged else self.effective_weight())
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear

    def forward_weight(self, x: Tensor) -> Tensor:
        """``effective_weight() x``: one matmul over the activations."""
        return F.linear(x, self.effective_weight(), self.base.bias)

    def require_unmerged(self, action: str) -> None:
        """Refuse ``action`` while the update is merged into ``W0``."""
        if self.merged:
            raise RuntimeError(f"cannot {action} while merged: call unmerge() first")

    def place(self, B: Tensor) -> Tensor:
        """``B`` (rows = adapted outputs; a stack of them allowed) placed in ``W0``'s output
        rows."""
        if self.out_index is None:
            return B
        placed = B.new_zeros(*B.shape[:-2], self.out_features, B.shape[-1])
        return placed.index_copy(-2, self.out_index, B)
