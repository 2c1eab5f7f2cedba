"""The sweep recipe: one base recipe, a grid of methods x sparsity levels (x models), and where to write.

Every section rejects unknown keys, like `prune.runs.recipe`. Sample (`recipes/sweeps/smollm2-135m.yaml`):

    base: ../smollm2-135m/wanda-50.yaml   # relative to this file; every point starts from it
    grid:
      methods: [magnitude, wanda, sparsegpt]   # or {name: sparsegpt, update_weights: false, label: sgpt-mask}
      sparsities: [0.3, 0.4, 0.5, 0.6, 0.7, 2:4, 4:8]
      models: [smollm2-135m]                   # optional; default: the base recipe's model
    set:                                       # overrides applied to every point (dotted keys or nested)
      eval.limit: 50
      eval.latency: false
    output: runs/sweeps/smollm2-135m
    shared_calibration: true   # one-shot points prune from statistics of the dense model gathered once
    save_masks: true           # masks.safetensors per point (small); save_models writes each point's model/
    sensitivity: {method: wanda, sparsity: 0.5, by: [block, type], heldout_blocks: 8}

A point's recipe is the base recipe, then `set`, then the point's model, method and sparsity. Method keys of the
base recipe carry over when the point uses the same method; for another method only the keys every method
shares (`targets`, `skip_incompatible`) do. One-shot points drop the `train` section (so training settings never
make them recompute); every point gets
`eval.dense_baseline: false` (the sweep measures the dense model once) and `export.save_model: <save_models>`.

Points of different methods with their own settings (a depth point has no sparsity level, an activation point a
mode) are listed instead of a grid (`recipes/sweeps/smollm2-135m-speed.yaml`), each with a name (its directory)
and its whole method section; a point whose recipe is invalid is refused before anything runs:

    points:
      - {name: teal-40, method: {name: activation, mode: teal, sparsity: 0.4}}
      - {name: depth-6, method: {name: depth, remove: 6}}
    speed: {rounds: 5}   # every point's saved model timed beside the dense model (prune.sweep.speed)
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from prune.core.config import MethodConfig, StrictConfig
from prune.core.errors import UserInputError
from prune.core.sparsity import parse_sparsity
from prune.core.yaml_io import read_mapping
from prune.methods.registry import get_declaration
from prune.runs.recipe import Recipe, apply_overrides, parse_recipe, set_dotted

POINTS_DIR = "points"


class GridConfig(StrictConfig):
    """The points of a sweep: methods x sparsity levels (x models)."""

    methods: list[str | dict[str, Any]] = Field(description="method names, or {name: ..., label: ..., <method keys>}")
    sparsities: list[str | float] = Field(description="fractions (0.5) and N:M patterns (2:4)")
    models: list[str] | None = Field(None, description="models to sweep (default: the base recipe's model)")

    @field_validator("methods", "sparsities", "models")
    @classmethod
    def _not_empty(cls, value, info):
        if value is not None and not value:
            raise ValueError(f"grid.{info.field_name} is empty; list at least one entry")
        return value

    @field_validator("sparsities")
    @classmethod
    def _levels(cls, value):
        seen = {}
        for level in value:
            try:
                text = str(parse_sparsity(level))
            except UserInputError as error:
                raise ValueError(str(error)) from None
            if text in seen:
                raise ValueError(f"sparsity {level!r} is listed twice (as {seen[text]!r} too)")
            seen[text] = level
        return [str(parse_sparsity(level)) for level in value]


class SensitivityConfig(StrictConfig):
    """`prune sweep --sensitivity`: one group of layers pruned at a time."""

    method: str | None = Field(None, description="a one-shot method (default: wanda if in the grid, else the first)")
    sparsity: str | float = Field("0.5", description="level applied to one group at a time")
    by: list[Literal["block", "type"]] = Field(
        default_factory=lambda: ["block", "type"], description="group layers per decoder block and/or per layer type"
    )
    heldout_blocks: int | None = Field(8, ge=1, description="validation windows per perplexity (None: all)")


class PointEntry(StrictConfig):
    """One listed point: its name (the directory under points/) and its whole method section."""

    name: str = Field(description="the point's name and directory, e.g. teal-40")
    method: dict[str, Any] = Field(description="the method section, e.g. {name: activation, mode: teal, sparsity: 0.4}")

    @field_validator("name")
    @classmethod
    def _directory_name(cls, value):
        if slug(value) != value or value in (".", ".."):
            raise ValueError(f"point name {value!r} names its directory: use letters, digits and . _ + - only")
        return value

    @field_validator("method")
    @classmethod
    def _named(cls, value):
        if not isinstance(value.get("name"), str):
            raise ValueError(f"method {value} needs a `name`, e.g. {{name: depth, remove: 6}}")
        return value


class SpeedConfig(StrictConfig):
    """The speed axis: every finished point's saved model and the dense model timed in turn in one process."""

    rounds: int = Field(5, ge=1, description="timed rounds, every model once per round (after one warm-up round)")
    prompt_len: int = Field(128, ge=1, description="prompt tokens of the timed prefill (batch 1)")
    decode_tokens: int = Field(32, ge=1, description="tokens decoded one at a time with the KV cache")
    threads: int = Field(1, ge=1, description="torch threads while timing")


