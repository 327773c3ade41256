"""Classifier alignment from stored class statistics."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from avalanche.models import IncrementalClassifier, MultiTaskModule
from avalanche.models.dynamic_modules import avalanche_model_adaptation

from cl_sulora.adapters.injection import subspace_lora_layers
from cl_sulora.errors import ConfigError
from cl_sulora.models.heads import SolvedHead, make_head, split_head
from cl_sulora.runner.checkpoint import latest_checkpoint
from cl_sulora.runner.loop import Checkpointing, run
from cl_sulora.training.alignment import AlignmentConfig, ClassifierAlignment, ClassStatistics
from tests.helpers import tiny_config


@pytest.mark.parametrize("diagonal", [False, True])
def test_statistics_match_the_sample_moments(diagonal):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=g), torch.arange(3).repeat(20)
    stats = ClassStatistics(diagonal=diagonal)
    stats.add(x[:25], y[:25])
    stats.add(x[25:], y[25:])  # accumulates across batches
    gaussians = stats.gaussians(shrinkage=0.0)
    for c in range(3):
        f = x[y == c].double()
        mean, scale = gaussians[c]
        cov = torch.cov(f.T, correction=0)
        assert torch.allclose(mean, f.mean(0))
        if diagonal:
            assert torch.allclose(scale**2, cov.diagonal())
        else:
            assert torch.allclose(scale @ scale.T, cov, atol=1e-10)
    restored = ClassStatistics(diagonal=diagonal)
    restored.load_state_dict(stats.state_dict(), torch.device("cpu"))
    assert torch.equal(restored.gaussians(0.1)[2][1], stats.gaussians(0.1)[2][1])


def test_rank_deficient_covariance_still_samples():
    stats = ClassStatistics(diagonal=False)
    stats.add(torch.ones(4, 6), torch.zeros(4, dtype=torch.long))  # zero covariance
    mean, scale = stats.gaussians(shrinkage=0.0)[0]
    assert torch.isfinite(scale).all() and torch.equal(mean, torch.ones(6, dtype=torch.float64))


def test_alignment_removes_a_head_bias_towards_the_newest_classes():
    """Classes 0-1 then 2-3, each trained alone: the head favours 2-3 until it is aligned."""
    torch.manual_seed(0)
    means = 3 * torch.eye(4, 8)
    head = IncrementalClassifier(8, initial_out_features=4)
    with torch.no_grad():
        head.active_units.fill_(1)  # every class seen
        head.classifier.weight.copy_(means)
        head.classifier.bias.copy_(torch.tensor([0.0, 0.0, 12.0, 12.0]))  # recency bias
    x = means.repeat_interleave(50, 0) + torch.randn(200, 8)
    y = torch.arange(4).repeat_interleave(50)
    plugin = ClassifierAlignment(AlignmentConfig(enabled=True, epochs=5, lr=0.1))
    plugin.statistics().add(x, y)
    before = (head(x).argmax(1) == y).float().mean()
    plugin._align(head, plugin.statistics(), torch.device("cpu"), experience=1)
    after = (head(x).argmax(1) == y).float().mean()
    assert before <= 0.55 and after >= 0.9  # near the Bayes rate (about 0.95)
    assert plugin.stored_state_params() == 4 * (8 + 64)


def test_bad_alignment_settings_are_rejected(tiny, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="alignment.covariance"):
        tiny_config(tmp_path, **{"alignment.covariance": "banded"})


def test_aligned_run_records_statistics_and_resumes_identically(tiny, tmp_path):  # noqa: F811
    overrides = {"alignment.enabled": True, "alignment.epochs": 1, "deterministic": True}
    config = tiny_config(tmp_path / "a", **overrides)
    whole = run(config, checkpointing=Checkpointing(tmp_path / "ck"))
    assert whole.record["alignment_stored_params"] == 6 * (48 + 48 * 48)  # embed_dim 48
    plain = run(tiny_config(tmp_path / "b", deterministic=True))
    assert plain.record["alignment_stored_params"] is None
    assert plain.record["accuracy_matrix"] != whole.record["accuracy_matrix"]

    # Resume from the checkpoint after the second experience: same final state.
    second = sorted((tmp_path / "ck").iterdir())[-2]
    for later in sorted((tmp_path / "ck").iterdir())[-1:]:
        for f in later.iterdir():
            f.unlink()
        later.rmdir()
    assert latest_checkpoint(tmp_path / "ck").path == second
    resumed = run(tiny_config(tmp_path / "a", **overrides),
                  checkpointing=Checkpointing(tmp_path / "ck", resume=True))
    assert resumed.record["accuracy_matrix"] == whole.record["accuracy_matrix"]
    a = whole.experiment.model.state_dict()
    b = resumed.experiment.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("diagonal", [False, True])
def test_drift_compensation_moves_means_and_keeps_covariances(diagonal):
    g = torch.Generator().manual_seed(1)
    plugin = ClassifierAlignment(AlignmentConfig(enabled=True, drift_compensation=True,
                                                 covariance="diagonal" if diagonal else "full"))
    x, y = torch.randn(40, 6, generator=g), torch.arange(2).repeat(20)
    plugin.statistics().add(x, y)
    old = plugin.statistics().gaussians(0.0)
    before = torch.randn(30, 6, generator=g)
    step = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 0.25])
    plugin.compensate_drift(before, before + step)  # the whole space translated
    new = plugin.statistics().gaussians(0.0)
    for c in (0, 1):
        assert torch.allclose(new[c][0], old[c][0] + step.double())
        assert torch.allclose(new[c][1], old[c][1], atol=1e-9)


def test_drift_compensation_weights_nearby_samples_more():
    plugin = ClassifierAlignment(AlignmentConfig(enabled=True, drift_compensation=True,
                                                 drift_bandwidth=1.0))
    origin = torch.zeros(4, dtype=torch.long)
    plugin.statistics().add(torch.zeros(4, 2), origin)  # class 0 at the origin
    before = torch.tensor([[0.1, 0.0], [10.0, 0.0]])
    after = before + torch.tensor([[1.0, 0.0], [0.0, 5.0]])  # near moves right, far moves up
    plugin.compensate_drift(before, after)
    mean = plugin.statistics().gaussians(0.0)[0][0]
    assert mean[0] > 0.99 and abs(float(mean[1])) < 1e-6


def test_drift_compensated_run_moves_the_first_classes_statistics(tiny, tmp_path):  # noqa: F811
    base = {"alignment.enabled": True, "alignment.epochs": 1, "deterministic": True}
    plain = run(tiny_config(tmp_path / "a", **base))
    drift = run(tiny_config(tmp_path / "b", **base, **{"alignment.drift_compensation": True}))

    def stats(result):
        plugin = next(p for p in result.experiment.strategy.plugins
                      if isinstance(p, ClassifierAlignment))
        return plugin.statistics()

    a, b = stats(plain), stats(drift)
    assert a.count == b.count and len(a.count) == 6
    # experience 1's classes are identical until experience 2 trains, then only b moves them
    assert not torch.allclose(a.total[0], b.total[0])
    assert len(drift.record["accuracy_matrix"]) == 3


def test_ridge_fit_solves_the_head_from_every_experience_seen():
    """``fit="ridge"``: the head's rows are the ridge regression of one-hot targets on the
    features of both experiences (from the stored moments), the ridge RanPAC's choice on the
    newest experience; the recency bias is gone."""
    from cl_sulora.ridge import RANPAC_RIDGES, select_ridge
    from cl_sulora.seeding import keyed_generator

    torch.manual_seed(0)
    means = 3 * torch.eye(4, 8)
    x = means.repeat_interleave(50, 0) + torch.randn(200, 8)
    y = torch.arange(4).repeat_interleave(50)
    head = IncrementalClassifier(8, initial_out_features=4)
    with torch.no_grad():
        head.active_units.fill_(1)
        head.classifier.bias.copy_(torch.tensor([0.0, 0.0, 12.0, 12.0]))  # recency bias
    plugin = ClassifierAlignment(AlignmentConfig(enabled=True, fit="ridge"), seed=3)
    for experience, part in enumerate((slice(0, 100), slice(100, 200))):
        plugin.statistics().add(x[part], y[part])
        plugin._solve(head, plugin.statistics(), x[part], y[part], experience)
    h, targets = x.double(), torch.nn.functional.one_hot(y).double()
    ridge = select_ridge(x[100:].double(), targets[100:], RANPAC_RIDGES, 0.8,
                         keyed_generator(3, "alignment-ridge", 1))
    expected = torch.linalg.solve(h.T @ h + ridge * torch.eye(8, dtype=torch.float64),
                                  h.T @ targets).T
    torch.testing.assert_close(head.classifier.weight, expected.float())
    assert head.classifier.bias.eq(0).all()
    assert (head(x).argmax(1) == y).float().mean() >= 0.9


def test_ridge_fit_needs_full_covariance(tiny, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="alignment.covariance=full"):
        tiny_config(tmp_path, **{"alignment.fit": "ridge", "alignment.covariance": "diagonal"})
    for ridges in ([1.0, float("inf")], [0.0], []):  # RanPAC's ridges are refused alike
        with pytest.raises(ConfigError, match="alignment.ridges"):
            tiny_config(tmp_path, **{"alignment.fit": "ridge", "alignment.ridges": ridges})
    result = run(tiny_config(tmp_path / "run", **{"alignment.enabled": True,
                                                   "alignment.fit": "ridge"}))
    head = result.experiment.model.head
    seen = head.active_units.bool()
    assert seen.sum() == 6 and head.classifier.bias[seen].eq(0).all()
    assert result.record["config"]["alignment"]["fit"] == "ridge"


def test_prototype_fit_makes_the_head_a_cosine_classifier():
    """``fit="prototype"``: each seen class's row is its mean at unit length, bias 0. Class 1's
    mean is long and close in angle to class 0's, so a head of raw means (a dot product) would
    take class 0's samples for class 1; the cosine does not. Only the means are stored, and
    they survive a state round trip."""
    torch.manual_seed(0)
    means = torch.zeros(2, 8)
    means[0, 0], means[1, :2] = 1.0, torch.tensor([4.0, 2.0])
    y = torch.arange(2).repeat_interleave(50)
    x = means[y] + 0.05 * torch.randn(100, 8)
    head = IncrementalClassifier(8, initial_out_features=2)
    with torch.no_grad():
        head.active_units.fill_(1)
        head.classifier.bias.copy_(torch.tensor([0.0, 12.0]))  # recency bias
    plugin = ClassifierAlignment(AlignmentConfig(enabled=True, fit="prototype"))
    plugin.statistics().add(x, y)
    plugin._prototypes(head, plugin.statistics())
    expected = torch.nn.functional.normalize(torch.stack([x[y == c].mean(0) for c in (0, 1)]))
    torch.testing.assert_close(head.classifier.weight, expected)
    assert head.classifier.bias.eq(0).all()
    assert (head(x).argmax(1) == y).all()
    assert ((x @ means.T).argmax(1) == y).float().mean() <= 0.5  # raw means would fail
    assert plugin.stored_state_params() == 2 * 8 and not plugin.statistics().square
    restored = ClassifierAlignment(AlignmentConfig(enabled=True, fit="prototype"))
    restored.load_state_dict(plugin.state_dict(), type("S", (), {"device": torch.device("cpu")}))
    assert torch.equal(restored.statistics().total[1], plugin.statistics().total[1])


@pytest.mark.parametrize("task_incremental", [False, True])
def test_prototype_fit_on_the_frozen_backbone_predicts_as_simplecil(tiny, tmp_path,  # noqa: F811
                                                                    task_incremental):
    """On the frozen backbone the prototype head is SimpleCIL: whatever the head learnt by SGD,
    its accuracy on every experience seen, after every experience, is SimpleCIL's (a head per
    task, task-incremental, each from its own task's classes). Tasks not trained yet have no
    prototypes, so they are not compared."""
    flags = {"data.task_incremental": task_incremental, "deterministic": True}

    def seen(result):
        return [row[:i + 1] for i, row in enumerate(result.record["accuracy_matrix"])]

    aligned = run(tiny_config(tmp_path / "a", "frozen", **flags, **{
        "alignment.enabled": True, "alignment.fit": "prototype",
        "alignment.task_heads": task_incremental}))
    simplecil = run(tiny_config(tmp_path / "b", "simplecil", **flags))
    assert seen(aligned) == seen(simplecil)
    experiment = aligned.experiment
    for task in range(3 if task_incremental else 0):  # each head from its own task's means
        dataset = experiment.spec.benchmark.train_stream[task].dataset.eval()
        x = torch.stack([dataset[i][0] for i in range(len(dataset))])
        y = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
        with torch.no_grad():
            features = experiment.model.backbone(x).double()
        means = torch.stack([features[y == c].mean(0) for c in (0, 1)])
        torch.testing.assert_close(experiment.model.head.classifiers[str(task)].classifier
                                   .weight[:2], torch.nn.functional.normalize(means).float())
    trained = run(tiny_config(tmp_path / "c", "frozen", **flags))
    assert seen(trained) != seen(simplecil)


@pytest.mark.parametrize("key", ["backbone.random_features", "alignment.random_features"])
def test_ridge_fit_on_random_features_of_the_frozen_backbone_is_ranpac(tiny, tmp_path, key):  # noqa: F811
    """RanPAC's projection (seeded by the run seed, as the ``ranpac`` strategy's) after the
    backbone (``backbone.random_features``) or under the solved head only (``alignment.
    random_features``, RanPAC's split); under the ridge fit, on the frozen backbone, the
    evaluated model is RanPAC: the same logits for every class seen. The statistics pool one
    Gram matrix of the random features (a per-class 64 x 64 square would be 6 times larger).
    With the split, training reads the backbone's own features through a plain head."""
    common = {"seed": 3, "deterministic": True}
    aligned = run(tiny_config(tmp_path / "a", "frozen", **common, **{
        key: 64, "alignment.enabled": True, "alignment.fit": "ridge",
        "alignment.ridges": [10.0]}))
    ranpac = run(tiny_config(tmp_path / "b", "ranpac", **common, **{
        "method.projection_dim": 64, "method.ridges": [10.0]}))
    stream = aligned.experiment.spec.benchmark.test_stream
    x = torch.stack([stream[i].dataset[j][0] for i in range(3) for j in range(4)])
    model = aligned.experiment.model
    with torch.no_grad():
        a, b = model.eval()(x)[:, :6], ranpac.experiment.model.eval()(x)[:, :6]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert aligned.record["alignment_stored_params"] == 6 * 64 + 64 * 64
    section, name = key.split(".")
    assert aligned.record["config"][section][name] == 64
    if section == "alignment":
        assert isinstance(model.head, SolvedHead)
        with torch.no_grad():
            trained, features = model.train()(x), model.backbone(x)
        assert model.head.trained.classifier.in_features == features.shape[1] == 48
        torch.testing.assert_close(trained, model.head.trained(features))


def test_split_head_trains_as_the_plain_head_and_changes_only_the_classifier(tiny, tmp_path):  # noqa: F811
    """Under an adapting method the projection never reaches the training loss: a run with
    ``alignment.random_features`` ends with the same backbone and adapters as the run with the
    plain ridge head (whose solved rows, masked while other classes train, are all that differ
    in its head), and evaluates differently. It resumes from a checkpoint to the same state."""
    common = {"deterministic": True, "alignment.enabled": True, "alignment.fit": "ridge",
              "alignment.ridges": [10.0]}
    split = run(tiny_config(tmp_path / "a", **common, **{"alignment.random_features": 32}),
                checkpointing=Checkpointing(tmp_path / "ck"))
    plain = run(tiny_config(tmp_path / "b", **common))
    a, b = split.experiment.model.state_dict(), plain.experiment.model.state_dict()
    backbone = [k for k in b if not k.startswith("head.")]
    assert backbone and all(torch.equal(a[k], b[k]) for k in backbone)
    assert a["head.random_features.projection"].shape == (48, 32)
    stream = split.experiment.spec.benchmark.test_stream
    x = torch.stack([stream[i].dataset[j][0] for i in range(3) for j in range(4)])
    model = split.experiment.model.eval()
    with torch.no_grad():
        features = model.backbone(x)
        solved = model.head.solved(torch.relu(features @ a["head.random_features.projection"]))
        torch.testing.assert_close(model(x), solved)
        assert not torch.allclose(model(x)[:, :6], plain.experiment.model.eval()(x)[:, :6])

    last = sorted((tmp_path / "ck").iterdir())[-1]
    for f in last.iterdir():
        f.unlink()
    last.rmdir()
    resumed = run(tiny_config(tmp_path / "a", **common, **{"alignment.random_features": 32}),
                  checkpointing=Checkpointing(tmp_path / "ck", resume=True))
    assert resumed.record["accuracy_matrix"] == split.record["accuracy_matrix"]
    c = resumed.experiment.model.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_lwf_with_the_split_head_distils_the_trained_head_also_after_a_resume(tiny, tmp_path):  # noqa: F811
    """Which part of a split head answers follows the module's mode: LwF's previous model must
    answer with the trained head, as the loss it is distilled into does, in a whole run and
    after a resume from a checkpoint (which ends in the same state)."""
    overrides = {"deterministic": True, "alignment.enabled": True, "alignment.fit": "ridge",
                 "alignment.random_features": 32}
    whole = run(tiny_config(tmp_path / "a", "lwf", **overrides),
                checkpointing=Checkpointing(tmp_path / "ck"))
    last = sorted((tmp_path / "ck").iterdir())[-1]
    for f in last.iterdir():
        f.unlink()
    last.rmdir()
    resumed = run(tiny_config(tmp_path / "a", "lwf", **overrides),
                  checkpointing=Checkpointing(tmp_path / "ck", resume=True))
    assert resumed.record["accuracy_matrix"] == whole.record["accuracy_matrix"]
    for result in (whole, resumed):
        teacher = next(p.lwf.prev_model for p in result.experiment.strategy.plugins
                       if hasattr(p, "lwf"))
        heads = [m for m in teacher.modules() if isinstance(m, SolvedHead)]
        assert len(heads) == 1 and heads[0].training


def test_split_head_is_made_and_grown_without_touching_the_random_state():
    """So a run with the split head draws the same random numbers as one without it."""
    experience = SimpleNamespace(classes_in_this_experience=[0, 1, 2], task_labels=[0])
    draws = []
    for split in (False, True):
        torch.manual_seed(0)
        head = (split_head("class-incremental", 8, 16, torch.Generator().manual_seed(1))
                if split else make_head("class-incremental", 8))
        avalanche_model_adaptation(head, experience)
        draws.append(torch.rand(4))
        if split:
            assert head.solved.classifier.out_features == head.trained.classifier.out_features
            assert head.trained.classifier.out_features == 3
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"alignment.fit": "sampled"}, "alignment.fit=ridge"),
    ({"alignment.enabled": False}, "alignment.enabled=true"),
    ({"backbone.random_features": 16}, "backbone.random_features"),
    ({"alignment.task_heads": True}, "alignment.task_heads"),
])
def test_bad_split_head_settings_are_rejected(tiny, tmp_path, overrides, field):  # noqa: F811
    settings = {"alignment.enabled": True, "alignment.fit": "ridge",
                "alignment.random_features": 16, **overrides}
    with pytest.raises(ConfigError, match=field):
        tiny_config(tmp_path, **settings)


