"""The measured models: a timm ViT with random weights plus a linear head, and random inputs."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .settings import BackboneSpec, Settings


class Classifier(nn.Module):
    """``head(backbone(x))``; the head is what every method trains besides its adapters."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def build_template(spec: BackboneSpec, settings: Settings) -> Classifier:
    """The backbone (random weights, on the CPU) every method starts from."""
    import timm

    torch.manual_seed(settings.seed)
    backbone = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.kwargs)
    return Classifier(backbone, settings.num_classes).eval()


def fresh(template: Classifier, device: torch.device) -> Classifier:
    """An independent copy of ``template`` on ``device``, in training mode."""
    return copy.deepcopy(template).to(device).train()


def random_images(spec: BackboneSpec, count: int, *, seed: int,
                  device: torch.device | str = "cpu") -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, spec.image_size, spec.image_size, generator=gen)
    return x.to(device)


def random_batch(spec: BackboneSpec, settings: Settings,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """One training batch of random images and labels, already on ``device``."""
    x = random_images(spec, spec.batch_size, seed=settings.seed, device=device)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    y = torch.randint(settings.num_classes, (spec.batch_size,), generator=gen)
    return x, y.to(device)
