"""Shared pieces of the benchmark builders: the spec, data-root lookup, seeded limits and
splits, text tasks, tokenisation, Avalanche dataset/scenario construction and the validation
split carved from the training experiences."""

from __future__ import annotations

import json
import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from avalanche.benchmarks import (
    benchmark_from_datasets,
    nc_benchmark,
    with_classes_timeline,
    with_task_labels,
)
from avalanche.benchmarks.scenarios.generic_scenario import CLScenario
from avalanche.benchmarks.utils import (
    ConstantSequence,
    DataAttribute,
    TaskAwareSupervisedClassificationDataset,
    TaskLabels,
    TransformGroups,
)
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import (
    Compose,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    Resize,
    ToTensor,
)

from ..errors import DataError

T = TypeVar("T")
DATA_ENV_VAR = "CL_SULORA_DATA"
DEFAULT_DATA_ROOT = Path("~/.cache/cl-sulora-data")
UNPACK_HINT = (
    "put the data in its standard layout (docs/benchmarks.md) under a folder DIR and pass "
    f"--data-root DIR (or set {DATA_ENV_VAR}=DIR)"
)
# Normalisation of the project's reference backbone (ViT-Small, 32x32, CIFAR-10 statistics).
DEFAULT_MEAN = (0.4914, 0.4822, 0.4465)
DEFAULT_STD = (0.247, 0.2435, 0.2616)
CLASS_TIMELINE = (
    "classes_in_this_experience",
    "previous_classes",
    "classes_seen_so_far",
    "future_classes",
)


@dataclass
class BenchmarkSpec:
    """A built benchmark plus everything needed to describe and reproduce it."""

    name: str
    benchmark: CLScenario
    protocol: str  # "class-incremental" | "domain-incremental" | "task-incremental"
    modality: str  # "image" | "text"
    num_classes: int  # output units in total (summed over heads when task-incremental)
    experience_names: list[str]
    notes: dict[str, Any] = field(default_factory=dict)
    data_root: Path | None = None
    classes_per_task: list[int] | None = None  # task-incremental only
    #: training-time augmentation applied to each minibatch on the training device, as
    #: ``batch_augment(inputs, generator)`` (None: done per sample by the loader); a None
    #: generator asks for the per-sample transform's own draws
    batch_augment: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """The explicit root, else $CL_SULORA_DATA, else ~/.cache/cl-sulora-data."""
    root = data_root if data_root is not None else os.environ.get(DATA_ENV_VAR)
    return Path(root if root else DEFAULT_DATA_ROOT).expanduser()


def find_layout(root: Path, dirname: str, marker: str) -> Path:
    """``root/dirname``, or ``root`` itself when it directly holds ``marker``."""
    if (root / dirname).is_dir():
        return root / dirname
    if (root / marker).exists():
        return root
    raise FileNotFoundError(f"{dirname} data not found: expected {root / dirname}; {UNPACK_HINT}")


def check_positive(name: str, value: int | None) -> None:
    """Reject a non-positive (or non-integer) optional count."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def check_seed(name: str, value: int) -> None:
    """Reject a seed that NumPy's generators cannot take, naming its run config key."""
    if (not isinstance(value, numbers.Integral) or isinstance(value, bool)
            or not 0 <= value <= 2**32 - 1):
        raise ValueError(f"{name} (data.{name}) must be an integer from 0 to 2**32 - 1, "
                         f"got {value!r}")


def seeded_class_order(count: int, seed: int | None) -> list[int]:
    """The class order of the reference codes: a ``numpy.random.RandomState(seed)``
    permutation of ``0..count-1`` (their ``shuffle: true``, seed 1993 in most configs), or with
    ``seed=None`` the classes in their own order (``shuffle: false``, as InfLoRA's configs)."""
    if seed is None:
        return list(range(count))
    check_seed("class_order_seed", seed)
    return np.random.RandomState(seed).permutation(count).tolist()


def check_order(name: str, order: Sequence[str], known: Sequence[str]) -> list[str]:
    """Validate a user-given order of known, distinct names."""
    order = list(order)
    unknown = [x for x in order if x not in known]
    if unknown or not order or len(set(order)) != len(order):
        raise ValueError(
            f"{name} must be a non-empty list of distinct names from {list(known)}, got {order}"
        )
    return order


def keep_first(order: list[T], num_experiences: int | None) -> list[T]:
    """The first ``num_experiences`` entries of ``order`` (all when None)."""
    check_positive("num_experiences", num_experiences)
    if num_experiences is not None and num_experiences > len(order):
        raise ValueError(f"num_experiences={num_experiences} but only {len(order)} available")
    return order[:num_experiences]


