"""Tiny models and streams built from configs: fast enough for every test to train for real."""

from __future__ import annotations

import pytest
import torch
from avalanche.benchmarks.scenarios.deprecated.generators import nc_benchmark
from avalanche.benchmarks.utils import as_classification_dataset
from torch.utils.data import TensorDataset

from cl_sulora.models import ContinualClassifier, make_head


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


@pytest.fixture
def vit_model():
    torch.manual_seed(0)
    return ContinualClassifier(tiny_vit(), make_head("class-incremental", 32))


@pytest.fixture
def bert_model():
    torch.manual_seed(0)
    return ContinualClassifier(TinyBert(), make_head("class-incremental", 32))
