"""Checkpoints of a continual-learning run, one per finished experience, written atomically.

A checkpoint is a directory ``exp-XXXX`` holding ``model.safetensors`` (every tensor of the
model), ``state.pt`` (plugin states, RNG states, clock, stream position and the runner's
results so far; plain tensors and containers only, loaded with ``weights_only=True``) and
``meta.json`` (position, config, the SHA-256 of both files and of its own content). It is
assembled in a temporary directory, fsynced and renamed into place, so a crash leaves either the
complete new checkpoint or none; the previous checkpoint is removed only after the new one is
complete. Loading checks every checksum and that the position agrees between the folder name,
``meta.json`` and the state.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from avalanche.models.dynamic_modules import avalanche_model_adaptation
from safetensors.torch import load, save

from ..atomic import atomic_write_bytes, atomic_write_json, fsync_dir
from ..errors import CheckpointError, ConfigError
from ..saving import separate_storage

PREFIX = "exp-"
FILES = ("model.safetensors", "state.pt")
KEEP = 2  # the newest checkpoint and the one before it


@dataclass
class Checkpoint:
    path: Path
    position: int
    model_state: dict[str, torch.Tensor]
    state: dict
    meta: dict


def rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def clock_state(strategy) -> dict[str, int]:
    """The counters of Avalanche's clock (EWC, for one, reads ``train_exp_counter``)."""
    return {k: v for k, v in vars(strategy.clock).items() if type(v) is int}


def stateful_plugins(strategy) -> dict[str, object]:
    """Plugins that carry state across experiences (they define ``state_dict``)."""
    plugins = {}
    for index, plugin in enumerate(strategy.plugins):
        if hasattr(plugin, "state_dict") and hasattr(plugin, "load_state_dict"):
            plugins[f"{index}:{type(plugin).__name__}"] = plugin
    return plugins


def save_checkpoint(directory: str | Path, *, position: int, strategy, extra: dict,
                    meta: dict | None = None) -> Path:
    """Write the checkpoint after experience ``position``; keep the previous one too.

    Checkpoints of later positions are removed: they belong to a run this one replaces
    (``--overwrite-checkpoints``), which are so discarded only once this run has a checkpoint of
    its own to resume from."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "position": position,
        "plugins": {k: p.state_dict() for k, p in stateful_plugins(strategy).items()},
        "clock": clock_state(strategy),
        "rng": rng_state(),
        "extra": extra,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    model_state = separate_storage(strategy.model.state_dict())
    blobs = {"model.safetensors": save(model_state), "state.pt": buffer.getvalue()}
    final = directory / f"{PREFIX}{position:04d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=directory))
    try:
        for name, data in blobs.items():
            atomic_write_bytes(tmp / name, data)
        sums = {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}
        atomic_write_json(tmp / "meta.json", sealed({"position": position, "sha256": sums,
                                                     **(meta or {})}))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for later in checkpoints(directory):
        if later.name > final.name:
            shutil.rmtree(later, ignore_errors=True)
    for old in checkpoints(directory)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def sealed(meta: dict) -> dict:
    """``meta`` with ``meta_sha256``: the SHA-256 of its canonical JSON (sorted keys), so an
    edit of any field, the position and config included, is detected on load."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return {**body, "meta_sha256": digest}


def temporary_folders(directory: str | Path) -> list[Path]:
    """Folders left by checkpoint writes that were interrupted before their rename."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f".{PREFIX}[0-9]*.*") if p.is_dir())


def prepare_directory(directory: str | Path, *, resume: bool, overwrite: bool) -> list[Path]:
    """Make ``directory`` ready for a run before it trains: writable (a probe file is created,
    written and removed) and without the temporary folders of interrupted writes. Returns the
    removed paths.

    A folder holding checkpoints is refused for a new run unless ``overwrite``: its newest one
    would otherwise be replaced and its run lost. With ``overwrite`` they stay until the new run
    writes its first checkpoint (:func:`save_checkpoint` removes them then), so a run that fails
    before that (a wrong data root, a missing weights file) discards nothing."""
    directory = Path(directory)
    check_writable(directory, "--checkpoint-dir")
    existing = checkpoints(directory)
    if existing and not resume and not overwrite:
        raise ConfigError(
            f"--checkpoint-dir {directory} holds checkpoints of an earlier run "
            f"({', '.join(p.name for p in existing)}): continue it with --resume, give "
            "another --checkpoint-dir, or pass --overwrite-checkpoints to discard them"
        )
    removed = temporary_folders(directory)
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def check_writable(directory: str | Path, flag: str) -> None:
    """Create ``directory`` if needed and prove it writable with a probe file; a
    :class:`ConfigError` naming ``flag`` otherwise."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{flag} {directory} is a file, not a folder: give a folder path")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(b"probe")
        os.unlink(probe)
    except OSError as err:
        raise ConfigError(f"{flag} {directory} is not writable ({err.strerror or err}): "
                          "give a folder you can write to") from err


