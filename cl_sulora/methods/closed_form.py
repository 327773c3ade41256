"""Classifiers fit in closed form on a frozen backbone's features: SimpleCIL's class prototypes
and RanPAC's random-projection ridge regression.

Neither trains by gradient: after each experience the head's statistics grow by the
experience's features (computed with the evaluation transform, as the official code does) and
the head is solved again. They answer whether adapting the backbone helps at all: the field
knows them to beat many adapter methods on strong backbones. Their official code is
single-head (class- and domain-incremental); under the task-incremental protocol each task gets
its own closed-form head (:class:`TaskHeads`), as every method there gets a head per task.

A model is built with its protocol's head and the strategy puts the closed-form head in its
place, so :func:`~cl_sulora.saving.save_model` records which closed-form head a model holds
(:func:`closed_form_structure`) and :func:`~cl_sulora.saving.load_model` makes it again in a
fresh model (:func:`closed_form_head_to_load`); a strategy wraps such a model's head as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin
from avalanche.models import MultiTaskModule
from pydantic import Field, NonNegativeInt
from torch import Tensor, nn

from ..adapters.config import config_dataclass
from ..ridge import (
    RANPAC_RIDGES,
    FitFraction,
    Ridges,
    random_features,
    random_projection,
    select_ridge,
    solve_ridge,
)
from ..seeding import keyed_generator, projection_generator
from ..training.plugins import MASK_VALUE
from ..training.template import AdapterTemplate
from .registry import MethodSpec, checked_config, register

PROTOCOLS = ("class-incremental", "domain-incremental", "task-incremental")


class _ClassScores(nn.Module):
    """A head over the classes seen so far: subclasses score them (:meth:`scores`, one column
    per class id up to the largest seen, in fp32); the output has a column for every class the
    evaluated experience may hold (:meth:`cover`), those not seen yet at the masking value, as
    Avalanche's growing head gives. Its buffers take the shapes of the state it loads (they
    grow with the classes seen, so a fresh head is smaller than a trained one)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(0, dtype=torch.bool))
        self.width = 1

    def cover(self, num_classes: int) -> None:
        """Output at least ``num_classes`` columns from now on."""
        self.width = max(self.width, num_classes)

    def mark_seen(self, labels: Tensor) -> None:
        grow(self, "seen", int(labels.max()) + 1, dim=0)
        self.seen[labels] = True

    def scores(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def settings(self) -> dict:
        """The sizes the head was made with (its constructor's arguments but random draws):
        enough to make an empty head that takes this one's state."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        out = torch.full((len(x), max(self.width, len(self.seen))), MASK_VALUE,
                         dtype=torch.float32, device=x.device)
        if self.seen.any():
            with torch.autocast(x.device.type, enabled=False):  # fp32, as the official code
                scores = self.scores(x.float())
            out[:, :len(self.seen)] = torch.where(self.seen, scores, MASK_VALUE)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, buffer in self.named_buffers(recurse=False):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != buffer.shape:
                setattr(self, name, buffer.new_empty(saved.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PrototypeHead(_ClassScores):
    """SimpleCIL's cosine classifier: the logit of class ``c`` is the cosine of the feature with
    the class's prototype, the sum of its training features (for a class of one experience, its
    mean times the count: the same direction; across domains, the mean over every domain, as
    the official code's domain-incremental rule gives)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.register_buffer("sums", torch.zeros(0, in_features))

    def settings(self) -> dict:
        return {"in_features": self.in_features}

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add ``features`` (N, d) to the prototypes of their ``labels`` (N,)."""
        self.mark_seen(labels)
        grow(self, "sums", len(self.seen), dim=0)
        self.sums.index_add_(0, labels, features.to(self.sums.dtype))

    def scores(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.sums, dim=1).T


class RidgeHead(_ClassScores):
    """RanPAC's classifier: logits ``ReLU(x R) W^T``, with ``R`` a fixed Gaussian random
    projection (``in_features`` x ``projection_dim``; 0: none) and ``W`` the ridge regression of
    one-hot targets on the projected features of everything seen, ``W^T = (G + ridge I)^-1 Q``
    from the accumulated ``G = H^T H`` and ``Q = H^T Y``. Without a ``generator`` ``R`` is zero,
    for a head whose saved state is loaded next."""

    def __init__(self, in_features: int, projection_dim: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.projection_dim = projection_dim
        width = projection_dim or in_features
        if not projection_dim:
            projection = torch.zeros(0)
        elif generator is None:
            projection = torch.zeros(in_features, projection_dim)
        else:
            projection = random_projection(in_features, projection_dim, generator)
        self.register_buffer("projection", projection)
        self.register_buffer("gram", torch.zeros(width, width, dtype=torch.float64))
        self.register_buffer("targets", torch.zeros(width, 0, dtype=torch.float64))
        self.register_buffer("weight", torch.zeros(0, width))
        self.ridge: float | None = None

    def settings(self) -> dict:
        return {"in_features": self.in_features, "projection_dim": self.projection_dim}

    def project(self, x: Tensor) -> Tensor:
        return random_features(x, self.projection) if self.projection.numel() else x.float()

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor, ridges: Sequence[float],
               fit_fraction: float, generator: torch.Generator) -> None:
        """Accumulate the experience's projected ``features`` and one-hot ``labels``, choose
        the ridge on them (:func:`select_ridge`) and solve for ``W``."""
        h = self.project(features).double()
        self.mark_seen(labels)
        grow(self, "targets", len(self.seen), dim=1)
        y = F.one_hot(labels, self.targets.shape[1]).double()
        self.gram += h.T @ h
        self.targets += h.T @ y
        self.ridge = select_ridge(h, y, ridges, fit_fraction, generator)
        self.weight = solve_ridge(self.gram, self.targets, self.ridge).T.float()

    def scores(self, x: Tensor) -> Tensor:
        return self.project(x) @ self.weight.T


class TaskHeads(MultiTaskModule):
    """One closed-form head per task (task-incremental): each sample's task label picks its
    task's head, made by ``make`` when the task first arrives. Columns a task's head does not
    output are at the masking value (Avalanche's multi-task forward would leave them at 0,
    above a negative score)."""

    def __init__(self, make: Callable[[], _ClassScores]) -> None:
        super().__init__()
        self.make = make
        self.heads = nn.ModuleDict()

    def head(self, task: int) -> _ClassScores:
        """The head of ``task`` (made, on the device of the others, if new)."""
        key = str(int(task))
        if key not in self.heads:
            other = next(self.buffers(), None)
            self.heads[key] = self.make().to(other.device if other is not None else "cpu")
        return self.heads[key]

    def forward(self, x: Tensor, task_labels: Tensor | int | None) -> Tensor | dict:
        if task_labels is None or isinstance(task_labels, int):
            return super().forward(x, task_labels)
        outputs = {int(t): self.forward_single_task(x[task_labels == t], int(t))
                   for t in torch.unique(task_labels)}
        width = max(out.shape[1] for out in outputs.values())
        out = torch.full((len(x), width), MASK_VALUE, dtype=torch.float32, device=x.device)
        for task, scores in outputs.items():
            out[task_labels == task, :scores.shape[1]] = scores
        return out

    def forward_single_task(self, x: Tensor, task_label: int) -> Tensor:
        return self.head(task_label)(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in state_dict:  # make the saved tasks' heads; each then takes its buffers
            if key.startswith(prefix + "heads."):
                self.head(int(key[len(prefix) + len("heads."):].split(".")[0]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def grow(module: nn.Module, name: str, size: int, dim: int) -> None:
    """Zero-pad buffer ``name`` of ``module`` to ``size`` along ``dim`` (never shrinks)."""
    old = getattr(module, name)
    if old.shape[dim] >= size:
        return
    shape = list(old.shape)
    shape[dim] = size - old.shape[dim]
    setattr(module, name, torch.cat([old, old.new_zeros(shape)], dim=dim))


def head_in_features(model: nn.Module) -> int:
    """The feature size the model's head reads (its first linear layer's input)."""
    for module in model.head.modules():
        if isinstance(module, nn.Linear):
            return module.in_features
    raise ValueError(f"{type(model.head).__name__} head has no nn.Linear: cannot tell the "
                     "backbone's feature size")


#: the closed-form heads, by class name (as :func:`closed_form_structure` records them)
CLOSED_FORM_HEADS: dict[str, type[_ClassScores]] = {
    cls.__name__: cls for cls in (PrototypeHead, RidgeHead)}


def closed_form_structure(head: nn.Module) -> dict | None:
    """What makes ``head`` again, empty and ready to take its state
    (:func:`empty_closed_form_head`): its closed-form heads' class and sizes, and whether there
    is one per task; ``None`` for a head not solved in closed form."""
    if isinstance(head, TaskHeads):
        sample = next(iter(head.heads.values()), None)
        sample = head.make() if sample is None else sample
    elif isinstance(head, _ClassScores):
        sample = head
    else:
        return None
    return {"kind": "closed-form", "class": type(sample).__name__,
            "settings": sample.settings(), "per_task": isinstance(head, TaskHeads)}


def empty_closed_form_head(structure: dict) -> nn.Module:
    """An empty head of a :func:`closed_form_structure`; its buffers take the shapes of the
    state loaded into it (a head per task is made for each task of that state)."""
    cls = CLOSED_FORM_HEADS.get(structure["class"])
    if cls is None:
        raise ValueError(f"a closed-form head {structure['class']!r} this library does not "
                         f"know (it knows {sorted(CLOSED_FORM_HEADS)})")
    settings = dict(structure["settings"])
    return TaskHeads(lambda: cls(**settings)) if structure["per_task"] else cls(**settings)


def closed_form_head_to_load(model: nn.Module, structure: dict) -> nn.Module:
    """The head ``model`` takes a saved closed-form head's state into: its own if it is that
    head already (a closed-form strategy made it), else an empty one of the saved kind, in
    place of the protocol head the model was built with (of the saved regime, a head per task
    or one, and feature size), on that head's device."""
    head = model.head
    own = closed_form_structure(head)
    if own is not None:
        if own != structure:
            raise ValueError(f"saved from a closed-form head {_describe(structure)}, loaded "
                             f"into one {_describe(own)}")
        return head
    if structure["per_task"] != isinstance(head, MultiTaskModule):
        raise ValueError(f"saved from a closed-form head {_describe(structure)}, loaded into a "
                         f"{type(head).__name__}: build the model with the saved protocol's head")
    if head_in_features(model) != structure["settings"]["in_features"]:
        raise ValueError(f"saved from a closed-form head {_describe(structure)}, loaded into a "
                         f"head on {head_in_features(model)} features")
    tensor = next(iter([*head.parameters(), *head.buffers()]), None)
    return empty_closed_form_head(structure).to("cpu" if tensor is None else tensor.device)


