"""Checkpoints: exact resume, atomicity, clear errors on damaged files, non-finite loss."""

import pytest
import torch
from avalanche.core import SupervisedPlugin

from cl_sulora import SubspaceLoRAConfig, SuLoRA
from cl_sulora.errors import DivergenceError as NonFiniteLossError
from cl_sulora.models import ContinualClassifier, make_head
from cl_sulora.runner.checkpoint import (
    CheckpointError,
    checkpoints,
    latest_checkpoint,
    restore,
    save_checkpoint,
)
from tests.helpers import image_stream, tiny_vit

CONFIG = SubspaceLoRAConfig(rank=2, num_slots=2, fusion="fraction", allocator="data")


def fresh_strategy(seed=0):
    torch.manual_seed(seed)
    model = ContinualClassifier(tiny_vit(), make_head("class-incremental", 32))
    return SuLoRA(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                  config=CONFIG, train_mb_size=8, train_epochs=1, evaluator=None)


def outputs(strategy, x):
    strategy.model.eval()
    with torch.no_grad():
        return strategy.model(x)


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path):
    bm = image_stream(n_classes=6, n_experiences=3)
    x = torch.randn(5, 3, 8, 8)
    torch.manual_seed(123)
    straight = fresh_strategy()
    for position, exp in enumerate(bm.train_stream):
        straight.train(exp)
        if position == 0:
            save_checkpoint(tmp_path, position=0, strategy=straight, extra={"rows": [[1.0]]})
    expected = outputs(straight, x)

    resumed = fresh_strategy(seed=99)  # different init: everything must come from the checkpoint
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.position == 0 and checkpoint.state["extra"] == {"rows": [[1.0]]}
    restore(resumed, checkpoint, list(bm.train_stream)[: checkpoint.position + 1])
    for exp in list(bm.train_stream)[1:]:
        resumed.train(exp)
    assert torch.equal(outputs(resumed, x), expected)


def test_only_the_two_newest_checkpoints_are_kept(tmp_path):
    strategy = fresh_strategy()
    for position in range(4):
        save_checkpoint(tmp_path, position=position, strategy=strategy, extra={})
    assert [p.name for p in checkpoints(tmp_path)] == ["exp-0002", "exp-0003"]
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers


def test_truncated_checkpoint_names_the_file_and_fallback_is_explicit(tmp_path):
    strategy = fresh_strategy()
    save_checkpoint(tmp_path, position=0, strategy=strategy, extra={})
    newest = save_checkpoint(tmp_path, position=1, strategy=strategy, extra={})
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated or corrupted"):
        latest_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path, fallback=True).position == 0


def test_non_finite_loss_stops_training_with_a_clear_message():
    strategy = fresh_strategy()
    bm = image_stream()

    class Poison:
        def after_forward(self, strategy, **kwargs):
            strategy.mb_output = strategy.mb_output * float("nan")

    strategy.plugins.insert(0, type("PoisonPlugin", (Poison, SupervisedPlugin), {})())
    with pytest.raises(NonFiniteLossError, match="non-finite loss .* at experience 0"):
        strategy.train(bm.train_stream[0])


class PoisonStep(SupervisedPlugin):
    """Makes the loss nan at one step of the experience; counts the hooks reached."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.epochs_ended, self.experience_ended = step, 0, False

    def after_forward(self, strategy, **kwargs):
        if strategy.clock.train_exp_iterations == self.step:
            strategy.mb_output = strategy.mb_output * float("nan")

    def after_training_epoch(self, strategy, **kwargs):
        self.epochs_ended += 1

    def after_training_exp(self, strategy, **kwargs):
        self.experience_ended = True


@pytest.mark.parametrize("step, epochs_ended", [(4, 3), (10, 4)])
def test_non_finite_loss_is_reported_one_check_late_but_before_the_experience_ends(
        step, epochs_ended):
    # 24 samples in batches of 8: 3 iterations per epoch, 4 epochs, checks at epoch ends. A
    # check raises on the record of the check before it, except at the last epoch's end.
    strategy = fresh_strategy()
    strategy.train_epochs = 4
    poison = PoisonStep(step)
    strategy.plugins.insert(0, poison)
    epoch, iteration = divmod(step, 3)
    with pytest.raises(NonFiniteLossError,
                       match=f"at experience 0, epoch {epoch}, iteration {iteration}:"):
        strategy.train(image_stream().train_stream[0])
    assert poison.epochs_ended == epochs_ended and not poison.experience_ended
