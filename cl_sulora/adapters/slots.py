"""The slot lifecycle of :class:`~cl_sulora.adapters.subspace_layer.SubspaceLoRALinear` layers,
batched.

Starting, pointing, ending and fusing slots, and rebuilding the live-row caches, change many
layers at an experience boundary. Layers of one shape, dtype and device are changed together:
each step is one kernel on their stacked tensors (written back with one multi-tensor copy)
instead of one kernel per layer, so the cost of a boundary hardly grows with the depth of the
model. The layer's own methods (``start_slot`` ...) are these functions on one layer. The row
choices are made on the host, from each layer's slot table
(:class:`~cl_sulora.adapters.slot_table.SlotTable`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .slot_table import FREE

if TYPE_CHECKING:
    from .subspace_layer import SubspaceLoRALinear


# ---------------------------------------------------------------------- lifecycle
@torch.no_grad()
def start_slots(layers: Sequence[SubspaceLoRALinear], owner: int,
                directions: Sequence[Tensor] | None = None) -> None:
    """Give ``rank`` free rows of each layer to ``owner``, with the layer's ``directions``
    (``rank x d_in``, orthonormal and orthogonal to its rows in use) or, when ``None``, zero
    rows for slots pointed later (:func:`point_slots`). Each slot's ``B`` starts at zero and
    is trainable; so are, at one, the magnitudes of the earlier slots of layers with
    ``slot_magnitudes``."""
    chosen = []
    for layer in layers:
        layer.require_unmerged("start a slot")
        if layer.lora_B_train is not None:
            raise RuntimeError("a slot is already training: call end_slot() first")
        free = layer.slots.free_rows()
        if len(free) < layer.rank:
            raise RuntimeError(
                f"only {len(free)} free rows, a slot needs {layer.rank}: fuse old pairs first"
            )
        chosen.append(free[: layer.rank])
    for members in _batches(layers):
        group = [layers[i] for i in members]
        index = _device_index([chosen[i] for i in members], group[0])
        rows = 0.0 if directions is None else torch.stack([directions[i] for i in members])
        _assign(group, index, owner, rows)
        torch._foreach_zero_([t for layer in group
                              for t in (layer.importance_ema, layer.importance_unc)])
        for layer, rows_i, index_i in zip(group, (chosen[i] for i in members), index,
                                          strict=True):
            layer.slots.give(rows_i, owner)
            layer.slots.begin_training(rows_i, index_i.clone())  # its own storage
            layer.lora_B_train = nn.Parameter(layer.lora_B.new_zeros(layer.n_out, layer.rank))
            owners = layer.slots.magnitude_owners() if layer.slot_magnitudes else []
            if owners:
                layer.lora_magnitude = nn.Parameter(layer.lora_B.new_ones(len(owners)))
    _changed(layers)


@torch.no_grad()
def point_slots(layers: Sequence[SubspaceLoRALinear], directions: Sequence[Tensor],
                columns: Sequence[Tensor | Sequence[int]] | None = None) -> None:
    """Point training-slot columns (``columns[i]`` of layer ``i``; ``None``: all of every
    slot) at new ``directions``, their ``B`` columns and importance statistics zeroed."""
    changed: list[SubspaceLoRALinear] = []
    if columns is not None:
        for layer, local, rows in zip(layers, columns, directions, strict=True):
            _point_columns(layer, _host_list(local), rows)
            changed.append(layer)
    else:
        for members in _batches(layers):
            group = [layers[i] for i in members]
            rows = torch.stack([directions[i] for i in members]).to(group[0].lora_A)
            index = torch.stack([layer.slots.train_rows for layer in group])
            _scatter([layer.lora_A for layer in group], 0, index, rows)
            torch._foreach_zero_([t for layer in group for t in (
                layer.lora_B_train, layer.importance_ema, layer.importance_unc)])
            if all(not layer.slots.stale and layer.slots.A_train.shape[0] == layer.rank
                   for layer in group):  # the slots' cached rows, in column order
                torch._foreach_copy_([layer.slots.A_train for layer in group],
                                     list(rows.unbind()))
            else:
                changed += group
    _changed(changed)


@torch.no_grad()
def end_slots(layers: Sequence[SubspaceLoRALinear],
              importances: Sequence[Tensor] | None = None) -> None:
    """Freeze each layer's training slot: its ``B`` (with the slot's gain) becomes part of the
    buffer ``lora_B``, its pair importance (``importances[i]``, one value per column) is
    recorded, and the learned magnitudes of earlier slots are folded into their ``B``."""
    position = {id(layer): i for i, layer in enumerate(layers)}
    active = [layer for layer in layers if layer.lora_B_train is not None]
    for layer in active:
        if layer.lora_magnitude is not None:
            _fold_magnitudes(layer)
    for members in _batches(active):
        group = [active[i] for i in members]
        index = torch.stack([layer.slots.train_rows for layer in group])
        _scatter([layer.lora_B for layer in group], 1, index,
                 torch.stack([layer.lora_B_train.detach() * layer.train_gain
                              for layer in group]))
        if importances is not None:
            scores = torch.stack([importances[position[id(layer)]] for layer in group])
            _scatter([layer.row_importance for layer in group], 0, index, scores)
        for layer in group:
            layer.lora_B_train = None
            layer.train_gain.fill_(1.0)
            layer.slots.end_training()
    _changed(active)


@torch.no_grad()
def discard_slots(layers: Sequence[SubspaceLoRALinear]) -> None:
    """Throw away each layer's training slot, unfinished: its rows become free (zero ``A``,
    ``B`` and importance), its ``B`` and the earlier slots' learned magnitudes are dropped
    unfolded. For an experience whose training failed part-way."""
    active = [layer for layer in layers if layer.lora_B_train is not None]
    _free([(layer, list(layer.slots.training_rows)) for layer in active])
    for layer in active:
        layer.lora_B_train = None
        layer.lora_magnitude = None
        layer.train_gain.fill_(1.0)
        layer.importance_ema.zero_()
        layer.importance_unc.zero_()
        layer.slots.end_training()
    _changed(active)


@torch.no_grad()
def fuse_rows(layers: Sequence[SubspaceLoRALinear],
              rows: Sequence[Tensor | Sequence[int]]) -> None:
    """Fold each layer's rank-1 pairs ``rows[i]`` into its ``W0`` and free the rows.

    Frozen rows are freed; rows of the training slot are re-zeroed in ``B`` and stay owned by
    it (point them with :func:`point_slots`). Rows given as lists (or CPU tensors) cost no
    synchronisation with the device.
    """
    rows = [_host_list(r) for r in rows]
    for layer, chosen in zip(layers, rows, strict=True):
        if chosen:
            layer.require_unmerged("fuse")
            table = layer.slots
            if any(table.owners[row] == FREE for row in chosen):
                raise ValueError("cannot fuse free rows")
            if layer.lora_magnitude is not None and any(row not in table.training_rows
                                                         for row in chosen):
                raise RuntimeError("cannot fuse earlier slots while their magnitudes train: "
                                   "end the training slot first")
    pairs = [(layer, chosen) for layer, chosen in zip(layers, rows, strict=True) if chosen]
    for members in _batches([p[0] for p in pairs], key=lambda i: len(pairs[i][1])):
        group = [pairs[i][0] for i in members]
        chosen = [pairs[i][1] for i in members]
        index = _device_index(chosen, group[0])
        training = any(row in layer.slots.training_rows
                       for layer, c in zip(group, chosen, strict=True) for row in c)
        B = torch.stack([layer.full_B() if training else layer.lora_B for layer in group])
        A = torch.stack([layer.lora_A for layer in group])
        delta = torch.bmm(_take(B, 2, index) * group[0].scaling, _take(A, 1, index))
        _add_to_weights(group, delta)
        for layer, c in zip(group, chosen, strict=True):
            slot = layer.slots.training_rows
            local = [slot.index(row) for row in c if row in slot]
            if local:
                layer.lora_B_train[:, local] = 0
        _free([(layer, [row for row in c if row not in layer.slots.training_rows])
               for layer, c in zip(group, chosen, strict=True)])
        torch._foreach_add_([layer.num_fused for layer in group], [len(c) for c in chosen])
    _changed([p[0] for p in pairs])


# ---------------------------------------------------------------------- live-row caches
@torch.no_grad()
def rebuild_caches(layers: Sequence[SubspaceLoRALinear]) -> None:
    """Gather each layer's live rows into its slot table's caches: ``A_live`` (frozen owners
    first, the training slot's rows last, in its column order), ``B_frozen`` (the frozen rows'
    ``B``, scaled and placed in ``W0``'s output rows) and ``A_train``."""
    plans = []
    for layer in layers:
        layer.slots.stale = False
        frozen, training = layer.slots.live_rows()
        plans.append((len(frozen), frozen + training))
    for members in _batches(layers, key=lambda i: (plans[i][0], len(plans[i][1]))):
        group = [layers[i] for i in members]
        frozen = plans[members[0]][0]
        index = _device_index([plans[i][1] for i in members], group[0])
        A = _take(torch.stack([layer.lora_A for layer in group]), 1, index)
        B = _take(torch.stack([layer.lora_B for layer in group]), 2, index[:, :frozen])
        B = group[0].place(B * group[0].scaling)
        for layer, A_i, B_i in zip(group, A.unbind(), B.unbind(), strict=True):
            layer.slots.A_live = A_i
            layer.slots.B_frozen = B_i
            layer.slots.A_train = A_i[frozen:]
    for layer, (frozen, rows) in zip(layers, plans, strict=True):
        if layer.lora_magnitude is not None:
            layer.slots.magnitude_index = _magnitude_positions(layer, rows[:frozen])


@contextmanager
def deferred_refresh(layers: Iterable[SubspaceLoRALinear]) -> Iterator[None]:
    """Rebuild each layer's live-row caches once, on exit, rather than after every change."""
    layers = list(layers)
    for layer in layers:
        layer.slots.deferred = True
    try:
        yield
    finally:
        for layer in layers:
            layer.slots.deferred = False
        rebuild_caches([layer for layer in layers if layer.slots.stale])


def _changed(layers: Sequence[SubspaceLoRALinear]) -> None:
    """Mark the layers' caches stale and rebuild those outside :func:`deferred_refresh`."""
    for layer in layers:
        layer.slots.stale = True
    rebuild_caches([layer for layer in layers if not layer.slots.deferred])


# ---------------------------------------------------------------------- helpers
def _batches(layers: Sequence[SubspaceLoRALinear],
             key: Callable[[int], Hashable] | None = None) -> list[list[int]]:
    """Positions of ``layers`` grouped by shape, dtype, device, scaling and output rows (and
    ``key(position)``): the layers whose tensors stack."""
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        A = layer.lora_A
        k = (layer.stack_key, A.dtype, A.device, None if key is None else key(i))
        groups.setdefault(k, []).append(i)
    return list(groups.values())


def _device_index(rows: Sequence[Sequence[int]], layer: SubspaceLoRALinear) -> Tensor:
    """``L x k`` row indices on ``layer``'s device (one copy from the host, from pinned memory
    on CUDA so that it does not wait for the device)."""
    index = torch.tensor(rows, dtype=torch.long)
    device = layer.lora_A.device
    if device.type == "cuda":
        index = index.pin_memory()
    return index.to(device, non_blocking=True)


def _expand(index: Tensor, dim: int, like: Tensor) -> Tensor:
    """``L x k`` ``index`` broadcast to index dimension ``dim`` of the stacked ``like``."""
    shape = [1] * like.dim()
    shape[0], shape[dim] = index.shape
    size = list(like.shape)
    size[dim] = index.shape[1]
    return index.view(shape).expand(size)


def _take(stacked: Tensor, dim: int, index: Tensor) -> Tensor:
    """Rows (``dim`` 1) or columns (``dim`` 2) ``index[l]`` of each stacked layer ``l``."""
    return stacked.gather(dim, _expand(index, dim, stacked))


def _scatter(tensors: list[Tensor], dim: int, index: Tensor, values: Tensor | float) -> None:
    """Write ``values`` at positions ``index[l]`` along ``dim`` of each ``tensors[l]``."""
    stacked = torch.stack(tensors)
    where = _expand(index, dim + 1, stacked)
    if torch.is_tensor(values):
        stacked.scatter_(dim + 1, where, values.to(stacked))
    else:
        stacked.scatter_(dim + 1, where, values)
    torch._foreach_copy_(tensors, list(stacked.unbind()))


def _assign(group: Sequence[SubspaceLoRALinear], index: Tensor, owner: int,
            rows: Tensor | float) -> None:
    """Give rows ``index[l]`` of each stacked layer ``l`` to ``owner`` with ``A`` rows ``rows``,
    their ``B`` columns and importance zeroed (on the device; the tables follow on the host)."""
    _scatter([layer.lora_A for layer in group], 0, index, rows)
    _scatter([layer.lora_B for layer in group], 1, index, 0.0)
    _scatter([layer.slots.row_owner for layer in group], 0, index, owner)
    _scatter([layer.row_importance for layer in group], 0, index, 0.0)


def _free(pairs: list[tuple[SubspaceLoRALinear, list[int]]]) -> None:
    """Free the given frozen rows of each layer: zero ``A``, ``B`` and importance, no owner."""
    pairs = [(layer, rows) for layer, rows in pairs if rows]
    for members in _batches([p[0] for p in pairs], key=lambda i: len(pairs[i][1])):
        group = [pairs[i][0] for i in members]
        _assign(group, _device_index([pairs[i][1] for i in members], group[0]), FREE, 0.0)
        for i in members:
            layer, rows = pairs[i]
            layer.slots.give(rows, FREE)


def _add_to_weights(layers: Sequence[SubspaceLoRALinear], delta: Tensor) -> None:
    """Add each layer's ``delta`` (stacked, rows = adapted outputs) to its ``W0``."""
    weights = [layer.base.weight for layer in layers]
    if layers[0].out_index is None:
        torch._foreach_add_(weights, list(delta.unbind()))
        return
    for weight, layer, rows in zip(weights, layers, delta.unbind(), strict=True):
        weight.index_add_(0, layer.out_index, rows)


def _magnitude_positions(layer: SubspaceLoRALinear, rows: Sequence[int]) -> Tensor:
    """Position in ``layer.lora_magnitude`` of the owner of each of the frozen ``rows``."""
    table = layer.slots
    position = {owner: i for i, owner in enumerate(table.magnitude_owners())}
    return _device_index([[position[table.owners[row]] for row in rows]], layer)[0]


def _fold_magnitudes(layer: SubspaceLoRALinear) -> None:
    """Scale the frozen rows' ``B`` columns by their slots' magnitudes; drop the parameter."""
    rows = layer.slots.frozen_rows()
    columns = _device_index([rows], layer)[0]
    scale = layer.lora_magnitude.detach()[_magnitude_positions(layer, rows)]
    layer.lora_B.index_copy_(1, columns, layer.lora_B.index_select(1, columns) * scale)
    layer.lora_magnitude = None


def _point_columns(layer: SubspaceLoRALinear, columns: list[int], directions: Tensor) -> None:
    """:func:`point_slots` of some columns of one layer's slot."""
    rows = torch.tensor([layer.slots.training_rows[i] for i in columns], dtype=torch.long)
    layer.lora_A.index_copy_(0, rows.to(layer.lora_A.device), directions.to(layer.lora_A))
    layer.lora_B_train[:, columns] = 0
    layer.importance_ema[:, columns] = 0
    layer.importance_unc[:, columns] = 0


def _host_list(rows: Tensor | Sequence[int]) -> list[int]:
    """Row indices as a Python list (a device tensor is copied to the host)."""
    if torch.is_tensor(rows):
        return rows.flatten().tolist()
    return [int(row) for row in rows]