def limit_indices(labels: Sequence[Any], limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices keeping, per label, the first ``limit`` items of a seeded shuffle."""
    check_positive("limit_per_class", limit)
    if limit is None:
        return np.arange(len(labels))
    counts: dict[Any, int] = {}
    keep = []
    for i in np.random.RandomState(seed).permutation(len(labels)):
        label = labels[i]
        if counts.get(label, 0) < limit:
            counts[label] = counts.get(label, 0) + 1
            keep.append(i)
    return np.sort(np.asarray(keep, dtype=np.int64))


def stratified_split(
    labels: Sequence[Any], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-label split into (kept, held-out) sorted indices; ``fraction`` is held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {fraction!r}")
    rng = np.random.RandomState(seed)
    labels_arr = np.asarray(labels)
    held = []
    for label in sorted(set(labels_arr.tolist())):
        idx = rng.permutation(np.flatnonzero(labels_arr == label))
        held.append(idx[: int(round(fraction * len(idx)))])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels_arr)), held_idx), held_idx


@dataclass
class TextTask:
    """One text task: label names and (texts, label names) per split."""

    name: str
    label_names: list[str]
    train: tuple[list[str], list[str]]
    test: tuple[list[str], list[str]]
    test_from_train: bool  # no test file: the test split is carved from train.json
    dropped: dict[str, int]  # rows per split whose label is not in labels.json
    train_from_test: bool = False  # no training file: both splits are carved from test.json


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}; {UNPACK_HINT}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {UNPACK_HINT}") from err


def _read_rows(path: Path, label_names: list[str]) -> tuple[list[str], list[str], int]:
    rows = _read_json(path)
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and "sentence" in r and "label" in r for r in rows
    ):
        raise ValueError(f"{path} must be a JSON list of {{'sentence': ..., 'label': ...}}")
    known = set(label_names)
    kept = [r for r in rows if r["label"] in known]
    _warn_dropped(path, len(rows) - len(kept), label_names)
    return [r["sentence"] for r in kept], [r["label"] for r in kept], len(rows) - len(kept)


def _warn_dropped(path: Path, count: int, label_names: list[str]) -> None:
    if count:
        warnings.warn(f"{path}: {count} row(s) whose label is not one of {label_names} were "
                      "dropped (counted in the record's notes, dropped_rows)", stacklevel=4)


def _split(texts: list[str], labels: list[str], fraction: float, seed: int):
    """(kept, held-out) parts of (texts, labels), stratified and seeded."""
    keep, held = stratified_split(labels, fraction, seed)
    return (([texts[i] for i in keep], [labels[i] for i in keep]),
            ([texts[i] for i in held], [labels[i] for i in held]))


def read_text_task(
    task_dir: Path, name: str, test_fraction: float, seed: int, with_test: bool = True
) -> TextTask:
    """Read ``train/test/labels.json`` of a task, dropping rows with unknown labels. Without
    a test file, a seeded stratified ``test_fraction`` of train becomes the test split;
    without a training file, the same fraction of the test file is the test split and the
    rest the training split. With ``with_test=False`` the test split is left empty (and a
    test file that is not needed for training is not read); train is the same either way."""
    label_names = _read_json(task_dir / "labels.json")
    if not isinstance(label_names, list) or not all(isinstance(x, str) for x in label_names):
        raise ValueError(f"{task_dir / 'labels.json'} must be a JSON list of label names")
    train_path, test_path = task_dir / "train.json", task_dir / "test.json"
    if not train_path.is_file() and not test_path.is_file():
        raise DataError(f"task {name} has no data: neither {train_path} nor {test_path} "
                        f"exists; leave {name} out of data.task_order ({UNPACK_HINT})")
    dropped = {"train": 0, "test": 0}
    if train_path.is_file():
        texts, labels, dropped["train"] = _read_rows(train_path, label_names)
        if test_path.is_file():
            train, test = (texts, labels), ([], [])
            if with_test:
                test_texts, test_labels, dropped["test"] = _read_rows(test_path, label_names)
                test = (test_texts, test_labels)
        else:
            train, test = _split(texts, labels, test_fraction, seed)
    else:
        texts, labels, dropped["test"] = _read_rows(test_path, label_names)
        train, test = _split(texts, labels, test_fraction, seed)
    if not train[0]:
        raise DataError(f"{train_path if train_path.is_file() else test_path} has no row to "
                        f"train on (labelled one of {label_names}); {UNPACK_HINT}")
    return TextTask(
        name=name,
        label_names=label_names,
        train=train,
        test=test if with_test else ([], []),
        test_from_train=not test_path.is_file(),
        dropped=dropped,
        train_from_test=not train_path.is_file(),
    )


def load_tokenizer(tokenizer: Any) -> Any:
    """A Hugging Face tokenizer, loaded with ``AutoTokenizer`` when given a name or path."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer)
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer or a path, got {tokenizer!r}")
    return tokenizer


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> torch.Tensor:
    """Long tensor (N, 2, max_length): input_ids and attention_mask, padded and truncated."""
    check_positive("max_length", max_length)
    enc = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_token_type_ids=False,
    )  # python lists: transformers' own tensor conversion is several times slower
    ids = torch.tensor(enc["input_ids"], dtype=torch.long).view(len(texts), max_length)
    mask = torch.tensor(enc["attention_mask"], dtype=torch.long).view(len(texts), max_length)
    return torch.stack([ids, mask], dim=1)


