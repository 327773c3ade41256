"""Allocators: orthonormal, disjoint rows; principal and data directions where they should be."""

import pytest
import torch
from torch import nn

from cl_sulora.adapters.subspace_layer import SubspaceLoRALinear
from cl_sulora.linalg import project_out
from cl_sulora.methods.sulora.allocators import DataAllocator, build_allocator


def allocate_all(layer, allocator, name="layer"):
    for owner in range(layer.num_slots):
        layer.start_slot(owner, allocator.directions(name, layer, layer.rank, owner))
        layer.end_slot()


def assert_orthonormal_and_disjoint(layer):
    slots = [layer.lora_A[layer.slots.rows_of(o)] for o in range(layer.num_slots)]
    for i, a in enumerate(slots):
        torch.testing.assert_close(a @ a.T, torch.eye(layer.rank), rtol=0, atol=1e-5)
        for b in slots[i + 1:]:
            assert (a @ b.T).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["orthogonal", "principal"])
def test_rows_are_orthonormal_and_disjoint_across_slots(name):
    torch.manual_seed(0)
    layer = SubspaceLoRALinear(nn.Linear(24, 10), rank=3, num_slots=8, alpha=1.0)
    allocate_all(layer, build_allocator(name))
    assert_orthonormal_and_disjoint(layer)


def test_data_allocator_rows_are_orthonormal_disjoint_and_follow_the_inputs():
    torch.manual_seed(0)
    d = 20
    layer = SubspaceLoRALinear(nn.Linear(d, 6), rank=2, num_slots=4, alpha=1.0)
    alloc = DataAllocator(energy=0.9)
    for owner in range(4):
        # experience `owner` has inputs in coordinates 4*owner .. 4*owner+3, dominated by the first
        x = torch.zeros(200, d)
        x[:, 4 * owner: 4 * owner + 4] = torch.randn(200, 4) * torch.tensor([5.0, 3.0, 0.5, 0.1])
        cov = (x.T @ x / 200).double()
        alloc.prepare({"l": layer}, {"l": cov})
        dirs = alloc.directions("l", layer, 2, owner)
        layer.start_slot(owner, dirs)
        # the slot lies in the experience's own input coordinates (top two of them)
        assert dirs[:, 4 * owner: 4 * owner + 2].norm(dim=1).min() > 0.99
        layer.end_slot()
        alloc.update({"l": layer})
        # the kept input basis covers this experience's dominant directions
        basis = layer.input_basis.double()
        assert (basis @ torch.eye(d, dtype=torch.float64)[4 * owner]).norm() > 0.99
    assert_orthonormal_and_disjoint(layer)


def _experience_cov(d, scales):
    """Input covariance of an experience whose inputs have these scales on the first axes."""
    x = torch.zeros(500, d)
    x[:, :len(scales)] = torch.randn(500, len(scales)) * torch.tensor(scales)
    return (x.T @ x / 500).double()


@pytest.mark.parametrize("keep", [False, True])
def test_data_allocator_keep_slot_rows_never_hands_out_fused_rows_again(keep):
    torch.manual_seed(0)
    d = 16
    layer = SubspaceLoRALinear(nn.Linear(d, 5), rank=2, num_slots=1, alpha=1.0)
    alloc = DataAllocator(energy=0.9, keep_slot_rows=keep)
    given = []
    for owner in range(3):
        # one dominant axis (the energy rule keeps it) and a weaker second one (it does not):
        # the slot's second row lies outside the kept basis
        alloc.prepare({"l": layer}, {"l": _experience_cov(d, [10.0, 1.0, 0.5, 0.2])})
        if owner:
            layer.fuse(layer.slots.rows_of(owner - 1))  # frees the only slot
        rows = alloc.directions("l", layer, 2, owner)
        layer.start_slot(owner, rows)
        layer.end_slot()
        alloc.update({"l": layer})
        given.append(rows)
    overlap = max((given[i] @ given[j].T).abs().max() for i in range(3) for j in range(i))
    basis = layer.input_basis.double()
    if keep:
        # every row given out is in the basis, and no row is handed out twice
        for rows in given:
            torch.testing.assert_close(project_out(rows, basis), torch.zeros_like(rows),
                                       rtol=0, atol=1e-5)  # the basis is kept in float32
        assert overlap < 1e-5
    else:
        # the freed second axis is the next experience's best direction outside the basis
        assert overlap > 0.99
        assert basis.shape[0] < 3 * 2


