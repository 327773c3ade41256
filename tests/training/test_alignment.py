"""Classifier alignment from stored class statistics."""

from __future__ import annotations

import pytest
import torch
from avalanche.models import IncrementalClassifier

from cl_sulora.errors import ConfigError
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
    plugin.stats.add(x, y)
    before = (head(x).argmax(1) == y).float().mean()
    plugin._align(head, torch.device("cpu"), experience=1)
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
    plugin.stats.add(x, y)
    old = plugin.stats.gaussians(0.0)
    before = torch.randn(30, 6, generator=g)
    step = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 0.25])
    plugin.compensate_drift(before, before + step)  # the whole space translated
    new = plugin.stats.gaussians(0.0)
    for c in (0, 1):
        assert torch.allclose(new[c][0], old[c][0] + step.double())
        assert torch.allclose(new[c][1], old[c][1], atol=1e-9)


def test_drift_compensation_weights_nearby_samples_more():
    plugin = ClassifierAlignment(AlignmentConfig(enabled=True, drift_compensation=True,
                                                 drift_bandwidth=1.0))
    plugin.stats.add(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))  # class 0 at the origin
    before = torch.tensor([[0.1, 0.0], [10.0, 0.0]])
    after = before + torch.tensor([[1.0, 0.0], [0.0, 5.0]])  # near moves right, far moves up
    plugin.compensate_drift(before, after)
    mean = plugin.stats.gaussians(0.0)[0][0]
    assert mean[0] > 0.99 and abs(float(mean[1])) < 1e-6


def test_drift_compensated_run_moves_the_first_classes_statistics(tiny, tmp_path):  # noqa: F811
    base = {"alignment.enabled": True, "alignment.epochs": 1, "deterministic": True}
    plain = run(tiny_config(tmp_path / "a", **base))
    drift = run(tiny_config(tmp_path / "b", **base, **{"alignment.drift_compensation": True}))

    def stats(result):
        plugin = next(p for p in result.experiment.strategy.plugins
                      if isinstance(p, ClassifierAlignment))
        return plugin.stats

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
        plugin.stats.add(x[part], y[part])
        plugin._solve(head, x[part], y[part], experience)
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
