"""SuLoRA through Avalanche: isolation of experiences, capacity, fusion, inference modes."""

import copy
import math

import pytest
import torch
from avalanche.core import SupervisedPlugin

from cl_sulora import SubspaceLoRAConfig, SubspaceLoRALinear, subspace_lora_layers
from cl_sulora.errors import CapacityError
from cl_sulora.models import ContinualClassifier, make_head
from tests.helpers import (
    TinyBert,
    _dataset,
    domain_stream,
    image_stream,
    make_strategy,
    nc_benchmark,
    text_stream,
    tiny_vit,
)


def snapshot(model):
    return {name: {k: v.detach().clone() for k, v in layer.state_dict().items()}
            | {"weight": layer.weight.detach().clone()}
            for name, layer in subspace_lora_layers(model).items()}


def test_training_an_experience_changes_only_its_slot_and_the_head(vit_model):
    config = SubspaceLoRAConfig(rank=2, num_slots=3, fusion="never")
    bm = image_stream(n_classes=6, n_experiences=3)
    strategy = make_strategy(vit_model, config)
    strategy.train(bm.train_stream[0])
    strategy.train(bm.train_stream[1])
    before = snapshot(vit_model)
    head_before = vit_model.head.classifier.weight.detach().clone()
    frozen_backbone = {n: p.detach().clone() for n, p in vit_model.backbone.named_parameters()}
    strategy.train(bm.train_stream[2])
    after = snapshot(vit_model)
    for name, layer in subspace_lora_layers(vit_model).items():
        new_rows = layer.slots.rows_of(2)
        old_rows = layer.slots.rows_of(0) + layer.slots.rows_of(1)
        assert torch.equal(after[name]["weight"], before[name]["weight"])  # W0
        assert torch.equal(after[name]["lora_A"][old_rows], before[name]["lora_A"][old_rows])
        assert torch.equal(after[name]["lora_B"][:, old_rows], before[name]["lora_B"][:, old_rows])
        assert after[name]["lora_B"][:, new_rows].abs().sum() > 0  # the new slot trained
    for n, p in vit_model.backbone.named_parameters():
        assert torch.equal(p, frozen_backbone[n]), n
    head_after = vit_model.head.classifier.weight
    # the head grew; old classes' logits were masked, so their rows got no gradient
    assert head_after.shape[0] == 6 and torch.equal(head_after[:4], head_before[:4])


def test_more_experiences_than_slots_runs_with_when_full(vit_model):
    config = SubspaceLoRAConfig(rank=2, num_slots=2, fusion="when_full")
    bm = image_stream(n_classes=8, n_experiences=4)
    strategy = make_strategy(vit_model, config)
    for exp in bm.train_stream:
        strategy.train(exp)
    for layer in subspace_lora_layers(vit_model).values():
        assert len(layer.slots.used_rows()) <= 4
        assert int(layer.num_fused) == 4  # two experiences had to make room of 2 rows
        assert len(layer.slots.rows_of(3)) == 2


def test_more_experiences_than_slots_fails_before_training_under_never(vit_model):
    config = SubspaceLoRAConfig(rank=2, num_slots=2, fusion="never")
    bm = image_stream(n_classes=6, n_experiences=3)
    strategy = make_strategy(vit_model, config)
    weights = {n: p.detach().clone() for n, p in vit_model.named_parameters()}
    with pytest.raises(CapacityError, match="3 experiences but num_slots=2"):
        strategy.train(bm.train_stream)
    assert all(torch.equal(p, weights[n]) for n, p in vit_model.named_parameters())
    layers = subspace_lora_layers(vit_model).values()
    assert all(len(layer.slots.used_rows()) == 0 for layer in layers)


def test_fraction_policy_fuses_the_lowest_importance_pairs(vit_model):
    config = SubspaceLoRAConfig(rank=2, num_slots=4, fusion="fraction", fusion_gamma=0.5)
    bm = image_stream(n_classes=4, n_experiences=2)
    strategy = make_strategy(vit_model, config)
    strategy.train(bm.train_stream[0])
    for layer in subspace_lora_layers(vit_model).values():
        # one of the two pairs was fused: the less important one
        assert len(layer.slots.used_rows()) == 2 - math.ceil(0.5 * 2)
        assert int(layer.num_fused) == 1
        assert layer.row_importance[layer.slots.used_rows()].min() > 0


