"""Learning-rate schedules across the optimizer rebuild of every experience: Avalanche's own
LRSchedulerPlugin follows it, and the strategies' lr_schedule argument."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins import LRSchedulerPlugin

from cl_sulora import SDLoRA, SubspaceLoRAConfig, SuLoRA
from cl_sulora.errors import ConfigError
from cl_sulora.models import ContinualClassifier, make_head
from cl_sulora.runner import resolve_config
from cl_sulora.training import LRSchedule
from tests.helpers import image_stream, tiny_vit


class RecordLR(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int, float]] = []

    def before_training_iteration(self, strategy, **kwargs):
        if strategy.clock.train_epoch_iterations == 0:
            self.seen.append((strategy.experience.current_experience,
                              strategy.clock.train_exp_epochs,
                              strategy.optimizer.param_groups[0]["lr"]))


def model():
    torch.manual_seed(0)
    return ContinualClassifier(tiny_vit(), make_head("class-incremental", 32))


@pytest.mark.parametrize("strategy_cls", [SuLoRA, SDLoRA])
def test_avalanche_step_lr_follows_the_optimizer_of_every_experience(strategy_cls):
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    record = RecordLR()
    scheduler = LRSchedulerPlugin(torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5))
    config = SubspaceLoRAConfig(rank=2, num_slots=2) if strategy_cls is SuLoRA else None
    strategy = strategy_cls(model=net, optimizer=optimizer, config=config, train_mb_size=8,
                            train_epochs=3, evaluator=None, plugins=[scheduler, record])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        for experience in image_stream().train_stream:
            strategy.train(experience)
    assert strategy.optimizer is optimizer
    assert [(e, n, round(lr, 6)) for e, n, lr in record.seen] == [
        (0, 0, 0.1), (0, 1, 0.05), (0, 2, 0.025), (1, 0, 0.1), (1, 1, 0.05), (1, 2, 0.025)]


def test_the_lr_schedule_argument_decays_within_each_experience():
    net = model()
    record = RecordLR()
    strategy = SuLoRA(model=net, optimizer=torch.optim.Adam(net.parameters(), lr=0.1),
                      config=SubspaceLoRAConfig(rank=2, num_slots=2), train_mb_size=8,
                      train_epochs=2, evaluator=None, plugins=[record], lr_schedule="cosine")
    for experience in image_stream().train_stream:
        strategy.train(experience)
    lrs = [round(lr, 6) for _, _, lr in record.seen]
    assert lrs[0] == lrs[2] == 0.1 and 0 < lrs[1] < 0.1 and lrs[1] == lrs[3]


def test_two_schedules_are_refused():
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    plugin = LRSchedulerPlugin(torch.optim.lr_scheduler.StepLR(optimizer, 1))
    with pytest.raises(ValueError, match="two learning-rate schedules"):
        SuLoRA(model=net, optimizer=optimizer, config=SubspaceLoRAConfig(rank=2, num_slots=2),
               plugins=[plugin], lr_schedule="cosine")


def test_multistep_drops_at_each_epoch_milestone_from_the_first_experiences_own_rate():
    """SD-LoRA's reference loop: ``init_lr`` on the first task, ``lrate`` after, each times
    ``gamma`` at every epoch milestone reached (MultiStepLR stepped once per epoch)."""
    net = model()
    record = RecordLR()
    schedule = LRSchedule(0.1, "multistep", milestones=[2, 1], gamma=0.5, first_lr=0.4)
    strategy = SuLoRA(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                      config=SubspaceLoRAConfig(rank=2, num_slots=2), train_mb_size=8,
                      train_epochs=3, evaluator=None, plugins=[record], lr_schedule=schedule)
    for experience in image_stream().train_stream:
        strategy.train(experience)
    assert [(e, n, round(lr, 6)) for e, n, lr in record.seen] == [
        (0, 0, 0.4), (0, 1, 0.2), (0, 2, 0.1), (1, 0, 0.1), (1, 1, 0.05), (1, 2, 0.025)]


@pytest.mark.parametrize("training, message", [
    ({"lr_schedule": "multistep"}, "needs training.lr_milestones"),
    ({"lr_milestones": [3]}, "only used by lr_schedule 'multistep'"),
])
def test_milestones_and_multistep_come_together(training, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config("bbc-news", "sulora", {f"training.{k}": v for k, v in training.items()})


def test_epoch_cosine_is_inflora_s_quarter_wave_stepped_per_epoch():
    net = model()
    record = RecordLR()
    strategy = SuLoRA(model=net, optimizer=torch.optim.Adam(net.parameters(), lr=0.1),
                      config=SubspaceLoRAConfig(rank=2, num_slots=2), train_mb_size=8,
                      train_epochs=3, evaluator=None, plugins=[record],
                      lr_schedule="epoch-cosine")
    strategy.train(image_stream().train_stream[0])
    assert [lr for _, _, lr in record.seen] == pytest.approx(
        [0.1, 0.1 * math.cos(99 * math.pi / 400), 0.1 * math.cos(99 * math.pi / 200)])
