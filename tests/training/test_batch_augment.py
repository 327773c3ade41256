"""Crop + flip of whole minibatches on the training device (``data.augment_on_device``): the
per-image loader transform's own draws (a run without loader workers sees the same batches),
or seeded device draws from the same distribution, and the plugin that applies it."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from avalanche.core import SupervisedPlugin

from cl_sulora.benchmarks import build_benchmark
from cl_sulora.benchmarks.array_images import (
    BatchPadCropFlip,
    PadCropFlip,
    Uint8Normalize,
    array_image_transforms,
    chw_tensor,
)
from cl_sulora.runner.build import build_experiment, seed_everything
from cl_sulora.runner.config import resolve_config
from cl_sulora.training.plugins import BatchAugment, EpochTimer
from tests.helpers import write_cifar

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
P = 4  # padding of 32x32 images: offsets 0..8 in each direction


def key(image: torch.Tensor) -> bytes:
    return image.contiguous().numpy().tobytes()


def image(seed: int = 0) -> torch.Tensor:
    pixels = np.random.RandomState(seed).randint(0, 256, (32, 32, 3), dtype=np.uint8)
    return chw_tensor(pixels)


def all_crops(raw: torch.Tensor) -> dict[bytes, tuple[int, int, bool]]:
    """Every normalised crop + flip of a uint8 image, by (row offset, column offset, flip)."""
    normalize = Uint8Normalize(MEAN, STD)
    padded = torch.nn.functional.pad(raw, (P, P, P, P))
    crops = {}
    for i in range(2 * P + 1):
        for j in range(2 * P + 1):
            for flip in (False, True):
                crop = padded[:, i:i + 32, j:j + 32]
                crops[key(normalize(crop.flip(-1) if flip else crop))] = (i, j, flip)
    return crops


def test_batch_draws_exactly_the_per_image_crops_uniformly():
    raw = image()
    crops = all_crops(raw)
    assert len(crops) == (2 * P + 1) ** 2 * 2  # all distinct
    normalize, crop_flip = Uint8Normalize(MEAN, STD), PadCropFlip(32, P)
    torch.manual_seed(0)
    per_image = {key(normalize(crop_flip(raw))) for _ in range(3000)}
    assert per_image == set(crops)  # the loader's transform has exactly these outcomes

    augment = BatchPadCropFlip(32, P, MEAN, STD)
    batch = normalize(raw).expand(2048, -1, -1, -1)
    out = augment(batch, torch.Generator().manual_seed(0))
    drawn = Counter(crops[key(o)] for o in out)  # KeyError: not a crop of the loader's path
    assert set(drawn) == set(crops.values())
    flips = sum(n for (_, _, f), n in drawn.items() if f)
    assert 0.45 < flips / len(out) < 0.55
    for axis in (0, 1):
        per_offset = Counter()
        for draw, n in drawn.items():
            per_offset[draw[axis]] += n
        assert all(150 < per_offset[k] < 310 for k in range(2 * P + 1))  # ~2048 / 9 each


def test_each_image_of_a_batch_gets_its_own_crop():
    raws = [image(seed) for seed in range(3)]
    normalize = Uint8Normalize(MEAN, STD)
    batch = torch.stack([normalize(r) for r in raws]).repeat(64, 1, 1, 1)
    out = BatchPadCropFlip(32, P, MEAN, STD)(batch, torch.Generator().manual_seed(1))
    for k, raw in enumerate(raws):
        crops = all_crops(raw)
        assert all(key(o) in crops for o in out[k::3])
        assert len({key(o) for o in out[k::3]}) > 20


def test_padding_is_normalised_black():
    normalize = Uint8Normalize(MEAN, STD)
    black = normalize(torch.zeros(3, 1, 1, dtype=torch.uint8)).view(3)
    white = normalize(torch.full((3, 1, 1), 255, dtype=torch.uint8)).view(3)
    batch = normalize(torch.full((3, 32, 32), 255, dtype=torch.uint8)).expand(512, -1, -1, -1)
    out = BatchPadCropFlip(32, P, MEAN, STD)(batch, torch.Generator().manual_seed(0))
    is_black = (out == black.view(1, 3, 1, 1)).all(1)
    assert (is_black | (out == white.view(1, 3, 1, 1)).all(1)).all()
    corner = torch.zeros(32, 32, dtype=torch.bool)
    corner[:P] = corner[:, :P] = True  # offset (0, 0): P rows above, P columns left padded
    assert (is_black == corner).all((1, 2)).any()


def test_without_a_generator_the_batch_is_the_per_image_paths_batch():
    raws = [image(seed) for seed in range(24)]
    normalize, crop_flip = Uint8Normalize(MEAN, STD), PadCropFlip(32, P)
    torch.manual_seed(3)
    expected = torch.stack([normalize(crop_flip(raw)) for raw in raws])
    after = torch.rand(1)
    torch.manual_seed(3)
    out = BatchPadCropFlip(32, P, MEAN, STD)(torch.stack([normalize(raw) for raw in raws]))
    assert torch.equal(out, expected)
    assert torch.equal(torch.rand(1), after)  # the same draws, no more, no fewer


def test_seeded_draws_and_output_layout():
    augment = BatchPadCropFlip(32, P, MEAN, STD)
    batch = torch.randn(16, 3, 32, 32)

    def draw(seed):
        return augment(batch, torch.Generator().manual_seed(seed))

    out = draw(5)
    assert torch.equal(out, draw(5)) and not torch.equal(out, draw(6))
    assert out.shape == batch.shape and out.dtype == batch.dtype and out.is_contiguous()


def test_array_transforms_on_device_only_normalise_in_the_loader():
    normalize, same, augment = array_image_transforms(32, MEAN, STD, True, on_device=True)
    assert normalize is same and isinstance(augment, BatchPadCropFlip)
    assert (augment.size, augment.padding) == (32, P)
    raw = image()
    assert torch.equal(normalize(raw), Uint8Normalize(MEAN, STD)(raw))
    assert array_image_transforms(32, MEAN, STD, False, on_device=True)[2] is None


# ------------------------------------------------------------------------------- benchmark
@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar(root / "cifar-100-python")
    return root


def test_cifar_augment_on_device(cifar_root):
    spec = build_benchmark(
        "split-cifar100-10", data_root=cifar_root, augment_on_device=True, validation=0.4,
        num_experiences=2,
    )  # fmt: skip
    assert isinstance(spec.batch_augment, BatchPadCropFlip)
    assert spec.notes["augment_on_device"] is True and spec.notes["augment"] is True
    train = spec.benchmark.train_stream[0].dataset
    assert all(torch.equal(train[0][0], train[0][0]) for _ in range(10))  # not augmented
    assert spec.notes["train_sizes"] == [20, 20] and spec.notes["validation_sizes"] == [10, 10]
    plain = build_benchmark("split-cifar100-10", data_root=cifar_root, num_experiences=1)
    assert plain.batch_augment is None and plain.notes["augment_on_device"] is False


def test_cifar_augment_on_device_needs_augment_and_32_pixels(cifar_root):
    with pytest.raises(ValueError, match="needs augment=True.*data.augment=true"):
        build_benchmark(
            "split-cifar100-10", data_root=cifar_root, augment=False, augment_on_device=True
        )
    with pytest.raises(ValueError, match="needs 32x32 images.*image_size=16"):
        build_benchmark(
            "split-cifar100-10", data_root=cifar_root, image_size=16, augment_on_device=True
        )


# ---------------------------------------------------------------------------------- plugin
def fake_strategy(experience: int, workers: int = 2) -> SimpleNamespace:
    return SimpleNamespace(
        experience=SimpleNamespace(current_experience=experience),
        device=torch.device("cpu"), loader_workers=workers,
        mbatch=[torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))],
    )


def plugin_draw(seed: int, experience: int) -> torch.Tensor:
    plugin = BatchAugment(BatchPadCropFlip(32, P, MEAN, STD), seed=seed)
    strategy = fake_strategy(experience)
    plugin.before_training_exp(strategy)
    plugin.before_training_iteration(strategy)
    return strategy.mbatch[0]


def test_plugin_draws_are_seeded_by_seed_experience_and_rank(monkeypatch):
    first = plugin_draw(0, 1)
    assert torch.equal(first, plugin_draw(0, 1))
    assert not torch.equal(first, plugin_draw(1, 1))
    assert not torch.equal(first, plugin_draw(0, 2))
    monkeypatch.setattr("cl_sulora.training.distributed.rank", lambda: 1)
    assert not torch.equal(first, plugin_draw(0, 1))


def test_plugin_draws_as_the_loader_when_the_loader_has_no_workers():
    plugin = BatchAugment(BatchPadCropFlip(32, P, MEAN, STD), seed=0)
    plugin.before_training_exp(fake_strategy(1, workers=0))
    assert plugin.generator is None
    plugin.before_training_exp(fake_strategy(1, workers=2))
    assert plugin.generator is not None


class Inputs(SupervisedPlugin):
    """The model inputs of every training and evaluation forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.train: list[torch.Tensor] = []
        self.eval: list[torch.Tensor] = []

    def before_forward(self, strategy, **kwargs):
        self.train.append(strategy.mb_x.clone())

    def before_eval_forward(self, strategy, **kwargs):
        self.eval.append(strategy.mb_x.clone())