def test_a_full_adapter_fuses_exactly_its_lowest_importance_pairs(vit_model):
    """Under when_full, the new experience's slot takes the rows of the two least important
    pairs (importances set by hand, all distinct); every other pair stays where it was."""
    config = SubspaceLoRAConfig(rank=2, num_slots=2, fusion="when_full")
    bm = image_stream(n_classes=6, n_experiences=3)
    strategy = make_strategy(vit_model, config, epochs=1)
    strategy.train(bm.train_stream[0])
    strategy.train(bm.train_stream[1])
    layers = subspace_lora_layers(vit_model)
    lowest, kept = {}, {}
    g = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        importance = torch.randperm(4, generator=g).float() + 1.0
        layer.row_importance.copy_(importance)
        order = torch.argsort(importance).tolist()
        lowest[name] = sorted(order[:2])
        kept[name] = {row: layer.slots.owners[row] for row in order[2:]}
    strategy.train(bm.train_stream[2])
    for name, layer in layers.items():
        assert sorted(layer.slots.rows_of(2)) == lowest[name]
        assert {row: layer.slots.owners[row] for row in kept[name]} == kept[name]
        assert int(layer.num_fused) == 2


def test_norm_score_fuses_the_pairs_with_the_smallest_update(vit_model):
    """With fusion_score=norm, the new slot takes the rows of the two pairs whose B columns are
    smallest, whatever their recorded importance says (set here to the opposite order)."""
    config = SubspaceLoRAConfig(rank=2, num_slots=2, fusion="when_full", fusion_score="norm")
    bm = image_stream(n_classes=6, n_experiences=3)
    strategy = make_strategy(vit_model, config, epochs=1)
    strategy.train(bm.train_stream[0])
    strategy.train(bm.train_stream[1])
    layers = subspace_lora_layers(vit_model)
    smallest = {}
    g = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        norms = torch.randperm(4, generator=g).float() + 1.0
        layer.lora_B.mul_(norms / layer.lora_B.norm(dim=0))
        layer.row_importance.copy_(norms.neg() + 10.0)  # importance would fuse the others
        assert torch.allclose(layer.pair_norms(), norms)
        smallest[name] = sorted(torch.argsort(norms)[:2].tolist())
    strategy.train(bm.train_stream[2])
    for name, layer in layers.items():
        assert sorted(layer.slots.rows_of(2)) == smallest[name]
        assert int(layer.num_fused) == 2


def test_fusion_policies_choose_the_lowest_importance_frozen_rows():
    from cl_sulora.methods.sulora.fusion import build_fusion_policy
    from tests.helpers import fill_slot

    layer = SubspaceLoRALinear(torch.nn.Linear(16, 8), rank=2, num_slots=4, alpha=1.0)
    for owner in range(3):
        fill_slot(layer, owner, seed=owner)
    importance = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.0, 0.0]  # rows 6-7 free
    assert build_fusion_policy("when_full").make_room(layer, 4, importance) == [1, 5]
    assert build_fusion_policy("fraction", gamma=0.5).after_experience(layer, importance) == [
        1, 5, 3]
    assert build_fusion_policy("when_full").after_experience(layer, importance) == []


def test_importance_is_accumulated_while_training(vit_model):
    strategy = make_strategy(vit_model, SubspaceLoRAConfig(rank=2, num_slots=2))
    strategy.train(image_stream().train_stream[0])
    for layer in subspace_lora_layers(vit_model).values():
        assert (layer.row_importance[layer.slots.rows_of(0)] > 0).all()


