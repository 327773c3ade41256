"""The Python API refuses what would go wrong silently, with errors that say what to fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cl_sulora
from cl_sulora import (
    BranchLoRAConfig,
    JointLoRA,
    SDLoRA,
    SDLoRAConfig,
    SubspaceLoRAConfig,
    SuLoRA,
)
from cl_sulora.adapters.injection import adapter_config
from cl_sulora.methods import METHODS
from cl_sulora.models import ContinualClassifier, make_head
from tests.helpers import image_stream, tiny_vit


class MLP(nn.Module):
    """A model whose head is not called head or classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU())
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc(self.body(x))


def optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def test_trainable_modules_that_name_nothing_are_refused_before_adapting():
    model = MLP()
    with pytest.raises(ValueError, match=r"trainable_modules \['head', 'classifier'\].*'fc'"):
        SDLoRA(model=model, optimizer=optimizer(model),
               config=SDLoRAConfig(target_modules=["body.1"], rank=2))
    assert adapter_config(model) is None and isinstance(model.body[1], nn.Linear)
    ok = SDLoRAConfig(target_modules=["body.1"], rank=2, trainable_modules=["fc"])
    SDLoRA(model=model, optimizer=optimizer(model), config=ok)
    assert adapter_config(model) is ok


def test_task_aware_inference_needs_a_multi_head_model():
    model = ContinualClassifier(tiny_vit(), make_head("class-incremental", 32))
    with pytest.raises(ValueError, match="needs a multi-head classifier"):
        SuLoRA(model=model, optimizer=optimizer(model), inference="task-aware")


def test_a_config_of_another_method_is_a_type_error_naming_the_expected_class():
    model = ContinualClassifier(tiny_vit(), make_head("class-incremental", 32))
    with pytest.raises(TypeError, match="config must be a SubspaceLoRAConfig, got a "
                                        "BranchLoRAConfig"):
        SuLoRA(model=model, optimizer=optimizer(model), config=BranchLoRAConfig())


@pytest.mark.parametrize("name", ["ewc", "frozen", "ranpac"])
def test_strategies_with_their_own_config_refuse_another_class(name):
    model = ContinualClassifier(tiny_vit(), make_head("class-incremental", 32))
    expected = METHODS[name].config_cls.__name__
    with pytest.raises(TypeError, match=f"expected a {expected}, got a SDLoRAConfig"):
        METHODS[name].strategy(model=model, optimizer=optimizer(model), config=SDLoRAConfig())


@pytest.mark.parametrize("name", ["naive", "simplecil"])
def test_strategies_without_a_config_refuse_one(name):
    model = ContinualClassifier(tiny_vit(), make_head("class-incremental", 32))
    with pytest.raises(ValueError, match="takes no config"):
        METHODS[name].strategy(model=model, optimizer=optimizer(model), config=SDLoRAConfig())


def test_joint_lora_trains_once():
    model = ContinualClassifier(tiny_vit(), make_head("class-incremental", 32))
    strategy = JointLoRA(model=model, optimizer=optimizer(model), train_mb_size=8,
                         evaluator=None, config=BranchLoRAConfig(rank=2))
    stream = image_stream().train_stream
    strategy.train(stream)
    with pytest.raises(RuntimeError, match="trains once, on the whole stream, and has"):
        strategy.train(stream)


def test_make_head_honours_num_classes():
    assert make_head("class-incremental", 8, 10).classifier.out_features == 10
    assert make_head("class-incremental", 8).classifier.out_features == 1  # grows
    assert make_head("domain-incremental", 8, 7).out_features == 7
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        make_head("class-incremental", 8, 0)


def test_every_method_config_is_exported_at_the_top():
    configs = {spec.config_cls for spec in METHODS.values() if spec.config_cls is not None}
    exported = {getattr(cl_sulora, name) for name in cl_sulora.__all__}
    assert configs <= exported and SubspaceLoRAConfig in exported


@pytest.mark.parametrize("config_class", [SubspaceLoRAConfig, BranchLoRAConfig, SDLoRAConfig])
def test_a_refused_assignment_leaves_the_config_as_it_was(config_class):
    """pydantic sets a field before the model's own checks run: a refused value must not stay
    (it would break every later assignment, and reach a strategy that never checks again)."""
    config = config_class(rank=4)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        config.rank = 0
    assert config.rank == 4
    config.alpha = 2.0  # a valid assignment still works
    assert config_class(**config.to_dict()) == config


def test_a_refused_cross_field_assignment_is_undone():
    config = SubspaceLoRAConfig(allocator="orthogonal")
    with pytest.raises(ValueError, match="data_centred_rows applies to allocator='data' only"):
        config.data_centred_rows = True
    assert config.data_centred_rows is False


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
@pytest.mark.parametrize("config_class", [SubspaceLoRAConfig, BranchLoRAConfig])
def test_a_non_finite_alpha_is_refused_before_training(config_class, alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        config_class(alpha=alpha)


def plain_naive(model, plugin):
    """``plugin`` in a plain Avalanche ``Naive``: the route that bypasses the strategies' own
    checks."""
    from avalanche.training import Naive

    return Naive(model=model, optimizer=optimizer(model), train_mb_size=8, train_epochs=1,
                 evaluator=None, plugins=[plugin])


@pytest.mark.parametrize("method", ["sulora", "inclora"])
def test_a_plugin_whose_trainable_modules_name_nothing_refuses_to_train(method):
    from cl_sulora import SuLoRAPlugin, add_branch_lora, add_subspace_lora
    from cl_sulora.methods.lora import IncLoRAPlugin

    model = ContinualClassifier(tiny_vit(), make_head("class-incremental", 32))
    if method == "sulora":
        config = SubspaceLoRAConfig(rank=2, num_slots=2, trainable_modules=["fc"])
        plugin = SuLoRAPlugin(add_subspace_lora(model, config) and config)
    else:
        config = BranchLoRAConfig(rank=2, trainable_modules=["fc"])
        plugin = IncLoRAPlugin(add_branch_lora(model, config) and config)
    with pytest.raises(ValueError, match=r"trainable_modules \['fc'\] name no module"):
        plain_naive(model, plugin).train(image_stream().train_stream[0])


def test_a_task_aware_plugin_on_a_single_head_model_refuses_to_train():
    from cl_sulora import SuLoRAPlugin, add_subspace_lora

    model = ContinualClassifier(tiny_vit(), make_head("class-incremental", 32))
    config = SubspaceLoRAConfig(rank=2, num_slots=2)
    add_subspace_lora(model, config)
    naive = plain_naive(model, SuLoRAPlugin(config, inference="task-aware"))
    with pytest.raises(ValueError, match="needs a multi-head classifier"):
        naive.train(image_stream().train_stream[0])


@pytest.mark.parametrize("groups", ["two groups", "one group with its own lr"])
def test_an_optimizer_with_per_group_settings_is_refused(groups):
    """The strategy rebuilds the optimizer each experience with its defaults: per-group
    settings would be dropped silently."""
    model = ContinualClassifier(tiny_vit(), make_head("class-incremental", 32))
    head, rest = list(model.head.parameters()), list(model.backbone.parameters())
    param_groups = ([{"params": head, "lr": 0.1}, {"params": rest}] if groups == "two groups"
                    else [{"params": head + rest, "lr": 0.1}])
    config = SubspaceLoRAConfig(rank=2, num_slots=2)
    with pytest.raises(ValueError, match=r"parameter group\(s\) with their own \['lr'\]"):
        SuLoRA(model=model, optimizer=torch.optim.AdamW(param_groups, lr=1e-3), config=config)
    SuLoRA(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=config)
