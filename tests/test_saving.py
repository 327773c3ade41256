"""The whole continual model saves and loads exactly (adapters of every kind and the grown
head), and exports to the plain backbone."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from cl_sulora import load_model, merge_adapters, merge_and_unload, save_model
from cl_sulora.methods import METHODS
from cl_sulora.models import ContinualClassifier, make_head, split_head
from cl_sulora.training.alignment import AlignmentConfig, ClassifierAlignment
from tests.helpers import TINY_VIT, image_stream


def build(protocol: str = "class-incremental"):
    torch.manual_seed(0)
    backbone = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                                 **TINY_VIT)
    return ContinualClassifier(backbone, make_head(protocol, 48))


def split_model():
    """:func:`build`'s model with RanPAC's split head (``alignment.random_features``)."""
    model = build()
    model.head = split_head("class-incremental", 48, 16, torch.Generator().manual_seed(0))
    return model


def trained(name: str, protocol: str = "class-incremental", model=None, plugins=()):
    model = build(protocol) if model is None else model
    spec = METHODS[name]
    values = dict(spec.defaults) | ({"rank": 2, "num_slots": 4} if "sulora" in name
                                    else {"rank": 2})
    strategy = spec.strategy(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                             config=spec.config_cls(**values), train_mb_size=8, train_epochs=1,
                             evaluator=None, plugins=list(plugins),
                             **({"inference": "task-aware"} if protocol == "task-incremental"
                                and spec.task_aware_inference else {}))
    stream = image_stream(n_classes=6, n_experiences=3,
                          task_labels=protocol == "task-incremental")
    for experience in stream.train_stream:
        strategy.train(experience)
    return model.eval()


@pytest.mark.parametrize("name", ["sulora", "sdlora", "sdlora-kd", "inflora", "olora"])
def test_a_grown_model_round_trips_its_predictions_exactly(tmp_path, name):
    model = trained(name)
    save_model(model, tmp_path)
    fresh = load_model(build(), tmp_path).eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert model.head.classifier.out_features == fresh.head.classifier.out_features == 6


@pytest.mark.parametrize("name", ["sulora", "sdlora", "inclora"])
def test_a_merged_model_saves_unmerged_and_loads_with_its_predictions(tmp_path, name):
    """A merged weight already holds the update the adapter's tensors hold: saving both as they
    are would apply the update twice on loading."""
    model = trained(name)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    unmerged_state = {k: v.clone() for k, v in model.state_dict().items()}
    merged_state = merge_adapters(model).state_dict()
    assert any(not torch.equal(merged_state[k], v) for k, v in unmerged_state.items())
    save_model(model, tmp_path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in merged_state.items())
    fresh = load_model(build(), tmp_path).eval()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in unmerged_state.items())
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


def test_a_split_head_round_trips_its_solved_predictions(tmp_path):
    alignment = ClassifierAlignment(AlignmentConfig(enabled=True, fit="ridge",
                                                    random_features=16, ridges=[1.0]))
    model = trained("sulora", model=split_model(), plugins=[alignment])
    save_model(model, tmp_path)
    fresh = load_model(split_model(), tmp_path).eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert model.head.solved.classifier.out_features == fresh.head.solved.classifier.out_features
    assert fresh.head.solved.classifier.out_features == 6
    with pytest.raises(ValueError, match="loaded into a IncrementalClassifier"):
        load_model(build(), tmp_path)


def test_a_multi_head_model_round_trips_every_task(tmp_path):
    model = trained("sulora", "task-incremental")
    save_model(model, tmp_path)
    fresh = load_model(build("task-incremental"), tmp_path).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        for task in range(3):
            assert torch.equal(fresh(x, task), model(x, task))


def test_loading_into_an_adapted_or_different_model_is_refused(tmp_path):
    from cl_sulora.errors import ConfigError

    save_model(trained("sdlora"), tmp_path)
    with pytest.raises(ConfigError, match="needs a fresh model"):
        load_model(trained("sdlora"), tmp_path)
    fixed_head = ContinualClassifier(build().backbone, make_head("domain-incremental", 48, 6))
    with pytest.raises(ValueError, match="growing head, loaded into a Linear"):
        load_model(fixed_head, tmp_path)


@pytest.mark.parametrize("name", ["sulora", "sdlora"])
def test_merge_and_unload_exports_the_plain_backbone(tmp_path, name):
    model = trained(name)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = model.backbone(x)
    plain = merge_and_unload(model.backbone)
    save_file(plain.state_dict(), tmp_path / "backbone.safetensors")
    torch.manual_seed(1)
    fresh = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                              **TINY_VIT).eval()
    state = load_file(tmp_path / "backbone.safetensors")
    assert set(state) == set(fresh.state_dict())  # the keys of a fresh timm model
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)


def test_a_model_that_does_not_fit_is_refused_naming_the_tensor(tmp_path):
    from cl_sulora.errors import ConfigError

    save_model(trained("sulora"), tmp_path)
    other = ContinualClassifier(build().backbone, make_head("class-incremental", 48))
    other.head.classifier = torch.nn.Linear(40, 2)  # a head on features of another size
    with pytest.raises(ConfigError, match=r"size mismatch for head\.classifier\.weight.*"
                                          r"build a fresh model"):
        load_model(other, tmp_path)


def test_a_restored_model_under_a_new_task_aware_sulora_gives_the_original_outputs(tmp_path):
    """The slots record their owner experience, not its task: the task of each experience is
    saved with the model, and a new task-aware strategy on the restored model takes it, so each
    task is evaluated with the slots up to its own, as the strategy that trained it does (not
    with every live slot)."""
    from avalanche.core import SupervisedPlugin

    from cl_sulora import SubspaceLoRAConfig, SuLoRA
    from cl_sulora.adapters.injection import experience_tasks

    outputs: dict[int, torch.Tensor] = {}

    class Capture(SupervisedPlugin):
        def after_eval_forward(self, strategy, **kwargs):
            outputs[int(strategy.experience.task_label)] = strategy.mb_output.detach().clone()

    def strategy(model):
        return SuLoRA(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                      config=SubspaceLoRAConfig(rank=2, num_slots=3, fusion="never"),
                      inference="task-aware", train_mb_size=8, eval_mb_size=100,
                      evaluator=None, plugins=[Capture()])

    stream = image_stream(n_classes=6, n_experiences=3, task_labels=True)
    original = strategy(build("task-incremental"))
    for experience in stream.train_stream:
        original.train(experience)
    original.eval(stream.test_stream)
    expected = dict(outputs)
    save_model(original.model, tmp_path)
    restored = strategy(load_model(build("task-incremental"), tmp_path))
    assert experience_tasks(restored.model) == {0: 0, 1: 1, 2: 2}
    assert [restored.sulora.task_owners(t) for t in range(3)] == [[0], [0, 1], [0, 1, 2]]
    outputs.clear()
    restored.eval(stream.test_stream)
    assert sorted(outputs) == [0, 1, 2]
    for task in range(3):
        assert torch.equal(outputs[task], expected[task]), task
