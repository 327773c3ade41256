"""Split CIFAR-100: class-incremental, equal experiences, seeded class order."""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from .array_images import array_image_transforms, chw_tensor
from .common import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    UNPACK_HINT,
    BenchmarkSpec,
    carve_validation,
    class_split_benchmark,
    class_split_spec,
    image_notes,
    image_transforms,
    keep_first,
    resolve_data_root,
    seeded_class_order,
    wants_validation,
)
from .registry import register_benchmark

DIRNAME = "cifar-100-python"
NUM_CLASSES = 100
IMAGE_SIZE = 32
DOWNLOAD_TIMEOUT_S = 10.0
HINT = f"{UNPACK_HINT}, or --set data.download=true to fetch it when online"


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-100 file not found: expected {path}; {HINT}")
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as err:  # any unpickling failure means a damaged file
        raise ValueError(f"{path} is not a readable CIFAR-100 pickle ({err!r}); {HINT}") from err


#: MD5 of the CIFAR-100 python files known to be whole: the official release's (as torchvision
#: lists them) and those of the lossless rebuild some copies ship, whose bytes differ.
KNOWN_MD5 = {
    "train": {"16019d7e3df5f24257cddd939b257f8d", "04c46c5e37f20bcd0311ac99cb988b21"},
    "test": {"f0ef6b0ae62326f3e7ffdfab6717acfc", "a50eb1e6162d6b25031cecb6b48950f4"},
    "meta": {"7973b15100ade9c7d40fb424638fde48", "1580defa312ed3539344f148645d707a"},
}


def verify_checksum(path: Path) -> None:
    """A :class:`DataError` unless ``path``'s MD5 is one of :data:`KNOWN_MD5`'s for its name."""
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    if digest not in KNOWN_MD5[path.name]:
        raise DataError(
            f"{path}: MD5 {digest} is not that of a known copy of CIFAR-100's {path.name} file "
            f"({' or '.join(sorted(KNOWN_MD5[path.name]))}): it is damaged or another copy. "
            f"Unpack it again ({UNPACK_HINT}), or use it as it is with "
            "--set data.verify_checksums=false"
        )


