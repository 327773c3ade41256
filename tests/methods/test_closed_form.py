"""SimpleCIL and RanPAC: heads solved in closed form on the frozen backbone, checked against the
formulas of their official code computed here by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin

from cl_sulora import RanPAC, RanPACConfig, SimpleCIL
from cl_sulora.models import ContinualClassifier, make_head
from cl_sulora.ridge import RANPAC_RIDGES, ridge_losses, select_ridge
from tests.helpers import image_stream, tiny_vit


def fresh_model(protocol="class-incremental"):
    """A model as a user builds it: the protocol's head, which the strategy replaces."""
    torch.manual_seed(0)
    return ContinualClassifier(tiny_vit(), make_head(protocol, 32, 4 if protocol ==
                                                     "domain-incremental" else None))


def build(cls, protocol="class-incremental", model=None, **kwargs):
    model = fresh_model(protocol) if model is None else model
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])
    return cls(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
               train_mb_size=8, eval_mb_size=5, evaluator=evaluator, **kwargs)


@torch.no_grad()
def features_of(strategy, experience):
    """Backbone features and labels of an experience's data, computed here."""
    data = experience.dataset.eval()
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([int(data[i][1]) for i in range(len(data))])
    strategy.model.eval()
    return strategy.model.backbone(x), y


def test_simplecil_prototypes_are_the_class_means_and_predict_by_cosine():
    stream = image_stream()
    strategy = build(SimpleCIL)
    backbone = {k: v.clone() for k, v in strategy.model.backbone.state_dict().items()}
    seen = []
    for exp in stream.train_stream:
        strategy.train(exp)
        seen.append(features_of(strategy, exp))
    f = torch.cat([s[0] for s in seen])
    y = torch.cat([s[1] for s in seen])
    means = torch.stack([f[y == c].mean(0) for c in range(4)])
    head = strategy.model.head
    torch.testing.assert_close(F.normalize(head.sums, dim=1), F.normalize(means, dim=1))
    # logits are the cosines of feature and prototype
    test_f, _ = features_of(strategy, stream.test_stream[1])
    expected = F.normalize(test_f, dim=1) @ F.normalize(means, dim=1).T
    torch.testing.assert_close(head(test_f), expected)
    assert all(torch.equal(backbone[k], v) for k, v in strategy.model.backbone.state_dict().items())
    assert not strategy.optimizer.param_groups  # nothing trained by gradient
    accuracy = strategy.eval(stream.test_stream)["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert accuracy > 0.9  # the classes are separable prototypes of the generated stream


def test_simplecil_across_domains_sums_every_domain():
    stream = image_stream(n_classes=2, n_experiences=1, seed=0)
    other = image_stream(n_classes=2, n_experiences=1, seed=1)
    strategy = build(SimpleCIL, "domain-incremental")
    strategy.train(stream.train_stream[0])
    strategy.train(other.train_stream[0])
    f = torch.cat([features_of(strategy, s.train_stream[0])[0] for s in (stream, other)])
    y = torch.cat([features_of(strategy, s.train_stream[0])[1] for s in (stream, other)])
    sums = torch.stack([f[y == c].sum(0) for c in range(2)])
    torch.testing.assert_close(strategy.model.head.sums, sums)


def test_ranpac_solves_the_ridge_regression_of_everything_seen():
    stream = image_stream()
    config = RanPACConfig(projection_dim=48, seed=3)
    strategy = build(RanPAC, config=config)
    head = strategy.model.head
    projection = head.projection.clone()
    hs, ys = [], []
    for exp in stream.train_stream:
        strategy.train(exp)
        f, y = features_of(strategy, exp)
        hs.append(F.relu(f @ projection).double())
        ys.append(y)
        # the projection is drawn once: the same for every experience
        assert torch.equal(head.projection, projection)
    h, y = torch.cat(hs), torch.cat(ys)
    onehot = F.one_hot(y, 4).double()
    torch.testing.assert_close(head.gram, h.T @ h)
    torch.testing.assert_close(head.targets, h.T @ onehot)
    eye = torch.eye(48, dtype=torch.float64)
    weight = torch.linalg.solve(h.T @ h + head.ridge * eye, h.T @ onehot).T.float()
    torch.testing.assert_close(head.weight, weight)
    test_f, _ = features_of(strategy, stream.test_stream[0])
    torch.testing.assert_close(head(test_f), F.relu(test_f @ projection) @ weight.T)
    assert strategy.adapter_report()["stored_state_params"] == 48 * 48 + 48 * 4 + 32 * 48


@pytest.mark.parametrize("samples, width", [(60, 12), (30, 40)])  # primal and kernel forms
def test_ranpac_ridge_is_the_candidate_with_the_least_held_out_error(samples, width):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(samples, width, generator=g, dtype=torch.float64)
    y = F.one_hot(torch.randint(0, 3, (samples,), generator=g), 3).double()
    y = y + 0.5 * (h[:, :3] > 0)  # targets the features partly explain
    chosen = select_ridge(h, y, RANPAC_RIDGES, 0.8, torch.Generator().manual_seed(5))
    # the official procedure: a solve per candidate on the fit part, MSE on the rest
    order = torch.randperm(samples, generator=torch.Generator().manual_seed(5))
    cut = int(samples * 0.8)
    fit, held = order[:cut], order[cut:]
    losses = []
    for ridge in RANPAC_RIDGES:
        eye = torch.eye(width, dtype=torch.float64)
        w = torch.linalg.solve(h[fit].T @ h[fit] + ridge * eye, h[fit].T @ y[fit])
        losses.append(float(F.mse_loss(h[held] @ w, y[held])))
    assert chosen == RANPAC_RIDGES[losses.index(min(losses))]
    fast = ridge_losses(h, y, RANPAC_RIDGES, 0.8, torch.Generator().manual_seed(5))
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(losses), rtol=1e-6, atol=1e-9)
    assert len(set(losses)) > 1  # the candidates differ here: the choice is not trivial


