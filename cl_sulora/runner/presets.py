"""Strategy presets: a registered method, its config and the training recipe, validated on load.

The presets shipped with the library are package data (``cl_sulora/presets/<name>.yaml``, found
through :mod:`importlib.resources`, so they are there in an installed wheel too); a preset of
one's own is given as a path ending in ``.yaml``."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    model_validator,
)

from ..errors import ConfigError
from ..methods import METHODS, MethodSpec

#: The shipped presets (a package-data folder).
PRESETS: Traversable = files("cl_sulora") / "presets"

#: A positive, finite float (``inf`` and ``nan`` are refused).
FinitePositive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class TrainingConfig(BaseModel):
    """The training recipe, shared by every method of a comparison."""

    model_config = ConfigDict(extra="forbid")

    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: FinitePositive = 1e-3
    weight_decay: FiniteFloat = 0.0
    momentum: FiniteFloat = 0.9  # sgd only
    lr_schedule: Literal["constant", "cosine", "multistep", "epoch-cosine"] = "cosine"
    # multistep: the rate times lr_gamma at each of these epochs of an experience
    lr_milestones: list[PositiveInt] = []
    lr_gamma: FinitePositive = 0.1
    # the base rate of the stream's first experience (None: lr), as the reference configs'
    # init_lr
    first_lr: FinitePositive | None = None
    epochs: PositiveInt = 1
    batch_size: PositiveInt = 32
    eval_batch_size: PositiveInt = 64
    num_workers: NonNegativeInt = 0  # data-loader worker processes (0: load in the main one)
    # the divergence check (loss, parameters, optimizer state) before every k-th update
    divergence_check_every: PositiveInt = 1

    @model_validator(mode="after")
    def _check_milestones(self) -> TrainingConfig:
        if self.lr_schedule == "multistep" and not self.lr_milestones:
            raise ValueError("lr_schedule 'multistep' needs training.lr_milestones, the "
                             "epochs at which the rate is multiplied by lr_gamma (e.g. [10, 15])")
        if self.lr_schedule != "multistep" and self.lr_milestones:
            raise ValueError(f"training.lr_milestones {self.lr_milestones} are only used by "
                             "lr_schedule 'multistep': set training.lr_schedule=multistep, or "
                             "drop the milestones")
        return self


class PresetFile(BaseModel):
    """The layout of a preset file."""

    model_config = ConfigDict(extra="forbid")

    strategy: str
    method: dict[str, Any] = {}
    training: TrainingConfig = TrainingConfig()


@dataclass(frozen=True)
class Preset:
    """A loaded preset: ``name`` is the file stem, ``method`` the preset's method keys."""

    name: str
    path: Path | Traversable
    spec: MethodSpec
    method: dict[str, Any]
    training: TrainingConfig


# ----------------------------------------------------------------------------------- YAML values
class _Loader(yaml.SafeLoader):
    """YAML 1.1 loader that also reads ``1e-3`` (no dot) as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """A YAML document or scalar, with ``1e-3`` read as a float."""
    return yaml.load(text, Loader=_Loader)


# --------------------------------------------------------------------------------------- presets
def available_presets() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.name.removesuffix(".yaml") for p in PRESETS.iterdir()
                  if p.name.endswith(".yaml"))


def preset_path(name_or_path: str) -> Path | Traversable:
    """The shipped preset ``name_or_path``, or, for a name ending in ``.yaml`` or ``.yml``,
    that file (a preset of one's own)."""
    if name_or_path.endswith((".yaml", ".yml")):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"preset file {path} does not exist")
        return path
    shipped = PRESETS / f"{name_or_path}.yaml"
    if "/" in name_or_path or not shipped.is_file():
        raise ConfigError(
            f"unknown strategy {name_or_path!r}; choose one of {available_presets()}, or give "
            "a preset file of your own as a path ending in .yaml"
        )
    return shipped


def load_preset(name_or_path: str) -> Preset:
    """Load and validate a preset by name or path; errors name the file and the field."""
    path = preset_path(name_or_path)
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys strategy, method, training")
    try:
        preset = PresetFile.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(describe(err, f"{path}", "fix the file", model=PresetFile)) from err
    if preset.strategy not in METHODS:
        raise ConfigError(
            f"{path}: strategy {preset.strategy!r} is not a registered method; "
            f"choose one of {sorted(METHODS)}"
        )
    spec = METHODS[preset.strategy]
    method_config(spec, preset.method, where=f"{path}", fix="fix the file")
    name = path.name.rsplit(".", 1)[0]
    return Preset(name, path, spec, dict(preset.method), preset.training)


def method_fields(spec: MethodSpec) -> list[str]:
    """The config keys of a method (none without a config class)."""
    if spec.config_cls is None:
        return []
    return [f.name for f in dataclasses.fields(spec.config_cls)]


def method_config(spec: MethodSpec, values: dict[str, Any], *, where: str, fix: str) -> Any:
    """The method's config object from its registry defaults updated with ``values``."""
    if spec.config_cls is None:
        if values:
            raise ConfigError(
                f"{where}: method {spec.name!r} takes no config keys, got "
                f"{sorted(values)}; remove the 'method' keys"
            )
        return None
    unknown = sorted(set(values) - set(method_fields(spec)))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {['method.' + k for k in unknown]} for strategy "
            f"{spec.name!r}; valid method keys: {method_fields(spec)}; {fix}"
        )
    try:
        return spec.config_cls(**{**spec.defaults, **values})
    except ValidationError as err:
        raise ConfigError(describe(err, where, fix, prefix="method")) from err


def describe(
    err: ValidationError,
    where: str,
    fix: str,
    prefix: str = "",
    model: type[BaseModel] | None = None,
) -> str:
    """One line per pydantic error: ``where: field: problem (got value)``, then what to do;
    unknown keys of ``model`` (or its nested models) come with the valid ones."""
    lines = [f"{where}: invalid configuration ({fix}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "") or prefix or "(config)"
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            valid = _valid_keys(model, e["loc"][:-1])
            lines.append(f"  {field}: unknown key" + (f"; valid keys: {valid}" if valid else ""))
        elif e["loc"]:
            lines.append(f"  {field}: {e['msg']} (got {e['input']!r})")
        else:
            lines.append(f"  {field}: {e['msg']}")
    return "\n".join(lines)


def _valid_keys(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part)) if model else None
        annotation = field.annotation if field else None
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    return list(model.model_fields) if model else []