def load_split(path: Path, verify: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and fine labels (N,) of one CIFAR-100 pickle (its checksum
    verified first with ``verify``); a file whose images are all zero is refused."""
    if verify and path.is_file():
        verify_checksum(path)
    raw = _unpickle(path)
    try:
        data = np.asarray(raw["data"], dtype=np.uint8).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
        labels = np.asarray(raw["fine_labels"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} lacks valid 'data'/'fine_labels' ({err!r}); {HINT}") from err
    if len(data) != len(labels) or labels.min(initial=0) < 0 or labels.max(initial=0) >= 100:
        raise ValueError(f"{path}: {len(data)} images vs {len(labels)} labels in 0..99; {HINT}")
    if not data.any():
        raise DataError(f"{path}: every image is all zeros, not CIFAR-100 data; {HINT}")
    return np.ascontiguousarray(data.transpose(0, 2, 3, 1)), labels


def _download(parent: Path) -> None:
    from torchvision.datasets import CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        download_and_extract_archive(CIFAR100.url, str(parent), md5=CIFAR100.tgz_md5)
    except OSError as err:
        raise ConnectionError(
            f"could not download CIFAR-100 from {CIFAR100.url} into {parent / DIRNAME} "
            f"({err!r}); offline? {UNPACK_HINT}"
        ) from err
    finally:
        socket.setdefaulttimeout(previous)


def class_order(seed: int | None) -> list[int]:
    """Permutation of 0..99 from ``numpy.random.RandomState(seed)``; ``None``: 0..99."""
    return seeded_class_order(NUM_CLASSES, seed)


@register_benchmark("split-cifar100-100", n_splits=100)
@register_benchmark("split-cifar100-50", n_splits=50)
@register_benchmark("split-cifar100-20", n_splits=20)
@register_benchmark("split-cifar100-10", n_splits=10)
@register_benchmark("split-cifar100-5", n_splits=5)
def build_split_cifar100(
    n_splits: int = 10,
    *,
    data_root: str | os.PathLike | None = None,
    download: bool = False,
    class_order_seed: int | None = 1993,
    image_size: int = IMAGE_SIZE,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    augment: bool = True,
    augment_on_device: bool = False,
    limit_per_class: int | None = None,
    num_experiences: int | None = None,
    seed: int = 0,
    validation: float = 0.0,
    verify_checksums: bool = True,
) -> BenchmarkSpec:
    """Split CIFAR-100 into ``n_splits`` experiences of equally many classes.

    Labels are remapped to the position in the class order, so experience i holds classes
    i*C..(i+1)*C-1; ``notes["class_order"]`` gives the original CIFAR ids. ``validation > 0``
    evaluates on that fraction of each training experience instead of the test set
    (:func:`~cl_sulora.benchmarks.common.carve_validation`); the test file is then not read.
    ``augment_on_device`` moves the training crop + flip from the loader to the training device,
    a minibatch at a time (``spec.batch_augment``); it needs ``augment`` and 32x32 images.
    ``verify_checksums`` checks each file against the known copies (:data:`KNOWN_MD5`).
    """
    if not isinstance(n_splits, int) or n_splits < 1 or NUM_CLASSES % n_splits:
        raise ValueError(f"n_splits must divide 100, got {n_splits!r}")
    if augment_on_device and not augment:
        raise ValueError(
            "augment_on_device=True needs augment=True (there is nothing to augment): "
            "drop data.augment_on_device or set data.augment=true"
        )
    if augment_on_device and image_size != IMAGE_SIZE:
        raise ValueError(
            f"augment_on_device=True needs {IMAGE_SIZE}x{IMAGE_SIZE} images (the uint8 array "
            f"path), but the backbone takes image_size={image_size}: drop "
            "data.augment_on_device (the loader then augments each image)"
        )
    kept_exps = len(keep_first(list(range(n_splits)), num_experiences))
    held_out = wants_validation(validation)
    root = resolve_data_root(data_root)
    folder = root / DIRNAME
    if not folder.is_dir() and (root / "meta").is_file():
        folder = root  # root directly holds the pickles
    if download and not all((folder / f).is_file() for f in ("train", "test", "meta")):
        _download(root)
        folder = root / DIRNAME

    train_x, train_y = load_split(folder / "train", verify_checksums)
    test = None if held_out else load_split(folder / "test", verify_checksums)
    if verify_checksums and (folder / "meta").is_file():
        verify_checksum(folder / "meta")
    names = _unpickle(folder / "meta").get("fine_label_names")

    per_exp = NUM_CLASSES // n_splits
    order = class_order(class_order_seed)
    kept_classes = order[: kept_exps * per_exp]

    if image_size == IMAGE_SIZE:  # uint8 tensors: the same outputs as PIL, loaded ~3x faster
        load = chw_tensor
        train_tf, eval_tf, batch_augment = array_image_transforms(
            image_size, mean, std, augment, on_device=augment_on_device
        )
    else:
        load, batch_augment = Image.fromarray, None
        train_tf, eval_tf = image_transforms(image_size, mean, std, augment, resize=True)
    benchmark = class_split_benchmark((train_x, train_y), test, kept_classes, kept_exps,
                                      (train_tf, eval_tf), load, limit_per_class, seed)
    spec = class_split_spec(
        f"split-cifar100-{n_splits}", benchmark, order, per_exp,
        class_order_seed=class_order_seed, limit_per_class=limit_per_class, seed=seed,
        notes={
            "label_remap": "label i is original CIFAR-100 class class_order[i]",
            "class_names": [names[c] for c in order] if names else None,
            **image_notes(image_size, mean, std, augment),
            "augment_on_device": augment_on_device,
            "files": str(folder),
        },
        data_root=root,
        batch_augment=batch_augment,
    )
    return carve_validation(spec, validation, seed)