def test_closed_form_heads_round_trip_through_a_fresh_model(tmp_path):
    from cl_sulora import load_model, save_model

    stream = image_stream()
    for cls, kwargs in ((SimpleCIL, {}), (RanPAC, {"config": RanPACConfig(projection_dim=16)})):
        strategy = build(cls, **kwargs)
        strategy.train(stream.train_stream[0])
        x = next(iter(stream.test_stream[0].dataset))[0][None]
        strategy.model.eval()
        before = strategy.model(x)
        save_model(strategy.model, tmp_path / cls.__name__)
        fresh = build(cls, **kwargs).model  # an untrained head: smaller buffers
        restored = load_model(fresh, tmp_path / cls.__name__).eval()
        torch.testing.assert_close(restored(x), before)


@pytest.mark.parametrize("protocol", ["class-incremental", "task-incremental"])
def test_a_model_loaded_into_a_fresh_one_trains_on_under_a_new_strategy_as_the_original(
        tmp_path, protocol):
    """load_model takes a model built as the saved one was, with its protocol's head: the saved
    closed-form head is made again in its place, and a strategy built on the restored model
    keeps it (it has no nn.Linear to read the feature size from), so training goes on exactly
    as under the strategy that saved it."""
    from cl_sulora import load_model, save_model

    til = protocol == "task-incremental"
    stream = image_stream(n_classes=6, n_experiences=3, task_labels=til)
    x = torch.stack([exp.dataset[i][0] for exp in stream.test_stream for i in range(3)])
    tasks = torch.arange(3).repeat_interleave(3) if til else None
    for cls, kwargs in ((SimpleCIL, {}), (RanPAC, {"config": RanPACConfig(projection_dim=16)})):
        original = build(cls, protocol, **kwargs)
        original.train(stream.train_stream[0])
        save_model(original.model, tmp_path / cls.__name__)
        restored = build(cls, protocol, model=load_model(fresh_model(protocol),
                                                         tmp_path / cls.__name__), **kwargs)
        for exp in stream.train_stream[1:]:
            original.train(exp)
            restored.train(exp)
        original.model.eval(), restored.model.eval()
        with torch.no_grad():
            assert torch.equal(restored.model(x, tasks), original.model(x, tasks)), cls
        assert restored.eval(stream.test_stream) == original.eval(stream.test_stream)
    # a closed-form head of another strategy is refused, saying what to do
    with pytest.raises(ValueError, match=r"RidgeHead\(in_features=32, projection_dim=16\).*"
                                         r"SimpleCIL here solves a PrototypeHead.*wrap it with"):
        build(SimpleCIL, protocol, model=load_model(fresh_model(protocol), tmp_path / "RanPAC"))


def test_config_errors():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="fit_fraction"):
        RanPACConfig(fit_fraction=1.0)
    with pytest.raises(ValidationError, match="ridges"):
        RanPACConfig(ridges=[1.0, -1.0])
    with pytest.raises(ValueError, match="takes no config"):
        build(SimpleCIL, config=RanPACConfig())


def test_classes_not_seen_yet_are_masked_as_the_growing_head_masks_them():
    from cl_sulora.training.plugins import MASK_VALUE

    stream = image_stream()
    for cls, kwargs in ((SimpleCIL, {}), (RanPAC, {"config": RanPACConfig(projection_dim=16)})):
        strategy = build(cls, **kwargs)
        strategy.train(stream.train_stream[0])  # classes 0 and 1
        results = strategy.eval(stream.test_stream)  # the head covers classes 2, 3 too
        x = torch.stack([stream.test_stream[1].dataset[i][0] for i in range(3)])
        out = strategy.model(x)
        assert out.shape == (3, 4) and (out[:, 2:] == MASK_VALUE).all()
        assert (out[:, :2] > MASK_VALUE).all()
        assert results["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp001"] == 0.0