def test_data_keep_slot_rows_is_wired_and_needs_the_data_allocator():
    from cl_sulora.adapters.config import SubspaceLoRAConfig
    from cl_sulora.methods.sulora.plugin import SuLoRAPlugin

    plugin = SuLoRAPlugin(SubspaceLoRAConfig(allocator="data", data_keep_slot_rows=True))
    assert plugin.allocator.keep_slot_rows
    with pytest.raises(ValueError, match="data_keep_slot_rows applies to allocator='data'"):
        SubspaceLoRAConfig(allocator="orthogonal", data_keep_slot_rows=True)


def test_principal_allocator_takes_top_singular_directions_first():
    torch.manual_seed(0)
    linear = nn.Linear(12, 12)
    layer = SubspaceLoRALinear(linear, rank=2, num_slots=3, alpha=1.0)
    vh = torch.linalg.svd(linear.weight.detach().double()).Vh
    dirs = build_allocator("principal").directions("l", layer, 2, 0)
    overlap = (dirs @ vh[:2].T).abs()
    torch.testing.assert_close(overlap.max(dim=1).values, torch.ones(2, dtype=torch.float64))


def test_unknown_allocator_is_rejected():
    with pytest.raises(ValueError, match="choose one of"):
        build_allocator("random")


def reference_directions(candidates, used, n):
    """The greedy choice written plainly: project each candidate out of ``used`` and of the
    rows accepted before it, keep it when half its norm remains."""
    span = torch.linalg.svd(used.double(), full_matrices=False).Vh if used.numel() else None
    chosen = []
    for c in candidates.double():
        rows = [r for r in ([*span] if span is not None else [])] + chosen
        v = c.clone()
        for _ in range(2):
            for r in rows:
                v = v - (r @ v) * r
        if v.norm() > 0.5 * c.norm():
            chosen.append(v / v.norm())
            if len(chosen) == n:
                break
    return torch.stack(chosen)


def test_directions_outside_matches_the_plain_greedy_choice():
    from cl_sulora.linalg import directions_outside

    g = torch.Generator().manual_seed(3)
    used = torch.linalg.qr(torch.randn(30, 7, generator=g)).Q.T  # 7 orthonormal rows
    # candidates: two inside the span (rejected), then random ones
    candidates = torch.cat([used[:2] * 3, torch.randn(40, 30, generator=g)])
    got = directions_outside(candidates, used, 5)
    torch.testing.assert_close(got, reference_directions(candidates, used, 5), rtol=0,
                               atol=1e-10)
    assert (got @ used.double().T).abs().max() < 1e-12


def test_batched_allocation_equals_one_layer_at_a_time():
    torch.manual_seed(0)
    layers = {f"l{i}": SubspaceLoRALinear(nn.Linear(20, 9), rank=2, num_slots=4, alpha=1.0)
              for i in range(3)}
    layers["odd"] = SubspaceLoRALinear(nn.Linear(12, 5), rank=2, num_slots=4, alpha=1.0)
    for name in ("principal", "data"):
        alloc = build_allocator(name)
        if name == "data":
            alloc.prepare(layers, {k: torch.cov(torch.randn(layer.in_features, 50)).double()
                                   for k, layer in layers.items()})
        together = alloc.directions_for(layers, owner=0)
        for key, layer in layers.items():
            alone = alloc.directions(key, layer, layer.rank, 0)
            torch.testing.assert_close(together[key], alone, rtol=0, atol=1e-10)


def test_extend_basis_follows_the_energy_rule():
    from cl_sulora.linalg import extend_basis

    d = 10
    scales = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.1, 0.0, 0.0, 0.0, 0.0])
    cov = torch.diag(scales**2).double()
    basis = extend_basis(torch.zeros(0, d), cov, 0.95, 8)
    # 100 + 25 = 125 of 130.26 is 96%: two directions, the two largest coordinates
    assert basis.shape == (2, d)
    torch.testing.assert_close(basis @ basis.T, torch.eye(2, dtype=torch.float64))
    assert basis[:, :2].norm(dim=1).min() > 1 - 1e-9
    grown = extend_basis(basis, cov, 0.99, 8)  # keeps the basis, adds what the rule asks
    torch.testing.assert_close(grown[:2], basis)
    assert grown.shape[0] == 3