class SweepRecipe(StrictConfig):
    """A whole sweep file."""

    base: str = Field(description="the base recipe, relative to the sweep file")
    grid: GridConfig | None = Field(None, description="methods x sparsities (x models); or list `points`")
    points: list[PointEntry] | None = Field(None, description="named points, each its own method section")
    set: dict[str, Any] = Field(default_factory=dict, description="overrides applied to every point")
    output: str | None = Field(None, description="sweep directory (default: runs/sweeps/<sweep file name>)")
    shared_calibration: bool = Field(True, description="one-shot points reuse dense statistics gathered once")
    save_masks: bool = Field(True, description="write masks.safetensors into each point's directory")
    save_models: bool = Field(False, description="write each point's pruned model/ (large)")
    sensitivity: SensitivityConfig = Field(default_factory=SensitivityConfig, description="the sensitivity scan")
    speed: SpeedConfig | None = Field(None, description="time every point's saved model beside the dense model")

    @model_validator(mode="after")
    def _one_form(self):
        if (self.grid is None) == (self.points is None):
            raise ValueError(
                "a sweep lists its points either as a `grid` (methods x sparsities) or as `points` (named method "
                "sections), exactly one of the two"
            )
        if self.points is not None:
            if not self.points:
                raise ValueError("points is empty; list at least one point")
            names = [point.name for point in self.points]
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise ValueError(f"point names must differ (they are directories): {', '.join(twice)} twice")
        if self.speed is not None and (not self.save_models or self.shared_calibration):
            raise ValueError(
                "speed times each point's saved model and weighs its files: set save_models: true and "
                "shared_calibration: false (points pruned from shared statistics keep no model)"
            )
        return self