def test_split_head_is_refused_on_a_task_incremental_stream_before_training(tiny, tmp_path):  # noqa: F811
    config = tiny_config(tmp_path, **{"data.task_incremental": True, "alignment.enabled": True,
                                      "alignment.fit": "ridge", "alignment.random_features": 16})
    with pytest.raises(ConfigError, match="task-incremental"):
        run(config)
    assert not list(tmp_path.rglob("*.json"))


def _task_features(experiment, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Task ``task``'s training features under task-aware inference, and its labels."""
    strategy = experiment.strategy
    dataset = experiment.spec.benchmark.train_stream[task].dataset.eval()
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])
    layers = subspace_lora_layers(strategy.model)
    for layer in layers.values():
        layer.set_owner_filter(strategy.sulora.task_owners(task))
    with torch.no_grad():
        features = strategy.model.backbone(x).float()
    for layer in layers.values():
        layer.set_owner_filter(None)
    return features, y


def test_task_heads_are_each_solved_from_their_own_tasks_statistics(tiny, tmp_path):  # noqa: F811
    """Task-incremental, ``task_heads`` with ``fit="ridge"``: the labels restart at 0 in every
    task, so statistics pooled across tasks would mix three tasks' classes; each head is the
    ridge solution of its own task's features (task-aware SuLoRA: exact after training), with
    the ridge chosen on that task's experience."""
    from cl_sulora.ridge import RANPAC_RIDGES, select_ridge, solve_ridge
    from cl_sulora.seeding import keyed_generator

    overrides = {"data.task_incremental": True, "alignment.enabled": True,
                 "alignment.fit": "ridge", "alignment.task_heads": True, "seed": 5}
    result = run(tiny_config(tmp_path / "a", **overrides))
    experiment = result.experiment
    plugin = experiment.alignment
    assert sorted(plugin.tasks) == [0, 1, 2]
    # per task: two class sums and one Gram matrix (embed_dim 48)
    assert result.record["alignment_stored_params"] == 3 * (2 * 48 + 48 * 48)
    heads = experiment.model.head.classifiers
    for task in range(3):
        features, y = _task_features(experiment, task)
        stats = plugin.statistics(task)
        assert sorted(stats.count) == [0, 1] and sum(stats.count.values()) == len(y)
        h = features.double()
        torch.testing.assert_close(stats.gram_matrix(), h.T @ h)
        assert not stats.square
        targets = torch.nn.functional.one_hot(y).double()
        ridge = select_ridge(h, targets, RANPAC_RIDGES, 0.8,
                             keyed_generator(5, "alignment-ridge", task))
        expected = solve_ridge(h.T @ h, h.T @ targets, ridge).T
        linear = heads[str(task)].classifier
        torch.testing.assert_close(linear.weight[:2], expected.float(), rtol=1e-4, atol=1e-5)
        assert linear.bias[:2].eq(0).all()

    # without task_heads the heads stay as trained and nothing is stored
    plain = run(tiny_config(tmp_path / "b", **{**overrides, "alignment.task_heads": False}))
    assert plain.record["alignment_stored_params"] == 0
    assert not plain.experiment.model.head.classifiers["0"].classifier.bias[:2].eq(0).all()


