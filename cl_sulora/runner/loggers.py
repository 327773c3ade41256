"""Avalanche's loggers for command-line runs (``--loggers csv,tensorboard,wandb``), each run
logging into a folder of its own under ``<out>/logs/``."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: The loggers ``--loggers`` can name.
LOGGERS = ("csv", "tensorboard", "wandb")


def check_loggers(names: list[str]) -> None:
    """Refuse unknown logger names, and ``wandb`` where it is not installed, before any run."""
    unknown = sorted(set(names) - set(LOGGERS))
    if unknown:
        raise ConfigError(f"--loggers: unknown logger(s) {unknown}; choose from {list(LOGGERS)}")
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--loggers wandb: the wandb package is not installed "
                          "(pip install wandb), or leave wandb out")


def make_loggers(names: list[str], folder: Path, run_name: str,
                 config: dict[str, Any]) -> list:
    """The named Avalanche loggers of one run, writing into ``folder / run_name``. W&B logs
    offline (``WANDB_MODE=offline`` unless already set) into that folder; ``wandb sync``
    uploads it."""
    from avalanche.logging import CSVLogger, TensorboardLogger

    check_loggers(names)
    where = folder / run_name
    loggers: list = []
    if "csv" in names:
        loggers.append(CSVLogger(log_folder=str(where / "csv")))
    if "tensorboard" in names:
        loggers.append(TensorboardLogger(tb_log_dir=where / "tensorboard"))
    if "wandb" in names:
        from avalanche.logging import WandBLogger

        os.environ.setdefault("WANDB_MODE", "offline")
        (where / "wandb").mkdir(parents=True, exist_ok=True)
        loggers.append(WandBLogger(project_name="cl-sulora", run_name=run_name,
                                   dir=where / "wandb", config=config))
    return loggers