class LabelledData(Dataset):
    """Items with integer ``targets``; ``load`` (if given) turns an item into the input."""

    def __init__(
        self, items: Sequence[Any], targets: Sequence[int], load: Callable[[Any], Any] | None = None
    ):
        if len(items) != len(targets):
            raise ValueError(f"{len(items)} items but {len(targets)} targets")
        self.items = items
        self.targets = [int(t) for t in targets]
        self.load = load

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        item = self.items[i]
        return (self.load(item) if self.load else item), self.targets[i]


def open_rgb(path: str | Path) -> Image.Image:
    """Read an image file as RGB."""
    with Image.open(path) as img:
        return img.convert("RGB")


def check_images(paths: Sequence[str | Path]) -> None:
    """Decode every image file (a few seconds for ten thousand small ones), so that an empty,
    truncated or corrupt file is reported when the benchmark is built, not in the middle of a
    run: a :class:`DataError` naming the file."""
    for path in paths:
        try:
            with Image.open(path) as img:
                img.load()
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for bad files
            raise DataError(f"{path} is not a readable image ({err}); remove or replace it "
                            "(a copy of the data that unpacked completely has none)") from err


def image_transforms(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool,
    resize: bool,
) -> tuple[Callable, Callable]:
    """(train, eval) transforms: optional resize, optional crop+flip, ToTensor, Normalize."""
    check_positive("image_size", image_size)
    head = [Resize((image_size, image_size))] if resize else []
    tail = [ToTensor(), Normalize(tuple(mean), tuple(std))]
    aug = [RandomCrop(image_size, padding=image_size // 8), RandomHorizontalFlip()]
    return (
        Compose(head + (aug if augment else []) + tail),
        Compose(head + tail),
    )


def classification_dataset(
    data: LabelledData,
    task_label: int,
    train_eval: tuple[Callable, Callable] | None = None,
    group: str = "train",
) -> TaskAwareSupervisedClassificationDataset:
    """Avalanche dataset yielding (x, y, task_label), with train/eval transform groups."""
    groups = None
    if train_eval is not None:
        groups = TransformGroups({"train": train_eval[0], "eval": train_eval[1]})
    dataset = TaskAwareSupervisedClassificationDataset(
        [data],
        data_attributes=[
            DataAttribute(data.targets, "targets"),
            TaskLabels(ConstantSequence(task_label, len(data))),
        ],
        transform_groups=groups,
    )
    return dataset.with_transforms(group)


def text_dataset(
    texts: Sequence[str],
    labels: Sequence[int],
    task_label: int,
    tokenizer: Any,
    max_length: int,
    limit_per_class: int | None,
    seed: int,
) -> TaskAwareSupervisedClassificationDataset:
    """Tokenised (and per-class limited) text classification dataset."""
    keep = limit_indices(labels, limit_per_class, seed)
    x = tokenize(tokenizer, [texts[i] for i in keep], max_length)
    return classification_dataset(LabelledData(x, [labels[i] for i in keep]), task_label)


def domain_streams(
    domains: Sequence[str],
    files: Callable[[str, str], tuple[Sequence[Path], Sequence[int]]],
    transforms: tuple[Callable, Callable],
    limit_per_class: int | None,
    seed: int,
    held_out: bool,
    check_files: bool = True,
) -> tuple[dict[str, list], dict[str, list[int]]]:
    """(datasets, sizes) per split of a domain-incremental image stream: per domain, the images
    ``files(split, domain)`` lists (paths, labels), limited per class, task label 0, each image
    decoded first with ``check_files``. With ``held_out`` (a validation split to be carved) the
    test files are not read and the training datasets stand in for the test stream."""
    streams: dict[str, list] = {"train": [], "test": []}
    sizes: dict[str, list[int]] = {"train": [], "test": []}
    for split in ("train",) if held_out else ("train", "test"):
        for domain in domains:
            paths, labels = files(split, domain)
            keep = limit_indices(labels, limit_per_class, seed)
            if check_files:
                check_images([paths[i] for i in keep])
            data = LabelledData([str(paths[i]) for i in keep], [labels[i] for i in keep],
                                open_rgb)
            group = "train" if split == "train" else "eval"
            streams[split].append(classification_dataset(data, 0, transforms, group))
            sizes[split].append(len(data))
    if held_out:  # placeholder test stream, replaced by carve_validation
        streams["test"], sizes["test"] = streams["train"], sizes["train"]
    return streams, sizes


def class_split_benchmark(
    train: tuple[Sequence[Any], Sequence[int]],
    test: tuple[Sequence[Any], Sequence[int]] | None,
    classes: Sequence[int],
    n_experiences: int,
    transforms: tuple[Callable, Callable],
    load: Callable[[Any], Any] | None,
    limit_per_class: int | None,
    seed: int,
    check: Callable[[Sequence[Any]], None] | None = None,
) -> CLScenario:
    """Avalanche's ``nc_benchmark`` of the (items, labels) of ``classes`` (a class order: the
    labels become positions in it) in ``n_experiences`` equal experiences, each class limited
    to a seeded ``limit_per_class`` items, ``load`` turning an item into the input. ``check``
    sees each split's kept items first. ``test`` None (a validation split is to be carved):
    the training data stands in for the test stream, unread."""

    def subset(items: Sequence[Any], labels: Sequence[int]) -> LabelledData:
        y = np.asarray(labels)
        idx = np.flatnonzero(np.isin(y, classes))
        idx = idx[limit_indices(y[idx].tolist(), limit_per_class, seed)]
        kept = items[idx] if isinstance(items, np.ndarray) else [items[i] for i in idx]
        if check is not None:
            check(kept)
        return LabelledData(kept, y[idx].tolist(), load)

    train_data = subset(*train)
    return nc_benchmark(
        train_data,
        train_data if test is None else subset(*test),
        n_experiences=n_experiences,
        task_labels=False,
        fixed_class_order=list(classes),
        class_ids_from_zero_from_first_exp=True,
        train_transform=transforms[0],
        eval_transform=transforms[1],
    )


def image_notes(image_size: int, mean: Sequence[float], std: Sequence[float],
                augment: bool) -> dict[str, Any]:
    """What a benchmark's notes record of its image transforms."""
    return {"image_size": image_size, "mean": list(mean), "std": list(std), "augment": augment}


def class_split_spec(
    name: str,
    benchmark: CLScenario,
    order: Sequence[int],
    per_exp: int,
    *,
    class_order_seed: int | None,
    limit_per_class: int | None,
    seed: int,
    notes: dict[str, Any],
    data_root: Path,
    batch_augment: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
) -> BenchmarkSpec:
    """The spec of a :func:`class_split_benchmark` of ``per_exp`` classes per experience in
    ``order``: its notes give the class order, the per-class limit and the sizes, then
    ``notes``, the benchmark's own (label remap, transforms, files)."""
    kept = len(benchmark.train_stream)
    return BenchmarkSpec(
        name=name,
        benchmark=benchmark,
        protocol="class-incremental",
        modality="image",
        num_classes=kept * per_exp,
        experience_names=[class_range_name(i * per_exp, per_exp) for i in range(kept)],
        notes={
            "class_order": list(order),
            "class_order_seed": class_order_seed,
            "limit_per_class": limit_per_class,
            "limit_seed": seed,
            "train_sizes": [len(e.dataset) for e in benchmark.train_stream],
            "test_sizes": [len(e.dataset) for e in benchmark.test_stream],
            **notes,
        },
        data_root=data_root,
        batch_augment=batch_augment,
    )


def domain_spec(
    name: str,
    streams: dict[str, list[TaskAwareSupervisedClassificationDataset]],
    sizes: dict[str, list[int]],
    domains: Sequence[str],
    *,
    modality: str,
    num_classes: int,
    limit_per_class: int | None,
    seed: int,
    notes: dict[str, Any],
    data_root: Path,
) -> BenchmarkSpec:
    """The spec of a domain-incremental stream, one experience per domain of ``domains``
    (:func:`domain_streams`' ``streams`` and ``sizes``): its notes give the domain order, the
    per-class limit and the sizes, then ``notes``, the benchmark's own."""
    return BenchmarkSpec(
        name=name,
        benchmark=stream_benchmark(streams["train"], streams["test"]),
        protocol="domain-incremental",
        modality=modality,
        num_classes=num_classes,
        experience_names=list(domains),
        notes={
            "domain_order": list(domains),
            "limit_per_class": limit_per_class,
            "limit_seed": seed,
            "train_sizes": sizes["train"],
            "test_sizes": sizes["test"],
            **notes,
        },
        data_root=data_root,
    )


def stream_benchmark(
    train: list[TaskAwareSupervisedClassificationDataset],
    test: list[TaskAwareSupervisedClassificationDataset],
) -> CLScenario:
    """Scenario with one experience per dataset, exposing task labels and class timelines."""
    scenario = with_task_labels(
        with_classes_timeline(benchmark_from_datasets(train=train, test=test))
    )
    for stream in scenario.streams.values():
        for exp in stream:  # sorted lists, as NCScenario gives (Avalanche heads index with them)
            for attr in CLASS_TIMELINE:
                setattr(exp, attr, sorted(getattr(exp, attr)))
    return scenario


def class_range_name(first: int, count: int, names: Sequence[str] | None = None) -> str:
    """Experience name such as ``classes 0-9`` (with class names when given)."""
    text = f"classes {first}-{first + count - 1}" if count > 1 else f"class {first}"
    return f"{text} ({', '.join(names)})" if names else text


# ------------------------------------------------------------------------------ validation
VALIDATION_HINT = "use a smaller validation fraction, or a larger limit_per_class"


def wants_validation(validation: float) -> bool:
    """Check a ``validation`` fraction (0 <= v < 1); True when a split is to be carved, so the
    builder can leave the test data unread."""
    if (
        not isinstance(validation, numbers.Real)
        or isinstance(validation, bool)
        or not 0.0 <= validation < 1.0
    ):
        raise ValueError(
            f"validation must be a fraction 0 <= v < 1 of each training experience to hold out "
            f"(0: evaluate on test; e.g. 0.1), got {validation!r}"
        )
    return validation > 0


def validation_split(
    labels: Sequence[Any], fraction: float, seed: int | Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-label split into (train, held-out) sorted indices: ``round(fraction * n)``
    (at least 1) of each label's ``n`` items are held out; every label must keep one to train."""
    wants_validation(fraction)
    rng = np.random.RandomState(seed)
    labels_arr = np.asarray(labels)
    held = []
    for label in sorted(set(labels_arr.tolist())):
        idx = rng.permutation(np.flatnonzero(labels_arr == label))
        count = max(1, int(round(fraction * len(idx)))) if fraction > 0 else 0
        if count >= len(idx):
            raise ValueError(
                f"validation={fraction} would leave class {label} ({len(idx)} training "
                f"sample(s)) nothing to train on; {VALIDATION_HINT}"
            )
        held.append(idx[:count])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels_arr)), held_idx), held_idx