@dataclass
class Point:
    """One grid point: a validated recipe (or the reason it cannot run) and where its report goes."""

    model: str
    method: str  # registered method name
    method_label: str
    sparsity: str  # a grid level normalized ("0.5", "2:4"); a listed point's target label ("teal 0.4", "6 blocks")
    label: str  # directory name under points/
    directory: Path
    recipe: Recipe | None
    error: str | None
    path: Literal["shared", "pipeline"]
    fingerprint: str


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def _section_class(annotation: Any) -> type[BaseModel]:
    """The config class an annotation holds: itself, or inside `X | None` and `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(_section_class(arg) for arg in get_args(annotation) if arg is not type(None))


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            section = item["loc"][:-1]
            model = SweepRecipe
            for part in section:
                if isinstance(part, str):  # an int is a list index: the entry's class is the list's
                    model = _section_class(model.model_fields[part].annotation)
            allowed = ", ".join(model.model_fields)
            within = ".".join(str(part) for part in section)
            lines.append(f"unknown key {where!r}; allowed keys{' in ' + within if section else ''}: {allowed}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {message}" if where else message)
    return "invalid sweep recipe: " + "; ".join(lines)


def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[SweepRecipe, dict[str, Any]]:
    """Read a sweep file and its base recipe; `--set` keys naming a sweep key (grid, output, set, ...) change
    the sweep, any other key is added to `set` (applied to every point). Returns (sweep, raw base recipe)."""
    path = Path(path)
    raw = read_mapping(
        path,
        "sweep recipe",
        f"sweep recipe {str(path)!r} not found; pass a YAML file such as recipes/sweeps/smollm2-135m.yaml.",
    )
    point_overrides = []
    sweep_overrides = []
    for override in overrides:
        key = override.partition("=")[0].strip().split(".")[0]
        (sweep_overrides if key in SweepRecipe.model_fields else point_overrides).append(override)
    raw = apply_overrides(raw, sweep_overrides)
    if point_overrides:
        extra = apply_overrides({}, point_overrides)
        raw["set"] = {**_flatten(raw.get("set") or {}), **_flatten(extra)}
    raw.setdefault("output", f"runs/sweeps/{path.stem}")
    try:
        sweep = SweepRecipe.model_validate(raw)
    except ValidationError as error:
        raise UserInputError(_describe(error)) from None
    base_path = Path(sweep.base)
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    base = read_mapping(
        base_path,
        "base recipe",
        f"the sweep's base recipe {str(base_path)!r} (base: {sweep.base!r}) "
        "not found; `base` is relative to the sweep file.",
    )
    if sweep.grid is not None:
        for entry in sweep.grid.methods:  # unknown methods are bad input, not skipped points
            _method_entry(entry)
    else:
        _check_points(sweep, base)
    if sweep.speed is not None and not wants_dense(sweep, base):
        raise UserInputError(
            "speed compares every point with the dense model, timed beside them: leave eval.dense_baseline on "
            "(the sweep measures the dense model once)."
        )
    return sweep, base


def wants_dense(sweep: SweepRecipe, base: dict[str, Any]) -> bool:
    """Whether the sweep measures the dense model (its points never do: they get eval.dense_baseline false)."""
    override = _flatten(sweep.set).get("eval.dense_baseline")
    if override is not None:
        return bool(override)
    return bool((base.get("eval") or {}).get("dense_baseline", True))


def _check_points(sweep: SweepRecipe, base: dict[str, Any]) -> None:
    """A listed point is asked for by name: an unknown method or an invalid recipe is bad input, not a skipped
    row."""
    for index, entry in enumerate(sweep.points):
        get_declaration(entry.method["name"])
        for model in models_of(sweep, base):
            try:
                parse_recipe(listed_raw(sweep, base, model, entry, Path(sweep.output) / POINTS_DIR / entry.name))
            except UserInputError as error:
                raise UserInputError(f"points[{index}] ({entry.name}): {error}") from None


def _method_entry(entry: str | dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """(method name, label, extra method keys) of one grid.methods entry."""
    if isinstance(entry, str):
        entry = {"name": entry}
    entry = dict(entry)
    if "name" not in entry:
        raise UserInputError(f"grid.methods entry {entry} needs a `name`, e.g. {{name: wanda}}.")
    name = entry.pop("name")
    get_declaration(name)
    label = entry.pop("label", None)
    if label is None:
        label = (
            name
            if not entry
            else f"{name}-" + hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:6]
        )
    if "sparsity" in entry:
        raise UserInputError(f"grid.methods entry {name!r} sets `sparsity`; levels come from grid.sparsities.")
    return name, str(label), entry


def slug(text: str) -> str:
    """A file-name-safe form of a model name or level: '2:4' -> '2of4', 'org/name' -> 'org_name'."""
    text = text.replace(":", "of")
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", Path(text).name if Path(text).is_absolute() else text).strip("_") or "x"


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def point_raw(sweep: SweepRecipe, base: dict[str, Any], model: str, entry, sparsity: str, output: Path) -> dict:
    """The raw recipe of one grid point (see the module docstring for the rules)."""
    name, _, extra = _method_entry(entry)
    return _raw(sweep, base, model, {**extra, "name": name, "sparsity": sparsity}, output)


def listed_raw(sweep: SweepRecipe, base: dict[str, Any], model: str, entry: PointEntry, output: Path) -> dict:
    """The raw recipe of one listed point: its method section over the base recipe's, by the same rules."""
    return _raw(sweep, base, model, entry.method, output)


