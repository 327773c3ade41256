"""DomainNet: domain-incremental over its six domains, class-incremental in 5 x 69 classes.

Domain-incremental: one experience per domain, all 345 classes in each. Class-incremental: 5
experiences of 69 classes, each with its classes' images of every domain.

The layout and rule of RanPAC's loader (``utils/data.py``, class ``domainnet``; domain order
from its ``trainer.py``): the official "cleaned" release under ``<root>/DomainNet/``, with its
list files ``<domain>_train.txt`` and ``<domain>_test.txt``, each line ``<domain>/<class>/<file>
<label>``. RanPAC tests on the union of the domains' test lists after the last domain; here each
domain's test list is an experience of the test stream, so the accuracy matrix has a column per
domain (A_last is their mean, not weighted by size). Transforms are those of the image folders
(:func:`~cl_sulora.benchmarks.image_folders.crop_transforms`).

The class-incremental protocol is CODA-Prompt's, which InfLoRA and SD-LoRA report: 345 classes
in 5 tasks of 69, the classes in label order (or a seeded permutation). CODA-Prompt and InfLoRA
read their images from their own split files (``dataloaders/splits/domainnet_{train,test}.yaml``
in either repository: ``data`` paths and ``targets``); given that folder as ``split_lists`` the
builder reads them, else it takes the union of the official lists of ``domains`` (all six by
default). Whether the two select the same images is not known here: the split files could not
be read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import yaml

from .common import (
    UNPACK_HINT,
    BenchmarkSpec,
    carve_validation,
    check_order,
    domain_spec,
    domain_streams,
    image_notes,
    keep_first,
    resolve_data_root,
    wants_validation,
)
from .image_folders import IMAGENET_MEAN, IMAGENET_STD, crop_transforms, file_class_split
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
    spec = domain_spec(
        "domainnet-dil", streams, sizes, domains, modality="image", num_classes=NUM_CLASSES,
        limit_per_class=limit_per_class, seed=seed,
        notes={**image_notes(image_size, mean, std, augment), "files": str(folder)},
        data_root=folder.parent,
    )
    return carve_validation(spec, validation, seed)


def read_split_file(path: Path, folder: Path) -> tuple[list[Path], list[int]]:
    """Image paths and labels of a CODA-Prompt/InfLoRA split file (YAML with lists ``data`` of
    paths and ``targets`` of labels), each path taken from its ``DomainNet/`` part on, under
    ``folder`` (the local ``DomainNet`` folder)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"DomainNet split file not found: expected {path} (dataloaders/splits/ of the "
            "CODA-Prompt or InfLoRA repository); or drop data.split_lists to use the official "
            "lists of the domains")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list) or not isinstance(
            raw.get("targets"), list) or len(raw["data"]) != len(raw["targets"]):
        raise ValueError(f"{path}: expected YAML lists 'data' (image paths) and 'targets' "
                         "(labels) of one length")
    paths = []
    for number, name in enumerate(raw["data"]):
        parts = Path(str(name)).parts
        if DIRNAME not in parts:
            raise ValueError(f"{path}: data[{number}] = {name!r} has no {DIRNAME}/ folder in it")
        paths.append(folder.joinpath(*parts[parts.index(DIRNAME) + 1:]))
    labels = [int(t) for t in raw["targets"]]
    if any(not 0 <= t < NUM_CLASSES for t in labels):
        raise ValueError(f"{path}: targets must lie in 0..{NUM_CLASSES - 1}")
    return paths, labels


@register_benchmark("domainnet-5", n_splits=5)
def build_domainnet_cil(
    n_splits: int = 5,
    *,
    data_root: str | os.PathLike | None = None,
    domains: Sequence[str] = DOMAINS,
    split_lists: str | os.PathLike | None = None,
    class_order_seed: int | None = None,
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
    """DomainNet's 345 classes in ``n_splits`` class-incremental experiences (69 classes each
    at 5), every domain's images of a class in its experience. The images: the CODA-Prompt /
    InfLoRA split files in ``split_lists`` when given, else the official lists of ``domains``.
    Labels are positions in the class order (``class_order_seed``: a seeded permutation;
    ``None``: label order, as CODA-Prompt and InfLoRA run it)."""
    held_out = wants_validation(validation)
    domains = check_order("domains", domains, DOMAINS)
    folder = resolve_data_root(data_root) / DIRNAME
    hint = f"{UNPACK_HINT}; the data is published at {PUBLISHED}"
    if split_lists is not None:
        lists = Path(split_lists)
        train = read_split_file(lists / "domainnet_train.yaml", folder)
        test = None if held_out else read_split_file(lists / "domainnet_test.yaml", folder)
        source = f"the split files in {lists}"
    else:
        def union(split: str) -> tuple[list[Path], list[int]]:
            paths: list[Path] = []
            labels: list[int] = []
            for domain in domains:
                more = read_list(folder / f"{domain}_{split}.txt", hint)
                paths += more[0]
                labels += more[1]
            return paths, labels

        train = union("train")
        test = None if held_out else union("test")
        source = f"the official lists of {', '.join(domains)}"
    spec = file_class_split(
        f"domainnet-{n_splits}", train, test, NUM_CLASSES, n_splits,
        num_experiences=num_experiences, class_order_seed=class_order_seed,
        image_size=image_size, mean=mean, std=std, augment=augment,
        limit_per_class=limit_per_class, seed=seed, check_files=check_files,
        notes={"label_remap": "label i is DomainNet label class_order[i]", "images": source,
               "files": str(folder)},
        data_root=folder.parent,
    )
    return carve_validation(spec, validation, seed)
