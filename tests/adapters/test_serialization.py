"""Adapter state saves and loads on its own, exactly, with clear errors on damaged files."""

import json

import pytest
import torch

from cl_sulora import (
    SubspaceLoRAConfig,
    add_subspace_lora,
    load_subspace_lora,
    save_subspace_lora,
    subspace_lora_layers,
)
from cl_sulora.adapters.serialization import WEIGHTS_NAME
from tests.helpers import fill_slot, tiny_vit


def adapted_model(fuse: bool):
    torch.manual_seed(0)
    model = add_subspace_lora(tiny_vit(), SubspaceLoRAConfig(rank=2, num_slots=3))
    for i, layer in enumerate(subspace_lora_layers(model).values()):
        fill_slot(layer, 0, 10 + i)
        fill_slot(layer, 1, 20 + i)
        if fuse:
            layer.fuse(layer.slots.rows_of(0)[:1])
    return model


@pytest.mark.parametrize("fuse", [False, True])
def test_round_trip_reproduces_outputs_exactly(tmp_path, fuse):
    model = adapted_model(fuse)
    save_subspace_lora(model, tmp_path)
    torch.manual_seed(0)
    fresh = tiny_vit()  # same pretrained backbone, no adapters
    load_subspace_lora(fresh, tmp_path)
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(fresh(x), model(x))
    for name, layer in subspace_lora_layers(fresh).items():
        original = subspace_lora_layers(model)[name]
        assert torch.equal(layer.slots.row_owner, original.slots.row_owner)
        assert torch.equal(layer.lora_A, original.lora_A)


def test_saved_state_excludes_backbone_weights(tmp_path):
    save_subspace_lora(adapted_model(False), tmp_path)
    from safetensors.torch import load_file

    keys = load_file(tmp_path / WEIGHTS_NAME).keys()
    assert not any(k.endswith("fused_weight") for k in keys)
    assert all(k.startswith("blocks.") and ".attn.qkv." in k for k in keys)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["config"]["rank"] == 2


def test_truncated_file_names_the_file(tmp_path):
    save_subspace_lora(adapted_model(True), tmp_path)
    path = tmp_path / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{path}.*truncated or corrupted"):
        load_subspace_lora(tiny_vit(), tmp_path)


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_subspace_lora(tiny_vit(), tmp_path / "nowhere")
