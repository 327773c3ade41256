"""The subspace LoRA layer: a frozen ``nn.Linear`` plus a frozen-``A`` LoRA split into slots."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from . import slots
from .base import AdaptedLinear
from .row_span_linear import row_span_linear
from .slot_table import SlotTable


class SubspaceLoRALinear(AdaptedLinear):
    """``y = W0 x + (alpha / rank) * sum over live rows j of b_j a_j^T x``.

    ``A`` (``R x d_in``, ``R = num_slots * rank``) holds orthonormal, frozen rows. Each row is
    free or owned by one experience (its *owner*), as :attr:`slots` (a
    :class:`~cl_sulora.adapters.slot_table.SlotTable`) records. The experience being trained owns
    ``rank`` rows whose ``B`` columns are the only trainable tensor (:attr:`lora_B_train`); the
    ``B`` columns of earlier experiences are frozen buffers. Fusion folds chosen rank-1 pairs
    into ``W0`` and frees their rows.

    When ``out_index`` is given, only those output features of ``W0`` are adapted (e.g. the q and
    v parts of a fused ``qkv``); ``B`` then has ``len(out_index)`` rows.

    Every forward applies all live pairs to the weight: one ``F.linear`` with
    ``W0 + scale * B_live A_live``, built per call at ``O(d_out r d_in)`` cost (nothing is merged
    into ``W0``). While the training slot needs gradients, its ``B`` gets them through
    :func:`~cl_sulora.adapters.row_span_linear.row_span_linear`: exact because ``A``'s rows are
    orthonormal, and costing a rank-``rank`` projection of the input instead of a full weight
    gradient. The live rows come from the slot table's caches, never gathered in the forward.

    The training slot's ``B`` may carry a gain (:meth:`set_training_gain`): its update is
    ``gain * lora_B_train``, the gain folded into ``lora_B`` when the slot ends.

    With ``slot_magnitudes``, the training experience also learns one scale per earlier slot
    (:attr:`lora_magnitude`, in the order of ``slots.magnitude_owners()``; SD-LoRA's
    magnitudes on frozen directions), folded into those slots' ``B`` when the training slot ends.

    The slot lifecycle (start, point, end, fuse) is :mod:`cl_sulora.adapters.slots`, batched over
    layers; the methods here are its one-layer case.
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
        #: what layers must share for their slots to be changed together (:mod:`.slots`)
        self.stack_key = (rank, total, d_in, self.n_out, d_out, self.scaling,
                          None if out_index is None else tuple(self.out_index.tolist()))
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        device = base.weight.device
        n_out = self.n_out
        self.register_buffer("lora_A", torch.zeros(total, d_in, **factory))
        self.register_buffer("lora_B", torch.zeros(n_out, total, **factory))
        self.register_buffer("row_importance", torch.zeros(total, device=device))
        self.register_buffer("num_fused", torch.zeros((), dtype=torch.long, device=device))
        # AdaLoRA-style importance state of the training slot's B (n_out x rank)
        self.register_buffer("importance_ema", torch.zeros(n_out, rank, device=device))
        self.register_buffer("importance_unc", torch.zeros(n_out, rank, device=device))
        # input subspace of earlier experiences, kept by the ``data`` allocator (rows)
        self.register_buffer("input_basis", torch.zeros(0, d_in, **factory))
        # the training slot's gain: its update is train_gain * lora_B_train (1 between slots)
        self.register_buffer("train_gain", torch.ones((), **factory))
        self.lora_B_train: nn.Parameter | None = None
        self.lora_magnitude: nn.Parameter | None = None
        self.slots = SlotTable(total, d_in, d_out, **factory)
        self.register_load_state_dict_post_hook(_reload_slots)

    # ------------------------------------------------------------------ properties
    @property
    def training_owner(self) -> int | None:
        """Owner id of the slot in training, or ``None``."""
        return self.slots.training_owner if self.lora_B_train is not None else None

    def live_adapter_params(self) -> int:
        """Values of ``A`` and ``B`` held for live (non-free) rows."""
        return len(self.slots.used_rows()) * (self.in_features + self.n_out)

    def magnitude_parameters(self) -> list[nn.Parameter]:
        """The earlier slots' learned scales while they train (folded when the slot ends)."""
        return [] if self.lora_magnitude is None else [self.lora_magnitude]

    def stored_state_params(self) -> int:
        """Values of the input basis kept by the ``data`` allocator."""
        return self.input_basis.numel()

    # ------------------------------------------------------------------ slot lifecycle
    def start_slot(self, owner: int, directions: Tensor | None) -> Tensor:
        """Give ``rank`` free rows to ``owner`` with the given ``A`` directions; returns the rows.

        ``directions`` (``rank x d_in``) must be orthonormal and orthogonal to the rows in use
        (the allocators guarantee it); ``None`` starts the rows at zero, for a slot pointed
        later (:meth:`reset_training_rows`). The slot's ``B`` starts at zero and is trainable.
        """
        slots.start_slots([self], owner, None if directions is None else [directions])
        return self.slots.train_rows

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

    @torch.no_grad()
    def set_training_gain(self, gain: Tensor | float) -> None:
        """Scale the training slot's update: ``B`` of its rows is ``gain * lora_B_train``
        (call it while ``lora_B_train`` is zero, or the slot's output jumps)."""
        if self.lora_B_train is None:
            raise RuntimeError("no slot is training: start_slot() first")
        self.train_gain.fill_(gain)

    def reset_training_rows(self, local: Tensor | Sequence[int] | None,
                            directions: Tensor) -> None:
        """Point training-slot columns ``local`` (indices into the slot; ``None``: all of them)
        at new directions, with their ``B`` columns and importance statistics zeroed."""
        slots.point_slots([self], [directions], None if local is None else [local])

    # ------------------------------------------------------------------ inference modes
    def set_owner_filter(self, owners: Iterable[int] | None) -> None:
        """Use only the rows of ``owners`` in the forward pass (``None``: every live row)."""
        self.require_unmerged("filter owners")
        self.slots.set_owner_filter(owners)
        slots.rebuild_caches([self])

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        table = self.slots
        if table.stale:
            slots.rebuild_caches([self])
        if self.merged or table.A_live.shape[0] == 0:
            return self.base(x)
        if self.training_slot_needs_grad():
            # the magnitudes reach the weight through the frozen rows: their span is needed too
            rows = table.A_train if self.lora_magnitude is None else table.A_live
            return row_span_linear(x, self.effective_weight(), self.base.bias, rows)
        return self.forward_weight(x)

    def effective_weight(self) -> Tensor:
        """``W0`` plus every live pair (of the owner filter), in ``W0``'s dtype; ``W0`` untouched.

        Computed outside autocast, so under bf16 autocast the forward casts the same sum that
        :meth:`merge` would leave in ``W0``.
        """
        table = self.slots
        if table.stale:
            slots.rebuild_caches([self])
        weight = self.base.weight
        if self.merged or table.A_live.shape[0] == 0:
            return weight
        with torch.autocast(weight.device.type, enabled=False):
            return torch.addmm(weight, self.live_B().to(weight.dtype),
                               table.A_live.to(weight.dtype))

    def training_slot_needs_grad(self) -> bool:
        return (torch.is_grad_enabled() and self.lora_B_train is not None
                and self.lora_B_train.requires_grad)

    def full_B(self) -> Tensor:
        """``B`` over all rows, the training slot's columns taken from the parameter."""
        if self.lora_B_train is None:
            return self.lora_B
        return self.lora_B.index_copy(1, self.slots.train_rows,
                                      self.lora_B_train.detach() * self.train_gain)

    def pair_norms(self) -> Tensor:
        """Norm of each row's ``B`` column (zero for free rows): the Frobenius norm of the row's
        rank-1 update up to the layer's scaling, since ``A``'s rows are orthonormal."""
        return self.full_B().detach().float().norm(dim=0)

    def live_B(self) -> Tensor:
        """The live rows' ``B``, scaled and placed in ``W0``'s output rows, in the order of
        ``slots.A_live`` (magnitudes applied to the frozen rows)."""
        table = self.slots
        frozen = table.B_frozen
        if self.lora_magnitude is not None:
            frozen = frozen * self.lora_magnitude[table.magnitude_index]
        if self.lora_B_train is None or table.A_live.shape[0] == frozen.shape[1]:
            return frozen
        trained = self.lora_B_train * (self.train_gain * self.scaling)
        return torch.cat([frozen, self.place(trained)], dim=1)

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept ``input_basis`` at its saved size and create the parameters that exist
        mid-experience; the slot table is reloaded once the whole layer is
        (:meth:`reload_slots`)."""
        state_dict.setdefault(prefix + "train_gain", torch.ones(()))  # saved without a gain
        saved = state_dict.get(prefix + "input_basis")
        if saved is not None:
            self.input_basis = self.input_basis.new_empty(saved.shape)
        for key in ("lora_B_train", "lora_magnitude"):
            saved = state_dict.get(prefix + key)
            if saved is not None and getattr(self, key) is None:
                setattr(self, key, nn.Parameter(self.lora_B.new_empty(saved.shape)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reload_slots(self) -> None:
        """Take the ownership from the slot table's buffers (after a state was loaded into
        them) and rebuild the live-row caches."""
        self.slots.reload()
        slots.rebuild_caches([self])

    def adapter_state(self) -> dict[str, Tensor]:
        """Every tensor of this layer that differs from the pretrained ``nn.Linear`` (detached,
        on the CPU, keyed as in the layer's ``state_dict``): the layer's own state without
        ``base.*`` and, once pairs were fused, ``fused_weight`` (the adapted rows of ``W0``)."""
        state = {key: value for key, value in self.state_dict().items()
                 if not key.startswith("base.")}
        if int(self.num_fused):
            weight = self.unmerged_weight().detach()
            if self.out_index is not None:
                weight = weight[self.out_index]
            state["fused_weight"] = weight
        return {key: value.detach().cpu().contiguous() for key, value in state.items()}

    #: State entries whose size changes with the experiences (or that exist mid-experience).
    VARIABLE_STATE = ("input_basis", "slots.train_rows", "lora_B_train", "lora_magnitude",
                      "train_gain")

    def state_mismatch(self, state: dict[str, Tensor]) -> str | None:
        """Why ``state`` (from :meth:`adapter_state`) cannot be loaded into this layer: a
        missing or unknown entry, or a tensor of another shape; ``None`` when it fits."""
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}
        expected = set(own) - set(self.VARIABLE_STATE)
        unknown = set(state) - set(own) - set(self.VARIABLE_STATE) - {"fused_weight"}
        if expected - set(state) or unknown:
            return (f"missing {sorted(expected - set(state))}, unknown {sorted(unknown)}")
        for key in expected:
            if state[key].shape != own[key].shape:
                return f"{key} is {tuple(state[key].shape)}, here {tuple(own[key].shape)}"
        fused = state.get("fused_weight")
        if fused is not None and fused.shape != (self.n_out, self.in_features):
            return f"fused_weight is {tuple(fused.shape)}, here {(self.n_out, self.in_features)}"
        basis = state.get("input_basis")
        if basis is not None and basis.shape[-1] != self.in_features:
            return f"input_basis has {basis.shape[-1]} columns, here {self.in_features}"
        return None

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        """Put a state from :meth:`adapter_state` back (unmerging first)."""
        self.unmerge()
        state = dict(state)
        fused = state.pop("fused_weight", None)
        for key in ("lora_B_train", "lora_magnitude"):
            if key not in state:
                setattr(self, key, None)
        self.load_state_dict(state, strict=False)
        if fused is not None:
            fused = fused.to(self.weight)
            if self.out_index is None:
                self.weight.copy_(fused)
            else:
                self.weight[self.out_index] = fused

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"slots={self.num_slots}, adapted_out={self.lora_B.shape[0]}, "
            f"live_rows={len(self.slots.used_rows())}"
        )


def _reload_slots(layer: SubspaceLoRALinear, incompatible_keys) -> None:
    """Post-hook of ``load_state_dict``: the slot table follows the loaded buffers."""
    layer.reload_slots()
