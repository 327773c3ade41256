"""The slot table of a subspace LoRA layer: which experience owns each row of ``A``, which rows the
training slot holds, and the live rows gathered for the forward pass.

Ownership is decided on the host (choosing rows never waits for the device) and mirrored in
two buffers that are saved with the layer. The forward pass never gathers rows: it reads the
caches, which :func:`~cl_sulora.adapters.slots.rebuild_caches` refills after every change of
ownership (or once, on leaving :func:`~cl_sulora.adapters.slots.deferred_refresh`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

FREE = -1  # owner id of a free row


class SlotTable(nn.Module):
    """Ownership of a layer's ``total`` rows, and the caches of its live rows.

    Saved state: ``row_owner`` (owner id per row, :data:`FREE` for a free row) and
    ``train_rows`` (the training slot's rows, in the column order of the layer's
    ``lora_B_train``). Host mirrors: :attr:`owners` and :attr:`training_rows`.

    Caches (not saved): ``A_live`` (the live rows of ``A``: frozen owners first, the training
    slot's rows last), ``B_frozen`` (the frozen rows' ``B`` columns, scaled and placed in the
    output rows of ``W0``), ``A_train`` (the training slot's rows of ``A_live``) and
    ``magnitude_index`` (for each frozen row of ``A_live``, its owner's position among the
    learned magnitudes). :attr:`stale` says the caches lag the ownership; :attr:`deferred` says
    their rebuild waits for the end of a batch of changes. :attr:`owner_filter` restricts the
    live rows to some owners (task-aware inference).
    """

    def __init__(self, total: int, d_in: int, d_out: int, *, device: torch.device,
                 dtype: torch.dtype) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("row_owner", torch.full((total,), FREE, dtype=torch.long,
                                                     device=device))
        self.register_buffer("train_rows", torch.zeros(0, dtype=torch.long, device=device))
        self.register_buffer("A_live", torch.zeros(0, d_in, **factory), persistent=False)
        self.register_buffer("B_frozen", torch.zeros(d_out, 0, **factory), persistent=False)
        self.register_buffer("A_train", torch.zeros(0, d_in, **factory), persistent=False)
        self.register_buffer("magnitude_index",
                             torch.zeros(0, dtype=torch.long, device=device), persistent=False)
        self.owners: list[int] = [FREE] * total
        self.training_rows: list[int] = []
        self.owner_filter: frozenset[int] | None = None
        self.stale = False
        self.deferred = False

    # ------------------------------------------------------------------ queries (host only)
    @property
    def training_owner(self) -> int | None:
        """Owner of the training slot, or ``None`` when no slot trains."""
        return self.owners[self.training_rows[0]] if self.training_rows else None

    def free_rows(self) -> list[int]:
        return [row for row, owner in enumerate(self.owners) if owner == FREE]

    def used_rows(self) -> list[int]:
        return [row for row, owner in enumerate(self.owners) if owner != FREE]

    def frozen_rows(self) -> list[int]:
        """Live rows of experiences that are no longer training."""
        training = set(self.training_rows)
        return [row for row, owner in enumerate(self.owners)
                if owner != FREE and row not in training]

    def rows_of(self, owner: int) -> list[int]:
        return [row for row, o in enumerate(self.owners) if o == owner]

    def magnitude_owners(self) -> list[int]:
        """Owners of the frozen rows, ascending: the order of a layer's learned magnitudes."""
        return sorted({self.owners[row] for row in self.frozen_rows()})

    def live_rows(self) -> tuple[list[int], list[int]]:
        """The frozen and the training rows that the forward pass uses (under the owner
        filter, which must keep all or none of the training slot)."""
        allowed = self.owner_filter
        frozen = [row for row in self.frozen_rows()
                  if allowed is None or self.owners[row] in allowed]
        training = [row for row in self.training_rows
                    if allowed is None or self.owners[row] in allowed]
        if training and len(training) != len(self.training_rows):
            raise RuntimeError("an owner filter must keep all or none of the training slot")
        return frozen, training

    # ------------------------------------------------------------------ changes (host only)
    def give(self, rows: Iterable[int], owner: int) -> None:
        """Record ``owner`` for ``rows`` (``FREE`` frees them)."""
        for row in rows:
            self.owners[row] = owner

    def begin_training(self, rows: list[int], index: Tensor) -> None:
        """The training slot is ``rows``; ``index`` is the same rows on the device."""
        self.training_rows = list(rows)
        self.train_rows = index

    def end_training(self) -> None:
        self.training_rows = []
        self.train_rows = self.train_rows[:0]

    def set_owner_filter(self, owners: Iterable[int] | None) -> None:
        self.owner_filter = None if owners is None else frozenset(int(o) for o in owners)

    def reload(self) -> None:
        """Take the host mirrors from the buffers (after a state was loaded into them)."""
        self.owners = self.row_owner.tolist()
        self.training_rows = self.train_rows.tolist()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept ``train_rows`` at its saved size (empty between experiences)."""
        saved = state_dict.get(prefix + "train_rows")
        if saved is not None:
            self.train_rows = self.train_rows.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"rows={len(self.owners)}, live={len(self.used_rows())}, "
                f"training={self.training_rows}")