def test_task_incremental_closed_form_heads_are_one_per_task(tmp_path):
    """Under the task-incremental protocol each task's classes (local labels 0, 1 in both
    tasks here) get their own head: a shared head would mix the two tasks' class 0."""
    from cl_sulora import load_model, save_model
    from cl_sulora.methods.closed_form import RidgeHead, TaskHeads
    from cl_sulora.training.plugins import MASK_VALUE

    stream = image_stream(task_labels=True)
    strategy = build(SimpleCIL, protocol="task-incremental")
    seen = []
    for exp in stream.train_stream:
        strategy.train(exp)
        seen.append(features_of(strategy, exp))
    head = strategy.model.head
    assert isinstance(head, TaskHeads) and sorted(head.heads) == ["0", "1"]
    for task, (f, y) in enumerate(seen):
        means = torch.stack([f[y == c].mean(0) for c in range(2)])
        torch.testing.assert_close(F.normalize(head.head(task).sums, dim=1),
                                   F.normalize(means, dim=1))
    test_f, _ = features_of(strategy, stream.test_stream[1])
    expected = F.normalize(test_f, dim=1) @ F.normalize(head.head(1).sums, dim=1).T
    torch.testing.assert_close(head(test_f, torch.ones(len(test_f), dtype=torch.long)), expected)
    results = strategy.eval(stream.test_stream)
    assert results["Top1_Acc_Exp/eval_phase/test_stream/Task001/Exp001"] > 0.9
    assert results["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000"] > 0.9
    # a batch of both tasks: each sample gets its task's scores, the other columns masked
    mixed = head(test_f[:2], torch.tensor([0, 1]))
    torch.testing.assert_close(mixed[1], expected[1])
    torch.testing.assert_close(mixed[0], head.head(0)(test_f[:1])[0])
    head.head(2).cover(3)  # a task not trained yet, of 3 classes: it scores nothing
    wide = head(test_f[:2], torch.tensor([0, 2]))
    assert wide.shape == (2, 3) and wide[1].eq(MASK_VALUE).all()
    assert wide[0, 2] == MASK_VALUE  # beyond task 0's two classes

    ranpac = build(RanPAC, protocol="task-incremental", config=RanPACConfig(projection_dim=16))
    for exp in stream.train_stream:
        ranpac.train(exp)
    f, y = features_of(ranpac, stream.train_stream[1])
    alone = RidgeHead(32, 16, torch.Generator())
    alone.projection.copy_(ranpac.model.head.head(0).projection)
    alone.update(f, y, RANPAC_RIDGES, 0.8, torch.Generator())
    alone.ridge = None
    torch.testing.assert_close(ranpac.model.head.head(1).gram, alone.gram)  # task 1's data only
    assert ranpac.method_state_params() == 2 * (16 * 16 + 16 * 2 + 32 * 16)

    x = next(iter(stream.test_stream[1].dataset))[0][None]
    strategy.model.eval()
    before = strategy.model(x, 1)
    save_model(strategy.model, tmp_path / "til")
    restored = load_model(build(SimpleCIL, protocol="task-incremental").model, tmp_path / "til")
    torch.testing.assert_close(restored.eval()(x, 1), before)


@pytest.mark.parametrize("cls", [SimpleCIL, RanPAC])
def test_a_new_task_head_is_made_on_the_strategy_device(cls):
    """A task-incremental experience's head is made when its task first arrives; it must end
    on the strategy's device with the rest of the model (made after the model was moved, it
    stayed on the CPU and the first GPU fit failed). The meta device stands for the GPU."""
    stream = image_stream(task_labels=True)
    strategy = build(cls, protocol="task-incremental", device="meta")
    strategy.experience = stream.train_stream[0]
    model = strategy.model_adaptation()
    assert "0" in model.head.heads
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}


