"""Training plugins: the class-incremental training mask, the divergence guard, minibatch
augmentation on the device, learning-rate schedule, autocast, TF32 matrix products, progress
bars and the training-epoch timer."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Literal

import torch
from avalanche.core import SupervisedPlugin
from tqdm.auto import tqdm

from ..errors import DivergenceError
from ..seeding import keyed_generator
from . import distributed

MASK_VALUE = -1e4  # finite, so a masked logit never turns the loss into inf or nan in fp16

Schedule = Literal["constant", "cosine", "multistep", "epoch-cosine"]


class CurrentClassMask(SupervisedPlugin, supports_distributed=True):
    """During training, mask the logits of classes absent from the experience's dataset.

    With a growing head this is the usual class-incremental regime: old classes are masked while
    a new experience trains. Rehearsal that mixes a buffer in through the data loader extends
    the allowed classes (see ``ReplayClassMask``).
    """

    def __init__(self) -> None:
        super().__init__()
        self._allowed: list[int] | None = None
        self._keep: torch.Tensor | None = None  # on the logits' device, built once per size

    @property
    def allowed(self) -> list[int] | None:
        """The classes left unmasked in the current experience (``None`` outside training)."""
        return self._allowed

    def allowed_classes(self, strategy) -> set[int]:
        """The classes the current experience trains on: those of its dataset."""
        return {int(t) for t in strategy.adapted_dataset.targets}

    def before_training_exp(self, strategy, **kwargs):
        self._allowed = sorted(self.allowed_classes(strategy))
        self._keep = None

    def after_forward(self, strategy, **kwargs):
        logits = strategy.mb_output
        if self._allowed is None or logits.dim() != 2:
            return
        if (self._keep is None or self._keep.shape[0] != logits.shape[1]
                or self._keep.device != logits.device):
            keep = torch.zeros(logits.shape[1], dtype=torch.bool)
            keep[[c for c in self._allowed if c < logits.shape[1]]] = True
            self._keep = keep.to(logits.device)
        strategy.mb_output = logits.masked_fill(~self._keep, MASK_VALUE)

    def after_training_exp(self, strategy, **kwargs):
        self._allowed = self._keep = None


class DivergenceGuard(SupervisedPlugin, supports_distributed=True):
    """Stop training, with a clear message, when it diverges.

    Before every ``check_every``-th optimizer update (every one by default) the guard reads,
    in one synchronisation with the device and over every data-parallel rank, whether the
    step's loss is finite and whether the trainable parameters and the optimizer's state were
    still finite (and the parameters no larger than ``max_abs`` in magnitude) after the
    previous update. So a non-finite loss stops the run before its own update, and a bad update
    (an infinite learning rate, an exploding one) before the next; after an experience's last
    step the parameters are checked once more, so no end-of-experience work (fusion,
    checkpoint, evaluation) ever sees a diverged model. All ranks read the same flags, so
    they stop together. Experiences are numbered from 1 in the message, as on the console.
    """

    def __init__(self, check_every: int = 1, max_abs: float = 1e6) -> None:
        super().__init__()
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.check_every = check_every
        self.max_abs = max_abs
        self._updated_bad: torch.Tensor | None = None  # after the last update, on the device
        self._epochs = 0

    def before_training_exp(self, strategy, **kwargs):
        self._updated_bad = None
        self._epochs = 0

    def before_update(self, strategy, **kwargs):
        if (strategy.clock.train_epoch_iterations + 1) % self.check_every:
            return
        loss_bad = ~torch.isfinite(strategy.loss.detach().float()).all()
        updated_bad = loss_bad.new_zeros(()) if self._updated_bad is None else self._updated_bad
        loss_flag, update_flag = distributed.any_over_ranks(torch.stack([loss_bad, updated_bad]))
        if update_flag:
            self._stop(strategy, self._UPDATE.format(max_abs=self.max_abs, when="the update "
                                                                                "before"))
        if loss_flag:
            loss = float(strategy.loss.detach().float().sum())
            self._stop(strategy, f"the loss is {loss} (stopped before its update)")

    def after_update(self, strategy, **kwargs):
        self._updated_bad = self.diverged(strategy.optimizer)

    def after_training_epoch(self, strategy, **kwargs):
        self._epochs += 1
        last = self._epochs >= strategy.train_epochs
        if last and self._updated_bad is not None:
            if distributed.any_over_ranks(self._updated_bad[None])[0]:
                self._stop(strategy, self._UPDATE.format(max_abs=self.max_abs,
                                                         when="the experience's last update"))

    _UPDATE = ("a trainable parameter or the optimizer's state stopped being finite, or a "
               "parameter exceeded {max_abs:g} in magnitude, after {when}")

    def diverged(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """On the device, without waiting: whether a trainable parameter is not finite or
        larger than ``max_abs`` in magnitude, or a tensor of the optimizer's state is not
        finite."""
        params = [p.detach() for g in optimizer.param_groups for p in g["params"]
                  if p.requires_grad]
        states = [v for p in params for v in optimizer.state.get(p, {}).values()
                  if torch.is_tensor(v) and v.is_floating_point() and v.numel() > 1]
        if not params:
            return torch.zeros((), dtype=torch.bool)
        largest = torch.stack(torch._foreach_norm(params, float("inf"))).max()
        bad = ~(largest <= self.max_abs)  # nan compares false
        if states:
            state_norms = torch.stack(torch._foreach_norm(states, float("inf")))
            bad = bad | ~torch.isfinite(state_norms).all()
        return bad

    def _stop(self, strategy, what: str) -> None:
        experience = int(strategy.experience.current_experience) + 1
        total = len(getattr(strategy.experience, "origin_stream", ())) or "?"
        raise DivergenceError(
            f"training diverged at experience {experience}/{total}, epoch "
            f"{strategy.clock.train_exp_epochs}, iteration "
            f"{strategy.clock.train_epoch_iterations}: {what}. Lower the learning rate "
            "(resume the last checkpoint with --resume and a lower --lr) or train in fp32; "
            "the checkpoints written so far are left as they were"
        )


class BatchAugment(SupervisedPlugin, supports_distributed=True):
    """Replaces the inputs of every training minibatch, once on the training device, by
    ``augment(inputs, generator)`` (evaluation and other passes over the data are left as
    they are). It runs first (the runner puts it before every other plugin), where the
    loader's per-image transforms of the batch would just have run.

    When the training loader has no worker processes, ``generator`` is None: the augmentation
    draws as the loader's per-image transform would (torch's default generator, image after
    image), so the run sees exactly the batches of the per-image path. With workers, whose
    draws come from their own generators, speed matters more: ``generator`` is then a device
    generator seeded at the start of each experience from ``seed``, the experience and the
    rank (a run, and a run resumed at an experience boundary, draws the same augmentations, and
    data-parallel ranks draw different ones)."""

    def __init__(
        self, augment: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor], *,
        seed: int = 0
    ) -> None:
        super().__init__()
        self.augment = augment
        self.seed = seed
        self.generator: torch.Generator | None = None

    def before_training_exp(self, strategy, **kwargs):
        self.generator = None
        if getattr(strategy, "loader_workers", 0):
            experience = int(strategy.experience.current_experience)
            self.generator = keyed_generator("batch-augment", self.seed, experience,
                                             distributed.rank(), device=strategy.device)

    def before_training_iteration(self, strategy, **kwargs):
        strategy.mbatch[0] = self.augment(strategy.mbatch[0], self.generator)


class LRSchedule(SupervisedPlugin, supports_distributed=True):
    """Sets the learning rate of ``strategy.optimizer`` before every training iteration, within
    each experience: ``constant``; ``cosine`` from the base rate towards 0 over the experience's
    iterations; ``multistep``, the base rate times ``gamma`` for every epoch milestone reached
    (torch's ``MultiStepLR`` stepped once per epoch, as the SD-LoRA reference loop does); or
    ``epoch-cosine``, the base rate times ``cos(0.495 pi e / (E - 1))`` in epoch ``e`` of ``E``
    (InfLoRA's ``CosineSchedule``, ``utils/schedulers.py``: a quarter wave ending at 1.6%). The
    base rate is ``lr``, or ``first_lr`` on the stream's first experience (the reference
    configs' ``init_lr``).

    Setting it every iteration keeps it right when a strategy rebuilds its optimizer."""

    def __init__(self, lr: float, schedule: Schedule = "constant", *,
                 milestones: Sequence[int] = (), gamma: float = 0.1,
                 first_lr: float | None = None) -> None:
        super().__init__()
        if schedule not in ("constant", "cosine", "multistep", "epoch-cosine"):
            raise ValueError("lr_schedule must be 'constant', 'cosine', 'multistep' or "
                             f"'epoch-cosine', got {schedule!r}")
        if schedule == "multistep" and not milestones:
            raise ValueError("lr_schedule 'multistep' needs its epoch milestones "
                             "(training.lr_milestones, e.g. [10, 15])")
        if schedule != "multistep" and milestones:
            raise ValueError(f"lr_milestones {list(milestones)} are only used by "
                             "lr_schedule 'multistep'; set it, or drop the milestones")
        self.lr = lr
        self.first_lr = first_lr
        self.schedule = schedule
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = gamma
        self.base = lr
        self.total = 1
        self.per_epoch = 1
        self.epochs = 1
        self.step = 0

    def lr_at(self, step: int) -> float:
        if self.schedule == "constant":
            return self.base
        epoch = step // self.per_epoch
        if self.schedule == "multistep":
            return self.base * self.gamma ** sum(epoch >= m for m in self.milestones)
        if self.schedule == "epoch-cosine":
            return self.base * math.cos(0.495 * math.pi * epoch / max(1, self.epochs - 1))
        return 0.5 * self.base * (1.0 + math.cos(math.pi * min(step, self.total) / self.total))

    def before_training_exp(self, strategy, **kwargs):
        first = int(strategy.experience.current_experience) == 0
        self.base = self.first_lr if first and self.first_lr is not None else self.lr
        self.per_epoch = max(1, len(strategy.dataloader))
        self.epochs = strategy.train_epochs
        self.total = max(1, self.epochs * self.per_epoch)
        self.step = 0

    def before_training_iteration(self, strategy, **kwargs):
        lr = self.lr_at(self.step)
        for group in strategy.optimizer.param_groups:
            group["lr"] = lr
        self.step += 1


class Autocast(SupervisedPlugin, supports_distributed=True):
    """Runs the forward passes (training and evaluation) under ``torch.autocast``; the logits
    are cast back to float32 for the loss and the metrics."""

    def __init__(self, device_type: str, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.device_type = device_type
        self.dtype = dtype
        self._context: torch.autocast | None = None

    def context(self) -> torch.autocast:
        """A fresh autocast context of this precision, for forward passes other plugins run."""
        return torch.autocast(self.device_type, dtype=self.dtype)

    def _enter(self) -> None:
        self._context = self.context()
        self._context.__enter__()

    def _exit(self, strategy) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None
        strategy.mb_output = strategy.mb_output.float()

    def before_forward(self, strategy, **kwargs):
        self._enter()

    def after_forward(self, strategy, **kwargs):
        self._exit(strategy)

    def before_eval_forward(self, strategy, **kwargs):
        self._enter()

    def after_eval_forward(self, strategy, **kwargs):
        self._exit(strategy)


def tf32_switches(state: tuple[bool, bool]) -> tuple[bool, bool]:
    """Set torch's process-wide TF32 switches (matrix products, cuDNN convolutions) to
    ``state``; returns the pair they had."""
    backends = torch.backends
    previous = (backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32)
    backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = state
    return previous


class TF32(SupervisedPlugin, supports_distributed=True):
    """Float32 training and evaluation whose matrix products and convolutions run on TF32
    tensor cores (CUDA, Ampere or newer): inputs rounded to a 10-bit mantissa, sums in float32,
    every tensor stored in float32. The backend switches are process-wide: this plugin turns
    them on for the strategy's ``train`` and ``eval`` calls and puts back what it found after
    each, so other code in the process keeps its own precision."""

    def __init__(self) -> None:
        super().__init__()
        self._saved: list[tuple[bool, bool]] = []

    def _enter(self) -> None:
        self._saved.append(tf32_switches((True, True)))

    def _exit(self) -> None:
        if self._saved:
            tf32_switches(self._saved.pop())

    def before_training(self, strategy, **kwargs):
        self._enter()

    def after_training(self, strategy, **kwargs):
        self._exit()

    def before_eval(self, strategy, **kwargs):
        self._enter()

    def after_eval(self, strategy, **kwargs):
        self._exit()


class EpochTimer(SupervisedPlugin, supports_distributed=True):
    """Wall time inside the training epochs: for each experience, from the start of its first
    epoch to the end of its last, the device synchronised at both ends. The training loop
    alone, without the per-experience work (allocation, fusion, alignment, data-loader start)
    that ``train_seconds`` also counts; nothing waits for the device between the epochs."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0
        self._start: float | None = None
        self._epochs = 0

    def before_training_exp(self, strategy, **kwargs):
        self._start, self._epochs = None, 0

    def before_training_epoch(self, strategy, **kwargs):
        if self._start is None:
            _synchronize(strategy.device)
            self._start = time.perf_counter()

    def after_training_epoch(self, strategy, **kwargs):
        self._epochs += 1
        if self._epochs >= strategy.train_epochs:
            self._stop(strategy)

    def after_training_exp(self, strategy, **kwargs):
        self._stop(strategy)  # training stopped before its last epoch

    def _stop(self, strategy) -> None:
        if self._start is not None:
            _synchronize(strategy.device)
            self.seconds += time.perf_counter() - self._start
            self._start = None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LatestValue:
    """The latest value of a scalar tensor that has reached the host, without waiting for the
    device: :meth:`push` starts copying a new value (asynchronously from a CUDA device) and
    returns the value of an earlier push once its copy is done (``None`` until then)."""

    def __init__(self) -> None:
        self._pending: tuple[torch.Tensor, torch.cuda.Event] | None = None

    def push(self, value: torch.Tensor) -> float | None:
        value = value.detach().reshape(-1)[:1]
        if not value.is_cuda:
            return float(value)
        ready = None
        if self._pending is not None and self._pending[1].query():
            ready, self._pending = float(self._pending[0]), None
        if self._pending is None:
            host = value.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)
        return ready


class Progress(SupervisedPlugin, supports_distributed=True):
    """tqdm bars: training iterations of each experience (with the loss, as the host receives
    it: the bar never waits for the device), and evaluation iterations over the evaluated
    stream; both vanish when done."""

    def __init__(self, num_experiences: int, label: str = "") -> None:
        super().__init__()
        self.num_experiences = num_experiences
        self.label = label
        self._bar: tqdm | None = None
        self._loss = LatestValue()

    def _open(self, total: int, desc: str) -> None:
        self._close()
        self._bar = tqdm(
            total=total, desc=f"{self.label}{desc}", unit="it", leave=False, dynamic_ncols=True
        )

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def before_training_exp(self, strategy, **kwargs):
        index = int(strategy.experience.current_experience)
        self._open(
            strategy.train_epochs * len(strategy.dataloader),
            f"train {index + 1}/{self.num_experiences}",
        )

    def after_training_iteration(self, strategy, **kwargs):
        if self._bar is not None:
            loss = self._loss.push(strategy.loss)
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            self._bar.update()

    def after_training_exp(self, strategy, **kwargs):
        self._close()

    def before_eval(self, strategy, **kwargs):
        size = strategy.eval_mb_size
        total = sum(math.ceil(len(exp.dataset) / size) for exp in strategy.current_eval_stream)
        self._open(total, "eval")

    def after_eval_iteration(self, strategy, **kwargs):
        if self._bar is not None:
            self._bar.update()

    def after_eval(self, strategy, **kwargs):
        self._close()


def strategy_autocast(strategy) -> AbstractContextManager:
    """The autocast of ``strategy``'s :class:`Autocast` plugin (a null context without one):
    plugins that run forward passes of their own use it to match the training precision."""
    for plugin in getattr(strategy, "plugins", ()):
        if isinstance(plugin, Autocast):
            return plugin.context()
    return nullcontext()
