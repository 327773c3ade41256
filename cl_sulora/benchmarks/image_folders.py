"""The field's class-incremental image benchmarks: ImageNet-R, ImageNet-A and CUB-200 in folders.

The layout is the one the reference loaders read (RanPAC, LAMDA-PILOT and InfLoRA's
``utils/data.py``, ``datasets.ImageFolder`` on each split): ``<root>/<dir>/train/<class>/*``
and ``<root>/<dir>/test/<class>/*``, classes numbered in sorted folder order, the class order a
``numpy.random.RandomState(class_order_seed)`` permutation (1993 in their configs; ``None``
keeps the sorted folder order, as InfLoRA's). ImageNet-R
as published by its authors is one folder of class folders: with ``split_seed`` the builder
splits it 80/20 itself, as InfLoRA does when it finds no ``train/`` folder (one global
``torch.randperm`` of the sorted files, the first 80% training). Transforms are the papers':
``RandomResizedCrop(size, scale=(0.05, 1))`` and a flip for training, ``Resize(size * 8 / 7,
bicubic)`` and ``CenterCrop(size)`` for evaluation, then the backbone's normalisation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms import (
    CenterCrop,
    Compose,
    InterpolationMode,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToTensor,
)

from .common import (
    UNPACK_HINT,
    BenchmarkSpec,
    carve_validation,
    check_images,
    check_positive,
    class_split_benchmark,
    class_split_spec,
    image_notes,
    keep_first,
    open_rgb,
    resolve_data_root,
    seeded_class_order,
    wants_validation,
)
from .registry import register_benchmark

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}

#: name -> (folder under the data root, classes, where the data is published)
DATASETS = {
    "imagenet-r": ("imagenet-r", 200, "https://github.com/hendrycks/imagenet-r (one folder; use "
                   "split_seed), or the train/test copy linked from the RanPAC and "
                   "RevisitingCIL READMEs"),
    "imagenet-a": ("imagenet-a", 200, "the train/test copy linked from the RanPAC and "
                   "RevisitingCIL READMEs (from https://github.com/hendrycks/natural-adv-examples)"),
    "cub200": ("cub", 200, "the train/test copy linked from the RanPAC and RevisitingCIL "
               "READMEs (from https://www.vision.caltech.edu/datasets/cub_200_2011/)"),
}


def crop_transforms(image_size: int, mean: Sequence[float], std: Sequence[float],
                    augment: bool):
    """(train, eval) transforms of the papers (see the module docstring)."""
    check_positive("image_size", image_size)
    tail = [ToTensor(), Normalize(tuple(mean), tuple(std))]
    evaluate = Compose([Resize(int(image_size * 8 / 7), interpolation=InterpolationMode.BICUBIC),
                        CenterCrop(image_size), *tail])
    if not augment:
        return evaluate, evaluate
    train = Compose([RandomResizedCrop(image_size, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3)),
                     RandomHorizontalFlip(), *tail])
    return train, evaluate


def folder_images(folder: Path, hint: str) -> tuple[list[str], list[str], list[int]]:
    """(class names in sorted order, image paths, labels) of an ImageFolder tree."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: expected {folder}; {hint}")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += [str(path) for path in files]
        labels += [label] * len(files)
    if not paths:
        raise FileNotFoundError(f"no images in class folders of {folder}; {hint}")
    return classes, paths, labels