def _describe(structure: dict) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in structure["settings"].items())
    return (f"{structure['class']}({settings})"
            + (" per task" if structure["per_task"] else ""))


class FeatureStore:
    """The frozen backbone's features of evaluation batches, kept after a dataset's first
    complete evaluation.

    The runner evaluates every test experience after each training experience, so a stream of
    ``T`` experiences passes each test sample through the backbone ``T`` times; a closed-form
    strategy never changes its backbone, and evaluation transforms are deterministic (the
    premise of :class:`~cl_sulora.training.loading.EvalInputCache`), so every pass after the
    first computes the same features. Each batch's features are kept under the dataset object
    and the batch's position in the (unshuffled) pass, and later passes only run the head. A
    pass that stops part-way keeps nothing; a dataset whose features would take the store past
    ``budget_bytes`` is encoded again every time."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        # id -> (dataset, features per batch); the dataset is held so that its id is not reused
        self._kept: dict[int, tuple[Any, list[Tensor]]] = {}
        self._batches: list[Tensor] = []  # the current pass's
        self._recording: Any = None  # the dataset whose features the current pass computes
        self._position = 0

    def start(self, dataset: Any) -> None:
        """Begin an evaluation pass over ``dataset``."""
        kept = self._kept.get(id(dataset))
        self._batches = kept[1] if kept is not None else []
        self._recording = dataset if kept is None else None
        self._position = 0

    def features(self, encode: Callable[[], Tensor], batch_size: int) -> Tensor:
        """The features of the pass's next batch (of ``batch_size`` samples): the kept ones,
        or ``encode()``'s, recorded."""
        position, self._position = self._position, self._position + 1
        if self._recording is not None:
            self._batches.append(encode())
            return self._batches[-1]
        if position >= len(self._batches) or len(self._batches[position]) != batch_size:
            raise RuntimeError(f"evaluation batch {position} ({batch_size} samples) does not match "
                               f"the {len(self._batches)} batches of features kept for its "
                               "dataset: its batches changed between evaluations")
        return self._batches[position]

    def finish(self) -> None:
        """End the pass; a recorded one is kept, within the budget."""
        if self._recording is not None:
            size = sum(f.numel() * f.element_size() for f in self._batches)
            if self.used_bytes + size <= self.budget_bytes:
                self._kept[id(self._recording)] = (self._recording, self._batches)
                self.used_bytes += size
        self._recording, self._batches = None, []