def test_recomposition_fuses_and_reinitialises_without_changing_the_function(vit_model):
    config = SubspaceLoRAConfig(rank=2, num_slots=3, recompose_every=1, recompose_gamma=0.5)
    strategy = make_strategy(vit_model, config)
    strategy.train(image_stream().train_stream[0])
    for layer in subspace_lora_layers(vit_model).values():
        assert int(layer.num_fused) > 0  # pairs were folded into W0 during training
    # one recomposition step on a training slot with a non-zero B leaves the function unchanged
    layers = subspace_lora_layers(vit_model)
    for name, layer in layers.items():
        layer.start_slot(1, strategy.sulora.allocator.directions(name, layer, 2, 1))
        with torch.no_grad():
            layer.lora_B_train.normal_()
    strategy.optimizer = torch.optim.Adam([layer.lora_B_train for layer in layers.values()])
    x = torch.randn(4, 3, 8, 8)
    vit_model.eval()
    before = vit_model(x)
    old_A = {name: layer.lora_A[layer.slots.train_rows].clone() for name, layer in layers.items()}
    strategy.sulora.recompose(strategy)
    torch.testing.assert_close(vit_model(x), before, rtol=0, atol=1e-5)
    for name, layer in layers.items():
        changed = (layer.lora_A[layer.slots.train_rows] != old_A[name]).any(dim=1)
        assert int(changed.sum()) == 1  # ceil(0.5 * 2) pair re-initialised
        assert layer.lora_B_train[:, changed].abs().max() == 0
        a = layer.lora_A[layer.slots.used_rows()]
        torch.testing.assert_close(a @ a.T, torch.eye(a.shape[0]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backbone", ["vit", "bert"])
def test_end_to_end_class_incremental_with_avalanche_metrics(backbone):
    torch.manual_seed(0)
    if backbone == "vit":
        model = ContinualClassifier(tiny_vit(), make_head("class-incremental", 32))
        bm = image_stream()
    else:
        model = ContinualClassifier(TinyBert(), make_head("class-incremental", 32))
        bm = text_stream()
    config = SubspaceLoRAConfig(rank=2, num_slots=4, allocator="data")
    strategy = make_strategy(model, config, epochs=6)
    for exp in bm.train_stream:
        strategy.train(exp)
    metrics = strategy.eval(bm.test_stream)
    acc = metrics["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert acc > 0.4  # 4 separable classes; chance is 0.25
    assert "StreamForgetting/eval_phase/test_stream" in metrics
    assert "StreamBWT/eval_phase/test_stream" in metrics


def test_end_to_end_domain_incremental_with_fixed_head():
    torch.manual_seed(0)
    model = ContinualClassifier(tiny_vit(), make_head("domain-incremental", 32, num_classes=3))
    bm = domain_stream()
    strategy = make_strategy(model, SubspaceLoRAConfig(rank=2, num_slots=2))
    for exp in bm.train_stream:
        strategy.train(exp)
    metrics = strategy.eval(bm.test_stream)
    assert metrics["Top1_Acc_Stream/eval_phase/test_stream"] > 1 / 3
    assert all(len(layer.slots.rows_of(1)) == 2 for layer in subspace_lora_layers(model).values())


def test_task_aware_inference_uses_the_slots_up_to_the_task():
    torch.manual_seed(0)
    model = ContinualClassifier(tiny_vit(), make_head("task-incremental", 32))
    bm = image_stream(task_labels=True)
    strategy = make_strategy(model, SubspaceLoRAConfig(rank=2, num_slots=2),
                             inference="task-aware")
    for exp in bm.train_stream:
        strategy.train(exp)
    seen = []

    class Spy:
        def before_eval_iteration(self, strategy, **kwargs):
            layer = next(iter(subspace_lora_layers(strategy.model).values()))
            seen.append((int(strategy.experience.task_label), layer.slots.A_live.shape[0]))

    spy = type("SpyPlugin", (Spy, SupervisedPlugin), {})()
    strategy.plugins.append(spy)
    strategy.eval(bm.test_stream)
    assert {t for t, _ in seen} == {0, 1}
    # task 0: its own slot; task 1: slots 0 and 1, as when it trained
    assert {t: rows for t, rows in seen} == {0: 2, 1: 4}
    layer = next(iter(subspace_lora_layers(model).values()))
    assert layer.slots.A_live.shape[0] == 4  # filter cleared after evaluation


def test_task_aware_output_is_the_training_time_output_and_later_slots_stay_out():
    """Right after task t trains, its task-aware evaluation gives the outputs of the model as
    it trained (every live slot); later experiences' slots never change them."""
    torch.manual_seed(0)
    model = ContinualClassifier(tiny_vit(), make_head("task-incremental", 32))
    bm = image_stream(n_classes=6, n_experiences=3, task_labels=True)
    strategy = make_strategy(model, SubspaceLoRAConfig(rank=2, num_slots=3, fusion="never"),
                             inference="task-aware", eval_mb_size=100)
    outputs: dict[int, torch.Tensor] = {}

    class Capture(SupervisedPlugin):
        def after_eval_forward(self, strategy, **kwargs):
            outputs[int(strategy.experience.task_label)] = strategy.mb_output.detach().clone()

    strategy.plugins.append(Capture())
    trained: dict[int, torch.Tensor] = {}
    for t, exp in enumerate(bm.train_stream):
        strategy.train(exp)
        data = bm.test_stream[t].dataset.eval()
        x = torch.stack([data[i][0] for i in range(len(data))])
        model.eval()
        with torch.no_grad():  # the training-time forward: every live slot, no filter
            trained[t] = model(x, torch.full((len(x),), t))
        strategy.eval(bm.test_stream[: t + 1])
        for task in range(t + 1):
            torch.testing.assert_close(outputs[task], trained[task], rtol=0, atol=1e-6)
def test_model_already_adapted_is_used_as_is(vit_model):
    from cl_sulora import add_subspace_lora

    config = SubspaceLoRAConfig(rank=2, num_slots=2)
    add_subspace_lora(vit_model, config)
    strategy = make_strategy(vit_model, None)
    assert strategy.config == config
    with pytest.raises(ValueError, match="different SubspaceLoRAConfig"):
        make_strategy(vit_model, SubspaceLoRAConfig(rank=1, num_slots=2))


def test_data_allocator_points_the_slot_from_its_first_training_batches(vit_model,
                                                                       monkeypatch):
    """The ``data`` allocator makes no pass of its own over the data: the slot's rows stay zero
    (and its ``B`` untouched) over the first ceil(data_max_samples / batch) training batches,
    whose forward passes (under the training autocast) give the covariance the rows are then
    drawn from; the covariance equals that of those batches' inputs."""
    from avalanche.core import SupervisedPlugin

    from cl_sulora.methods.input_statistics import input_covariances
    from cl_sulora.methods.sulora import SuLoRAPlugin
    from cl_sulora.training.plugins import Autocast

    class Watch(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.rows, self.b, self.batches, self.forwards = [], [], [], 0

        def before_training_iteration(self, strategy, **kwargs):
            layer = next(iter(subspace_lora_layers(strategy.model).values()))
            self.rows.append(float(layer.lora_A[layer.slots.train_rows].abs().sum()))
            self.b.append(float(layer.lora_B_train.detach().abs().sum()))
            self.batches.append(strategy.mb_x.clone())

        def before_forward(self, strategy, **kwargs):
            self.forwards += 1

    config = SubspaceLoRAConfig(rank=2, num_slots=3, allocator="data", data_max_samples=12)
    bm = image_stream(n_classes=4, n_experiences=2)  # 24 samples per experience: 3 batches
    watch = Watch()
    strategy = make_strategy(vit_model, config, epochs=1,
                             plugins=[Autocast("cpu", torch.bfloat16), watch])
    layers = subspace_lora_layers(vit_model)
    prepared, expected, dtypes = [], [], []
    prepare, point = type(strategy.sulora.allocator).prepare, SuLoRAPlugin.point_slot

    def checking_point(self, strategy):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected.append(input_covariances(
                strategy.model, layers, [(x,) for x in watch.batches[-2:]],
                lambda batch: strategy.model(batch[0]), 10**6))
        return point(self, strategy)

    monkeypatch.setattr(type(strategy.sulora.allocator), "prepare",
                        lambda self, found, c, m=None: (prepared.append(c),
                                                        prepare(self, found, c, m))[1])
    monkeypatch.setattr(SuLoRAPlugin, "point_slot", checking_point)
    handle = next(iter(layers.values())).register_forward_pre_hook(
        lambda module, inputs: dtypes.append(torch.get_autocast_dtype("cpu")
                                             if torch.is_autocast_enabled("cpu") else None))
    for experience in bm.train_stream:
        strategy.train(experience)
    handle.remove()
    assert watch.forwards == 6  # the training batches only
    assert watch.rows[0::3] == [0.0, 0.0] and watch.rows[1::3] == [0.0, 0.0]  # 2 batches >= 12
    assert all(r > 0 for r in watch.rows[2::3])
    assert watch.b[:2] == [0.0, 0.0] and watch.b[2] == 0.0  # B untouched until pointed
    assert len(prepared) == 2 and set(dtypes) == {torch.bfloat16}
    for got, want in zip(prepared, expected, strict=True):
        for name in layers:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    assert strategy.sulora.allocator._covariances == {}  # released after the experience
    for layer in layers.values():
        A = layer.lora_A[layer.slots.used_rows()].double()
        torch.testing.assert_close(A @ A.T, torch.eye(len(A), dtype=torch.float64), atol=1e-5,
                                   rtol=0)
        assert layer.input_basis.shape[0] > 0


def shared_input_stream():
    """Four experiences whose images come from one distribution (the classes differ slightly):
    each new task's top input directions are those of the earlier ones."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(8).repeat_interleave(12)
    x = (torch.randn(len(y), 3, 1, 1, generator=g) * torch.randn(3, 8, 8, generator=g)
         + 0.1 * torch.randn(8, 3, 8, 8, generator=g)[y] + 0.05 * torch.randn(len(y), 3, 8, 8,
                                                                               generator=g))
    return nc_benchmark(_dataset(x, y), _dataset(x, y), 4, task_labels=False, shuffle=False)


class BeforeSlotEnds(SupervisedPlugin):
    """Keeps ``record(strategy)`` after each experience's training; placed first among the
    plugins, it sees the slot before SuLoRA's plugin ends it."""

    def __init__(self, record):
        super().__init__()
        self.record, self.seen = record, []

    def after_training_exp(self, strategy, **kwargs):
        self.seen.append(self.record(strategy))


def strategy_watched_first(model, config, record):
    """A one-epoch SuLoRA strategy and the list of what ``record(strategy)`` returned after each
    experience's training, before the slot ended (:class:`BeforeSlotEnds`)."""
    watch = BeforeSlotEnds(record)
    strategy = make_strategy(model, config, epochs=1, plugins=[watch])
    strategy.plugins.remove(watch)
    strategy.plugins.insert(0, watch)
    return strategy, watch.seen


@pytest.mark.parametrize("keep", [True, False])
def test_fusion_never_hands_a_freed_row_out_again_with_data_keep_slot_rows(vit_model, keep):
    """Two slots for four experiences: from the third on, fusion frees a slot before each. With
    ``data_keep_slot_rows`` every row given out over the stream stays orthogonal to every other,
    fused or live, in every layer; without it a later slot takes freed directions again."""
    def training_rows(strategy):
        return {name: layer.lora_A[list(layer.slots.training_rows)].detach().double()
                for name, layer in subspace_lora_layers(strategy.model).items()}

    config = SubspaceLoRAConfig(rank=2, num_slots=2, allocator="data", data_energy=0.5,
                                data_max_samples=8, data_keep_slot_rows=keep)
    strategy, given = strategy_watched_first(vit_model, config, training_rows)
    for experience in shared_input_stream().train_stream:
        strategy.train(experience)
    assert len(given) == 4
    overlaps = []
    for name in given[0]:
        stacked = torch.cat([rows[name] for rows in given])
        gram = stacked @ stacked.T
        overlaps.append(float((gram - torch.diag(gram.diagonal())).abs().max()))
    if keep:
        assert max(overlaps) < 1e-4
    else:
        assert max(overlaps) > 0.1


@pytest.mark.parametrize("limit", [1.0, 20.0])
def test_data_gain_limit_trains_later_slots_with_a_gain_folded_in_at_their_end(vit_model, limit):
    """On a stream whose tasks share their inputs, the data allocator's later slots hold little
    of their experience's input energy: with ``data_gain_limit`` they train with a gain above
    one (the first slot, on its experience's top directions, with none), and the model's
    output is the same just before and just after the slot ends."""
    probe = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def gains_and_output(strategy):
        layers = subspace_lora_layers(strategy.model).values()
        strategy.model.eval()
        with torch.no_grad():
            return [float(layer.train_gain) for layer in layers], strategy.model(probe)

    config = SubspaceLoRAConfig(rank=2, num_slots=4, allocator="data", data_energy=0.9,
                                data_max_samples=8, data_gain_limit=limit)
    strategy, seen = strategy_watched_first(vit_model, config, gains_and_output)
    for experience in shared_input_stream().train_stream:
        strategy.train(experience)
        strategy.model.eval()
        with torch.no_grad():
            torch.testing.assert_close(strategy.model(probe), seen[-1][1])
        assert all(float(layer.train_gain) == 1.0
                   for layer in subspace_lora_layers(strategy.model).values())
    gains = [gain for gain, _ in seen]
    assert max(gains[0]) < 1.01
    later = [gain for exp in gains[1:] for gain in exp]
    if limit == 1.0:
        assert max(later) == 1.0
    else:
        assert min(later) >= 1.0 and max(later) > 2.0 and max(later) <= limit


def test_data_centred_rows_reach_the_slots_through_the_plugin(vit_model):
    """With ``data_centred_rows`` the plugin hands the recorded means to the allocator: on the
    same model and inputs, the first slot's rows differ from the uncentred ones."""
    def training_rows(strategy):
        return {name: layer.lora_A[list(layer.slots.training_rows)].detach().double().clone()
                for name, layer in subspace_lora_layers(strategy.model).items()}

    seen = {}
    for centred in (False, True):
        config = SubspaceLoRAConfig(rank=2, num_slots=2, allocator="data", data_energy=0.5,
                                    data_max_samples=8, data_centred_rows=centred)
        strategy, given = strategy_watched_first(copy.deepcopy(vit_model), config, training_rows)
        strategy.train(shared_input_stream().train_stream[0])
        seen[centred] = given[0]
    moved = [float((seen[True][name] - seen[False][name]).abs().max()) for name in seen[True]]
    assert min(moved) > 1e-3