def _raw(sweep: SweepRecipe, base: dict[str, Any], model: str, method_keys: dict[str, Any], output: Path) -> dict:
    name = method_keys["name"]
    raw = copy.deepcopy(base)
    for dotted, value in _flatten(sweep.set).items():
        set_dotted(raw, dotted, copy.deepcopy(value), f"set {dotted!r}")
    base_method = raw.get("method") if isinstance(raw.get("method"), dict) else {}
    if base_method.get("name") == name:
        method = {key: value for key, value in base_method.items() if key != "sparsity"}
    else:
        shared = set(MethodConfig.model_fields) - {"name", "sparsity"}
        method = {key: value for key, value in base_method.items() if key in shared}
    raw["method"] = {**method, **copy.deepcopy(method_keys)}
    raw["model"] = model
    raw["output"] = str(output)
    if get_declaration(name).kind == "oneshot":  # training settings do not apply: they must not change its fingerprint
        raw.pop("train", None)
    set_dotted(raw, "eval.dense_baseline", False, "sweep")
    set_dotted(raw, "export.save_model", sweep.save_models, "sweep")
    return raw


def models_of(sweep: SweepRecipe, base: dict[str, Any]) -> list[str]:
    if sweep.grid is not None and sweep.grid.models:
        return list(sweep.grid.models)
    model = _flatten(sweep.set).get("model", base.get("model", Recipe.model_fields["model"].default))
    return [str(model)]


def _entries(sweep: SweepRecipe, base: dict[str, Any], model: str):
    """(method name, method label, level or None, directory name, raw recipe of a directory) per point of one
    model; a listed point's level is its method's target label, known once its recipe is parsed (None here)."""
    if sweep.points is not None:
        for entry in sweep.points:
            yield entry.method["name"], entry.name, None, entry.name, partial(listed_raw, sweep, base, model, entry)
        return
    for entry in sweep.grid.methods:
        name, method_label, _ = _method_entry(entry)
        for sparsity in sweep.grid.sparsities:
            raw = partial(point_raw, sweep, base, model, entry, sparsity)
            yield name, method_label, sparsity, f"{method_label}-{slug(sparsity)}", raw


def expand_points(sweep: SweepRecipe, base: dict[str, Any]) -> list[Point]:
    """Every point in the file's order (per model: the grid's methods x levels, or the listed points); a grid
    combination a method cannot do carries its reason."""
    output = Path(sweep.output)
    models = models_of(sweep, base)
    points, labels = [], {}
    for model in models:
        for name, method_label, sparsity, label, raw in _entries(sweep, base, model):
            if len(models) > 1:
                label = f"{slug(model)}--{label}"
            if label in labels:
                raise UserInputError(f"two grid points share the directory {label!r}; give methods distinct `label`s.")
            labels[label] = True
            directory = output / POINTS_DIR / label
            path = "shared" if sweep.shared_calibration and get_declaration(name).statistics is not None else "pipeline"
            recipe, error = None, None
            try:
                recipe = parse_recipe(raw(directory))
            except UserInputError as problem:
                error = str(problem)
            if recipe is not None and getattr(recipe, "task", "causal-lm") != "causal-lm":
                path = "pipeline"  # the shared path measures language models; other tasks run whole
            if recipe is not None and recipe.recover.steps:
                path = "pipeline"  # recovery trains after the method: only the pipeline runs it
            if sparsity is None:  # a listed point (its recipe was checked by load_sweep)
                sparsity = recipe.method.target_label() if recipe else "-"
            key = fingerprint(recipe.fingerprint() if recipe else error, path, sweep.save_masks)
            points.append(Point(model, name, method_label, sparsity, label, directory, recipe, error, path, key))
    return points
