"""Every error the library raises on purpose, in one place, each with the exit status the command
line gives it.

A user's bad input (a preset, flag, file or data set) is a :class:`ConfigError` or one of its
kinds and is reported before training; a damaged or mismatched checkpoint is a
:class:`CheckpointError`; a run whose loss or weights stopped being finite is a
:class:`DivergenceError`. Anything else that escapes is a bug (exit status 1).
"""

from __future__ import annotations


class CLSuLoRAError(Exception):
    """Base of the library's own errors; ``exit_code`` is the command line's exit status."""

    exit_code = 1


class ConfigError(CLSuLoRAError, ValueError):
    """A preset, flag, ``--set`` value, file or argument is invalid; the message says where and
    what to do."""

    exit_code = 2


class BackboneError(ConfigError):
    """A backbone cannot be built from what was given (bad name, path, weights, or offline)."""


class DataError(ConfigError):
    """Benchmark data is missing, unreadable or not what its layout promises."""


class CapacityError(ConfigError):
    """The stream needs more slots than the adapter has and its fusion policy frees none."""


class CheckpointError(CLSuLoRAError, RuntimeError):
    """A checkpoint is missing, damaged, or does not belong to this run."""

    exit_code = 3


class DivergenceError(CLSuLoRAError, RuntimeError):
    """The training loss, parameters or optimizer state stopped being finite."""

    exit_code = 4