def seeded_split(count: int, seed: int, train_fraction: float = 0.8) -> tuple[list[int],
                                                                              list[int]]:
    """InfLoRA's split of a one-folder dataset: ``torch.randperm(count)`` from a generator
    seeded ``seed``, its first ``int(train_fraction * count)`` indices training, the rest test."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    cut = int(train_fraction * count)
    return order[:cut], order[cut:]


def build_image_folders(
    n_splits: int,
    *,
    dataset: str,
    data_root: str | os.PathLike | None = None,
    class_order_seed: int | None = 1993,
    split_seed: int | None = None,
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augment: bool = True,
    check_files: bool = True,
    limit_per_class: int | None = None,
    num_experiences: int | None = None,
    seed: int = 0,
    validation: float = 0.0,
) -> BenchmarkSpec:
    """``dataset`` (a key of :data:`DATASETS`) in ``n_splits`` class-incremental experiences.

    Reads ``<root>/<dir>/train`` and ``.../test``; with ``split_seed``, ``<root>/<dir>`` is one
    folder of class folders split 80/20 by :func:`seeded_split`. Labels are positions in the
    class order (``notes["class_order"]`` maps them to sorted folder indices, and
    ``notes["class_names"]`` names them). ``check_files`` decodes every image first, so that
    a damaged file stops the build, not the run. ``validation > 0`` evaluates on that fraction
    of each training experience instead of the test split, whose images are then not read."""
    dirname, expected, published = DATASETS[dataset]
    held_out = wants_validation(validation)
    root = resolve_data_root(data_root) / dirname
    hint = f"{UNPACK_HINT}; the data is published at {published}"
    if not isinstance(n_splits, int) or n_splits < 1 or expected % n_splits:
        raise ValueError(f"n_splits must divide {expected}, got {n_splits!r}")
    test = None  # with a validation split to carve, the test images are not read
    if split_seed is None:
        classes, *train = folder_images(root / "train", hint)
        if not held_out:
            test_classes, *test = folder_images(root / "test", hint)
            if test_classes != classes:
                raise ValueError(f"{root}/test has other classes than {root}/train "
                                 f"({len(test_classes)} against {len(classes)}); {hint}")
    else:
        classes, paths, labels = folder_images(root, hint)
        train_idx, test_idx = seeded_split(len(paths), split_seed)
        train = [paths[i] for i in train_idx], [labels[i] for i in train_idx]
        if not held_out:
            test = [paths[i] for i in test_idx], [labels[i] for i in test_idx]
    if len(classes) != expected:
        raise ValueError(f"{root} has {len(classes)} class folders, {dataset} has {expected}; "
                         f"{hint}")
    spec = file_class_split(
        f"{dataset}-{n_splits}", train, test, expected, n_splits,
        num_experiences=num_experiences, class_order_seed=class_order_seed,
        image_size=image_size, mean=mean, std=std, augment=augment,
        limit_per_class=limit_per_class, seed=seed, check_files=check_files,
        notes={
            "label_remap": "label i is the class of sorted folder index class_order[i]",
            "split": ("the train/test folders" if split_seed is None else
                      f"seeded 80/20 of one folder (torch.randperm, seed {split_seed})"),
            "split_seed": split_seed,
            "files": str(root),
        },
        class_names=classes, data_root=root.parent,
    )
    return carve_validation(spec, validation, seed)


def file_class_split(
    name: str,
    train: tuple[Sequence[Path], Sequence[int]],
    test: tuple[Sequence[Path], Sequence[int]] | None,
    num_classes: int,
    n_splits: int,
    *,
    num_experiences: int | None,
    class_order_seed: int | None,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool,
    limit_per_class: int | None,
    seed: int,
    check_files: bool,
    notes: dict[str, Any],
    data_root: Path,
    class_names: Sequence[str] | None = None,
) -> BenchmarkSpec:
    """``num_classes`` classes of image files (``(paths, labels)``; ``test`` None while a
    validation split is to be carved) in ``n_splits`` class-incremental experiences, in the
    seeded class order, with the papers' crops (:func:`crop_transforms`): the split behind the
    folder benchmarks and DomainNet's class-incremental one."""
    per_exp = num_classes // n_splits
    kept_exps = len(keep_first(list(range(n_splits)), num_experiences))
    order = seeded_class_order(num_classes, class_order_seed)
    benchmark = class_split_benchmark(
        train, test, order[: kept_exps * per_exp], kept_exps,
        crop_transforms(image_size, mean, std, augment), open_rgb, limit_per_class, seed,
        check_images if check_files else None)
    names = {"class_names": [class_names[c] for c in order]} if class_names else {}
    return class_split_spec(
        name, benchmark, order, per_exp, class_order_seed=class_order_seed,
        limit_per_class=limit_per_class, seed=seed,
        notes={**notes, **names, **image_notes(image_size, mean, std, augment)},
        data_root=data_root)


for _name, _splits in (("imagenet-r", (5, 10, 20)), ("imagenet-a", (10,)), ("cub200", (10, 20))):
    for _n in _splits:
        register_benchmark(f"{_name}-{_n}", n_splits=_n, dataset=_name)(build_image_folders)
