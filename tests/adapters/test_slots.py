"""Batched slot lifecycle: changing many layers at once equals changing each on its own."""

import torch
from torch import nn

from cl_sulora.adapters.slots import (
    deferred_refresh,
    end_slots,
    fuse_rows,
    point_slots,
    start_slots,
)
from cl_sulora.adapters.subspace_layer import SubspaceLoRALinear
from cl_sulora.linalg import directions_outside

SHAPES = [  # (d_in, d_out, out_index): two stackable groups and two layers of their own
    (16, 12, None), (16, 12, None), (16, 12, None),
    (16, 9, [0, 1, 2, 6, 7, 8]), (16, 9, [0, 1, 2, 6, 7, 8]),
    (16, 9, [0, 1, 2, 3, 4, 5]), (20, 12, None),
]


def make_layers() -> list[SubspaceLoRALinear]:
    torch.manual_seed(0)
    return [SubspaceLoRALinear(nn.Linear(d_in, d_out), rank=2, num_slots=3, alpha=3.0,
                               out_index=None if out is None else torch.tensor(out))
            for d_in, d_out, out in SHAPES]


def directions(layers, seed):
    g = torch.Generator().manual_seed(seed)
    return [directions_outside(torch.randn(6, layer.in_features, generator=g),
                               layer.lora_A[layer.slots.used_rows()], layer.rank)
            for layer in layers]


def train(layers, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            layer.lora_B_train.copy_(torch.randn(layer.lora_B_train.shape, generator=g))
            layer.importance_ema.copy_(torch.rand(layer.importance_ema.shape, generator=g))


def state(layer):
    tensors = {k: v.clone() for k, v in layer.state_dict().items()}
    if layer.lora_B_train is not None:
        tensors["lora_B_train"] = layer.lora_B_train.detach().clone()
    for cache in ("A_live", "B_frozen", "A_train"):
        tensors[cache] = getattr(layer.slots, cache).clone()
    return tensors, list(layer.slots.owners), list(layer.slots.training_rows)


def test_batched_lifecycle_equals_one_layer_at_a_time():
    batched, single = make_layers(), make_layers()
    x = [torch.randn(4, layer.in_features) for layer in batched]
    for owner in range(5):
        rows = directions(batched, owner)
        with deferred_refresh(batched):
            if owner >= 3:  # every slot in use: fuse two rows per layer, not the same ones
                picks = [layer.slots.frozen_rows()[i % 3: i % 3 + 2] for i, layer in
                         enumerate(batched)]
                fuse_rows(batched, picks)
            start_slots(batched, owner, None if owner % 2 else rows)
        for i, layer in enumerate(single):
            if owner >= 3:
                layer.fuse(layer.slots.frozen_rows()[i % 3: i % 3 + 2])
            layer.start_slot(owner, None if owner % 2 else rows[i])
        if owner % 2:  # started at zero rows: point them now
            point_slots(batched, rows)
            for layer, r in zip(single, rows, strict=True):
                layer.reset_training_rows(None, r)
        train(batched, owner)
        train(single, owner)
        scores = [torch.rand(2, generator=torch.Generator().manual_seed(i)) for i in range(7)]
        for a, b, xi in zip(batched, single, x, strict=True):
            torch.testing.assert_close(a(xi), b(xi), rtol=0, atol=0)
        end_slots(batched, scores)
        for layer, score in zip(single, scores, strict=True):
            layer.end_slot(score)
        for a, b in zip(batched, single, strict=True):
            (ta, oa, ra), (tb, ob, rb) = state(a), state(b)
            assert oa == ob and ra == rb
            assert ta.keys() == tb.keys()
            for key in ta:
                torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=1e-6, msg=key)
            assert a.slots.row_owner.tolist() == oa  # the host copy follows the buffer
    assert all(int(layer.num_fused) == 4 for layer in batched)


def test_fusing_different_rows_of_each_layer_frees_exactly_those():
    layers = make_layers()[:3]
    for owner in range(3):
        start_slots(layers, owner, directions(layers, owner))
        train(layers, owner)
        end_slots(layers)
    x = torch.randn(5, 16)
    before = [layer(x) for layer in layers]
    untouched = layers[2].state_dict()
    fuse_rows(layers, [[0], [2, 3], []])
    assert [layer.slots.free_rows() for layer in layers] == [[0], [2, 3], []]
    for layer, out in zip(layers, before, strict=True):  # fusion moves pairs into W0 only
        torch.testing.assert_close(layer(x), out, rtol=1e-5, atol=1e-5)
    assert [int(layer.num_fused) for layer in layers] == [1, 2, 0]
    assert layers[1].lora_A[[2, 3]].abs().max() == 0
    for key, value in layers[2].state_dict().items():
        assert torch.equal(value, untouched[key]), key
