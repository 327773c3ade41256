"""Checkpoints: exact resume, atomicity, clear errors on damaged files, non-finite loss."""

import pytest
import torch
from avalanche.core import SupervisedPlugin

from cl_sulora import SubspaceLoRAConfig, SuLoRA
from cl_sulora.errors import DivergenceError
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
    with pytest.raises(DivergenceError,
                       match=r"diverged at experience 1/2, epoch 0, iteration 0: the loss is nan"):
        strategy.train(bm.train_stream[0])


class PoisonStep(SupervisedPlugin):
    """Makes the loss nan at one step of the experience; records the trainable tensors after
    each optimizer update and counts the hooks reached."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.epochs_ended, self.experience_ended = step, 0, False
        self.updated: list[dict[str, torch.Tensor]] = []

    def after_forward(self, strategy, **kwargs):
        if strategy.clock.train_exp_iterations == self.step:
            strategy.mb_output = strategy.mb_output * float("nan")

    def after_update(self, strategy, **kwargs):
        self.updated.append({n: p.detach().clone() for n, p in strategy.model.named_parameters()
                             if p.requires_grad})

    def after_training_epoch(self, strategy, **kwargs):
        self.epochs_ended += 1

    def after_training_exp(self, strategy, **kwargs):
        self.experience_ended = True


@pytest.mark.parametrize("step", [0, 4, 11])
def test_a_non_finite_loss_stops_before_its_own_optimizer_update(step):
    # 24 samples in batches of 8: 3 iterations per epoch, 4 epochs
    strategy = fresh_strategy()
    strategy.train_epochs = 4
    poison = PoisonStep(step)
    strategy.plugins.insert(0, poison)
    epoch, iteration = divmod(step, 3)
    with pytest.raises(DivergenceError, match=f"epoch {epoch}, iteration {iteration}: the loss"):
        strategy.train(image_stream().train_stream[0])
    assert len(poison.updated) == step  # no update after the poisoned step's loss
    assert not poison.experience_ended
    if step:  # the head as the last update left it (the unfinished slot is discarded)
        now = dict(strategy.model.named_parameters())
        kept = {n: t for n, t in poison.updated[-1].items() if n.startswith("head.")}
        assert kept and all(torch.equal(now[n], t) for n, t in kept.items())


@pytest.mark.parametrize("lr, bad", [(float("inf"), "stopped being finite"), (1e9, "exceeded")])
def test_a_diverged_update_stops_training_before_the_next_step(lr, bad):
    torch.manual_seed(0)
    model = ContinualClassifier(tiny_vit(), make_head("class-incremental", 32))
    strategy = SuLoRA(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                      config=CONFIG, train_mb_size=8, train_epochs=2, evaluator=None)
    poison = PoisonStep(step=-1)  # only records the updates
    strategy.plugins.insert(0, poison)
    with pytest.raises(DivergenceError, match=bad):
        strategy.train(image_stream().train_stream[0])
    assert len(poison.updated) == 1 and not poison.experience_ended  # stopped at step 2


class FailAt(SupervisedPlugin):
    """Raises once, at one training iteration of one experience (an interrupt, a crash)."""

    def __init__(self, experience: int, iteration: int) -> None:
        super().__init__()
        self.at, self.armed = (experience, iteration), True

    def after_training_iteration(self, strategy, **kwargs):
        at = (strategy.experience.current_experience, strategy.clock.train_exp_iterations)
        if self.armed and at == self.at:
            self.armed = False
            raise KeyboardInterrupt


@pytest.mark.parametrize("method", ["sulora", "inclora"])
def test_training_again_after_a_failed_experience_starts_it_afresh(method):
    from cl_sulora import IncLoRA
    from cl_sulora.adapters.injection import adapter_layers

    torch.manual_seed(0)
    model = ContinualClassifier(tiny_vit(), make_head("class-incremental", 32))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    if method == "sulora":
        strategy = SuLoRA(model=model, optimizer=optimizer, config=CONFIG, train_mb_size=8,
                          train_epochs=1, evaluator=None, plugins=[FailAt(1, 1)])
    else:
        strategy = IncLoRA(model=model, optimizer=optimizer, train_mb_size=8, train_epochs=1,
                           evaluator=None, plugins=[FailAt(1, 1)])
    bm = image_stream()
    strategy.train(bm.train_stream[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = adapter_layers(model).values()
    live = [len(layer.slots.used_rows()) for layer in layers] if method == "sulora" else None
    with pytest.raises(KeyboardInterrupt):
        strategy.train(bm.train_stream[1])
    if method == "sulora":  # the unfinished slot is gone: the same rows live, none training
        assert [len(layer.slots.used_rows()) for layer in layers] == live
        assert all(layer.lora_B_train is None for layer in layers)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()
                   if ".lora_" in k or "row_owner" in k)
        assert set(strategy.sulora.owner_task) == {0}
    else:  # the unfinished branch is gone
        assert all(len(layer.branches) == 1 for layer in layers)
    strategy.train(bm.train_stream[1])  # trains again, from a clean start
    if method == "sulora":
        assert set(strategy.sulora.owner_task) == {0, 1}
        assert all(layer.lora_B_train is None and 1 in layer.slots.owners for layer in layers)
    else:
        assert all(len(layer.branches) == 2 for layer in layers)
