"""Text tasks, one per experience, task- or class-incremental: GLUE, or O-LoRA's long sequence.

``split-glue`` streams eight GLUE/SuperGLUE tasks; ``long-text`` every task of O-LoRA's 15-task
long sequence that has data here (14), in its order."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .common import (
    BenchmarkSpec,
    carve_validation,
    check_order,
    find_layout,
    keep_first,
    load_tokenizer,
    read_text_task,
    resolve_data_root,
    stream_benchmark,
    text_dataset,
    wants_validation,
)
from .registry import register_benchmark

DIRNAME = "CL_Benchmark"
TASK_PATHS = {
    "MNLI": "NLI/MNLI",
    "CB": "NLI/CB",
    "WiC": "WiC/WiC",
    "COPA": "COPA/COPA",
    "QQP": "QQP/QQP",
    "BoolQA": "BoolQA/BoolQA",
    "RTE": "NLI/RTE",
    "SST-2": "SC/SST-2",
    "MultiRC": "MultiRC/MultiRC",
    "IMDB": "SC/IMDB",
    "yelp": "SC/yelp",
    "amazon": "SC/amazon",
    "dbpedia": "TC/dbpedia",
    "agnews": "TC/agnews",
    "yahoo": "TC/yahoo",
}
DEFAULT_ORDER = ("MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "SST-2")
#: O-LoRA's long sequence, "order 4" of its appendix (from Progressive Prompts), without Yahoo
#: Answers, whose data the collection lacks.
LONG_ORDER = ("MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB", "yelp", "amazon",
              "SST-2", "dbpedia", "agnews", "MultiRC")
PROTOCOLS = ("task-incremental", "class-incremental")


def stream_order(task_order: Sequence[str], order_seed: int | None) -> list[str]:
    """``task_order`` checked, as given (``order_seed`` None) or permuted by
    ``numpy.random.RandomState(order_seed)``."""
    tasks = check_order("task_order", task_order, list(TASK_PATHS))
    if order_seed is None:
        return tasks
    return [tasks[i] for i in np.random.RandomState(order_seed).permutation(len(tasks))]


TASKS_DOC = """One experience per task of ``task_order`` ({summary}).

    ``order_seed`` (an integer) trains the tasks in a seeded permutation of ``task_order``
    instead (:func:`stream_order`; ``notes["task_order"]`` records it).
    task-incremental: experience i has task label i and labels 0..n_i-1 (labels.json order).
    class-incremental: task label 0; task i's labels are offset by the label counts of the
    tasks before it, giving one head over all tasks' labels. Tasks without a test file get a
    seeded stratified ``test_fraction`` of train as test, tasks with only a test file the
    same fraction of it as test and the rest as train (both listed in ``notes``).
    ``validation > 0`` evaluates on that fraction of each task's training data instead of the
    test split, which is then not read or tokenised.
    """


def task_stream_builder(name: str, default_order: Sequence[str],
                        summary: str) -> Callable[..., BenchmarkSpec]:
    """The builder of the text task stream ``name``, its tasks ``default_order`` unless the
    user gives ``task_order``; ``summary`` says what they are, in its docstring."""

    def build(
        *,
        tokenizer: Any,
        max_length: int = 128,
        protocol: str = "task-incremental",
        task_order: Sequence[str] = default_order,
        order_seed: int | None = None,
        data_root: str | os.PathLike | None = None,
        limit_per_class: int | None = None,
        num_experiences: int | None = None,
        seed: int = 0,
        test_fraction: float = 0.2,
        validation: float = 0.0,
    ) -> BenchmarkSpec:
        held_out = wants_validation(validation)
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        tasks = keep_first(stream_order(task_order, order_seed), num_experiences)
        tokenizer = load_tokenizer(tokenizer)
        root = resolve_data_root(data_root)
        folder = find_layout(root, DIRNAME, TASK_PATHS[tasks[0]])
        loaded = [
            read_text_task(folder / TASK_PATHS[t], t, test_fraction, seed, with_test=not held_out)
            for t in tasks
        ]

        incremental = protocol == "task-incremental"
        streams: dict[str, list] = {"train": [], "test": []}
        sizes: dict[str, list[int]] = {"train": [], "test": []}
        offsets, offset = [], 0
        for i, task in enumerate(loaded):
            offsets.append(0 if incremental else offset)
            label_ids = {label: k + offsets[-1] for k, label in enumerate(task.label_names)}
            splits = (("train", task.train),) + (() if held_out else (("test", task.test),))
            for split, (texts, names) in splits:
                ids = [label_ids[n] for n in names]
                data = text_dataset(texts, ids, i if incremental else 0, tokenizer, max_length,
                                    limit_per_class, seed)
                streams[split].append(data)
                sizes[split].append(len(data))
            offset += len(task.label_names)

        classes_per_task = [len(t.label_names) for t in loaded]
        if held_out:  # placeholder test stream, replaced by carve_validation
            streams["test"], sizes["test"] = streams["train"], sizes["train"]
        spec = BenchmarkSpec(
            name=name,
            benchmark=stream_benchmark(streams["train"], streams["test"]),
            protocol=protocol,
            modality="text",
            num_classes=sum(classes_per_task),
            experience_names=tasks,
            notes={
                "task_order": tasks,
                "order_seed": order_seed,
                "task_order_given": list(task_order),
                "label_names": {t.name: t.label_names for t in loaded},
                "label_offsets": dict(zip(tasks, offsets, strict=True)),
                "test_split_from_train": [t.name for t in loaded if t.test_from_train],
                "train_split_from_test": [t.name for t in loaded if t.train_from_test],
                "split_seed": seed,
                "test_fraction": test_fraction,
                "dropped_rows": {t.name: t.dropped for t in loaded},
                "limit_per_class": limit_per_class,
                "limit_seed": seed,
                "train_sizes": sizes["train"],
                "test_sizes": sizes["test"],
                "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
                "max_length": max_length,
                "files": str(folder),
            },
            data_root=root,
            classes_per_task=classes_per_task if incremental else None,
        )
        return carve_validation(spec, validation, seed)

    build.__name__ = build.__qualname__ = f"build_{name.replace('-', '_')}"
    build.__doc__ = TASKS_DOC.format(summary=summary)
    return build


build_split_glue = register_benchmark("split-glue")(task_stream_builder(
    "split-glue", DEFAULT_ORDER, "by default eight GLUE and SuperGLUE tasks"))
build_long_text = register_benchmark("long-text")(task_stream_builder(
    "long-text", LONG_ORDER, "by default the 14 tasks of O-LoRA's long sequence, its order 4, "
    "that have data: 50 classes; DBpedia has only a test file and Yelp, IMDB and MultiRC only "
    "a training file, each split by ``seed`` and ``test_fraction``"))
