"""Random generators keyed by what they are for, so draws are reproducible on resume."""

from __future__ import annotations

import zlib

import torch


def keyed_generator(*parts: object, device: torch.device | str | None = None) -> torch.Generator:
    """A generator (on ``device``, default the CPU) seeded by the CRC-32 of ``parts`` joined by
    ``/``: the same parts give the same draws in every run."""
    key = "/".join(str(part) for part in parts)
    generator = torch.Generator() if device is None else torch.Generator(device=device)
    return generator.manual_seed(zlib.crc32(key.encode()))


def projection_generator(seed: int) -> torch.Generator:
    """The generator of a run's random projection (:func:`cl_sulora.ridge.random_projection`):
    the ``ranpac`` strategy and ``backbone.random_features`` draw the same ``R`` for the same
    run seed."""
    return keyed_generator(seed, "projection", 0)
