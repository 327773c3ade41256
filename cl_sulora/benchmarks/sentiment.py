"""Binary sentiment across review domains (amazon, yelp, IMDB, SST-2), domain-incremental."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .common import (
    BenchmarkSpec,
    carve_validation,
    check_order,
    domain_spec,
    find_layout,
    keep_first,
    load_tokenizer,
    read_text_task,
    resolve_data_root,
    text_dataset,
    wants_validation,
)
from .registry import register_benchmark

DIRNAME = "CL_Benchmark"
# label name -> 0 (negative) / 1 (positive); None drops the row (neutral 3-star reviews).
RATINGS = {"very negative": 0, "negative": 0, "neutral": None, "positive": 1, "very positive": 1}
GOOD_BAD = {"Bad": 0, "Good": 1}
DOMAINS: dict[str, tuple[str, dict[str, int | None]]] = {
    "amazon": ("SC/amazon", RATINGS),
    "yelp": ("SC/yelp", RATINGS),
    "IMDB": ("SC/IMDB", GOOD_BAD),
    "SST-2": ("SC/SST-2", GOOD_BAD),
}


@register_benchmark("sentiment-dil")
def build_sentiment_dil(
    *,
    tokenizer: Any,
    max_length: int = 128,
    domain_order: Sequence[str] = tuple(DOMAINS),
    data_root: str | os.PathLike | None = None,
    limit_per_class: int | None = None,
    num_experiences: int | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    validation: float = 0.0,
) -> BenchmarkSpec:
    """One experience per domain with labels negative=0 / positive=1 and task label 0.

    Ratings 1-2 are negative, 4-5 positive, 3 (neutral) dropped; Bad/Good map to 0/1.
    Domains without a test file get a seeded stratified ``test_fraction`` of train as test.
    ``validation > 0`` evaluates on that fraction of each domain's training data instead of the
    test split, which is then not read or tokenised.
    """
    held_out = wants_validation(validation)
    domains = keep_first(check_order("domain_order", domain_order, list(DOMAINS)), num_experiences)
    tokenizer = load_tokenizer(tokenizer)
    root = resolve_data_root(data_root)
    folder = find_layout(root, DIRNAME, DOMAINS[domains[0]][0])
    streams: dict[str, list] = {"train": [], "test": []}
    sizes: dict[str, list[int]] = {"train": [], "test": []}
    dropped: dict[str, dict[str, int]] = {}
    loaded = []
    for domain in domains:
        path, mapping = DOMAINS[domain]
        task = read_text_task(folder / path, domain, test_fraction, seed, not held_out)
        if set(task.label_names) != set(mapping):
            labels_file = folder / path / "labels.json"
            raise ValueError(f"{labels_file} lists {task.label_names}, expected {list(mapping)}")
        loaded.append(task)
        dropped[domain] = dict(task.dropped)
        splits = (("train", task.train),) + (() if held_out else (("test", task.test),))
        for split, (texts, names) in splits:
            keep = [j for j, n in enumerate(names) if mapping[n] is not None]
            dropped[domain][f"{split}_neutral"] = len(names) - len(keep)
            data = text_dataset(
                [texts[j] for j in keep],
                [mapping[names[j]] for j in keep],
                0,
                tokenizer,
                max_length,
                limit_per_class,
                seed,
            )
            streams[split].append(data)
            sizes[split].append(len(data))
    if held_out:  # placeholder test stream, replaced by carve_validation
        streams["test"], sizes["test"] = streams["train"], sizes["train"]
    spec = domain_spec(
        "sentiment-dil", streams, sizes, domains, modality="text", num_classes=2,
        limit_per_class=limit_per_class, seed=seed,
        notes={
            "class_names": ["negative", "positive"],
            "label_mapping": {d: DOMAINS[d][1] for d in domains},
            "test_split_from_train": [t.name for t in loaded if t.test_from_train],
            "split_seed": seed,
            "test_fraction": test_fraction,
            "dropped_rows": dropped,
            "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
            "max_length": max_length,
            "files": str(folder),
        },
        data_root=root,
    )
    return carve_validation(spec, validation, seed)
