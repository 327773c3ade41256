"""Fixtures: tiny models built from configs (fast enough for every test to train for real) and
the generated ``tiny-images`` benchmark registered for a run."""

from __future__ import annotations

import json

import pytest
import torch

from cl_sulora.benchmarks import BENCHMARKS
from cl_sulora.models import ContinualClassifier, make_head
from tests.helpers import TINY_VIT, TinyBert, tiny_images, tiny_vit


@pytest.fixture
def vit_model():
    torch.manual_seed(0)
    return ContinualClassifier(tiny_vit(), make_head("class-incremental", 32))


@pytest.fixture
def bert_model():
    torch.manual_seed(0)
    return ContinualClassifier(TinyBert(), make_head("class-incremental", 32))


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """Registers ``tiny-images``; returns the CLI flags of a tiny, fast run."""
    monkeypatch.setitem(BENCHMARKS, "tiny-images", tiny_images)
    kwargs = json.dumps(TINY_VIT)
    return [
        "--benchmark",
        "tiny-images",
        "--backbone",
        "vit_small_patch16_224",
        "--set",
        f"backbone.kwargs={kwargs}",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "results"),
    ]
