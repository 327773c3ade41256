"""add_subspace_lora: targets by name, qkv parts, clear errors."""

import pytest
import torch
from torch import nn

from cl_sulora import SubspaceLoRAConfig, add_subspace_lora, subspace_lora_layers
from tests.helpers import TinyBert, tiny_vit


def test_timm_vit_gets_qkv_adapted_on_q_and_v_only():
    model = add_subspace_lora(tiny_vit(), SubspaceLoRAConfig(rank=2, num_slots=2))
    layers = subspace_lora_layers(model)
    assert sorted(layers) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    index = layers["blocks.0.attn.qkv"].out_index
    assert index.tolist() == list(range(0, 32)) + list(range(64, 96))
    assert model.adapter_targets == sorted(layers)


def test_bert_gets_query_and_value_adapted():
    model = add_subspace_lora(TinyBert(), SubspaceLoRAConfig(rank=2, num_slots=2))
    names = sorted(subspace_lora_layers(model))
    assert names == [f"encoder.encoder.layer.{i}.attention.self.{p}"
                     for i in range(2) for p in ("query", "value")]
    assert all(layer.out_index is None for layer in subspace_lora_layers(model).values())


def test_any_list_of_linear_names_and_regex():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    add_subspace_lora(model, SubspaceLoRAConfig(target_modules=["2"], rank=1, num_slots=2))
    assert list(subspace_lora_layers(model)) == ["2"]
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    add_subspace_lora(model, SubspaceLoRAConfig(target_modules=["re:[02]"], rank=1, num_slots=2))
    assert list(subspace_lora_layers(model)) == ["0", "2"]


def test_no_match_lists_the_candidate_linear_modules():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"Candidate Linear modules: 0, 2"):
        add_subspace_lora(model, SubspaceLoRAConfig(target_modules=["query"]))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="fusion_gamma"):
        SubspaceLoRAConfig(fusion_gamma=1.5)
    with pytest.raises(ValueError, match="allocator"):
        SubspaceLoRAConfig(allocator="random")
    with pytest.raises(ValueError, match="unknown_key"):
        SubspaceLoRAConfig(unknown_key=1)


def test_forward_is_unchanged_right_after_injection():
    torch.manual_seed(0)
    model = tiny_vit()
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    add_subspace_lora(model, SubspaceLoRAConfig(rank=2, num_slots=2))
    assert torch.equal(model(x), before)
