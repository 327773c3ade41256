"""What the suite measures: backbones, batch sizes, iteration counts and adapter settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

#: Experiences at which training steps, inference and memory are measured.
CHECKPOINTS = (1, 10, 50, 100)
#: The experience of the headline ratios, the profile and the compiled measurements.
REFERENCE_EXPERIENCE = 10


@dataclass(frozen=True)
class BackboneSpec:
    """A timm ViT with random weights, its input size and the batch size it is measured at."""

    key: str
    timm_name: str
    kwargs: dict[str, Any]
    image_size: int
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL_BACKBONES = {
    "vit-s4": BackboneSpec("vit-s4", "vit_small_patch16_224",
                           {"img_size": 32, "patch_size": 4}, 32, 1024),
    "vit-b16": BackboneSpec("vit-b16", "vit_base_patch16_224", {}, 224, 256),
}
_TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2}
TINY_BACKBONES = {
    "vit-s4": BackboneSpec("vit-s4", "vit_small_patch16_224",
                           {"img_size": 16, "patch_size": 4, **_TINY}, 16, 8),
    "vit-b16": BackboneSpec("vit-b16", "vit_base_patch16_224",
                            {"img_size": 32, "patch_size": 16, **_TINY}, 32, 4),
}


@dataclass(frozen=True)
class Settings:
    """Measurement settings shared by every group of one run.

    ``rank`` is every method's rank per experience (PEFT's LoRA rank too); SuLoRA has
    ``num_slots`` slots and fuses when full. An experience's training time is that of one
    experience of split-cifar100-10 (``experience_images`` images) for ``experience_epochs``
    epochs (the ``sulora`` preset's) at the measured batch size:
    ``experience_epochs * ceil(experience_images / batch_size)`` steps of the measured step
    time. ``data_sample_sweep`` are the ``data_max_samples`` values whose boundary time is
    recorded (``experience_images``: every input of the experience).
    """

    tiny: bool
    device: str
    precision: str = "bf16"
    warmup: int = 5
    iters: int = 20
    checkpoints: tuple[int, ...] = CHECKPOINTS
    reference_experience: int = REFERENCE_EXPERIENCE
    rank: int = 4
    num_slots: int = 10
    num_classes: int = 100
    experience_images: int = 5000
    experience_epochs: int = 5
    covariance_samples: int = 256
    data_sample_sweep: tuple[int, ...] = (64, 256, 1024, 5000)
    sweep_boundaries: int = 3
    matmul_size: int = 8192
    profile_steps: int = 3
    compile: bool = False
    seed: int = 0
    allocators: tuple[str, ...] = ("orthogonal", "principal", "data")
    methods: tuple[str, ...] = ("sulora", "sdlora", "inflora", "olora")

    @property
    def max_experience(self) -> int:
        return max(self.checkpoints)

    @property
    def boundary_experiences(self) -> int:
        """Experiences of each allocator's boundary run: the last three boundaries fuse."""
        return self.num_slots + 3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_settings(*, tiny: bool, device: str, compile: bool, warmup: int | None,
                  iters: int | None) -> Settings:
    """Full settings, or the tiny CPU ones (few iterations, a small matmul)."""
    from cl_sulora.runner.presets import load_preset

    epochs = load_preset("sulora").training.epochs
    settings = Settings(tiny=tiny, device=device, compile=compile, experience_epochs=epochs)
    if tiny:
        settings = replace(settings, warmup=1, iters=3, matmul_size=256, profile_steps=1,
                           covariance_samples=16, data_sample_sweep=(4, 16),
                           sweep_boundaries=2)
    if warmup is not None:
        settings = replace(settings, warmup=warmup)
    if iters is not None:
        settings = replace(settings, iters=iters)
    return settings


def backbone_specs(keys: list[str], *, tiny: bool, batch_size: int | None) -> list[BackboneSpec]:
    """The specs of ``keys`` (full or tiny), with ``batch_size`` overriding the default."""
    table = TINY_BACKBONES if tiny else FULL_BACKBONES
    unknown = [k for k in keys if k not in table]
    if unknown:
        raise SystemExit(f"unknown backbone(s) {unknown}; choose from {sorted(table)}")
    specs = [table[k] for k in keys]
    return [replace(s, batch_size=batch_size) for s in specs] if batch_size else specs
