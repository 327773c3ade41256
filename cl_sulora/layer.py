"""The subspace LoRA layer: a frozen ``nn.Linear`` plus a frozen-``A`` LoRA split into slots."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .adapted_linear import AdaptedLinear
from .row_span_linear import row_span_linear

FREE = -1  # owner id of a free row


class SubspaceLoRALinear(AdaptedLinear):
    """``y = W0 x + (alpha / rank) * sum over live rows j of b_j a_j^T x``.

    ``A`` (``R x d_in``, ``R = num_slots * rank``) holds orthonormal, frozen rows. Each row is
    free or owned by one experience (its *owner*). The experience being trained owns ``rank``
    rows whose ``B`` columns are the only trainable tensor (:attr:`lora_B_train`); the ``B``
    columns of earlier experiences are frozen buffers. Fusion folds chosen rank-1 pairs into
    ``W0`` and frees their rows.

    When ``out_index`` is given, only those output features of ``W0`` are adapted (e.g. the q and
    v parts of a fused ``qkv``); ``B`` then has ``len(out_index)`` rows.

    Every forward applies all live pairs to the weight: one ``F.linear`` with
    ``W0 + scale * B_live A_live``, built per call at ``O(d_out r d_in)`` cost (nothing is merged
    into ``W0``). While the training slot needs gradients, its ``B`` gets them through
    :func:`~cl_sulora.row_span_linear.row_span_linear`: exact because ``A``'s rows are
    orthonormal, and costing a rank-``rank`` projection of the input instead of a full weight
    gradient. The live rows are gathered into caches after every change of ownership, never in
    the forward pass; within :func:`deferred_refresh` only once, on leaving it (or at a forward
    pass inside it).
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        rank: int,
        num_slots: int,
        alpha: float,
        out_index: Tensor | None = None,
    ) -> None:
        d_out, d_in = base.weight.shape
        total = rank * num_slots
        if total > d_in:
            raise ValueError(
                f"rank x num_slots = {rank} x {num_slots} = {total} exceeds the input dimension "
                f"{d_in} of the adapted layer: orthonormal rows cannot be disjoint. Lower rank or "
                "num_slots, or enable fusion so fewer slots are needed."
            )
        super().__init__(base, out_index=out_index)
        self.rank = rank
        self.num_slots = num_slots
        self.scaling = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        n_out = self.n_out
        self.register_buffer("lora_A", torch.zeros(total, d_in, **factory))
        self.register_buffer("lora_B", torch.zeros(n_out, total, **factory))
        device = base.weight.device
        self.register_buffer("row_owner", torch.full((total,), FREE, dtype=torch.long,
                                                     device=device))
        self.register_buffer("row_importance", torch.zeros(total, device=device))
        self.register_buffer("num_fused", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("train_rows", torch.zeros(0, dtype=torch.long, device=device))
        # AdaLoRA-style importance state of the training slot's B (n_out x rank)
        self.register_buffer("importance_ema", torch.zeros(n_out, rank, device=device))
        self.register_buffer("importance_unc", torch.zeros(n_out, rank, device=device))
        # input subspace of earlier experiences, kept by the ``data`` allocator (rows)
        self.register_buffer("input_basis", torch.zeros(0, d_in, **factory))
        self.lora_B_train: nn.Parameter | None = None
        self._owner_filter: frozenset[int] | None = None
        # caches of the live rows (frozen owners first, training rows last)
        self.register_buffer("_A_live", torch.zeros(0, d_in, **factory), persistent=False)
        self.register_buffer("_B_frozen", torch.zeros(d_out, 0, **factory), persistent=False)
        self.register_buffer("_A_train", torch.zeros(0, d_in, **factory), persistent=False)
        self._stale = False
        self._deferred = False

    # ------------------------------------------------------------------ properties
    @property
    def training_owner(self) -> int | None:
        """Owner id of the slot in training, or ``None``."""
        if self.lora_B_train is None:
            return None
        return int(self.row_owner[self.train_rows[0]])

    def free_rows(self) -> Tensor:
        return torch.nonzero(self.row_owner == FREE).flatten()

    def frozen_rows(self) -> Tensor:
        """Live rows of experiences that are no longer training."""
        live = self.row_owner != FREE
        live[self.train_rows] = False
        return torch.nonzero(live).flatten()

    def used_rows(self) -> Tensor:
        return torch.nonzero(self.row_owner != FREE).flatten()

    def rows_of(self, owner: int) -> Tensor:
        return torch.nonzero(self.row_owner == owner).flatten()

    def live_adapter_params(self) -> int:
        """Values of ``A`` and ``B`` held for live (non-free) rows."""
        return int(self.used_rows().numel()) * (self.in_features + self.n_out)

    # ------------------------------------------------------------------ slot lifecycle
    @torch.no_grad()
    def start_slot(self, owner: int, directions: Tensor) -> Tensor:
        """Give ``rank`` free rows to ``owner`` with the given ``A`` directions; returns the rows.

        ``directions`` (``rank x d_in``) must be orthonormal and orthogonal to the rows in use
        (the allocators guarantee it). The slot's ``B`` starts at zero and is trainable.
        """
        self._check_not_merged("start a slot")
        if self.lora_B_train is not None:
            raise RuntimeError("a slot is already training: call end_slot() first")
        free = self.free_rows()
        if free.numel() < self.rank:
            raise RuntimeError(
                f"only {free.numel()} free rows, a slot needs {self.rank}: fuse old pairs first"
            )
        rows = free[: self.rank]
        self.lora_A[rows] = directions.to(self.lora_A)
        self.lora_B[:, rows] = 0
        self.row_owner[rows] = owner
        self.row_importance[rows] = 0
        self.train_rows = rows
        self.importance_ema.zero_()
        self.importance_unc.zero_()
        self.lora_B_train = nn.Parameter(torch.zeros_like(self.lora_B[:, rows]))
        self._refresh()
        return rows

    @torch.no_grad()
    def end_slot(self, importance: Tensor | None = None) -> None:
        """Freeze the training slot: its ``B`` becomes a buffer, its importance is recorded."""
        if self.lora_B_train is None:
            return
        self.lora_B[:, self.train_rows] = self.lora_B_train.detach()
        if importance is not None:
            self.row_importance[self.train_rows] = importance.to(self.row_importance)
        self.lora_B_train = None
        self.train_rows = self.train_rows[:0]
        self._refresh()

    @torch.no_grad()
    def fuse(self, rows: Tensor) -> None:
        """Fold the rank-1 pairs of ``rows`` into ``W0`` and free the rows.

        Frozen rows are freed; rows of the training slot are re-zeroed in ``B`` and stay owned by
        it (the caller gives them new directions with :meth:`reset_training_rows`).
        """
        self._check_not_merged("fuse")
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.row_owner.device)
        if rows.numel() == 0:
            return
        training = torch.isin(rows, self.train_rows)
        free, any_training = torch.stack([(self.row_owner[rows] == FREE).any(),
                                          training.any()]).tolist()
        if free:
            raise ValueError("cannot fuse free rows")
        B = self._full_B()[:, rows]
        self._add_to_weight(B @ self.lora_A[rows])
        if self.lora_B_train is not None and any_training:
            local = torch.nonzero(torch.isin(self.train_rows, rows[training])).flatten()
            self.lora_B_train[:, local] = 0
        frozen = rows[~training]
        self.lora_A[frozen] = 0
        self.lora_B[:, frozen] = 0
        self.row_owner[frozen] = FREE
        self.row_importance[frozen] = 0
        self.num_fused += rows.numel()
        self._refresh()

    @torch.no_grad()
    def reset_training_rows(self, local: Tensor, directions: Tensor) -> None:
        """Point training-slot columns ``local`` (indices into the slot) at new directions."""
        rows = self.train_rows[local]
        self.lora_A[rows] = directions.to(self.lora_A)
        self.lora_B_train[:, local] = 0
        self.importance_ema[:, local] = 0
        self.importance_unc[:, local] = 0
        self._refresh()

    # ------------------------------------------------------------------ inference modes
    def set_owner_filter(self, owners: Iterable[int] | None) -> None:
        """Use only the rows of ``owners`` in the forward pass (``None``: every live row)."""
        self._check_not_merged("filter owners")
        self._owner_filter = None if owners is None else frozenset(int(o) for o in owners)
        self._rebuild()

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        self.refresh()
        if self.merged or self._A_live.shape[0] == 0:
            return self.base(x)
        if self._needs_adapter_grad():
            return row_span_linear(x, self.effective_weight(), self.base.bias, self._A_train)
        return self._forward_weight(x)

    def effective_weight(self) -> Tensor:
        """``W0`` plus every live pair (of the owner filter), in ``W0``'s dtype; ``W0`` untouched.

        Computed outside autocast, so under bf16 autocast the forward casts the same sum that
        :meth:`merge` would leave in ``W0``.
        """
        self.refresh()
        weight = self.base.weight
        if self.merged or self._A_live.shape[0] == 0:
            return weight
        with torch.autocast(weight.device.type, enabled=False):
            return torch.addmm(weight, self._live_B().to(weight.dtype),
                               self._A_live.to(weight.dtype))

    def _needs_adapter_grad(self) -> bool:
        return (torch.is_grad_enabled() and self.lora_B_train is not None
                and self.lora_B_train.requires_grad)

    # ------------------------------------------------------------------ state
    _VARIABLE = ("train_rows", "input_basis")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept the variable-size buffers at their saved size, rebuild the training slot."""
        for key in self._VARIABLE:
            saved = state_dict.get(prefix + key)
            if saved is not None:
                current = getattr(self, key)
                setattr(self, key, current.new_empty(saved.shape))
        train = state_dict.get(prefix + "lora_B_train")
        if train is not None and self.lora_B_train is None:
            self.lora_B_train = nn.Parameter(self.lora_B.new_empty(train.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh()

    # ------------------------------------------------------------------ internals
    def _embed(self, B: Tensor) -> Tensor:
        """Scale ``B`` (rows = adapted outputs) and place it in ``W0``'s output rows."""
        return self._place(B * self.scaling)

    def _full_B(self) -> Tensor:
        """``B`` over all rows, the training slot's columns taken from the parameter."""
        if self.lora_B_train is None:
            return self.lora_B
        return self.lora_B.index_copy(1, self.train_rows, self.lora_B_train.detach())

    def _live_B(self) -> Tensor:
        if self.lora_B_train is None or self._A_live.shape[0] == self._B_frozen.shape[1]:
            return self._B_frozen
        return torch.cat([self._B_frozen, self._embed(self.lora_B_train)], dim=1)

    def _add_to_weight(self, delta: Tensor) -> None:
        """Add ``scaling * delta`` (rows = adapted outputs) to ``W0``."""
        delta = delta * self.scaling
        if self.out_index is None:
            self.base.weight.add_(delta)
        else:
            self.base.weight.index_add_(0, self.out_index, delta)

    def refresh(self) -> None:
        """Rebuild the live-row caches if a change within :func:`deferred_refresh` left them
        stale."""
        if self._stale:
            self._rebuild()

    def _refresh(self) -> None:
        """Rebuild the live-row caches after a change of ownership or directions (only mark
        them stale within :func:`deferred_refresh`)."""
        self._stale = True
        if not self._deferred:
            self._rebuild()

    def _rebuild(self) -> None:
        """Gather the live rows into the caches."""
        self._stale = False
        live = self.row_owner != FREE
        if self._owner_filter is not None:
            allowed = torch.tensor(sorted(self._owner_filter), device=self.row_owner.device)
            live &= torch.isin(self.row_owner, allowed)
        training = torch.zeros_like(live)
        training[self.train_rows] = True
        frozen = torch.nonzero(live & ~training).flatten()
        active_training = torch.nonzero(live & training).flatten()
        if active_training.numel() and active_training.numel() != self.train_rows.numel():
            raise RuntimeError("an owner filter must keep all or none of the training slot")
        self._A_live = torch.cat([self.lora_A[frozen], self.lora_A[active_training]]).detach()
        self._B_frozen = self._embed(self.lora_B[:, frozen]).detach()
        self._A_train = self.lora_A[active_training].detach()

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"slots={self.num_slots}, adapted_out={self.lora_B.shape[0]}, "
            f"live_rows={int((self.row_owner != FREE).sum())}"
        )


@contextmanager
def deferred_refresh(layers: Iterable[SubspaceLoRALinear]) -> Iterator[None]:
    """Rebuild each layer's live-row caches once, on exit, rather than after every change."""
    layers = list(layers)
    for layer in layers:
        layer._deferred = True
    try:
        yield
    finally:
        for layer in layers:
            layer._deferred = False
            layer.refresh()