def test_run_augments_training_batches_only(cifar_root, tmp_path):
    tiny_vit = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 2}
    config = resolve_config(
        "split-cifar100-10",
        "sulora",
        {
            "backbone.name": "vit_small_patch16_224",
            "backbone.kwargs": tiny_vit,
            "training.epochs": 2,
            "training.batch_size": 4,
            "device": "cpu",
            "out": str(tmp_path),
            "data.data_root": str(cifar_root),
            "data.limit_per_class": 1,
            "data.num_experiences": 1,
            "data.augment_on_device": True,
        },
    )
    inputs = Inputs()
    experiment = build_experiment(config, plugins=[inputs])
    plugins = experiment.strategy.plugins
    augment = next(p for p in plugins if isinstance(p, BatchAugment))
    # every plugin that sees the batches comes after the augmentation (the learning-rate
    # schedule, set at epoch start, sees none)
    runner = [p for p in plugins if isinstance(p, EpochTimer | Inputs)]
    assert augment.augment is experiment.spec.batch_augment
    assert all(plugins.index(augment) < plugins.index(p) for p in runner)
    outputs = []

    def recorded(x, generator):
        outputs.append(experiment.spec.batch_augment(x, generator))
        return outputs[-1]

    augment.augment = recorded
    stream = experiment.spec.benchmark
    experiment.strategy.train(stream.train_stream[0])
    experiment.strategy.eval(stream.test_stream[:1])
    assert len(outputs) == len(inputs.train) == 2 * 3  # 10 samples, batches of 4, 2 epochs
    assert all(torch.equal(o, x) for o, x in zip(outputs, inputs.train, strict=True))
    test = stream.test_stream[0].dataset
    expected = torch.stack([test[i][0] for i in range(len(test))])
    assert torch.equal(torch.cat(inputs.eval), expected)


