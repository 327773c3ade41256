import pytest
import torch
from torch.utils.data import TensorDataset

from cl_sulora.training.distributed import ShardedBatchSampler
from cl_sulora.training.loading import EpochSpanningLoader


def epoch_batches(loader: EpochSpanningLoader) -> list[list[int]]:
    return [batch[0].tolist() for batch in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_epoch_is_one_fresh_pass_over_the_data(num_workers):
    data = TensorDataset(torch.arange(10))
    sampler = ShardedBatchSampler(10, 4, rank=0, world=1, seed=5)
    loader = EpochSpanningLoader(data, sampler, epochs=3, num_workers=num_workers)
    assert len(loader) == 3
    epochs = [epoch_batches(loader) for _ in range(3)]
    for batches in epochs:
        assert [len(b) for b in batches] == [4, 4, 2]
        assert sorted(i for b in batches for i in b) == list(range(10))
    assert epochs[0] != epochs[1] != epochs[2]  # a new permutation per epoch
    # the same passes as the sampler alone, seeded alike
    alone = ShardedBatchSampler(10, 4, rank=0, world=1, seed=5)
    assert epochs == [list(alone) for _ in range(3)]


def test_an_epoch_beyond_the_planned_ones_starts_another_round():
    data = TensorDataset(torch.arange(6))
    loader = EpochSpanningLoader(data, ShardedBatchSampler(6, 4, rank=0, world=1, seed=0),
                                 epochs=1, num_workers=1)
    for _ in range(3):
        batches = epoch_batches(loader)
        assert sorted(i for b in batches for i in b) == list(range(6))


def test_order_without_shuffle_and_the_short_batch_dropped():
    sampler = ShardedBatchSampler(10, 4, rank=0, world=1, seed=0, shuffle=False, drop_last=True)
    assert list(sampler) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    loader = EpochSpanningLoader(TensorDataset(torch.arange(10)), sampler, epochs=2)
    assert epoch_batches(loader) == epoch_batches(loader) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_planned_epochs_must_be_positive():
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        EpochSpanningLoader(TensorDataset(torch.arange(3)),
                            ShardedBatchSampler(3, 2, rank=0, world=1, seed=0), epochs=0)
