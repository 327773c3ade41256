"""Builders the tests share: tiny models, generated streams and benchmarks, and run flags."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import torch
from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
from avalanche.benchmarks.utils import as_classification_dataset
from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
from avalanche.training.plugins import EvaluationPlugin
from PIL import Image
from torch.utils.data import TensorDataset

from cl_sulora import SuLoRA
from cl_sulora.adapters.subspace_layer import SubspaceLoRALinear
from cl_sulora.benchmarks import BenchmarkSpec
from cl_sulora.benchmarks.cifar100 import KNOWN_MD5
from cl_sulora.linalg import directions_outside
from cl_sulora.runner.config import resolve_config


def tiny_vit(**kwargs) -> torch.nn.Module:
    import timm

    return timm.create_model(
        "vit_small_patch16_224", pretrained=False, img_size=8, patch_size=4, embed_dim=32,
        depth=2, num_heads=2, num_classes=0, **kwargs,
    )


class TinyBert(torch.nn.Module):
    """A 2-layer BERT from a config; input ``(N, 2, L)``: token ids and attention mask."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=16)
        self.encoder = BertModel(config, add_pooling_layer=False)

    def forward(self, x):
        out = self.encoder(input_ids=x[:, 0], attention_mask=x[:, 1]).last_hidden_state
        return out[:, 0]


def _dataset(x: torch.Tensor, y: torch.Tensor):
    dataset = TensorDataset(x, y)
    dataset.targets = y.tolist()
    return as_classification_dataset(dataset)


def image_stream(n_classes=4, n_experiences=2, per_class=12, seed=0, task_labels=False):
    """A class-incremental stream of 8x8 images where each class has its own mean pattern."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_classes, 3, 8, 8, generator=g)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    x = means[y] + 0.3 * torch.randn(len(y), 3, 8, 8, generator=g)
    return nc_benchmark(_dataset(x, y), _dataset(x, y), n_experiences, task_labels=task_labels,
                        shuffle=False, class_ids_from_zero_in_each_exp=task_labels)


def text_stream(n_classes=4, n_experiences=2, per_class=12, seed=0):
    """A class-incremental stream of token sequences whose first tokens encode the class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(per_class)
    ids = torch.randint(5, 50, (len(y), 8), generator=g)
    ids[:, 1:6] = (y + 1)[:, None]
    x = torch.stack([ids, torch.ones_like(ids)], dim=1)
    return nc_benchmark(_dataset(x, y), _dataset(x, y), n_experiences, task_labels=False,
                        shuffle=False)


def domain_stream(n_classes=3, n_domains=2, per_class=10, seed=0):
    """A domain-incremental stream: same classes, a shifted input distribution per domain."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline

    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_classes, 3, 8, 8, generator=g)
    trains, tests = [], []
    for d in range(n_domains):
        y = torch.arange(n_classes).repeat_interleave(per_class)
        x = means[y] + d + 0.3 * torch.randn(len(y), 3, 8, 8, generator=g)
        trains.append(_dataset(x, y))
        tests.append(_dataset(x, y))
    return with_classes_timeline(benchmark_from_datasets(train=trains, test=tests))


TINY_VIT = {"img_size": 8, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 2}


def tiny_images(*, image_size, mean, std, num_experiences=None, task_incremental=False, seed=0):
    """A generated 8x8 image stream (registered as a benchmark in the tests)."""
    n = num_experiences or 3
    stream = image_stream(
        n_classes=2 * n, n_experiences=n, per_class=6, seed=seed, task_labels=task_incremental
    )
    return BenchmarkSpec(
        name="tiny-images",
        benchmark=stream,
        protocol="task-incremental" if task_incremental else "class-incremental",
        modality="image",
        num_classes=2 * n,
        experience_names=[f"classes {2 * i}-{2 * i + 1}" for i in range(n)],
        notes={"generated": True, "path": Path("/nowhere")},
        classes_per_task=[2] * n if task_incremental else None,
    )


def tiny_config(tmp_path, strategy="sulora", **overrides):
    return resolve_config(
        "tiny-images",
        strategy,
        {
            "backbone.name": "vit_small_patch16_224",
            "backbone.kwargs": TINY_VIT,
            "training.epochs": 1,
            "training.batch_size": 8,
            "device": "cpu",
            "out": str(tmp_path),
            **overrides,
        },
    )


def tiny_flags(out: Path, strategy: str = "sulora") -> list[str]:
    """A deterministic CLI run of 3 tiny experiences (2 iterations each) on a tiny ViT."""
    return [
        "run", "--strategy", strategy, "--benchmark", "tiny-images",
        "--backbone", "vit_small_patch16_224", "--set", f"backbone.kwargs={json.dumps(TINY_VIT)}",
        "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--deterministic",
        "--out", str(out / "results"), "--checkpoint-dir", str(out / "ckpt"),
    ]


def fill_slot(layer: SubspaceLoRALinear, owner: int, seed: int) -> None:
    """Start a slot with orthogonal directions, give it a random B, and freeze it."""
    g = torch.Generator().manual_seed(seed)
    used = layer.lora_A[layer.slots.used_rows()]
    dirs = directions_outside(torch.randn(8, layer.in_features, generator=g), used, layer.rank)
    layer.start_slot(owner, dirs)
    with torch.no_grad():
        layer.lora_B_train.copy_(torch.randn(layer.lora_B_train.shape, generator=g))
    layer.end_slot(torch.rand(layer.rank, generator=g))


def evaluator():
    return EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        forgetting_metrics(experience=True, stream=True),
        bwt_metrics(experience=True, stream=True),
        loggers=[],
    )


def make_strategy(model, config, epochs=2, **kwargs):
    return SuLoRA(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                  config=config, train_mb_size=8, train_epochs=epochs, evaluator=evaluator(),
                  **kwargs)


def write_cifar(folder: Path, train_per_class: int = 3, test_per_class: int = 2) -> None:
    """CIFAR-100 pickles; channel R encodes the class, G = 255 - class, B the index."""
    folder.mkdir(parents=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), per_class)
        np.random.RandomState(1).shuffle(labels)
        planes = np.zeros((len(labels), 3, 1024), dtype=np.uint8)
        planes[:, 0] = labels[:, None]
        planes[:, 1] = 255 - labels[:, None]
        planes[:, 2] = (np.arange(len(labels)) % 256)[:, None]
        raw = {"data": planes.reshape(len(labels), 3072), "fine_labels": labels.tolist()}
        (folder / split).write_bytes(pickle.dumps(raw, protocol=4))
    meta = {"fine_label_names": [f"c{i}" for i in range(100)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=4))
    for name in ("train", "test", "meta"):  # a known copy, as far as the checksums go
        KNOWN_MD5[name].add(hashlib.md5((folder / name).read_bytes()).hexdigest())


def write_image_folder(folder: Path, per_class: int, classes: int = 200) -> None:
    """``classes`` class folders of ``per_class`` 6x6 PNGs; red = class index, green = file
    index (names sort as their indices)."""
    for c in range(classes):
        (folder / f"n{c:08d}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.zeros((6, 6, 3), dtype=np.uint8)
            pixels[..., 0], pixels[..., 1] = c, i
            Image.fromarray(pixels).save(folder / f"n{c:08d}" / f"{i:03d}.png")


#: What ``python -m cl_sulora`` runs in a test folder that shadows the package: a run that
#: writes its process id to the file it is given, then takes long (to be stopped).
SLOW_RUN = """
import os, sys, time
open(sys.argv[1], "w").write(str(os.getpid()))
time.sleep(120)
"""
