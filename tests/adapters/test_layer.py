"""SubspaceLoRALinear: the forward formula, slots, fusion, merge/unmerge."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cl_sulora.adapters.slot_table import FREE
from cl_sulora.adapters.slots import deferred_refresh
from cl_sulora.adapters.subspace_layer import SubspaceLoRALinear
from cl_sulora.linalg import directions_outside
from tests.helpers import fill_slot


def make_layer(d_in=16, d_out=12, rank=2, slots=4, out_index=None, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return SubspaceLoRALinear(nn.Linear(d_in, d_out).to(dtype), rank=rank, num_slots=slots,
                              alpha=3.0, out_index=out_index)


def full_B(layer: SubspaceLoRALinear) -> torch.Tensor:
    B = layer.lora_B.clone()
    if layer.lora_B_train is not None:
        B[:, layer.slots.train_rows] = layer.lora_B_train.detach()
    return B


def by_hand(layer: SubspaceLoRALinear, x: torch.Tensor) -> torch.Tensor:
    live = layer.slots.used_rows()
    delta = layer.scaling * (x @ layer.lora_A[live].T) @ full_B(layer)[:, live].T
    out = layer.base(x)
    if layer.out_index is None:
        return out + delta
    out[..., layer.out_index] += delta
    return out


def test_deferred_refresh_rebuilds_the_caches_once_and_forwards_stay_exact():
    eager, deferred = make_layer(), make_layer()
    x = torch.randn(3, 16)
    with deferred_refresh([deferred]):
        for owner in range(3):
            fill_slot(deferred, owner, owner + 10)
            assert deferred.slots.stale
            torch.testing.assert_close(deferred(x), by_hand(deferred, x))  # refreshed on use
            fill_slot(eager, owner, owner + 10)
            assert not eager.slots.stale
        deferred.fuse(deferred.slots.rows_of(1))
        assert deferred.slots.stale and deferred.slots.A_live.shape[0] == 6
    eager.fuse(eager.slots.rows_of(1))
    assert not deferred.slots.stale and deferred.slots.A_live.shape[0] == 4
    torch.testing.assert_close(deferred.slots.A_live, eager.slots.A_live, rtol=0, atol=0)
    torch.testing.assert_close(deferred(x), eager(x), rtol=0, atol=0)


def test_forward_matches_formula_with_frozen_and_training_slots():
    layer = make_layer()
    fill_slot(layer, 0, 1)
    fill_slot(layer, 1, 2)
    layer.start_slot(2, directions_outside(
        torch.randn(4, 16), layer.lora_A[layer.slots.used_rows()], 2))
    with torch.no_grad():
        layer.lora_B_train.normal_()
    x = torch.randn(5, 3, 16)
    torch.testing.assert_close(layer(x), by_hand(layer, x), rtol=0, atol=1e-5)


def test_a_slot_started_with_zero_rows_and_pointed_later_forwards_like_one_started_there():
    """``start_slot`` without directions (zero rows), then ``reset_training_rows(None, ...)``
    (the ``data`` allocator's order): outputs, caches and ``B`` as if the slot had started
    with the rows."""
    x = torch.randn(5, 3, 16)
    for out_index in (None, torch.tensor([0, 2, 5, 7])):
        pointed, direct = make_layer(out_index=out_index), make_layer(out_index=out_index)
        for layer in (pointed, direct):
            fill_slot(layer, 0, 1)
        dirs = directions_outside(torch.randn(4, 16), pointed.lora_A[pointed.slots.used_rows()], 2)
        pointed.start_slot(1, None)
        torch.testing.assert_close(pointed(x), by_hand(pointed, x), rtol=0, atol=1e-5)
        pointed.reset_training_rows(None, dirs)
        direct.start_slot(1, dirs)
        assert not pointed.slots.stale
        torch.testing.assert_close(pointed.slots.A_live, direct.slots.A_live, rtol=0, atol=0)
        with torch.no_grad():
            for layer in (pointed, direct):
                layer.lora_B_train.copy_(torch.arange(layer.lora_B_train.numel()).view_as(
                    layer.lora_B_train).float() / 10)
        torch.testing.assert_close(pointed(x), direct(x), rtol=0, atol=0)
        torch.testing.assert_close(pointed(x), by_hand(pointed, x), rtol=0, atol=1e-4)


def test_training_slot_is_the_only_trainable_tensor_and_gets_gradients():
    layer = make_layer()
    fill_slot(layer, 0, 1)
    layer.start_slot(1, directions_outside(
        torch.randn(4, 16), layer.lora_A[layer.slots.used_rows()], 2))
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_B_train"]
    layer(torch.randn(4, 16)).sum().backward()
    assert layer.lora_B_train.grad is not None and layer.lora_B_train.grad.abs().sum() > 0


def test_qkv_adapts_only_chosen_output_rows():
    index = torch.cat([torch.arange(0, 4), torch.arange(8, 12)])  # q and v of a 3 x 4 qkv
    layer = make_layer(d_in=16, d_out=12, out_index=index)
    fill_slot(layer, 0, 3)
    x = torch.randn(6, 16)
    diff = layer(x) - layer.base(x)
    assert diff[:, 4:8].abs().max() == 0
    assert diff[:, :4].abs().max() > 0 and diff[:, 8:].abs().max() > 0
    torch.testing.assert_close(layer(x), by_hand(layer, x), rtol=0, atol=1e-5)


def test_merge_unmerge_round_trips_exactly_and_agrees():
    layer = make_layer(out_index=torch.arange(0, 6))
    for owner in range(3):
        fill_slot(layer, owner, owner + 10)
    x = torch.randn(7, 16)
    before_w = layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    merged = layer(x)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.weight, before_w)
    assert torch.equal(layer(x), unmerged)


def test_fusion_keeps_outputs_and_frees_exactly_the_fused_rows():
    layer = make_layer()
    for owner in range(3):
        fill_slot(layer, owner, owner + 20)
    x = torch.randn(9, 16)
    before = layer(x)
    used = set(layer.slots.used_rows())
    fused = torch.tensor([0, 3])
    layer.fuse(fused)
    assert (layer(x) - before).abs().max() < 1e-5
    assert set(layer.slots.used_rows()) == used - {0, 3}
    assert (layer.slots.row_owner[fused] == FREE).all()
    assert int(layer.num_fused) == 2
    with pytest.raises(ValueError, match="free rows"):
        layer.fuse(fused)


def test_fusing_training_rows_keeps_them_owned_and_outputs_unchanged():
    layer = make_layer()
    layer.start_slot(0, directions_outside(torch.randn(4, 16), layer.lora_A[:0], 2))
    with torch.no_grad():
        layer.lora_B_train.normal_()
    x = torch.randn(4, 16)
    before = layer(x)
    layer.fuse(layer.slots.train_rows[:1])
    assert (layer(x) - before).abs().max() < 1e-5
    assert (layer.slots.row_owner[layer.slots.train_rows] == 0).all()
    assert layer.lora_B_train[:, 0].abs().max() == 0


def test_capacity_larger_than_input_dimension_is_refused():
    with pytest.raises(ValueError, match="exceeds the input dimension"):
        SubspaceLoRALinear(nn.Linear(8, 4), rank=4, num_slots=3, alpha=1.0)


def test_dtype_follows_base_weight():
    layer = make_layer(dtype=torch.float64)
    fill_slot(layer, 0, 5)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64
    assert layer(torch.randn(2, 16, dtype=torch.float64)).dtype == torch.float64


def test_owner_filter_uses_only_that_owners_rows():
    layer = make_layer()
    fill_slot(layer, 0, 30)
    fill_slot(layer, 1, 31)
    x = torch.randn(3, 16)
    layer.set_owner_filter([1])
    only_one = layer(x)
    rows = layer.slots.rows_of(1)
    expected = layer.base(x) + layer.scaling * (x @ layer.lora_A[rows].T) @ layer.lora_B[:, rows].T
    torch.testing.assert_close(only_one, expected, rtol=0, atol=1e-5)
    layer.set_owner_filter(None)
    torch.testing.assert_close(layer(x), by_hand(layer, x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qkv", [False, True])
@pytest.mark.parametrize("training_slot", [False, True])
def test_weight_path_matches_activation_path(dtype, qkv, training_slot):
    index = torch.cat([torch.arange(0, 4), torch.arange(8, 12)]) if qkv else None
    layer = make_layer(out_index=index, dtype=dtype)
    for owner in range(3):
        fill_slot(layer, owner, owner + 40)
    if training_slot:
        layer.start_slot(3, directions_outside(torch.randn(4, 16),
                                               layer.lora_A[layer.slots.used_rows()], 2))
        with torch.no_grad():
            layer.lora_B_train.normal_()
    x = torch.randn(6, 5, 16, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    with torch.no_grad():
        activations = by_hand(layer, x)
        no_grad = layer(x)  # no gradient needed: the weight path
        torch.testing.assert_close(no_grad, layer.forward_weight(x), rtol=0, atol=0)
        torch.testing.assert_close(no_grad, activations, rtol=tol, atol=tol)
        if qkv:  # k rows are exactly the base layer's
            assert torch.equal(no_grad[..., 4:8], layer.base(x)[..., 4:8])
        for owners in ([1], [0, 2]) if not training_slot else ([0, 1, 2, 3],):
            layer.set_owner_filter(owners)
            rows = [row for row in layer.slots.used_rows() if layer.slots.owners[row] in owners]
            delta = layer.scaling * (x @ layer.lora_A[rows].T) @ full_B(layer)[:, rows].T
            expected = layer.base(x)
            expected[..., index if qkv else slice(None)] += delta
            torch.testing.assert_close(layer(x), expected, rtol=tol, atol=tol)
            layer.set_owner_filter(None)
        # merging leaves in W0 exactly the weight the weight path uses
        effective = layer.effective_weight().clone()
        before = layer.weight.detach().clone()
        layer.merge()
        assert torch.equal(layer.weight, effective)
        assert torch.equal(layer(x), no_grad)
        layer.unmerge()
        assert torch.equal(layer.weight, before)
        assert torch.equal(layer(x), no_grad)
    with torch.inference_mode():
        assert torch.equal(layer(x), no_grad)
    if training_slot:  # with gradients: the same weight path, and the slot gets its gradient
        y = layer(x)
        torch.testing.assert_close(y.detach(), no_grad, rtol=0, atol=0)
        y.float().sum().backward()
        assert layer.lora_B_train.grad is not None and layer.weight.grad is None
    else:  # nothing to train: the weight path even with gradients enabled
        torch.testing.assert_close(layer(x).detach(), no_grad, rtol=0, atol=0)


def test_weight_path_under_bf16_autocast_matches_merged():
    layer = make_layer(out_index=torch.arange(0, 6))
    for owner in range(3):
        fill_slot(layer, owner, owner + 50)
    x = torch.randn(4, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
        layer.unmerge()
    assert unmerged.dtype == torch.bfloat16
    assert torch.equal(unmerged, merged)


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(8, 24),
    d_out=st.integers(2, 12),
    rank=st.integers(1, 3),
    slots=st.integers(1, 4),
    ops=st.lists(st.tuples(st.sampled_from(["add", "fuse"]), st.integers(0, 99)), max_size=12),
)
def test_any_sequence_of_slots_and_fusions_keeps_function_and_accounting(
    d_in, d_out, rank, slots, ops
):
    d_in = max(d_in, rank * slots)
    layer = make_layer(d_in=d_in, d_out=d_out, rank=rank, slots=slots)
    x = torch.randn(4, d_in)
    owner = 0
    for op, pick in ops:
        before = layer(x)
        if op == "add":
            if len(layer.slots.free_rows()) < rank:
                continue
            fill_slot(layer, owner, pick)
            owner += 1
        else:
            frozen = torch.tensor(layer.slots.frozen_rows(), dtype=torch.long)
            if frozen.numel() == 0:
                continue
            order = torch.randperm(frozen.numel(), generator=torch.Generator().manual_seed(pick))
            chosen = frozen[order]
            layer.fuse(chosen[: 1 + pick % frozen.numel()])
            assert (layer(x) - before).abs().max() < 1e-5
        free, used = len(layer.slots.free_rows()), len(layer.slots.used_rows())
        assert free >= 0 and used >= 0 and free + used == rank * slots
        A = layer.lora_A[layer.slots.used_rows()]
        torch.testing.assert_close(A @ A.T, torch.eye(used), rtol=0, atol=1e-5)
        # the host copy of the ownership never drifts from the buffers
        assert layer.slots.owners == layer.slots.row_owner.tolist()
        assert layer.slots.training_rows == layer.slots.train_rows.tolist()


def test_training_and_eval_forwards_trace_without_graph_breaks(vit_model):
    """torch.compile sees one graph: SuLoRA's and the branch layer's forwards, with frozen and
    training slots (branches with magnitudes, as SD-LoRA's), have no graph break."""
    import torch._dynamo as dynamo

    from cl_sulora.adapters.branch_layer import LoRABranch
    from cl_sulora.adapters.config import BranchLoRAConfig, SubspaceLoRAConfig
    from cl_sulora.adapters.injection import (
        add_branch_lora,
        add_subspace_lora,
        branch_lora_layers,
        subspace_lora_layers,
    )
    from tests.helpers import tiny_vit

    add_subspace_lora(vit_model, SubspaceLoRAConfig(rank=2, num_slots=4))
    for owner in range(3):
        for layer in subspace_lora_layers(vit_model).values():
            layer.start_slot(owner, directions_outside(
                torch.randn(4, layer.in_features), layer.lora_A[layer.slots.used_rows()], 2))
            if owner < 2:
                layer.end_slot(torch.rand(2))
    branchy = tiny_vit()
    add_branch_lora(branchy, BranchLoRAConfig(rank=2))
    for t in range(3):
        for layer in branch_lora_layers(branchy).values():
            layer.add_branch(LoRABranch(torch.randn(2, layer.in_features),
                                        torch.randn(layer.n_out, 2), magnitude=1.0,
                                        normalise="product", train_A=t == 2, train_B=t == 2))
    x = torch.randn(2, 3, 8, 8)
    for model in (vit_model, branchy):
        for grad in (True, False):
            dynamo.reset()
            with torch.set_grad_enabled(grad):
                explained = dynamo.explain(lambda inputs, m=model: m(inputs).sum())(x)
            assert explained.graph_break_count == 0, explained.break_reasons
    dynamo.reset()


@pytest.mark.parametrize("qkv", [False, True])
def test_training_slot_gets_the_activation_path_gradient(qkv):
    index = torch.cat([torch.arange(0, 4), torch.arange(8, 12)]) if qkv else None
    layer = make_layer(out_index=index)
    fill_slot(layer, 0, 60)
    layer.start_slot(1, directions_outside(
        torch.randn(4, 16), layer.lora_A[layer.slots.used_rows()], 2))
    with torch.no_grad():
        layer.lora_B_train.normal_()
    x = torch.randn(3, 5, 16, requires_grad=True)
    dy = torch.randn(3, 5, 12)
    (layer(x) * dy).sum().backward()
    got = (layer.lora_B_train.grad.clone(), x.grad.clone())
    layer.lora_B_train.grad = x.grad = None
    rows = layer.slots.train_rows  # the same output, written with the slot on the activations
    delta = layer.scaling * (x @ layer.lora_A[rows].T) @ layer.lora_B_train.T
    frozen = layer.slots.frozen_rows()
    delta = delta + layer.scaling * (x @ layer.lora_A[frozen].T) @ layer.lora_B[:, frozen].T
    out = layer.base(x)
    out = out.index_add(-1, index, delta) if qkv else out + delta
    (out * dy).sum().backward()
    torch.testing.assert_close(got[0], layer.lora_B_train.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], x.grad, rtol=1e-5, atol=1e-5)


def test_training_slot_filtered_out_gets_no_gradient():
    layer = make_layer()
    fill_slot(layer, 0, 61)
    layer.start_slot(1, directions_outside(
        torch.randn(4, 16), layer.lora_A[layer.slots.used_rows()], 2))
    with torch.no_grad():
        layer.lora_B_train.normal_()
    layer.set_owner_filter([0])  # the training slot is not in the forward pass
    x = torch.randn(3, 5, 16)
    y = layer(x)
    with torch.no_grad():
        expected = layer(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert not y.requires_grad and layer.lora_B_train.grad is None


def test_importance_update_follows_the_adalora_formula_for_every_layer():
    from cl_sulora.methods.sulora.importance import pair_scores, update_importance

    layers = [make_layer(seed=s) for s in range(3)]
    for i, layer in enumerate(layers[:2]):
        fill_slot(layer, 0, seed=i)
        layer.start_slot(1, directions_outside(
            torch.randn(8, 16), layer.lora_A[layer.slots.used_rows()], layer.rank))
        with torch.no_grad():
            layer.lora_B_train.normal_()
    ema = [layer.importance_ema.clone() for layer in layers[:2]]
    unc = [layer.importance_unc.clone() for layer in layers[:2]]
    for _ in range(3):
        for layer in layers[:2]:
            layer.lora_B_train.grad = torch.randn_like(layer.lora_B_train)
        update_importance(layers, 0.85, 0.7)  # the third layer has no training slot: skipped
        for i, layer in enumerate(layers[:2]):
            sensitivity = (layer.lora_B_train * layer.lora_B_train.grad).abs().detach()
            ema[i] = 0.85 * ema[i] + 0.15 * sensitivity
            unc[i] = 0.7 * unc[i] + 0.3 * (sensitivity - ema[i]).abs()
            torch.testing.assert_close(layer.importance_ema, ema[i])
            torch.testing.assert_close(layer.importance_unc, unc[i])
    assert (pair_scores(layers[0]) > 0).all()
    assert layers[2].lora_B_train is None


def test_training_gain_scales_the_slot_and_is_folded_into_B_when_it_ends():
    layer = make_layer()
    fill_slot(layer, 0, 1)
    layer.start_slot(1, directions_outside(
        torch.randn(4, 16), layer.lora_A[layer.slots.used_rows()], 2))
    layer.set_training_gain(3.0)
    with torch.no_grad():
        layer.lora_B_train.normal_()
    x = torch.randn(5, 16)
    rows = layer.slots.train_rows
    frozen = layer.slots.rows_of(0)
    want = (layer.base(x) + layer.scaling * (x @ layer.lora_A[frozen].T) @ layer.lora_B[:, frozen].T
            + layer.scaling * 3.0 * (x @ layer.lora_A[rows].T) @ layer.lora_B_train.detach().T)
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.pair_norms()[rows], 3.0 * layer.lora_B_train.norm(dim=0))
    # the gradient reaches the slot through the gain (the activation path's, as without one)
    layer(x).square().sum().backward()
    assert layer.lora_B_train.grad.abs().max() > 0
    layer.fuse(rows[:1])  # a fused training pair keeps its exact contribution
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-5)
    layer.end_slot()
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-5)  # the gain is in lora_B now
    assert float(layer.train_gain) == 1.0
    with pytest.raises(RuntimeError, match="no slot is training"):
        layer.set_training_gain(2.0)


def test_a_state_saved_without_a_training_gain_still_loads():
    layer = make_layer()
    fill_slot(layer, 0, 1)
    state = {k: v for k, v in layer.state_dict().items() if k != "train_gain"}
    other = make_layer(seed=1)
    other.load_state_dict(state)
    x = torch.randn(3, 16)
    torch.testing.assert_close(other(x), layer(x))
    assert float(other.train_gain) == 1.0
    assert other.state_mismatch({k: v for k, v in layer.adapter_state().items()
                                 if k != "train_gain"}) is None
