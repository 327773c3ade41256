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


def wider_vit():
    import timm

    return timm.create_model("vit_small_patch16_224", pretrained=False, img_size=8, patch_size=4,
                             embed_dim=48, depth=2, num_heads=2, num_classes=0)


@pytest.mark.parametrize("target, match", [
    ("rank", r"another config \(rank: model 4, saved 2"),
    ("alpha", r"another config \(alpha: model 3.0, saved 1.0"),
    ("wider", r"slots\.row_owner|lora_A is|does not fit"),
    ("plain-wider", r"lora_A is \(6, 32\), here \(6, 48\)|does not fit"),
])
def test_a_mismatched_load_is_refused_and_leaves_the_model_unchanged(tmp_path, target, match):
    from cl_sulora.errors import ConfigError

    save_subspace_lora(adapted_model(fuse=False), tmp_path)
    torch.manual_seed(0)
    if target == "rank":
        model = add_subspace_lora(tiny_vit(), SubspaceLoRAConfig(rank=4, num_slots=3))
    elif target == "alpha":
        model = add_subspace_lora(tiny_vit(), SubspaceLoRAConfig(rank=2, num_slots=3, alpha=3.0))
    elif target == "wider":
        model = add_subspace_lora(wider_vit(), SubspaceLoRAConfig(rank=2, num_slots=3))
    else:
        model = wider_vit()  # not adapted yet, and wider than the saved one
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = [type(m).__name__ for m in model.modules()]
    with pytest.raises(ConfigError, match=match):
        load_subspace_lora(model, tmp_path)
    assert [type(m).__name__ for m in model.modules()] == adapted
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
