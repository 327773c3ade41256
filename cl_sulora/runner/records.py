"""The results record of a run: what was measured, and where every number came from (command,
config, commit, device, versions)."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import subprocess
import tempfile
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import metrics
from ..atomic import atomic_write_json
from ..errors import ConfigError
from ..training import distributed

if TYPE_CHECKING:
    from .build import Experiment
    from .loop import StreamResult

#: The checkout the package runs from, when it runs from one (not from an installed wheel).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
#: Where a record goes when its folder cannot be written at the end of a run.
FALLBACK_DIR = Path(tempfile.gettempdir()) / "cl-sulora-records"
#: Packages whose versions every record names.
VERSIONED = ("cl-sulora", "torch", "avalanche-lib", "timm", "transformers")


def make_record(
    experiment: Experiment, result: StreamResult, command: Sequence[str]
) -> dict[str, Any]:
    """The results JSON of a run."""
    config, spec = experiment.config, experiment.spec
    device = distributed.local_device(config.device)
    adapters = experiment.strategy.adapter_report()
    alignment = experiment.alignment
    return {
        "benchmark": spec.name,
        "protocol": spec.protocol,
        "strategy": config.strategy,
        "seed": config.seed,
        "backbone": experiment.backbone.name,
        "commit": experiment.commit,
        "versions": versions(),
        "device": device_name(device),
        # data-parallel ranks; training.batch_size is the global batch, split over them
        "world_size": distributed.world_size(),
        "command": list(command),
        "config": config.model_dump(mode="json"),
        "experience_names": list(spec.experience_names),
        "accuracy_matrix": result.accuracy_matrix,
        **metrics.summarize(result.accuracy_matrix),
        "trainable_params": result.trainable_params,
        "live_adapter_params": adapters["live_adapter_params"],
        "stored_state_params": adapters["stored_state_params"],
        "alignment_stored_params": None if alignment is None else alignment.stored_state_params(),
        "train_seconds": result.train_seconds,
        # the part of train_seconds inside training epochs (see training.plugins.EpochTimer)
        "train_epoch_seconds": result.train_epoch_seconds,
        # training samples in one pass over the stream (the joint run's pass included)
        "train_samples": sum(len(e.dataset) for e in spec.benchmark.train_stream),
        "peak_memory_mb": peak_memory_mb(device),
        "notes": _jsonable(spec.notes),
    }


def write_record(path: Path, record: dict[str, Any],
                 echo: Callable[[str], None] | None = None) -> Path:
    """Write ``record`` to ``path`` atomically; if that fails (the folder became unwritable
    during the run), write it to :data:`FALLBACK_DIR` and say where, rather than lose the
    run. Returns the path written."""
    try:
        return atomic_write_json(path, record)
    except OSError as err:
        fallback = FALLBACK_DIR / path.name
        atomic_write_json(fallback, record)
        message = f"could not write {path} ({err.strerror or err}); the record is at {fallback}"
        warnings.warn(message, stacklevel=2)
        if echo:
            echo(f"warning: {message}")
        return fallback


def check_result_path(path: Path, config: dict[str, Any], overwrite: bool,
                      own: Mapping[str, Any] | None = None) -> None:
    """Refuse, before training, to replace a record of another run config at ``path`` (a sweep
    into one folder would keep only its last run); ``overwrite`` allows it. ``own``: the config
    of the run being resumed, whose own record (same config) may be replaced too."""
    if overwrite or not path.is_file():
        return
    try:
        saved = json.loads(path.read_text()).get("config", {})
    except (OSError, json.JSONDecodeError):
        return  # not a record: the run's own write replaces it
    if own is not None and not config_differences(saved, own):
        return
    differing = config_differences(saved, config)
    if differing:
        raise ConfigError(
            f"{path} holds the record of a run with another config ({'; '.join(differing[:5])})"
            ": give another --out, or pass --overwrite to replace it"
        )


#: Run config keys that say where a run reads and writes, not what it runs: a record of the
#: same run is the same however these paths were spelt (``$CL_SULORA_DATA`` or ``--data-root``,
#: a relative or an absolute ``--out``).
LOCATIONS = ("out", "data.data_root")


def same_run(saved: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
    """Whether a record's config ``saved`` is that of the run ``config``, :data:`LOCATIONS`
    aside."""
    return not config_differences(saved, config, ignore=LOCATIONS)


def records_in(folder: str | Path, label: str) -> dict[Path, dict[str, Any]]:
    """The run records in ``folder`` of the benchmark label ``label``
    (``<label>__<strategy>__seed<k>.json``), by path; files that are not records are left out."""
    found = {}
    for path in sorted(Path(folder).glob(f"{label}__*__seed*.json")):
        if not re.fullmatch(rf"{re.escape(label)}__.+__seed\d+\.json", path.name):
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "accuracy_matrix" in record and "config" in record:
            found[path] = record
    return found


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any],
                       ignore: Collection[str] = ()) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs, the keys in ``ignore``
    aside. A training or backbone setting that ``old`` lacks (it was written before the setting
    existed) counts as its default, the value that keeps the earlier behaviour."""
    from .config import BackboneConfig
    from .presets import TrainingConfig

    defaults = _flatten({"training": TrainingConfig().model_dump(mode="json"),
                         "backbone": BackboneConfig().model_dump(mode="json")})
    old, new = _flatten(old), _flatten(new)
    old = {**{k: v for k, v in defaults.items() if k not in old and k in new}, **old}
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and k not in ignore]


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def versions() -> dict[str, str | None]:
    """Versions of this package and of the others in :data:`VERSIONED` (``None`` for one
    that is not installed)."""
    from .. import __version__

    found: dict[str, str | None] = {"cl-sulora": __version__}
    for name in VERSIONED[1:]:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def git_commit(root: Path = PROJECT_ROOT) -> dict[str, Any] | None:
    """``{"sha", "dirty"}`` of the project checkout. ``CL_SULORA_COMMIT`` names the commit
    instead (``{"sha", "dirty": None}``) where the tree was copied without, or with a stale,
    git directory; ``None`` for an installed package (its version is in :func:`versions`)."""
    sha = os.environ.get("CL_SULORA_COMMIT")
    if sha:
        return {"sha": sha, "dirty": None}
    if not (root / ".git").exists():
        return None
    try:
        sha = _git(root, "rev-parse", "HEAD")
        dirty = bool(_git(root, "status", "--porcelain"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"sha": sha, "dirty": dirty}


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads"
    )


def peak_memory_mb(device: torch.device) -> float:
    """CUDA peak allocated memory of the run; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