def checkpoints(directory: str | Path) -> list[Path]:
    """Complete-looking checkpoint directories, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{PREFIX}[0-9]*") if p.is_dir())


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify one checkpoint; :class:`CheckpointError` says which file is wrong."""
    path = Path(path)
    meta_path = path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        sums = meta["sha256"]
        position = int(meta["position"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({err})") from err
    if sealed(meta) != meta:
        raise CheckpointError(f"{meta_path}: edited or damaged (its meta_sha256 does not match "
                              "its content)")
    if path.name != f"{PREFIX}{position:04d}":
        raise CheckpointError(f"{meta_path}: position {position} does not match the folder "
                              f"{path.name}")
    blobs = {}
    for name in FILES:
        file = path / name
        try:
            data = file.read_bytes()
        except OSError as err:
            raise CheckpointError(f"{file}: missing ({err})") from err
        if hashlib.sha256(data).hexdigest() != sums.get(name):
            raise CheckpointError(
                f"{file}: truncated or corrupted ({len(data)} bytes, checksum does not match "
                "meta.json)"
            )
        blobs[name] = data
    try:
        model_state = load(blobs["model.safetensors"])
        state = torch.load(io.BytesIO(blobs["state.pt"]), weights_only=True)
    except Exception as err:  # any decoding failure (safetensors, unpickling) is damage
        raise CheckpointError(f"{path}: cannot be decoded ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or state.get("position") != position:
        raise CheckpointError(f"{path}: the state's position does not match meta.json's "
                              f"({position})")
    return Checkpoint(path, position, model_state, state, meta)


def latest_checkpoint(directory: str | Path, *, fallback: bool = False) -> Checkpoint | None:
    """The newest checkpoint in ``directory`` (``None`` if there is none).

    A damaged newest checkpoint raises :class:`CheckpointError`, unless ``fallback`` is set:
    then the newest intact one is used.
    """
    errors = []
    for path in reversed(checkpoints(directory)):
        try:
            return load_checkpoint(path)
        except CheckpointError as err:
            if not fallback:
                raise CheckpointError(
                    f"{err}. Resume from the newest intact checkpoint instead with "
                    "--resume-fallback (the experiences after it are trained again)."
                ) from err
            errors.append(str(err))
    if errors:
        raise CheckpointError("no intact checkpoint: " + "; ".join(errors))
    return None


def restore(strategy, checkpoint: Checkpoint, trained_experiences, eval_experiences=()) -> None:
    """Bring a freshly built ``strategy`` to the state saved in ``checkpoint``.

    The head grows through ``trained_experiences`` (those finished before the checkpoint) as
    it did in training (then through ``eval_experiences``, the stream evaluated after them,
    whose adaptation may grow it too), plugins rebuild their structure from their saved state,
    then every tensor of the model is loaded exactly. The optimizer is not restored: strategies
    build a fresh one at every experience.
    """
    model = strategy.model
    model.train()
    for experience in trained_experiences:
        avalanche_model_adaptation(model, experience)
    model.eval()
    for experience in eval_experiences:
        avalanche_model_adaptation(model, experience)
    model.train()
    model.to(strategy.device)
    plugins = stateful_plugins(strategy)
    saved = checkpoint.state["plugins"]
    if set(saved) != set(plugins):
        raise CheckpointError(
            f"{checkpoint.path}: saved plugins {sorted(saved)} differ from this run's "
            f"{sorted(plugins)}: resume with the same strategy and options"
        )
    for key, plugin in plugins.items():
        plugin.load_state_dict(saved[key], strategy)
    model.load_state_dict(checkpoint.model_state, strict=True)
    model.to(strategy.device)
    for key, value in checkpoint.state.get("clock", {}).items():
        setattr(strategy.clock, key, value)
    set_rng_state(checkpoint.state["rng"])
