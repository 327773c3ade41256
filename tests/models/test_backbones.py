"""Backbones: local timm weights, Hugging Face encoders and their pooling, offline errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from cl_sulora.errors import BackboneError
from cl_sulora.models import backbones
from cl_sulora.models.backbones import HFEncoder, build_backbone
from tests.helpers import TinyBert

TINY_VIT = {"img_size": 8, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _save_vit(folder, num_classes=3, config=True):
    """A tiny timm ViT with a classifier head, saved in fp16 as in the reference backbone."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", num_classes=num_classes, **TINY_VIT)
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    if config:
        (folder / "config.json").write_text(
            json.dumps(
                {
                    "timm_model_name": "vit_small_patch16_224",
                    "timm_kwargs": {**TINY_VIT, "num_classes": num_classes},
                    "input": {"size": [3, 8, 8], "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]},
                }
            )
        )
    return state


def test_timm_from_local_dir_casts_to_fp32_and_drops_head(tmp_path):
    state = _save_vit(tmp_path / "vit")
    backbone = build_backbone(None, weights=tmp_path / "vit")
    assert backbone.modality == "image" and backbone.feature_dim == 32
    assert backbone.image_size == 8
    assert backbone.mean == (0.1, 0.2, 0.3) and backbone.std == (0.4, 0.5, 0.6)
    loaded = backbone.module.state_dict()
    assert not any(k.startswith("head.") and loaded[k].numel() for k in loaded)
    for key, value in loaded.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, state[key].float())
    assert backbone.module(torch.randn(2, 3, 8, 8)).shape == (2, 32)
    assert backbone.benchmark_options() == {
        "image_size": 8,
        "mean": (0.1, 0.2, 0.3),
        "std": (0.4, 0.5, 0.6),
    }


def test_timm_from_bare_safetensors_file_needs_name_and_kwargs(tmp_path):
    _save_vit(tmp_path, config=False)
    file = tmp_path / "model.safetensors"
    with pytest.raises(BackboneError, match="--backbone NAME"):
        build_backbone(None, weights=file)
    backbone = build_backbone("vit_small_patch16_224", weights=file, **TINY_VIT)
    assert backbone.feature_dim == 32 and backbone.image_size == 8


def test_timm_weights_errors(tmp_path):
    _save_vit(tmp_path / "vit")
    with pytest.raises(BackboneError, match="does not fit"):
        build_backbone(None, weights=tmp_path / "vit", embed_dim=64, num_heads=2)
    with pytest.raises(BackboneError, match="not 'vit_tiny_patch16_224'"):
        build_backbone("vit_tiny_patch16_224", weights=tmp_path / "vit")
    with pytest.raises(BackboneError, match="not found"):
        build_backbone(None, weights=tmp_path / "missing.safetensors")
    with pytest.raises(BackboneError, match="config.json"):
        build_backbone(None, weights=tmp_path)
    with pytest.raises(BackboneError, match="not both"):
        build_backbone("vit_small_patch16_224", weights=tmp_path / "vit", pretrained=True)


def test_timm_by_name_random_init():
    backbone = build_backbone("vit_small_patch16_224", **TINY_VIT)
    assert backbone.feature_dim == 32 and backbone.image_size == 8
    assert len(backbone.mean) == 3


def test_normalize_false_feeds_pixels_in_0_1_to_image_backbones_only():
    plain = build_backbone("vit_small_patch16_224", normalize=False, **TINY_VIT)
    assert plain.benchmark_options()["mean"] == (0.0, 0.0, 0.0)
    assert plain.benchmark_options()["std"] == (1.0, 1.0, 1.0)
    assert build_backbone("vit_small_patch16_224", **TINY_VIT).mean != (0.0, 0.0, 0.0)
    with pytest.raises(BackboneError, match="normalize=False is for image backbones"):
        build_backbone("minilm-l6", normalize=False)


def test_hf_encoder_pooling():
    torch.manual_seed(0)
    bert = TinyBert().encoder.eval()
    ids = torch.randint(5, 50, (3, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    x = torch.stack([ids, mask], dim=1)
    hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    mean = HFEncoder(bert, "mean")(x)
    for i, n in enumerate(mask.sum(1).tolist()):
        torch.testing.assert_close(mean[i], hidden[i, :n].mean(0))
    torch.testing.assert_close(HFEncoder(bert, "cls")(x), hidden[:, 0])
    with pytest.raises(ValueError, match="pooling"):
        HFEncoder(bert, "max")


def test_hf_encoder_from_local_dir(tmp_path):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "news"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab + [f"w{i}" for i in range(42)]))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    TinyBert().encoder.save_pretrained(tmp_path)
    backbone = build_backbone(str(tmp_path), pooling="cls", max_length=8)
    assert backbone.modality == "text" and backbone.feature_dim == 32
    assert backbone.max_length == 8 and backbone.module.pooling == "cls"
    enc = backbone.tokenizer(
        ["hello world", "news"], padding="max_length", max_length=8, return_tensors="pt"
    )
    x = torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)
    assert backbone.module(x).shape == (2, 32)
    assert set(backbone.benchmark_options()) == {"tokenizer", "max_length"}


def test_minilm_alias_resolves_to_the_bundled_model():
    folder = backbones.TEXT_ALIASES["minilm-l6"]()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(backbones, "hub_reachable", lambda: False)
    with pytest.raises(BackboneError, match="local directory"):
        build_backbone("some-org/some-encoder-that-is-not-cached")
    with pytest.raises(BackboneError, match="--backbone-weights"):
        build_backbone("vit_small_patch16_224", pretrained=True)


def test_hub_reachable_respects_offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert backbones.hub_reachable() is False


def test_name_is_required_without_weights():
    with pytest.raises(BackboneError, match="backbone name"):
        build_backbone(None)
