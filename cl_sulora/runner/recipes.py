"""Recipes: the settings of one table of runs (benchmark, training recipe, and each strategy's
method settings), shipped as package data so that ``cl-sulora reproduce NAME`` runs it with one
command. Two kinds:

- ``cl_sulora/recipes/<name>.yaml``: a table of ``benchmarks/RESULTS.md``, every setting
  validated there, every method under one training recipe;
- ``cl_sulora/recipes/paper/<name>.yaml`` (``paper/<name>``): the field's protocol (ViT-B/16 at
  224 px), each method under its official code's own settings, beside the numbers its paper
  published (``published``) and what the recipe does not match (``deviations``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..benchmarks.common import DATA_ENV_VAR
from ..errors import ConfigError
from .config import FLAG_KEYS, resolve_config
from .presets import describe, parse_yaml

RECIPES = files("cl_sulora") / "recipes"
#: The folder of the recipes of the field's protocol (names ``paper/<name>``).
PAPER = "paper"
#: Run config sections a recipe may nest.
SECTIONS = ("data", "training", "alignment", "backbone", "method")


class Published(BaseModel):
    """A method's published result on a recipe's benchmark, in its paper's metrics: the
    accuracy over all test samples of the classes seen, after the last experience (``final``:
    "Acc", "A_T") and averaged over the experiences (``average``: "AAA", "A-bar"), in %."""

    model_config = ConfigDict(extra="forbid")

    final: float = Field(ge=0, le=100)
    average: float | None = Field(default=None, ge=0, le=100)
    #: the paper and table, and the seeds it averages where it says
    source: str


class RecipeFile(BaseModel):
    """The layout of a recipe: run config keys shared by every run (``common``, dotted or
    nested as in ``--set``), the seeds, and per strategy (preset name) its own keys."""

    model_config = ConfigDict(extra="forbid")

    title: str
    benchmark: str
    #: the table's main metric (a key of every record)
    metric: Literal["A_last", "A_avg"] = "A_last"
    #: where the table's runs are recorded: folders of ``benchmarks/results/accuracy`` in the
    #: project repository, a later folder's record of a run replacing an earlier one's
    records: list[str] = []
    seeds: list[int] = [0, 1, 2]
    common: dict[str, Any] = {}
    strategies: dict[str, dict[str, Any]]
    #: what the user must point to, as flags of ``cl-sulora reproduce``: ``--data-root`` (or
    #: ``$CL_SULORA_DATA``), ``--backbone-weights`` (the image backbone the table was made with)
    needs: list[Literal["--data-root", "--backbone-weights"]] = []
    #: per strategy, the number its paper published with these settings (paper recipes)
    published: dict[str, Published] = {}
    #: what the recipe does not match of the official code (paper recipes)
    deviations: list[str] = []

    @model_validator(mode="after")
    def _check_published(self) -> RecipeFile:
        unknown = sorted(set(self.published) - set(self.strategies))
        if unknown:
            raise ValueError(f"published names strategies the recipe does not run: {unknown}")
        return self


@dataclass(frozen=True)
class Recipe:
    name: str
    spec: RecipeFile

    def runs(self, seeds: list[int] | None = None,
             strategies: list[str] | None = None) -> list[tuple[str, int, dict[str, Any]]]:
        """``(strategy, seed, overrides)`` of every run, overrides as dotted run config keys."""
        chosen = strategies or list(self.spec.strategies)
        unknown = sorted(set(chosen) - set(self.spec.strategies))
        if unknown:
            raise ConfigError(f"recipe {self.name!r} has no strategy {unknown}; its strategies: "
                              f"{list(self.spec.strategies)}")
        return [(strategy, seed, {**_dotted(self.spec.common),
                                  **_dotted(self.spec.strategies[strategy]), "seed": seed})
                for strategy in chosen for seed in (seeds or self.spec.seeds)]


def available_recipes(kind: Literal["tables", "paper", "all"] = "all") -> list[str]:
    """The shipped recipes' names: the results tables', the paper ones' (``paper/<name>``),
    or both."""
    tables = sorted(p.name.removesuffix(".yaml") for p in RECIPES.iterdir()
                    if p.name.endswith(".yaml"))
    folder = RECIPES / PAPER
    paper = sorted(f"{PAPER}/{p.name.removesuffix('.yaml')}" for p in folder.iterdir()
                   if p.name.endswith(".yaml")) if folder.is_dir() else []
    return {"tables": tables, "paper": paper, "all": tables + paper}[kind]


def load_recipe(name: str) -> Recipe:
    """A shipped recipe by name, validated (every run's config resolves)."""
    path = RECIPES / f"{name}.yaml"
    if not re.fullmatch(rf"(?:{PAPER}/)?[\w-]+", name) or not path.is_file():
        raise ConfigError(f"unknown table {name!r}; choose one of {available_recipes()}")
    try:
        spec = RecipeFile.model_validate(parse_yaml(path.read_text(encoding="utf-8")))
    except (yaml.YAMLError, ValidationError) as err:
        message = describe(err, str(path), "fix the file") if isinstance(
            err, ValidationError) else f"{path}: not valid YAML: {err}"
        raise ConfigError(message) from err
    recipe = Recipe(name, spec)
    for strategy, _, overrides in recipe.runs(seeds=spec.seeds[:1]):
        resolve_config(spec.benchmark, strategy, {**overrides, "device": "cpu"})
    return recipe


def check_needs(recipe: Recipe, user: dict[str, Any]) -> None:
    """Refuse to run ``recipe`` without what it needs (``needs``), naming the flag."""
    given = {"--data-root": "data.data_root" in user or bool(os.environ.get(DATA_ENV_VAR)),
             "--backbone-weights": "backbone.weights" in user}
    missing = [flag for flag in recipe.spec.needs if not given[flag]]
    if missing:
        raise ConfigError(
            f"table {recipe.name!r} needs {' and '.join(missing)}: the data folder (or "
            f"${DATA_ENV_VAR}) and the local weights of the backbone it was recorded with "
            "(see README, Run a benchmark)"
        )


def command_line(recipe: Recipe, strategy: str, overrides: dict[str, Any]) -> list[str]:
    """The ``cl-sulora run`` arguments of one run of ``recipe``: a flag where the key has one
    (:data:`~.config.FLAG_KEYS`), else ``--set key=<JSON value>``."""
    flags = {key: "--" + dest.replace("_", "-") for dest, key in FLAG_KEYS.items()}
    arguments = ["run", "--benchmark", recipe.spec.benchmark, "--strategy", strategy,
                 "--seed", str(overrides["seed"])]
    sets = []
    for key, value in overrides.items():
        if key == "seed":
            continue
        if key in flags and value is True and key in ("deterministic", "compile"):
            arguments.append(flags[key])
        elif key in flags and isinstance(value, str | int | float) and not isinstance(value, bool):
            arguments += [flags[key], str(value)]
        elif key in flags and isinstance(value, list) and all(isinstance(v, str) for v in value):
            arguments += [flags[key], ",".join(value)]
        else:
            sets.append(f"{key}={json.dumps(value)}")
    return arguments + (["--set", *sets] if sets else [])


def _dotted(tree: dict[str, Any]) -> dict[str, Any]:
    """A recipe's keys as dotted run config keys: the sections (``data``, ``training``, ...)
    flattened one level, their values (a rank schedule, backbone kwargs) kept whole."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update({f"{key}.{name}": inner for name, inner in value.items()})
        else:
            flat[key] = value
    return flat
