"""PACS domain-incremental benchmark: one experience per domain, 7 shared classes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .common import (
    DEFAULT_MEAN,
    DEFAULT_STD,
    UNPACK_HINT,
    BenchmarkSpec,
    carve_validation,
    check_order,
    domain_spec,
    domain_streams,
    find_layout,
    image_notes,
    image_transforms,
    keep_first,
    resolve_data_root,
    wants_validation,
)
from .registry import register_benchmark

DIRNAME = "pacs-64"
DOMAINS = ("photo", "art_painting", "cartoon", "sketch")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _class_dirs(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"PACS folder not found: expected {folder}; {UNPACK_HINT}")
    return {d.name: d for d in sorted(folder.iterdir()) if d.is_dir()}


def _domain_files(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    dirs = _class_dirs(folder)
    if sorted(dirs) != classes:
        raise ValueError(f"{folder} has classes {sorted(dirs)}, expected {classes}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in dirs[name].iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images (jpg/png) in {dirs[name]}")
        paths += files
        labels += [label] * len(files)
    return paths, labels


@register_benchmark("pacs-dil")
def build_pacs_dil(
    *,
    data_root: str | os.PathLike | None = None,
    domain_order: Sequence[str] = DOMAINS,
    image_size: int = 32,
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    augment: bool = True,
    limit_per_class: int | None = None,
    num_experiences: int | None = None,
    seed: int = 0,
    validation: float = 0.0,
) -> BenchmarkSpec:
    """PACS as one experience per domain in ``domain_order``, all with the same 7 classes
    (ids = sorted class folder names) and task label 0. ``validation > 0`` evaluates on that
    fraction of each training domain instead of the test split, which is then not read. Every
    image used is decoded once here, so a damaged file stops the build, naming it."""
    held_out = wants_validation(validation)
    domains = keep_first(check_order("domain_order", domain_order, DOMAINS), num_experiences)
    root = resolve_data_root(data_root)
    folder = find_layout(root, DIRNAME, "train")
    classes = sorted(_class_dirs(folder / "train" / domains[0]))
    transforms = image_transforms(image_size, mean, std, augment, resize=True)
    streams, sizes = domain_streams(
        domains, lambda split, domain: _domain_files(folder / split / domain, classes),
        transforms, limit_per_class, seed, held_out)
    spec = domain_spec(
        "pacs-dil", streams, sizes, domains, modality="image", num_classes=len(classes),
        limit_per_class=limit_per_class, seed=seed,
        notes={"class_names": classes, **image_notes(image_size, mean, std, augment),
               "files": str(folder)},
        data_root=root,
    )
    return carve_validation(spec, validation, seed)
