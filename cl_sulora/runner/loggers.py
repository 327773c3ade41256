"""Avalanche's loggers for command-line runs (``--loggers csv,tensorboard,wandb``), each run
logging into a folder of its own under ``<out>/logs/``."""

from __future__ import annotations

import importlib.util
import os
import secrets
import types
from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: The loggers ``--loggers`` can name.
LOGGERS = ("csv", "tensorboard", "wandb")

#: What Avalanche 0.6's ``WandBLogger`` reads from the wandb module for a run of ours (it logs
#: scalars and ``log_artifacts`` stays off): ``init``, ``log``, ``finish``, ``Image`` and
#: ``Histogram``, plus two names later wandb releases dropped, which :func:`make_loggers` stands
#: in for: ``util.generate_id`` (it is not called when the run id is given) and
#: ``viz.CustomChart``, looked up for every metric logged (``wandb.viz`` moved in wandb 0.17.9;
#: the class is ``wandb.plot.CustomChart`` since).
WANDB_API = ("init", "log", "finish", "Image", "Histogram")


def check_loggers(names: list[str]) -> None:
    """Refuse unknown logger names, and ``wandb`` where it is not installed or lacks what
    Avalanche's W&B logger calls (:data:`WANDB_API`), before any run."""
    unknown = sorted(set(names) - set(LOGGERS))
    if unknown:
        raise ConfigError(f"--loggers: unknown logger(s) {unknown}; choose from {list(LOGGERS)}")
    if "wandb" in names:
        check_wandb()


def check_wandb() -> None:
    """Refuse a wandb that is missing, does not import, or lacks what Avalanche 0.6's
    ``WandBLogger`` calls (it would fail with an ``AttributeError`` once the run is built)."""
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("--loggers wandb: the wandb package is not installed "
                          "(pip install wandb), or leave wandb out")
    try:
        import wandb
    except Exception as err:  # a broken install: whatever its import raises
        raise ConfigError(f"--loggers wandb: wandb does not import ({type(err).__name__}: "
                          f"{err}); reinstall it, or leave wandb out") from err
    missing = [f"wandb.{name}" for name in WANDB_API if not hasattr(wandb, name)]
    if _custom_chart(wandb) is None:
        missing.append("wandb.plot.CustomChart (or wandb.viz.CustomChart)")
    if missing:
        raise ConfigError(
            f"--loggers wandb: Avalanche 0.6's W&B logger calls {', '.join(missing)}, which "
            f"wandb {getattr(wandb, '__version__', '?')} lacks; install a wandb release that "
            "has them (0.31 was tested), or leave wandb out")


def _custom_chart(wandb: Any) -> type | None:
    """wandb's custom chart class, where this release keeps it."""
    for home in ("viz", "plot"):
        chart = getattr(getattr(wandb, home, None), "CustomChart", None)
        if chart is not None:
            return chart
    return None


class _WandB:
    """The wandb module as Avalanche 0.6's ``WandBLogger`` reads it: the module itself, plus
    ``viz.CustomChart`` where this release moved it (to ``wandb.plot``)."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        if name == "viz" and not hasattr(self._module, "viz"):
            return types.SimpleNamespace(CustomChart=_custom_chart(self._module))
        return getattr(self._module, name)


def _wandb_logger(**kwargs: Any) -> Any:
    """Avalanche's ``WandBLogger`` reading wandb through :class:`_WandB`, with a run id of its
    own (unless ``WANDB_RUN_ID`` gives one), so no dropped wandb name is called; the W&B run
    of an earlier run in this process (``compare`` runs several) is finished first, where
    ``wandb.init`` would return it and the new run would log into it."""
    from avalanche.logging import WandBLogger

    class Logger(WandBLogger):
        def import_wandb(self) -> None:
            super().import_wandb()
            self.wandb = _WandB(self.wandb)

        def before_run(self) -> None:
            if self.wandb is not None and self.wandb.run is not None:
                self.wandb.finish()
            super().before_run()

    if not os.environ.get("WANDB_RUN_ID"):
        kwargs["params"] = {"id": secrets.token_hex(4)}  # 8 characters, as wandb's own ids
    return Logger(**kwargs)


def make_loggers(names: list[str], folder: Path, run_name: str,
                 config: dict[str, Any]) -> list:
    """The named Avalanche loggers of one run, writing into ``folder / run_name``. W&B logs
    offline (``WANDB_MODE=offline`` unless already set) into that folder, one W&B run per run;
    ``wandb sync`` uploads it."""
    from avalanche.logging import CSVLogger, TensorboardLogger

    check_loggers(names)
    where = folder / run_name
    loggers: list = []
    if "csv" in names:
        loggers.append(CSVLogger(log_folder=str(where / "csv")))
    if "tensorboard" in names:
        loggers.append(TensorboardLogger(tb_log_dir=where / "tensorboard"))
    if "wandb" in names:
        os.environ.setdefault("WANDB_MODE", "offline")
        (where / "wandb").mkdir(parents=True, exist_ok=True)
        loggers.append(_wandb_logger(project_name="cl-sulora", run_name=run_name,
                                     dir=where / "wandb", config=config))
    return loggers
