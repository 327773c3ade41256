"""DomainNet domain-incremental: one experience per domain, all 345 classes in each.

The layout and rule of RanPAC's loader (``utils/data.py``, class ``domainnet``; domain order
from its ``trainer.py``): the official "cleaned" release under ``<root>/DomainNet/``, with its
list files ``<domain>_train.txt`` and ``<domain>_test.txt``, each line ``<domain>/<class>/<file>
<label>``. RanPAC tests on the union of the domains' test lists after the last domain; here each
domain's test list is an experience of the test stream, so the accuracy matrix has a column per
domain (A_last is their mean, not weighted by size). Transforms are those of the image folders
(:func:`~cl_sulora.benchmarks.image_folders.crop_transforms`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .common import (
    UNPACK_HINT,
    BenchmarkSpec,
    carve_validation,
    check_order,
    domain_streams,
    keep_first,
    resolve_data_root,
    stream_benchmark,
    wants_validation,
)
from .image_folders import IMAGENET_MEAN, IMAGENET_STD, crop_transforms
from .registry import register_benchmark

DIRNAME = "DomainNet"
#: RanPAC's ``dil_tasks``.
DOMAINS = ("real", "quickdraw", "painting", "sketch", "infograph", "clipart")
NUM_CLASSES = 345
PUBLISHED = "http://ai.bu.edu/M3SDA/ (the cleaned version, with its <domain>_train.txt lists)"


def read_list(path: Path, hint: str) -> tuple[list[Path], list[int]]:
    """Image paths (relative to the list's folder) and labels of a DomainNet list file."""
    if not path.is_file():
        raise FileNotFoundError(f"DomainNet list not found: expected {path}; {hint}")
    paths, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        name, _, label = line.strip().rpartition(" ")
        if not name or not label.isdigit() or not 0 <= int(label) < NUM_CLASSES:
            raise ValueError(f"{path}:{number}: expected '<domain>/<class>/<file> <label>' with "
                             f"a label in 0..{NUM_CLASSES - 1}, got {line!r}")
        paths.append(path.parent / name)
        labels.append(int(label))
    return paths, labels


@register_benchmark("domainnet-dil")
def build_domainnet_dil(
    *,
    data_root: str | os.PathLike | None = None,
    domain_order: Sequence[str] = DOMAINS,
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
    """One experience per domain of ``domain_order`` (RanPAC's by default), task label 0, one
    head of 345 classes. ``check_files`` decodes every image used first, so that a damaged file
    stops the build, not the run."""
    held_out = wants_validation(validation)
    domains = keep_first(check_order("domain_order", domain_order, DOMAINS), num_experiences)
    folder = resolve_data_root(data_root) / DIRNAME
    hint = f"{UNPACK_HINT}; the data is published at {PUBLISHED}"
    transforms = crop_transforms(image_size, mean, std, augment)
    streams, sizes = domain_streams(
        domains, lambda split, domain: read_list(folder / f"{domain}_{split}.txt", hint),
        transforms, limit_per_class, seed, held_out, check_files)
    spec = BenchmarkSpec(
        name="domainnet-dil",
        benchmark=stream_benchmark(streams["train"], streams["test"]),
        protocol="domain-incremental",
        modality="image",
        num_classes=NUM_CLASSES,
        experience_names=domains,
        notes={
            "domain_order": domains,
            "limit_per_class": limit_per_class,
            "limit_seed": seed,
            "train_sizes": sizes["train"],
            "test_sizes": sizes["test"],
            "image_size": image_size,
            "mean": list(mean),
            "std": list(std),
            "augment": augment,
            "files": str(folder),
        },
        data_root=folder.parent,
    )
    return carve_validation(spec, validation, seed)