class ClosedFormStrategy(AdapterTemplate):
    """A frozen backbone under a head solved in closed form after each experience; nothing is
    trained by gradient (the optimizer is given no parameters). Subclasses make the head
    (:meth:`make_head`) and update it (:meth:`fit`).

    Evaluation computes a test set's features once (:class:`FeatureStore`, within
    ``eval_cache_gb``, beside the input cache: 0 turns both off); later evaluations run the head
    alone.

    A model with its protocol's head gets the closed-form head of its regime; one whose head
    is closed-form already (restored by :func:`~cl_sulora.saving.load_model`, or wrapped by a
    strategy before) keeps it, with what it has accumulated, so training goes on from it."""

    config_cls: type | None = None

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, config=None,
                 plugins: Sequence[SupervisedPlugin] | None = None, **kwargs) -> None:
        self.config = checked_config(self, self.config_cls, config)
        model.head = self.closed_form_head(model)
        model.requires_grad_(False)
        super().__init__(model=model, optimizer=optimizer, plugins=plugins, **kwargs)

    def closed_form_head(self, model: nn.Module) -> nn.Module:
        """The head this strategy solves for ``model``: in place of a protocol head, the
        closed-form head of its regime (a head per task, task-incremental, else one); a
        closed-form head is kept, once it is checked to be the one this strategy makes (its
        class and sizes), new tasks' heads then made by this strategy."""
        existing = closed_form_structure(model.head)
        if existing is None:
            in_features = head_in_features(model)
            return (TaskHeads(lambda: self.make_head(in_features))
                    if isinstance(model.head, MultiTaskModule) else self.make_head(in_features))
        in_features = existing["settings"]["in_features"]
        expected = closed_form_structure(self.make_head(in_features))
        if (existing["class"], existing["settings"]) != (expected["class"],
                                                         expected["settings"]):
            raise ValueError(
                f"the model's head is a closed-form head {_describe(existing)}: "
                f"{type(self).__name__} here solves a {_describe(expected)}; wrap it with the "
                "strategy and config that made it, or build a fresh model")
        if isinstance(model.head, TaskHeads):
            model.head.make = lambda: self.make_head(in_features)
        return model.head

    def set_eval_cache(self, budget_gb: float) -> None:
        """The input cache's budget, and as much again for the features of evaluation
        batches."""
        super().set_eval_cache(budget_gb)
        #: the backbone's features of evaluation batches
        self.eval_features = FeatureStore(self.eval_cache.budget_bytes)

    def make_head(self, in_features: int) -> nn.Module:
        raise NotImplementedError

    def _before_eval_exp(self, **kwargs):
        super()._before_eval_exp(**kwargs)
        self.eval_features.start(self.experience.dataset)

    def forward(self):
        """The logits of the evaluation batch, from its kept features where there are."""
        if self.is_training:
            return super().forward()
        features = self.eval_features.features(lambda: self.model.backbone(self.mb_x),
                                               len(self.mb_y))
        task_labels = self.mb_task_id if hasattr(self.experience, "task_labels") else None
        return self.model.classify(features, task_labels)

    def _after_eval_exp(self, **kwargs):
        self.eval_features.finish()
        super()._after_eval_exp(**kwargs)

    def fit(self, features: Tensor, labels: Tensor) -> None:
        """Update :meth:`current_head` with an experience's ``features`` and ``labels``."""
        raise NotImplementedError

    def current_head(self) -> _ClassScores:
        """The head the current experience's data belongs to (its task's, task-incremental)."""
        head = self.model.head
        if isinstance(head, TaskHeads):
            tasks = self.experience.task_labels
            if len(tasks) != 1:
                raise ValueError(f"a task-incremental experience holds one task, got {tasks}")
            return head.head(tasks[0])
        return head

    def closed_form_heads(self) -> list[_ClassScores]:
        """Every closed-form head of the model (one per task, task-incremental)."""
        head = self.model.head
        return list(head.heads.values()) if isinstance(head, TaskHeads) else [head]

    def make_optimizer(self, **kwargs):
        self.optimizer.state.clear()
        self.optimizer.param_groups.clear()

    def model_adaptation(self, model=None):
        # the experience's head first (a new task's is made here), then the template moves
        # the whole model, that head included, to the strategy's device
        classes = getattr(self.experience, "classes_in_this_experience", None)
        if classes is None:
            classes = self.experience.dataset.targets
        self.current_head().cover(int(max(classes)) + 1)
        return super().model_adaptation(model)

    @torch.no_grad()
    def _train_exp(self, experience, eval_streams=None, **kwargs):
        self.model.eval()
        data = experience.dataset.eval()
        features, labels = [], []
        for batch in self.experience_loader(data):
            features.append(self.model.backbone(batch[0].to(self.device)).float())
            labels.append(batch[1].to(self.device))
        self.fit(torch.cat(features), torch.cat(labels))


