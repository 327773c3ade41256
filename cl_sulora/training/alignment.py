"""Classifier alignment from stored class statistics, for this library's strategies
(:class:`~cl_sulora.training.template.AdapterTemplate`).

After each training experience the feature mean and covariance of every class in it are
stored; the head is then re-trained on features sampled from the Gaussians of every class seen
so far, balanced across classes (SLCA, Zhang et al., ICCV 2023). This corrects the head's bias
towards the newest classes without storing exemplars. Statistics are taken once, with the
backbone of the experience that brought the class, and are not refreshed later.

``fit="ridge"`` solves the head instead of sampling: the ridge regression of one-hot targets on
the features of every class seen, from the stored ``G = sum x x^T`` (one Gram matrix over every
class) and ``Q = sum x y^T`` (the class sums), as RanPAC solves its classifier, the ridge chosen
as RanPAC chooses it (:mod:`cl_sulora.ridge`). Exact, with no draws and no learning rate. On a
backbone followed by random features (``backbone.random_features``) it is RanPAC's classifier
on whatever features the method adapts, and the training head reads those features too.
``random_features`` instead splits the head as RanPAC does
(:class:`~cl_sulora.models.heads.SolvedHead`): a plain head on the backbone's features trains
with the method, and the head every evaluation reads is solved on the random features, which
the training loss never sees.

``fit="prototype"`` makes the head SimpleCIL's prototype classifier on the adapted features:
each seen class's row becomes its mean feature scaled to unit length (bias 0), so a sample's
top class is the one whose mean has the highest cosine with its features. Only the class means
are stored.

A multi-head model's heads never compete, so there is no bias between tasks to correct and they
are left as trained, unless ``task_heads`` is on: then each task keeps its own statistics and,
after each experience, only that experience's task's head is aligned (or solved) from the
statistics of the task's own classes. Where a task's features do not move once it is trained
(SuLoRA's task-aware inference), its solved head stays exact.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiHeadClassifier, MultiTaskModule
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    model_validator,
)
from torch import Tensor, nn

from ..models.heads import SolvedHead
from ..ridge import RANPAC_RIDGES, FitFraction, Ridges, select_ridge, solve_ridge
from ..seeding import keyed_generator
from .plugins import strategy_autocast
from .template import task_label


class AlignmentConfig(BaseModel):
    """Settings of :class:`ClassifierAlignment`; ``enabled`` is off by default.

    Args:
        enabled: align the head after every experience.
        samples_per_class: pseudo-features drawn per class and epoch.
        epochs: passes over the pseudo-features per alignment.
        lr: SGD learning rate (momentum 0.9, cosine to 0 over the alignment).
        batch_size: pseudo-features per step.
        covariance: ``full`` (d x d per class) or ``diagonal`` (d per class).
        shrinkage: added to the covariance diagonal, relative to its mean variance.
        drift_compensation: before storing a new experience's statistics, move every stored
            class mean by the drift the experience's training caused nearby (semantic drift
            compensation, Yu et al., CVPR 2020): the kernel-weighted mean displacement of the
            experience's own features, before vs after training. Costs one more forward pass
            over the experience.
        drift_bandwidth: the Gaussian kernel's width; ``None``: per class, the median distance
            of the experience's features (before training) to the class mean.
        fit: ``sampled`` (SLCA: SGD on sampled pseudo-features, the settings above),
            ``ridge`` (the head solved in closed form from the class sums and one Gram matrix;
            needs ``full`` covariance; the sampling settings are unused) or ``prototype``
            (each class's row its unit-length mean feature: SimpleCIL's cosine classifier;
            only the means are stored; the covariance and sampling settings are unused).
        ridges: the ridge candidates of ``fit="ridge"``, chosen per experience on its own
            features (RanPAC's 1e-8 ... 1e8).
        ridge_fit_fraction: the part of the experience's features the candidates are fit on;
            the rest scores them.
        task_heads: in a multi-head model (task-incremental), align each task's head from the
            statistics of its own classes after each of its experiences; off, the heads are
            left as trained (they never compete). Not with ``drift_compensation``, which would
            move other tasks' statistics after their heads were aligned.
        random_features: > 0 (``fit="ridge"``, single head): RanPAC's split of the head. The
            model's head is a :class:`~cl_sulora.models.heads.SolvedHead`: training reads the
            backbone's features through a plain head; evaluation reads this many random ReLU
            features of them (RanPAC's projection, seeded by the run seed) through a head
            solved here, whose statistics are taken of the random features. Not with
            ``backbone.random_features``, which puts the projection under training too.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    samples_per_class: PositiveInt = 256
    epochs: PositiveInt = 5
    lr: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.01
    batch_size: PositiveInt = 128
    covariance: Literal["full", "diagonal"] = "full"
    shrinkage: NonNegativeFloat = 0.01
    drift_compensation: bool = False
    drift_bandwidth: PositiveFloat | None = None
    fit: Literal["sampled", "ridge", "prototype"] = "sampled"
    ridges: Ridges = Field(default_factory=lambda: list(RANPAC_RIDGES))
    ridge_fit_fraction: FitFraction = 0.8
    task_heads: bool = False
    random_features: NonNegativeInt = 0

    @model_validator(mode="after")
    def _check(self) -> AlignmentConfig:
        if self.random_features and self.fit != "ridge":
            raise ValueError("alignment.random_features solves the head on random features as "
                             "RanPAC does: set alignment.fit=ridge (or alignment.random_features"
                             "=0)")
        if self.random_features and self.task_heads:
            raise ValueError("alignment.random_features splits a single head (class- or "
                             "domain-incremental); turn alignment.task_heads off")
        if self.fit == "ridge" and self.covariance != "full":
            raise ValueError("alignment.fit=ridge solves the head from the full second moments: "
                             "set alignment.covariance=full (or alignment.fit=sampled)")
        if self.task_heads and self.drift_compensation:
            raise ValueError("alignment.task_heads aligns each task's head once, from its own "
                             "statistics; alignment.drift_compensation would move them later: "
                             "turn one off")
        return self


Squares = Literal["class", "pooled", "none"]


class ClassStatistics:
    """Running per-class sums of features (float64) and of their outer products: per class
    (``squares="class"``: the Gaussians that sampling draws from), summed over every class
    (``"pooled"``: the Gram matrix, all the ridge fit needs; one ``d x d`` in all, so wide
    random features fit) or none (``"none"``: prototypes need the means only)."""

    def __init__(self, diagonal: bool, squares: Squares = "class") -> None:
        self.diagonal = diagonal
        self.squares = squares
        self.count: dict[int, int] = {}
        self.total: dict[int, Tensor] = {}
        self.square: dict[int, Tensor] = {}  # squares="class"
        self.gram: Tensor | None = None  # squares="pooled"

    def add(self, features: Tensor, labels: Tensor) -> None:
        features = features.double()
        if self.squares == "pooled":
            sq = self._square(features)
            self.gram = sq if self.gram is None else self.gram + sq
        for label in labels.unique().tolist():
            f = features[labels == label]
            if label in self.count:
                self.count[label] += len(f)
                self.total[label] += f.sum(0)
            else:
                self.count[label], self.total[label] = len(f), f.sum(0)
            if self.squares == "class":
                sq = self._square(f)
                self.square[label] = self.square[label] + sq if label in self.square else sq

    def _square(self, features: Tensor) -> Tensor:
        """The sum of the rows' outer products (of their squares, diagonal statistics)."""
        return (features * features).sum(0) if self.diagonal else features.T @ features

    def shift(self, label: int, by: Tensor) -> None:
        """Move class ``label``'s mean by ``by``, keeping its covariance (its part of the
        pooled Gram matrix moves alike)."""
        n, mean = self.count[label], self.total[label] / self.count[label]
        by = by.double()
        if self.diagonal:
            change = n * (2 * mean * by + by * by)
        else:
            change = n * (torch.outer(mean, by) + torch.outer(by, mean) + torch.outer(by, by))
        if self.squares == "class":
            self.square[label] += change
        elif self.squares == "pooled":
            self.gram += change
        self.total[label] += n * by

    def gram_matrix(self) -> Tensor:
        """The sum of every stored feature's outer product with itself."""
        return self.gram if self.gram is not None else sum(self.square.values())

    def stored_values(self) -> int:
        """Values held: the per-class sums and the squares kept."""
        squares = self.gram.numel() if self.gram is not None else 0
        return (sum(t.numel() for t in self.total.values()) + squares
                + sum(t.numel() for t in self.square.values()))

    def state_dict(self) -> dict:
        labels = sorted(self.count)
        state = {"labels": torch.tensor(labels, dtype=torch.long),
                 "count": torch.tensor([self.count[c] for c in labels], dtype=torch.long),
                 "total": [self.total[c].cpu() for c in labels],
                 "square": [self.square[c].cpu() for c in labels if c in self.square]}
        if self.gram is not None:
            state["gram"] = self.gram.cpu()
        return state

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        labels = state["labels"].tolist()
        self.count = dict(zip(labels, state["count"].tolist(), strict=True))
        self.total = {c: t.to(device) for c, t in zip(labels, state["total"], strict=True)}
        squares = state["square"]  # none where only the means or the pooled Gram are stored
        self.square = ({c: t.to(device) for c, t in zip(labels, squares, strict=True)}
                       if squares else {})
        self.gram = state["gram"].to(device) if "gram" in state else None
        if self.squares == "pooled" and self.square:  # saved per class before pooling
            self.gram, self.square = self.gram_matrix(), {}

    def gaussians(self, shrinkage: float) -> dict[int, tuple[Tensor, Tensor]]:
        """``{class: (mean, scale)}``: sample as ``mean + z @ scale.T`` (scale a Cholesky factor,
        or the standard deviations for diagonal statistics)."""
        out = {}
        for label, n in self.count.items():
            mean = self.total[label] / n
            if self.diagonal:
                var = (self.square[label] / n - mean * mean).clamp_min(0)
                var = var + shrinkage * var.mean().clamp_min(1e-12)
                out[label] = (mean, var.sqrt())
                continue
            cov = self.square[label] / n - torch.outer(mean, mean)
            cov = 0.5 * (cov + cov.T)
            eye = torch.eye(len(mean), dtype=cov.dtype, device=cov.device)
            cov = cov + shrinkage * cov.diagonal().mean().clamp_min(1e-12) * eye
            out[label] = (mean, _cholesky(cov))
        return out


#: What each fit keeps of the features' outer products (:class:`ClassStatistics`).
SQUARES_OF_FIT: dict[str, Squares] = {"sampled": "class", "ridge": "pooled", "prototype": "none"}


@torch.no_grad()
def _set_rows(head: nn.Module, classes: list[int], weight: Tensor) -> None:
    """Set the rows of ``classes`` in the head's linear layer to ``weight`` (one row per class,
    in that order) and their bias to 0: the one write of every closed-form fit."""
    linear = next(m for m in head.modules() if isinstance(m, nn.Linear))
    rows = torch.tensor(classes, device=linear.weight.device)
    linear.weight[rows] = weight.to(linear.weight)
    if linear.bias is not None:
        linear.bias[rows] = 0.0


def _cholesky(cov: Tensor) -> Tensor:
    factor, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return factor
    values, vectors = torch.linalg.eigh(cov)  # not positive definite in floating point
    return vectors * values.clamp_min(0).sqrt()


class ClassifierAlignment(SupervisedPlugin, supports_distributed=True):
    """Re-trains the head after each experience on features sampled from stored class
    Gaussians (``fit="ridge"``: solves it from their moments). A single head (growing or fixed)
    is aligned on every class seen; a multi-head model (task-incremental) is left unchanged,
    unless ``task_heads`` is on (then the trained task's head, on its own classes). Under
    data-parallel training every rank collects the whole experience and draws the same samples,
    so heads stay equal."""

    def __init__(self, config: AlignmentConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.seed = seed
        self.tasks: dict[int, ClassStatistics] = {}
        self._before: Tensor | None = None

    def statistics(self, task: int = 0) -> ClassStatistics:
        """The stored statistics of ``task``'s classes (of every class, with a single head:
        task 0), made empty on first use."""
        if task not in self.tasks:
            self.tasks[task] = ClassStatistics(diagonal=self.config.covariance == "diagonal",
                                               squares=SQUARES_OF_FIT[self.config.fit])
        return self.tasks[task]

    def stored_state_params(self) -> int:
        """Values stored: a mean per class (per task's class) and a covariance (or variances)
        per class (``fit="sampled"``), the Gram matrix of every class (per task; ``"ridge"``)
        or nothing more (``"prototype"``)."""
        return sum(stats.stored_values() for stats in self.tasks.values())

    def state_dict(self) -> dict:
        return {"tasks": {task: stats.state_dict() for task, stats in self.tasks.items()}}

    def load_state_dict(self, state: dict, strategy) -> None:
        tasks = state["tasks"] if "tasks" in state else {0: state}  # saved before task_heads
        self.tasks = {}
        for task, saved in tasks.items():
            self.statistics(int(task)).load_state_dict(saved, strategy.device)

    def _head(self, strategy) -> tuple[nn.Module, int] | None:
        """The head to align after the current experience and its statistics' task, or
        ``None`` when nothing is aligned."""
        head = getattr(strategy.model, "head", None)
        if head is None:
            return None
        if isinstance(head, SolvedHead):
            return head.solved, 0
        if not isinstance(head, MultiTaskModule):
            return head, 0
        if not self.config.task_heads:
            return None
        if not isinstance(head, MultiHeadClassifier):
            raise TypeError("alignment.task_heads aligns the heads of Avalanche's "
                            f"MultiHeadClassifier; this model's head is a {type(head).__name__}")
        task = task_label(strategy.experience)
        return head.classifiers[str(task)], task

    def before_training_exp(self, strategy, **kwargs):
        if self.config.drift_compensation and self.tasks and self._head(strategy) is not None:
            self._before = self._features(strategy)[0]

    def after_training_exp(self, strategy, **kwargs):
        found = self._head(strategy)
        if found is None:
            return
        head, task = found
        features, labels = self._features(strategy)
        if self._before is not None:
            self.compensate_drift(self._before, features)
            self._before = None
        stats = self.statistics(task)
        stats.add(features, labels)
        experience = int(strategy.experience.current_experience)
        if self.config.fit == "ridge":
            self._solve(head, stats, features, labels, experience)
        elif self.config.fit == "prototype":
            self._prototypes(head, stats)
        else:
            self._align(head, stats, strategy.device, experience)

    def compensate_drift(self, before: Tensor, after: Tensor) -> None:
        """Move each stored class mean by the kernel-weighted displacement ``after - before``
        of the features near it (rows: the same samples before and after training)."""
        before, moved = before.double(), (after - before).double()
        stats = self.statistics()
        for label in list(stats.count):
            mean = stats.total[label] / stats.count[label]
            dist = (before - mean).norm(dim=1)
            width = self.config.drift_bandwidth or float(dist.median().clamp_min(1e-12))
            weights = torch.exp(-0.5 * (dist / width) ** 2)
            if float(weights.sum()) > 0:
                stats.shift(label, (weights[:, None] * moved).sum(0) / weights.sum())

    @torch.no_grad()
    def _features(self, strategy) -> tuple[Tensor, Tensor]:
        """Features (float32) and labels of the experience, in dataset order, under the
        strategy's autocast: the backbone's, or their random features where the head that is
        aligned reads those (:class:`~cl_sulora.models.heads.SolvedHead`)."""
        model = strategy.model
        head = getattr(model, "head", None)
        solved_input = head.solved_input if isinstance(head, SolvedHead) else None
        was_training = model.training
        model.eval()
        loader = strategy.experience_loader(strategy.experience.dataset.eval())
        device = strategy.device
        features, labels = [], []
        for batch in loader:
            x = batch[0].to(device)
            with strategy_autocast(strategy):
                f = model.backbone(x).float()
            features.append(solved_input(f) if solved_input is not None else f)
            labels.append(batch[1].to(device))
        model.train(was_training)
        return torch.cat(features), torch.cat(labels)

    @torch.no_grad()
    def _solve(self, head: nn.Module, stats: ClassStatistics, features: Tensor, labels: Tensor,
               experience: int) -> None:
        """``fit="ridge"``: every row of the head's linear layer of a class in ``stats`` becomes
        the ridge regression's (bias 0), the ridge chosen on the experience's ``features``."""
        seen = sorted(stats.count)
        gram = stats.gram_matrix()
        targets = torch.stack([stats.total[c] for c in seen], dim=1)
        column = torch.full((max(seen) + 1,), -1, dtype=torch.long, device=labels.device)
        column[seen] = torch.arange(len(seen), device=labels.device)
        y = nn.functional.one_hot(column[labels], len(seen)).double()
        ridge = select_ridge(features.double(), y, self.config.ridges,
                             self.config.ridge_fit_fraction,
                             keyed_generator(self.seed, "alignment-ridge", experience))
        _set_rows(head, seen, solve_ridge(gram, targets, ridge).T)

    @torch.no_grad()
    def _prototypes(self, head: nn.Module, stats: ClassStatistics) -> None:
        """``fit="prototype"``: every row of the head's linear layer of a class in ``stats``
        becomes the class's mean feature at unit length (bias 0): the logit is the feature's
        norm times its cosine with the mean, so the top class is the cosine classifier's."""
        seen = sorted(stats.count)
        means = torch.stack([stats.total[c] / stats.count[c] for c in seen])
        _set_rows(head, seen, nn.functional.normalize(means, dim=1))

    def _align(self, head: nn.Module, stats: ClassStatistics, device: torch.device,
                experience: int) -> None:
        """``fit="sampled"``: SGD on the head over features drawn from ``stats``' classes."""
        cfg = self.config
        gaussians = stats.gaussians(cfg.shrinkage)
        labels = torch.tensor(sorted(gaussians), device=device)
        means = torch.stack([gaussians[c][0] for c in labels.tolist()]).float()
        scales = torch.stack([gaussians[c][1] for c in labels.tolist()]).float()
        gen = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + experience)
        params = [p for p in head.parameters()]
        grad_state = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)
        per_epoch = len(labels) * cfg.samples_per_class
        steps_per_epoch = math.ceil(per_epoch / cfg.batch_size)
        total = cfg.epochs * steps_per_epoch
        was_training = head.training
        head.train()
        step = 0
        with torch.enable_grad():
            for _ in range(cfg.epochs):
                features, targets = self._sample(means, scales, labels, gen, stats.diagonal)
                order = torch.randperm(per_epoch, generator=gen, device=device)
                for start in range(0, per_epoch, cfg.batch_size):
                    idx = order[start:start + cfg.batch_size]
                    for group in optimizer.param_groups:
                        group["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / total))
                    loss = nn.functional.cross_entropy(head(features[idx]), targets[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    step += 1
        head.train(was_training)
        for p, flag in zip(params, grad_state, strict=True):
            p.requires_grad_(flag)

    def _sample(self, means: Tensor, scales: Tensor, labels: Tensor, gen: torch.Generator,
                diagonal: bool) -> tuple[Tensor, Tensor]:
        n, d = self.config.samples_per_class, means.shape[1]
        z = torch.randn(len(labels), n, d, generator=gen, device=means.device)
        if diagonal:
            features = means[:, None] + z * scales[:, None]
        else:
            features = means[:, None] + z @ scales.transpose(1, 2)
        targets = labels.repeat_interleave(n)
        return features.reshape(-1, d), targets
