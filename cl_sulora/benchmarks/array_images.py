"""Transforms for images held in memory as uint8 arrays (CIFAR-100).

They apply torchvision's ``RandomCrop(size, padding)``, ``RandomHorizontalFlip()``, ``ToTensor()``
and ``Normalize`` to uint8 tensors, drawing the same random numbers in the same order, so their
outputs are bit-identical to the PIL pipeline's, at about a fifth of its per-sample cost (the
training data loader is the bottleneck of a ViT-S/4 run on one GPU). :class:`BatchPadCropFlip`
crops and flips a whole normalised minibatch on the training device instead, from the same
draws when asked (then moving the augmentation to the device changes where it runs, not what a
run computes) or from a device generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor


def chw_tensor(image: np.ndarray) -> Tensor:
    """An ``(H, W, C)`` uint8 array as a ``(C, H, W)`` uint8 tensor (no copy)."""
    return torch.from_numpy(image).permute(2, 0, 1)


def draw_crop_flip(height: int, width: int, size: int) -> tuple[int, int, bool]:
    """Row and column offsets of a ``size`` crop of a ``height`` x ``width`` image and whether
    to flip it: torchvision's RandomCrop + RandomHorizontalFlip draws, from torch's default
    (CPU) generator, in their order."""
    i = j = 0
    if (height, width) != (size, size):
        i = int(torch.randint(0, height - size + 1, size=(1,)))
        j = int(torch.randint(0, width - size + 1, size=(1,)))
    return i, j, bool(torch.rand(1) < 0.5)


class PadCropFlip:
    """Zero-pad by ``padding``, crop ``size`` x ``size`` at a random place, flip horizontally
    with probability 1/2 (:func:`draw_crop_flip`)."""

    def __init__(self, size: int, padding: int) -> None:
        self.size = size
        self.padding = padding

    def __call__(self, image: Tensor) -> Tensor:
        p, size = self.padding, self.size
        if p:
            image = torch.nn.functional.pad(image, (p, p, p, p))
        i, j, flip = draw_crop_flip(*image.shape[-2:], size)
        image = image[..., i:i + size, j:j + size]
        return image.flip(-1) if flip else image


class Uint8Normalize:
    """uint8 ``(C, H, W)`` -> float32 in [0, 1] -> ``(x - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(tuple(mean), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(tuple(std), dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: Tensor) -> Tensor:
        return image.float().div_(255).sub_(self.mean).div_(self.std)


class BatchPadCropFlip:
    """:class:`PadCropFlip` for every image of a float batch ``(B, C, H, W)`` already normalised
    by ``mean`` and ``std``, on the batch's device; the padding is the normalised value of black.

    With ``generator`` None, each image's offsets and flip are drawn on the host as the loader's
    per-image transform draws them (:func:`draw_crop_flip`, image after image, about 8 us an
    image): called where the loader would have transformed the batch's images, with nothing
    drawing from torch's default generator in between, it gives exactly the per-image path's
    batch (the runner's :class:`~cl_sulora.training.plugins.BatchAugment` does so when the
    loader has no worker processes). With a generator, they are drawn from it on the batch's
    device, all at once: the same distribution, other draws."""

    def __init__(
        self, size: int, padding: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.size = size
        self.padding = padding
        self.fill = -torch.tensor(tuple(mean), dtype=torch.float32) / torch.tensor(
            tuple(std), dtype=torch.float32
        )
        self._fills: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _fill_like(self, x: Tensor) -> Tensor:
        """The fill as ``(1, C, 1, 1)`` in ``x``'s dtype, copied to its device once."""
        key = (x.device, x.dtype)
        if key not in self._fills:
            self._fills[key] = self.fill.to(x).view(1, -1, 1, 1)
        return self._fills[key]

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, c, h, w = x.shape
        p, size, device = self.padding, self.size, x.device
        padded = x.new_empty(b, c, h + 2 * p, w + 2 * p)
        padded[:] = self._fill_like(x)
        padded[..., p:p + h, p:p + w] = x
        if generator is None:
            draws = torch.tensor([draw_crop_flip(h + 2 * p, w + 2 * p, size) for _ in range(b)])
            i, j, flip = draws.to(device).view(b, 3, 1).unbind(1)
            flip = flip.bool()
        else:
            i = torch.randint(0, h + 2 * p - size + 1, (b, 1), generator=generator,
                              device=device)
            j = torch.randint(0, w + 2 * p - size + 1, (b, 1), generator=generator,
                              device=device)
            flip = torch.rand(b, 1, generator=generator, device=device) < 0.5
        steps = torch.arange(size, device=device)
        rows = i + steps
        cols = j + torch.where(flip, steps.flip(0), steps)
        return padded[
            torch.arange(b, device=device).view(b, 1, 1, 1),
            torch.arange(c, device=device).view(1, c, 1, 1),
            rows.view(b, 1, size, 1),
            cols.view(b, 1, 1, size),
        ]


def array_image_transforms(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool,
    on_device: bool = False,
) -> tuple[Callable, Callable, BatchPadCropFlip | None]:
    """(train, eval, batch augmentation) for uint8 ``(C, H, W)`` tensors already ``image_size``
    wide. With ``augment`` and ``on_device`` the loader only normalises (train and eval) and the
    crop + flip is the returned :class:`BatchPadCropFlip`, for the training device; otherwise
    the train transform crops and flips per image and the batch augmentation is None."""
    normalize = Uint8Normalize(mean, std)
    if not augment:
        return normalize, normalize, None
    padding = image_size // 8
    if on_device:
        return normalize, normalize, BatchPadCropFlip(image_size, padding, mean, std)
    crop_flip = PadCropFlip(image_size, padding)
    return (lambda image: normalize(crop_flip(image))), normalize, None