def test_data_allocator_gain_evens_out_the_energy_a_slot_can_reach():
    """The second experience's inputs lie mostly in the first one's directions: its slot, outside
    them, holds a small share of its energy and gets the gain sqrt(E_top / E_slot), capped."""
    torch.manual_seed(0)
    d = 12
    gains = {}
    for limit in (1.0, 2.0, 100.0):
        layer = SubspaceLoRALinear(nn.Linear(d, 5), rank=2, num_slots=3, alpha=1.0)
        alloc = DataAllocator(energy=0.99, gain_limit=limit)
        found = []
        for owner, scales in enumerate(([4.0, 3.0], [4.0, 3.0, 0.4, 0.3])):
            cov = _experience_cov(d, scales)
            alloc.prepare({"l": layer}, {"l": cov})
            rows = alloc.directions_for({"l": layer}, owner)
            layer.start_slot(owner, rows["l"])
            found.append(alloc.gains({"l": layer}, rows).get("l"))
            layer.end_slot()
            alloc.update({"l": layer})
        gains[limit] = found
        if limit == 100.0:
            top = torch.linalg.eigvalsh(cov)[-2:].sum()
            held = ((rows["l"] @ cov) * rows["l"]).sum()
            assert float(held / top) < 0.05
            torch.testing.assert_close(found[1], (top / held).sqrt())
    assert gains[1.0] == [None, None]  # no gain by default
    assert abs(float(gains[100.0][0]) - 1.0) < 1e-6  # the first slot has the top directions
    assert float(gains[100.0][1]) > 4.0
    assert float(gains[2.0][1]) == 2.0


def test_data_gain_limit_is_wired_and_needs_the_data_allocator():
    from cl_sulora.adapters.config import SubspaceLoRAConfig
    from cl_sulora.methods.sulora.plugin import SuLoRAPlugin

    plugin = SuLoRAPlugin(SubspaceLoRAConfig(allocator="data", data_gain_limit=8.0))
    assert plugin.allocator.gain_limit == 8.0
    with pytest.raises(ValueError, match="data_gain_limit applies to allocator='data'"):
        SubspaceLoRAConfig(allocator="principal", data_gain_limit=8.0)
    with pytest.raises(ValueError, match="data_gain_limit must be >= 1"):
        SubspaceLoRAConfig(allocator="data", data_gain_limit=0.5)


@pytest.mark.parametrize("centred", [True, False])
def test_data_centred_rows_follow_the_spread_and_keep_the_mean_direction_in_the_basis(centred):
    """Inputs with a large mean along axis 0 (little spread there) and their spread along axes 1
    and 2: uncentred, the slot takes the mean's direction; with ``centred_rows`` it takes the
    direction of most spread. Either way the kept basis, grown from ``E[x x^T]``, holds the
    mean's direction, so no later slot can take it."""
    from cl_sulora.methods.input_statistics import InputRecorder

    x = torch.randn(400, 6, generator=torch.Generator().manual_seed(0))
    x = x * torch.tensor([0.1, 2.0, 1.0, 0.01, 0.01, 0.01]) + torch.tensor([4.0, 0, 0, 0, 0, 0])
    probe = nn.Linear(6, 3)
    recorder = InputRecorder({"l": probe})
    probe(x)
    layer = SubspaceLoRALinear(nn.Linear(6, 3), rank=1, num_slots=2, alpha=1.0)
    alloc = DataAllocator(energy=0.9, centred_rows=centred)
    alloc.prepare({"l": layer}, recorder.covariances(), recorder.means())
    row = alloc.directions("l", layer, 1, 0)
    assert row[0, 1 if centred else 0].abs() > 0.99
    layer.start_slot(0, row)
    layer.end_slot()
    alloc.update({"l": layer})
    basis = layer.input_basis.double()
    assert (basis @ torch.eye(6, dtype=torch.float64)[0]).norm() > 0.99


def test_data_centred_rows_is_wired_and_needs_the_data_allocator_and_the_means():
    from cl_sulora.adapters.config import SubspaceLoRAConfig
    from cl_sulora.methods.sulora.plugin import SuLoRAPlugin

    assert SuLoRAPlugin(SubspaceLoRAConfig(allocator="data", data_centred_rows=True)
                        ).allocator.centred_rows
    assert not SuLoRAPlugin(SubspaceLoRAConfig(allocator="data")).allocator.centred_rows
    with pytest.raises(ValueError, match="data_centred_rows applies to allocator='data'"):
        SubspaceLoRAConfig(allocator="orthogonal", data_centred_rows=True)
    layer = SubspaceLoRALinear(nn.Linear(6, 3), rank=1, num_slots=2, alpha=1.0)
    with pytest.raises(ValueError, match="centred_rows needs the input means"):
        DataAllocator(centred_rows=True).prepare({"l": layer}, {"l": torch.eye(6).double()})
