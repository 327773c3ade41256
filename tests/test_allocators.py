"""Allocators: orthonormal, disjoint rows; principal and data directions where they should be."""

import pytest
import torch
from torch import nn

from cl_sulora.allocators import DataAllocator, build_allocator
from cl_sulora.layer import SubspaceLoRALinear


def allocate_all(layer, allocator, name="layer"):
    for owner in range(layer.num_slots):
        layer.start_slot(owner, allocator.directions(name, layer, layer.rank, owner))
        layer.end_slot()


def assert_orthonormal_and_disjoint(layer):
    slots = [layer.lora_A[layer.rows_of(o)] for o in range(layer.num_slots)]
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
        alloc.prepare({"l": cov})
        dirs = alloc.directions("l", layer, 2, owner)
        layer.start_slot(owner, dirs)
        # the slot lies in the experience's own input coordinates (top two of them)
        assert dirs[:, 4 * owner: 4 * owner + 2].norm(dim=1).min() > 0.99
        layer.end_slot()
        alloc.update({"l": layer}, {"l": cov})
        # the kept input basis covers this experience's dominant directions
        basis = layer.input_basis.double()
        assert (basis @ torch.eye(d, dtype=torch.float64)[4 * owner]).norm() > 0.99
    assert_orthonormal_and_disjoint(layer)


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