def test_a_run_without_loader_workers_trains_on_the_per_image_paths_batches(cifar_root,
                                                                           tmp_path):
    """augment_on_device moves the crop + flip, not the draws: with training.num_workers=0
    the training inputs, and so the results, are those of the per-image path."""
    tiny_vit = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 2}
    runs = []
    for on_device in (False, True):
        config = resolve_config("split-cifar100-10", "sulora", {
            "backbone.name": "vit_small_patch16_224", "backbone.kwargs": tiny_vit,
            "training.epochs": 2, "training.batch_size": 4, "device": "cpu",
            "out": str(tmp_path / str(on_device)), "data.data_root": str(cifar_root),
            "data.limit_per_class": 2, "data.num_experiences": 2,
            "data.augment_on_device": on_device,
        })
        seed_everything(0)
        inputs = Inputs()
        experiment = build_experiment(config, plugins=[inputs])
        seed_everything(0)
        stream = experiment.spec.benchmark
        for experience in stream.train_stream:
            experiment.strategy.train(experience)
        head = [p.detach().clone() for p in experiment.model.parameters() if p.requires_grad]
        runs.append((inputs.train, head))
    (plain, plain_head), (moved, moved_head) = runs
    assert len(plain) == len(moved) == 2 * 2 * 5  # 2 experiences, 2 epochs, 20 images / 4
    assert all(torch.equal(a, b) for a, b in zip(plain, moved, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain_head, moved_head, strict=True))
