"""The subspace LoRA layer: a frozen ``nn.Linear`` plus a frozen-``A`` LoRA split into slots."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from . import slots
from .adapted_linear import AdaptedLinear
from .row_span_linear import row_span_linear
from .slots import FREE


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
    pass inside it). The ownership (``row_owner``, ``train_rows``) is mirrored on the host, so
    choosing rows never waits for the device.

    With ``slot_magnitudes``, the training experience also learns one scale per earlier slot
    (:attr:`lora_magnitude`, in the order of :meth:`magnitude_owners`; SD-LoRA's magnitudes on
    frozen directions), folded into those slots' ``B`` when the training slot ends.
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        rank: int,
        num_slots: int,
        alpha: float,
        out_index: Tensor | None = None,
        slot_magnitudes: bool = False,
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
        self.slot_magnitudes = slot_magnitudes
        # what layers must share for their slots to be changed together (:mod:`.slots`)
        self._stack_key = (rank, total, d_in, self.n_out, d_out, self.scaling,
                           None if out_index is None else tuple(self.out_index.tolist()))
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
        self.lora_magnitude: nn.Parameter | None = None
        self._owner_filter: frozenset[int] | None = None
        # caches of the live rows (frozen owners first, training rows last)
        self.register_buffer("_A_live", torch.zeros(0, d_in, **factory), persistent=False)
        self.register_buffer("_B_frozen", torch.zeros(d_out, 0, **factory), persistent=False)
        self.register_buffer("_A_train", torch.zeros(0, d_in, **factory), persistent=False)
        # position in ``lora_magnitude`` of each cached frozen row
        self.register_buffer("_magnitude_index", torch.zeros(0, dtype=torch.long, device=device),
                             persistent=False)
        # host copies of ``row_owner`` and ``train_rows``: ownership decisions never read the
        # device
        self._owner: list[int] = [FREE] * total
        self._train: list[int] = []
        self._stale = False
        self._deferred = False

    # ------------------------------------------------------------------ properties
    @property
    def training_owner(self) -> int | None:
        """Owner id of the slot in training, or ``None``."""
        if self.lora_B_train is None:
            return None
        return self._owner[self._train[0]]

    def row_owners(self) -> list[int]:
        """Owner of every row (``FREE`` for free rows). This and the row lists below are read
        from a host copy of ``row_owner``: they never synchronise with the device."""
        return list(self._owner)

    def free_rows(self) -> list[int]:
        return self._rows(lambda row, owner: owner == FREE)

    def frozen_rows(self) -> list[int]:
        """Live rows of experiences that are no longer training."""
        return self._rows(lambda row, owner: owner != FREE and row not in self._train)

    def used_rows(self) -> list[int]:
        return self._rows(lambda row, owner: owner != FREE)

    def rows_of(self, owner: int) -> list[int]:
        return self._rows(lambda row, o: o == owner)

    def training_rows(self) -> list[int]:
        """Rows of the slot in training, in the column order of ``lora_B_train``."""
        return list(self._train)

    def magnitude_owners(self) -> list[int]:
        """Owners of the frozen slots (ascending): the entries of :attr:`lora_magnitude`."""
        return sorted({self._owner[row] for row in self.frozen_rows()})

    def live_adapter_params(self) -> int:
        """Values of ``A`` and ``B`` held for live (non-free) rows."""
        return len(self.used_rows()) * (self.in_features + self.n_out)

    # ------------------------------------------------------------------ slot lifecycle
    # one layer's case of the batched functions in :mod:`cl_sulora.slots`
    def start_slot(self, owner: int, directions: Tensor | None) -> Tensor:
        """Give ``rank`` free rows to ``owner`` with the given ``A`` directions; returns the rows.

        ``directions`` (``rank x d_in``) must be orthonormal and orthogonal to the rows in use
        (the allocators guarantee it); ``None`` starts the rows at zero, for a slot pointed
        later (:meth:`reset_training_rows`). The slot's ``B`` starts at zero and is trainable.
        """
        slots.start_slots([self], owner, None if directions is None else [directions])
        return self.train_rows

    def end_slot(self, importance: Tensor | None = None) -> None:
        """Freeze the training slot: its ``B`` becomes a buffer, its importance is recorded."""
        slots.end_slots([self], None if importance is None else [importance])

    def fuse(self, rows: Tensor | Sequence[int]) -> None:
        """Fold the rank-1 pairs of ``rows`` into ``W0`` and free the rows.

        Frozen rows are freed; rows of the training slot are re-zeroed in ``B`` and stay owned by
        it (the caller gives them new directions with :meth:`reset_training_rows`). ``rows``
        given as a list (or a CPU tensor) costs no synchronisation with the device.
        """
        slots.fuse_rows([self], [rows])

    def reset_training_rows(self, local: Tensor | Sequence[int] | None,
                            directions: Tensor) -> None:
        """Point training-slot columns ``local`` (indices into the slot; ``None``: all of them)
        at new directions, with their ``B`` columns and importance statistics zeroed."""
        slots.point_slots([self], [directions], None if local is None else [local])

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
            # the magnitudes reach the weight through the frozen rows: their span is needed too
            rows = self._A_train if self.lora_magnitude is None else self._A_live
            return row_span_linear(x, self.effective_weight(), self.base.bias, rows)
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
        for key in ("lora_B_train", "lora_magnitude"):  # parameters that exist mid-experience
            saved = state_dict.get(prefix + key)
            if saved is not None and getattr(self, key) is None:
                setattr(self, key, nn.Parameter(self.lora_B.new_empty(saved.shape)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.reload_buffers()

    def reload_buffers(self) -> None:
        """Take the ownership from the ``row_owner`` and ``train_rows`` buffers (after they were
        assigned directly, e.g. by a loader) and rebuild the live-row caches."""
        self._owner = self.row_owner.tolist()
        self._train = self.train_rows.tolist()
        self._rebuild()

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
        frozen = self._B_frozen
        if self.lora_magnitude is not None:
            frozen = frozen * self.lora_magnitude[self._magnitude_index]
        if self.lora_B_train is None or self._A_live.shape[0] == frozen.shape[1]:
            return frozen
        return torch.cat([frozen, self._embed(self.lora_B_train)], dim=1)

    def refresh(self) -> None:
        """Rebuild the live-row caches if a change within :func:`deferred_refresh` left them
        stale."""
        if self._stale:
            self._rebuild()

    def _rebuild(self) -> None:
        """Gather the live rows into the caches (:func:`cl_sulora.slots.rebuild_caches`)."""
        slots.rebuild_caches([self])

    def _rows(self, keep: Callable[[int, int], bool]) -> list[int]:
        """Rows (ascending) whose ``(row, owner)`` pass ``keep``, from the host copy of the
        owners."""
        return [row for row, owner in enumerate(self._owner) if keep(row, owner)]

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"slots={self.num_slots}, adapted_out={self.lora_B.shape[0]}, "
            f"live_rows={len(self.used_rows())}"
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
        slots.rebuild_caches([layer for layer in layers if layer._stale])