class _Dataset(torch.utils.data.TensorDataset):
    def eval(self):
        return self


def test_task_heads_sampled_aligns_only_the_trained_tasks_head_on_its_own_classes():
    """Two tasks whose local labels 0 and 1 mean opposite things; each head starts with a bias
    towards label 1. After task 0, head 0 is aligned on task 0's classes; after task 1, head 1
    on task 1's (pooled statistics would mix the two tasks' class 0), and head 0 is untouched."""
    from types import SimpleNamespace

    from avalanche.models import MultiHeadClassifier

    from cl_sulora.models.heads import ContinualClassifier, grow_head

    torch.manual_seed(0)
    model = ContinualClassifier(torch.nn.Identity(), MultiHeadClassifier(8, 2, masking=False))
    grow_head(model.head, {"kind": "multi-head", "classes": {0: 2, 1: 2}})
    means = {0: 3 * torch.eye(2, 8), 1: 3 * torch.eye(2, 8).flip(0)}  # labels swapped in task 1
    y = torch.arange(2).repeat_interleave(100)
    data = {t: (means[t][y] + torch.randn(200, 8), y) for t in (0, 1)}
    for task in ("0", "1"):
        with torch.no_grad():
            model.head.classifiers[task].classifier.weight.zero_()
            model.head.classifiers[task].classifier.bias.copy_(torch.tensor([0.0, 5.0]))
    plugin = ClassifierAlignment(AlignmentConfig(enabled=True, epochs=5, lr=0.1,
                                                 task_heads=True))

    def after(task):
        x, labels = data[task]
        strategy = SimpleNamespace(
            model=model, device=torch.device("cpu"), plugins=[],
            experience=SimpleNamespace(task_label=task, current_experience=task,
                                       dataset=_Dataset(x, labels)),
            experience_loader=lambda d: torch.utils.data.DataLoader(d, batch_size=64))
        plugin.after_training_exp(strategy)

    def accuracy(task):
        x, labels = data[task]
        return float((model.head.classifiers[str(task)](x).argmax(1) == labels).float().mean())

    assert accuracy(0) == accuracy(1) == 0.5
    after(0)
    head0 = model.head.classifiers["0"].classifier.weight.clone()
    assert accuracy(0) >= 0.9 and accuracy(1) == 0.5
    after(1)
    assert accuracy(1) >= 0.9
    assert torch.equal(model.head.classifiers["0"].classifier.weight, head0)
    assert sorted(plugin.tasks) == [0, 1]

    class OwnHeads(MultiTaskModule):  # a multi-head model of another kind: refused, by name
        def forward_single_task(self, x, task_label):
            return x

    model.head = OwnHeads()
    with pytest.raises(TypeError, match="task_heads.*OwnHeads"):
        after(0)