class SimpleCIL(ClosedFormStrategy):
    """SimpleCIL (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models:
    Generalizability and Adaptivity are All You Need", IJCV 2024): a prototype classifier on the
    frozen backbone (:class:`PrototypeHead`)."""

    def make_head(self, in_features: int) -> nn.Module:
        return PrototypeHead(in_features)

    def fit(self, features: Tensor, labels: Tensor) -> None:
        self.current_head().update(features, labels)


@config_dataclass
class RanPACConfig:
    """RanPAC without its first-session adaptation (the official code's ``ncm`` model with
    ``use_RP``).

    Args:
        projection_dim: ``M``, the random projection's width (the official default 10000; 0:
            no projection, ridge regression on the features themselves).
        ridges: candidate ridge values, chosen per experience on its own features.
        fit_fraction: the part of an experience's samples the candidates are fit on; the
            rest scores them.
        seed: seeds the projection and the split of the ridge choice (the run seed by default).
    """

    projection_dim: NonNegativeInt = 10000
    ridges: Ridges = Field(default_factory=lambda: list(RANPAC_RIDGES))
    fit_fraction: FitFraction = 0.8
    seed: int = 0


class RanPAC(ClosedFormStrategy):
    """RanPAC (McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for
    Continual Learning", NeurIPS 2023): ridge regression on randomly projected frozen features
    (:class:`RidgeHead`)."""

    config_cls = RanPACConfig

    def make_head(self, in_features: int) -> nn.Module:
        return RidgeHead(in_features, self.config.projection_dim,
                         projection_generator(self.config.seed))

    def fit(self, features: Tensor, labels: Tensor) -> None:
        experience = int(self.experience.current_experience)
        self.current_head().update(features, labels, self.config.ridges,
                                   self.config.fit_fraction,
                                   keyed_generator(self.config.seed, "ridge", experience))

    def method_state_params(self) -> int:
        """The accumulated ``G`` and ``Q`` (and the fixed projection) of every head."""
        return sum(head.gram.numel() + head.targets.numel() + head.projection.numel()
                   for head in self.closed_form_heads())


register(MethodSpec(
    name="simplecil",
    strategy=SimpleCIL,
    config_cls=None,
    paper="SimpleCIL (Zhou et al., IJCV 2024): prototypes on the frozen backbone",
    trains="nothing by gradient: each new class's prototype (its mean feature)",
    stores="one prototype per class",
    protocols=PROTOCOLS,
    alignment=False,
    distributed=False,
))
register(MethodSpec(
    name="ranpac",
    strategy=RanPAC,
    config_cls=RanPACConfig,
    paper="RanPAC (McDonnell et al., NeurIPS 2023), without first-session adaptation",
    trains="nothing by gradient: the ridge classifier on random-projected frozen features",
    stores="the Gram matrix of the projected features and their targets",
    protocols=PROTOCOLS,
    alignment=False,
    distributed=False,
))