def carve_validation(spec: BenchmarkSpec, fraction: float, seed: int) -> BenchmarkSpec:
    """``spec`` with each training experience split per class into a train part (training
    transforms) and a held-out part (eval transforms); the held-out parts REPLACE the test
    stream. Experience order, classes, task labels and protocol are unchanged; the split of
    experience i is seeded by ``(seed, i)``. ``fraction`` 0 returns ``spec`` as it is.

    The builders pass placeholder test data when ``fraction > 0`` (the test files are not read),
    so the test stream of ``spec`` is ignored here."""
    if not wants_validation(fraction):
        return spec
    train, held = [], []
    for exp in spec.benchmark.train_stream:
        targets = [int(t) for t in exp.dataset.targets]
        try:
            keep, out = validation_split(targets, fraction, [seed, exp.current_experience])
        except ValueError as err:
            name = spec.experience_names[exp.current_experience]
            raise ValueError(f"experience {exp.current_experience} ({name}): {err}") from err
        train.append(exp.dataset.subset(keep.tolist()).train())
        held.append(exp.dataset.subset(out.tolist()).eval())
    sizes = {"train": [len(d) for d in train], "validation": [len(d) for d in held]}
    notes = {k: v for k, v in spec.notes.items() if k != "test_sizes"}
    notes.update(
        evaluated_stream="validation",
        validation={
            "fraction": fraction,
            "seed": seed,
            "rule": "per class of each training experience, a seeded round(fraction * n) "
            "(at least 1) is held out; the test stream is these held-out parts and the test "
            "data is not loaded",
            "train_sizes_before": [len(e.dataset) for e in spec.benchmark.train_stream],
        },
        train_sizes=sizes["train"],
        validation_sizes=sizes["validation"],
    )
    return replace(spec, benchmark=stream_benchmark(train, held), notes=notes)