@pytest.mark.parametrize("protocol", ["class-incremental", "task-incremental"])
def test_closed_form_runs_resume_from_a_checkpoint_exactly(tmp_path, protocol):
    from cl_sulora.runner.checkpoint import latest_checkpoint, restore, save_checkpoint

    stream = image_stream(n_classes=6, n_experiences=3,
                          task_labels=protocol == "task-incremental")
    x = next(iter(stream.test_stream[2].dataset))[0][None]
    task = 2 if protocol == "task-incremental" else None
    for cls, kwargs in ((SimpleCIL, {}), (RanPAC, {"config": RanPACConfig(projection_dim=16)})):
        straight = build(cls, protocol, **kwargs)
        for position, exp in enumerate(stream.train_stream):
            straight.train(exp)
            if position == 0:
                save_checkpoint(tmp_path / cls.__name__ / protocol, position=0,
                                strategy=straight, extra={})
        resumed = build(cls, protocol, **kwargs)
        checkpoint = latest_checkpoint(tmp_path / cls.__name__ / protocol)
        restore(resumed, checkpoint, list(stream.train_stream)[:1])
        for exp in list(stream.train_stream)[1:]:
            resumed.train(exp)
        straight.model.eval(), resumed.model.eval()
        torch.testing.assert_close(resumed.model(x, task), straight.model(x, task))


def encoded_samples(strategy) -> list[int]:
    """A counter of the samples the strategy's backbone encodes from now on."""
    count = [0]
    strategy.model.backbone.register_forward_hook(lambda m, args, out: count.__setitem__(
        0, count[0] + len(out)))
    return count


@pytest.mark.parametrize("protocol", ["class-incremental", "task-incremental"])
@pytest.mark.parametrize("cls", [SimpleCIL, RanPAC])
def test_evaluation_encodes_each_test_set_once_and_changes_no_result(cls, protocol):
    """After a test set's first evaluation only the head runs on it (its features are kept):
    every evaluation gives what encoding again would, per experience and task."""
    stream = image_stream(n_classes=6, n_experiences=3,
                          task_labels=protocol == "task-incremental")
    kwargs = {"config": RanPACConfig(projection_dim=16)} if cls is RanPAC else {}
    train = sum(len(exp.dataset) for exp in stream.train_stream)
    test = sum(len(exp.dataset) for exp in stream.test_stream)
    runs = {}
    for budget in (0.0, 1.0):
        strategy = build(cls, protocol, eval_cache_gb=budget, **kwargs)
        encoded = encoded_samples(strategy)
        results = []
        for exp in stream.train_stream:
            strategy.train(exp)
            results.append(strategy.eval(stream.test_stream))
        runs[budget] = results, encoded[0]
    assert runs[1.0][0] == runs[0.0][0]
    assert runs[0.0][1] == train + 3 * test
    assert runs[1.0][1] == train + test
    last = runs[1.0][0][-1]
    assert min(v for k, v in last.items() if k.startswith("Top1_Acc_Exp")) > 0.9


def test_a_part_evaluation_keeps_no_features_and_the_budget_holds():
    from avalanche.core import SupervisedPlugin

    class StopAfterOneBatch(SupervisedPlugin):
        armed = True

        def after_eval_iteration(self, strategy, **kwargs):
            if self.armed:
                raise KeyboardInterrupt

    stream = image_stream()
    stop = StopAfterOneBatch()
    strategy = build(SimpleCIL, plugins=[stop])
    strategy.train(stream.train_stream[0])
    with pytest.raises(KeyboardInterrupt):
        strategy.eval(stream.test_stream[0])
    stop.armed = False
    reference = build(SimpleCIL, eval_cache_gb=0.0)
    reference.train(stream.train_stream[0])
    assert strategy.eval(stream.test_stream) == reference.eval(stream.test_stream)
    test = sum(len(e.dataset) for e in stream.test_stream)
    assert strategy.eval_features.used_bytes == test * 32 * 4  # fp32 features of width 32

    small = build(SimpleCIL, eval_cache_gb=100 / 2**30)  # below one test set's features
    small.train(stream.train_stream[0])
    encoded = encoded_samples(small)
    small.eval(stream.test_stream)
    small.eval(stream.test_stream)
    assert encoded[0] == 2 * test
    assert small.eval_features.used_bytes == 0

    strategy.set_eval_cache(0)  # both caches off, what they kept dropped
    encoded = encoded_samples(strategy)
    strategy.eval(stream.test_stream)
    strategy.eval(stream.test_stream)
    assert encoded[0] == 2 * test and strategy.eval_features.used_bytes == 0


def test_ridge_solution_survives_a_ridge_too_small_for_the_floating_point():
    from cl_sulora.ridge import solve_ridge

    v = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    gram, targets = v.T @ v, v.T @ torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert int(torch.linalg.cholesky_ex(gram + 1e-30 * torch.eye(3, dtype=torch.float64))[1])
    solution = solve_ridge(gram, targets, 1e-30)  # the least-squares solution
    torch.testing.assert_close(gram @ solution, targets)
    torch.testing.assert_close(solve_ridge(gram, targets, 1.0),
                               torch.linalg.solve(gram + torch.eye(3, dtype=torch.float64),
                                                  targets))