def test_task_heads_refuse_drift_compensation(tiny, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="alignment.task_heads.*drift_compensation"):
        tiny_config(tmp_path, **{"alignment.task_heads": True,
                                 "alignment.drift_compensation": True})


def test_statistics_saved_before_task_heads_still_load():
    plugin = ClassifierAlignment(AlignmentConfig(enabled=True))
    plugin.statistics().add(torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1]))
    old_format = plugin.statistics().state_dict()
    restored = ClassifierAlignment(AlignmentConfig(enabled=True))
    restored.load_state_dict(old_format, type("S", (), {"device": torch.device("cpu")}))
    assert torch.equal(restored.statistics().square[1], plugin.statistics().square[1])


def test_pooled_statistics_hold_the_per_class_squares_sum_through_shifts_and_old_states():
    """The ridge fit's pooled Gram matrix is the sum of the per-class squares: after a drift
    shift too, and when a state saved with per-class squares (before pooling) is loaded."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(30, 4, generator=g), torch.arange(3).repeat(10)
    per_class, pooled = ClassStatistics(False, "class"), ClassStatistics(False, "pooled")
    for stats in (per_class, pooled):
        stats.add(x, y)
        stats.shift(1, torch.tensor([0.5, -1.0, 0.0, 2.0]))
    torch.testing.assert_close(pooled.gram_matrix(), per_class.gram_matrix())
    assert not pooled.square and pooled.stored_values() == 3 * 4 + 16
    restored = ClassStatistics(False, "pooled")
    restored.load_state_dict(per_class.state_dict(), torch.device("cpu"))
    torch.testing.assert_close(restored.gram_matrix(), per_class.gram_matrix())
    assert not restored.square


def test_task_heads_resume_identically(tiny, tmp_path):  # noqa: F811
    """Each task's statistics are checkpointed: resumed after the second experience, the run
    solves the third task's head, and ends, exactly as an uninterrupted one."""
    overrides = {"data.task_incremental": True, "alignment.enabled": True,
                 "alignment.fit": "ridge", "alignment.task_heads": True, "deterministic": True}
    whole = run(tiny_config(tmp_path / "a", **overrides),
                checkpointing=Checkpointing(tmp_path / "ck"))
    last = sorted((tmp_path / "ck").iterdir())[-1]
    for f in last.iterdir():
        f.unlink()
    last.rmdir()
    resumed = run(tiny_config(tmp_path / "a", **overrides),
                  checkpointing=Checkpointing(tmp_path / "ck", resume=True))
    assert resumed.record["accuracy_matrix"] == whole.record["accuracy_matrix"]
    assert sorted(resumed.experiment.alignment.tasks) == [0, 1, 2]
    a = whole.experiment.model.state_dict()
    b = resumed.experiment.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
