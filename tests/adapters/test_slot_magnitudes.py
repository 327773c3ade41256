"""Learned magnitudes of earlier slots (``slot_magnitudes``): formula, gradients, folding, state."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cl_sulora import SubspaceLoRAConfig, subspace_lora_layers
from cl_sulora.adapters.serialization import adapter_state, load_adapter_state
from cl_sulora.adapters.subspace_layer import SubspaceLoRALinear
from cl_sulora.linalg import directions_outside
from tests.helpers import fill_slot, image_stream, make_strategy

QKV = torch.cat([torch.arange(0, 4), torch.arange(8, 12)])


def layer_in_third_slot(out_index=None, magnitudes=(0.5, 2.0), seed=0):
    """A layer with ``slot_magnitudes`` whose owners 0 and 1 are frozen and 2 trains, with the
    given magnitudes and a random training ``B``."""
    torch.manual_seed(seed)
    layer = SubspaceLoRALinear(nn.Linear(16, 12), rank=2, num_slots=4, alpha=3.0,
                               out_index=out_index, slot_magnitudes=True)
    fill_slot(layer, 0, seed + 1)
    fill_slot(layer, 1, seed + 2)
    layer.start_slot(2, directions_outside(
        torch.randn(4, 16), layer.lora_A[layer.slots.used_rows()], 2))
    with torch.no_grad():
        layer.lora_B_train.normal_()
        layer.lora_magnitude.copy_(torch.tensor(magnitudes))
    return layer


def by_hand(layer, x, owners=(0, 1, 2)):
    """``W0 x`` plus each owner's pairs, frozen ones times their magnitude (differentiable in
    ``lora_B_train`` and ``lora_magnitude``)."""
    delta = 0
    for owner in owners:
        rows = layer.slots.rows_of(owner)
        if owner == layer.training_owner:
            B = layer.lora_B_train
        else:
            position = layer.slots.magnitude_owners().index(owner)
            B = layer.lora_B[:, rows] * layer.lora_magnitude[position]
        delta = delta + layer.scaling * (x @ layer.lora_A[rows].T) @ B.T
    out = layer.base(x)
    return out + delta if layer.out_index is None else out.index_add(-1, layer.out_index, delta)


def test_each_earlier_slot_gets_one_trainable_magnitude_starting_at_one():
    torch.manual_seed(0)
    layer = SubspaceLoRALinear(nn.Linear(16, 12), rank=2, num_slots=4, alpha=3.0,
                               slot_magnitudes=True)
    layer.start_slot(0, directions_outside(torch.randn(4, 16), layer.lora_A[:0], 2))
    assert layer.lora_magnitude is None  # nothing earlier to scale
    layer.end_slot()
    fill_slot(layer, 1, 3)
    x = torch.randn(5, 16)
    before = layer(x)
    layer.start_slot(2, directions_outside(
        torch.randn(4, 16), layer.lora_A[layer.slots.used_rows()], 2))
    assert layer.slots.magnitude_owners() == [0, 1]
    assert torch.equal(layer.lora_magnitude, torch.ones(2)) and layer.lora_magnitude.requires_grad
    trainable = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
    assert trainable == ["lora_B_train", "lora_magnitude"]
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-6)  # new slot's B is zero


@pytest.mark.parametrize("out_index", [None, QKV])
def test_forward_and_gradients_match_the_formula(out_index):
    """The row-span backward is exact for the magnitudes too: they reach the weight only
    through the frozen rows of ``A``."""
    layer = layer_in_third_slot(out_index)
    x = torch.randn(3, 5, 16, requires_grad=True)
    dy = torch.randn(3, 5, 12)
    y = layer(x)
    (y * dy).sum().backward()
    got = [t.grad.clone() for t in (layer.lora_B_train, layer.lora_magnitude, x)]
    for t in (layer.lora_B_train, layer.lora_magnitude, x):
        t.grad = None
    expected = by_hand(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    (expected * dy).sum().backward()
    for g, t in zip(got, (layer.lora_B_train, layer.lora_magnitude, x), strict=True):
        assert t.grad.abs().sum() > 0
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-4)


def test_ending_the_slot_folds_each_magnitude_into_its_slots_b():
    layer = layer_in_third_slot(QKV)
    x = torch.randn(4, 16)
    with torch.no_grad():
        before = layer(x)
    B0, B1 = (layer.lora_B[:, layer.slots.rows_of(o)].clone() for o in (0, 1))
    layer.end_slot()
    assert layer.lora_magnitude is None
    torch.testing.assert_close(layer.lora_B[:, layer.slots.rows_of(0)], 0.5 * B0, rtol=0, atol=0)
    torch.testing.assert_close(layer.lora_B[:, layer.slots.rows_of(1)], 2.0 * B1, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)
    layer.start_slot(3, directions_outside(
        torch.randn(4, 16), layer.lora_A[layer.slots.used_rows()], 2))
    assert layer.slots.magnitude_owners() == [0, 1, 2]
    assert torch.equal(layer.lora_magnitude, torch.ones(3))  # a fresh scale for every slot


def test_owner_filter_and_merge_apply_the_magnitudes():
    layer = layer_in_third_slot()
    x = torch.randn(4, 16)
    layer.set_owner_filter([1])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), by_hand(layer, x, owners=(1,)), rtol=1e-5, atol=1e-5)
        layer.set_owner_filter(None)
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
        layer.unmerge()


def test_fusing_an_earlier_slot_while_the_magnitudes_train_is_refused():
    layer = layer_in_third_slot()
    with pytest.raises(RuntimeError, match="end the training slot first"):
        layer.fuse(layer.slots.rows_of(0))
    layer.fuse(layer.slots.training_rows[:1])  # recomposition of the training slot stays possible


def test_state_and_saved_adapters_keep_the_magnitudes_mid_experience():
    layer = layer_in_third_slot()
    x = torch.randn(4, 16)

    def fresh():
        return SubspaceLoRALinear(nn.Linear(16, 12), rank=2, num_slots=4, alpha=3.0,
                                  slot_magnitudes=True)

    loaded = fresh()
    loaded.load_state_dict(layer.state_dict())
    assert torch.equal(loaded.lora_magnitude, layer.lora_magnitude)
    torch.testing.assert_close(loaded(x), layer(x), rtol=0, atol=0)
    restored = nn.Sequential(fresh())
    restored[0].base.load_state_dict(layer.base.state_dict())
    load_adapter_state(restored, adapter_state(nn.Sequential(layer)))
    assert restored[0].lora_magnitude.requires_grad
    torch.testing.assert_close(restored(x), layer(x), rtol=0, atol=0)


def test_sulora_trains_the_earlier_slots_magnitudes_and_folds_them(vit_model):
    config = SubspaceLoRAConfig(rank=2, num_slots=3, fusion="never", slot_magnitudes=True)
    bm = image_stream(n_classes=6, n_experiences=3)
    strategy = make_strategy(vit_model, config)
    strategy.train(bm.train_stream[0])
    layers = subspace_lora_layers(vit_model)
    B0 = {name: layer.lora_B[:, layer.slots.rows_of(0)].clone() for name, layer in layers.items()}
    strategy.train(bm.train_stream[1])
    for name, layer in layers.items():
        assert layer.lora_magnitude is None  # folded at the experience's end
        scale = layer.lora_B[:, layer.slots.rows_of(0)] / B0[name]
        assert torch.allclose(scale, scale.flatten()[0])  # one magnitude for the whole slot
        assert not torch.allclose(scale, torch.ones_like(scale))  # and it was trained


@settings(max_examples=25, deadline=None)
@given(
    rank=st.integers(1, 3),
    slots=st.integers(1, 4),
    ops=st.lists(st.tuples(st.sampled_from(["add", "fuse"]), st.integers(0, 99)), max_size=10),
)
def test_any_sequence_of_slots_and_fusions_keeps_the_function_through_folding(rank, slots, ops):
    """Training a slot with random magnitudes matches the formula; ending it (folding) and
    fusing earlier slots leave the function unchanged."""
    torch.manual_seed(0)
    d_in = max(12, rank * slots)
    layer = SubspaceLoRALinear(nn.Linear(d_in, 6), rank=rank, num_slots=slots, alpha=2.0,
                               slot_magnitudes=True)
    x = torch.randn(4, d_in)
    owner = 0
    for op, pick in ops:
        if op == "add" and len(layer.slots.free_rows()) >= rank:
            g = torch.Generator().manual_seed(pick)
            used = layer.lora_A[layer.slots.used_rows()]
            layer.start_slot(owner, directions_outside(torch.randn(2 * d_in, d_in, generator=g),
                                                       used, rank))
            assert (layer.lora_magnitude is None) == (owner == 0 or not layer.slots.frozen_rows())
            with torch.no_grad():
                layer.lora_B_train.copy_(torch.randn(layer.lora_B_train.shape, generator=g))
                if layer.lora_magnitude is not None:
                    layer.lora_magnitude.copy_(
                        torch.rand(layer.lora_magnitude.shape, generator=g) * 2)
                    live = [o for o in range(owner + 1) if layer.slots.rows_of(o)]
                    torch.testing.assert_close(layer(x), by_hand(layer, x, live),
                                               rtol=1e-5, atol=1e-5)
                before = layer(x)
            layer.end_slot(torch.rand(rank, generator=g))
            owner += 1
        elif op == "fuse" and layer.slots.frozen_rows():
            before = layer(x)
            frozen = layer.slots.frozen_rows()
            layer.fuse(frozen[: 1 + pick % len(frozen)])
        else:
            continue
        assert layer.lora_magnitude is None
        torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
