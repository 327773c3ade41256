"""The recipes of the field's protocol (``cl_sulora/recipes/paper/``): each names its published
numbers and deviations, and each of its runs starts training on a randomly initialised
ViT-B/16 at 224 px, on generated data in its benchmark's layout, with its own settings."""

from __future__ import annotations

import math

import pytest
from avalanche.core import SupervisedPlugin

from cl_sulora.runner import resolve_config
from cl_sulora.runner.build import build_experiment
from cl_sulora.runner.recipes import available_recipes, load_recipe
from tests.helpers import write_cifar, write_image_folder

PAIRS = [(name, strategy) for name in available_recipes("paper")
         for strategy in load_recipe(name).spec.strategies]


class FirstUpdate(Exception):
    pass


class StopAfterFirstUpdate(SupervisedPlugin):
    """Records the learning rate and loss of the first update, then stops the training."""

    def after_update(self, strategy, **kwargs):
        self.lr = strategy.optimizer.param_groups[0]["lr"]
        self.loss = float(strategy.loss.detach())
        raise FirstUpdate


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-data")
    write_cifar(root / "cifar-100-python", 1, 1)
    for name in ("imagenet-r", "imagenet-a"):
        write_image_folder(root / name / "train", 1)
        write_image_folder(root / name / "test", 1)
    return root


def test_the_paper_recipes_cover_the_field_and_name_their_sources():
    assert set(available_recipes("paper")) == {
        "paper/cifar100-10", "paper/imagenet-r-5", "paper/imagenet-r-10", "paper/imagenet-r-20",
        "paper/imagenet-a-10"}
    for name in available_recipes("paper"):
        spec = load_recipe(name).spec
        assert {"sdlora", "inflora", "sulora"} <= set(spec.strategies), name
        assert spec.deviations and spec.needs == ["--data-root"], name
        assert not spec.records  # never run here: no data, no weights
        for strategy, paper in spec.published.items():
            assert "Table" in paper.source and strategy in ("sdlora", "inflora"), name
    assert load_recipe("paper/imagenet-r-10").spec.published["sdlora"].final == 77.34


@pytest.mark.parametrize("name, strategy", PAIRS)
def test_each_run_of_a_paper_recipe_starts_training_on_a_random_init_vit_b16(
        name, strategy, data_root, tmp_path):
    recipe = load_recipe(name)
    [(_, _, overrides)] = recipe.runs(seeds=[0], strategies=[strategy])
    assert overrides["backbone.pretrained"] is True and overrides["precision"] == "fp32"
    tiny = {"backbone.pretrained": False, "data.data_root": str(data_root),
            "data.num_experiences": 1, "data.limit_per_class": 1, "training.batch_size": 2,
            "training.eval_batch_size": 2, "device": "cpu", "out": str(tmp_path)}
    if strategy == "inflora":  # its input covariance over a few images, not the experience
        tiny["method.covariance_samples"] = 4
    config = resolve_config(recipe.spec.benchmark, strategy, {**overrides, **tiny})
    stop = StopAfterFirstUpdate()
    experiment = build_experiment(config, plugins=[stop])
    assert experiment.backbone.name.startswith("vit_base_patch16_224")
    assert experiment.backbone.feature_dim == 768 and experiment.backbone.image_size == 224
    assert experiment.backbone.mean == (0.0, 0.0, 0.0)  # the official loaders' [0, 1] pixels
    first = experiment.spec.benchmark.train_stream[0]
    assert first.dataset[0][0].shape == (3, 224, 224)
    with pytest.raises(FirstUpdate):
        experiment.strategy.train(first)
    training = config.training
    assert stop.lr == pytest.approx(training.first_lr or training.lr)
    assert math.isfinite(stop.loss)
