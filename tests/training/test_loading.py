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


# ---------------------------------------------------------------------- evaluation cache
class CountingImages(torch.utils.data.Dataset):
    """Images of a class-specific mean; counts the items loaded."""

    def __init__(self, classes: list[int], seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.tensor(classes).repeat_interleave(6)
        self.x = torch.randn(len(classes), 3, 8, 8, generator=g)[
            self.y - min(classes)] + 0.3 * torch.randn(len(self.y), 3, 8, 8, generator=g)
        self.targets = self.y.tolist()
        self.loaded = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        self.loaded += 1
        return self.x[i], self.y[i]


def counted_stream(seed: int = 0):
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.utils import as_classification_dataset

    raw = [CountingImages([0, 1], seed), CountingImages([2, 3], seed + 1)]
    data = [as_classification_dataset(d) for d in raw]
    return with_classes_timeline(benchmark_from_datasets(train=data, test=data)), raw


def frozen_strategy(eval_cache_gb: float):
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    from cl_sulora import FrozenBackbone
    from cl_sulora.models import ContinualClassifier, make_head
    from tests.helpers import tiny_vit

    torch.manual_seed(0)
    model = ContinualClassifier(tiny_vit(), make_head("class-incremental", 32))
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    return FrozenBackbone(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                          train_mb_size=4, eval_mb_size=5, evaluator=evaluator,
                          eval_cache_gb=eval_cache_gb)


def test_later_evaluations_replay_the_first_without_loading():
    stream, raw = counted_stream()
    strategy = frozen_strategy(1.0)
    strategy.train(stream.train_stream[0])
    loaded = [d.loaded for d in raw]
    first = strategy.eval(stream.test_stream)
    assert [d.loaded - n for d, n in zip(raw, loaded, strict=True)] == [12, 12]
    again = strategy.eval(stream.test_stream)
    assert [d.loaded - n for d, n in zip(raw, loaded, strict=True)] == [12, 12]  # not reloaded
    assert again == first
    assert strategy.eval_cache.used_bytes == 2 * 12 * (3 * 8 * 8 * 4 + 8)  # images, labels


def test_a_cached_run_is_the_run_without_the_cache():
    """The same training and evaluations, with and without the cache: equal results, model
    and global random state after every step (a replay draws what a loader draws)."""
    outcomes = []
    for budget in (0.0, 1.0):
        stream, raw = counted_stream()
        strategy = frozen_strategy(budget)
        torch.manual_seed(1)
        steps = []
        for exp in stream.train_stream:
            strategy.train(exp)
            steps.append((strategy.eval(stream.test_stream), torch.get_rng_state()))
        outcomes.append((steps, strategy.model.state_dict(), sum(d.loaded for d in raw)))
    (plain, plain_model, plain_loads), (cached, cached_model, cached_loads) = outcomes
    assert cached_loads < plain_loads
    for (metrics_a, rng_a), (metrics_b, rng_b) in zip(plain, cached, strict=True):
        assert metrics_a == metrics_b and torch.equal(rng_a, rng_b)
    assert all(torch.equal(plain_model[k], cached_model[k]) for k in plain_model)


def test_each_dataset_has_its_own_batches_and_the_budget_holds():
    stream_a, _ = counted_stream(seed=0)
    stream_b, raw_b = counted_stream(seed=5)  # same positions, other data
    strategy, reference = frozen_strategy(1.0), frozen_strategy(0.0)
    for s in (strategy, reference):
        torch.manual_seed(3)
        s.train(stream_a.train_stream[0])
    strategy.eval(stream_a.test_stream)
    assert strategy.eval(stream_b.test_stream) == reference.eval(stream_b.test_stream)
    # a budget below one dataset's batches: loaded every time, nothing kept
    small = frozen_strategy(1000 / 2**30)
    small.train(stream_b.train_stream[0])
    before = raw_b[0].loaded
    small.eval(stream_b.test_stream)
    small.eval(stream_b.test_stream)
    assert raw_b[0].loaded - before == 24 and small.eval_cache.used_bytes == 0


def test_an_evaluation_stopped_part_way_keeps_nothing():
    from cl_sulora.training.loading import EvalInputCache

    cache = EvalInputCache(2**20, "cpu")
    data = TensorDataset(torch.arange(10.0), torch.arange(10))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    for _ in cache.loader(data, loader):
        break
    assert cache.used_bytes == 0
    assert [b[0].tolist() for b in cache.loader(data, loader)] == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                                  [8, 9]]
    assert cache.used_bytes == 10 * 4 + 10 * 8
    replay = cache.loader(data, loader)
    assert len(replay) == 3 and [b[1].tolist() for b in replay][-1] == [8, 9]
    with pytest.raises(ValueError, match="budget"):
        EvalInputCache(-1, "cpu")


def test_methods_passes_over_the_data_use_the_training_calls_workers(tiny, tmp_path):
    """InfLoRA's input statistics and the alignment's features load with the workers given
    to the training call, and compute exactly what a loader without workers gives."""
    from cl_sulora.runner.loop import run
    from tests.helpers import tiny_config

    records = {}
    for workers in (0, 2):
        config = tiny_config(tmp_path / str(workers), "inflora", deterministic=True, **{
            "training.num_workers": workers, "alignment.enabled": True,
            "data.num_experiences": 2})
        result = run(config)
        assert result.experiment.strategy.loader_workers == workers
        loader = result.experiment.strategy.experience_loader(
            result.experiment.spec.benchmark.train_stream[0].dataset)
        assert loader.num_workers == workers
        layers = [m for m in result.experiment.model.modules() if hasattr(m, "input_basis")]
        assert layers
        records[workers] = (result.record["accuracy_matrix"],
                            [m.input_basis.clone() for m in layers])
    assert records[0][0] == records[2][0]
    assert all(torch.equal(a, b) for a, b in zip(records[0][1], records[2][1], strict=True))
