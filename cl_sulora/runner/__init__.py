"""The experiment runner: run configs resolved from presets, building a run, the experience loop,
records, checkpoints, comparison reports and the ``cl-sulora`` command line."""

from .build import Experiment, build_experiment
from .config import RunConfig, resolve_config
from .loop import Checkpointing, RunResult, run
from .presets import available_presets, load_preset

__all__ = [
    "Checkpointing",
    "Experiment",
    "RunConfig",
    "RunResult",
    "available_presets",
    "build_experiment",
    "load_preset",
    "resolve_config",
    "run",
]
