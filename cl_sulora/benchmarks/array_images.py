"""Transforms for images held in memory as uint8 arrays (CIFAR-100).

They apply torchvision's ``RandomCrop(size, padding)``, ``RandomHorizontalFlip()``, ``ToTensor()``
and ``Normalize`` to uint8 tensors, drawing the same random numbers in the same order, so their
outputs are bit-identical to the PIL pipeline's, at about a fifth of its per-sample cost (the
training data loader is the bottleneck of a ViT-S/4 run on one GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor


def chw_tensor(image: np.ndarray) -> Tensor:
    """An ``(H, W, C)`` uint8 array as a ``(C, H, W)`` uint8 tensor (no copy)."""
    return torch.from_numpy(image).permute(2, 0, 1)


class PadCropFlip:
    """Zero-pad by ``padding``, crop ``size`` x ``size`` at a random place, flip horizontally
    with probability 1/2; the random draws of torchvision's RandomCrop + RandomHorizontalFlip."""

    def __init__(self, size: int, padding: int) -> None:
        self.size = size
        self.padding = padding

    def __call__(self, image: Tensor) -> Tensor:
        p, size = self.padding, self.size
        if p:
            image = torch.nn.functional.pad(image, (p, p, p, p))
        h, w = image.shape[-2:]
        if (h, w) != (size, size):
            i = int(torch.randint(0, h - size + 1, size=(1,)))
            j = int(torch.randint(0, w - size + 1, size=(1,)))
            image = image[..., i:i + size, j:j + size]
        if torch.rand(1) < 0.5:
            image = image.flip(-1)
        return image


class Uint8Normalize:
    """uint8 ``(C, H, W)`` -> float32 in [0, 1] -> ``(x - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(tuple(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(tuple(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: Tensor) -> Tensor:
        return image.float().div_(255).sub_(self.mean).div_(self.std)


def array_image_transforms(
    image_size: int, mean: Sequence[float], std: Sequence[float], augment: bool
) -> tuple[Callable, Callable]:
    """(train, eval) transforms of uint8 ``(C, H, W)`` tensors already ``image_size`` wide."""
    normalize = Uint8Normalize(mean, std)
    if not augment:
        return normalize, normalize
    crop_flip = PadCropFlip(image_size, image_size // 8)
    return (lambda image: normalize(crop_flip(image))), normalize
