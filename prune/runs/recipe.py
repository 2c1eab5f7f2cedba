"""The recipe schema: one YAML file says what to prune, how, and how to evaluate it.

Every section rejects unknown keys (naming the key and the allowed ones); the `method` section is validated
by the chosen method's own config class from the registry. Each section's keys, defaults and meaning are its
config class's fields (the class docstrings show the sample generated from them, see prune.core.config);
recipes/default.yaml is a complete recipe. An unquoted `2:4` stays the string '2:4' (prune.core.yaml_io).

`--set a.b=value` overrides any key; the value is read as YAML (`--set 'eval.tasks=[]'`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from prune.core.config import INT64, MethodConfig, PathText, StrictConfig
from prune.core.errors import UserInputError
from prune.core.yaml_io import load_yaml, read_mapping
from prune.data.config import DataConfig, ImageDataConfig
from prune.methods.registry import METHODS, get_declaration
from prune.models.runtime_config import RuntimeConfig
from prune.recovery.config import RecoverConfig
from prune.tasks.data_config import DATA_CONFIGS, DEFAULT_TASK
from prune.tasks.eval_config import EvalConfig
from prune.training.config import TrainConfig

# (section, key, neutral value) of settings added after run directories existed: see Recipe.fingerprint
LATER_SETTINGS = (("train", "distill", 0.0), ("data", "source_share", None), ("data", "stream_tokens", None))


class ExportConfig(StrictConfig):
    """The `export` section: what the run writes as model/."""

    save_model: bool = Field(True, description="write model/ with the hard masks merged into the weights")
    round_to: int | None = Field(
        None, ge=1, description="structural methods: kept FFN / hidden sizes rounded to a multiple (e.g. 8 or 64)"
    )
    uniform: bool = Field(
        False,
        description="structural methods: the same sizes in every layer, so plain transformers loads the exported model",
    )


class Recipe(StrictConfig):
    """A whole recipe: what to prune, how, and how to evaluate it."""

    model: PathText = Field(
        "smollm2-135m", description="an embedded alias, a local save_pretrained directory, or a Hub id"
    )
    task: Literal["causal-lm", "zero-shot-classification", "image-classification"] = Field(
        DEFAULT_TASK,
        description="causal-lm: text data, perplexity; zero-shot-classification: CLIP on images; "
        "image-classification: an image classifier's own head on images (prune.tasks)",
    )
    data: DataConfig | ImageDataConfig | None = Field(
        None, validate_default=True, description="the task's data: text (DataConfig) or images (ImageDataConfig)"
    )
    method: MethodConfig = Field(
        description="`name` picks the method (prune.methods.registry); its config class validates the other keys"
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="the trainer (learnable methods)")
    recover: RecoverConfig = Field(
        default_factory=RecoverConfig, description="recovery training of the kept weights after the method"
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="which figures to measure")
    export: ExportConfig = Field(default_factory=ExportConfig, description="what model/ holds")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="where and how the model runs")
    output: PathText | None = Field(None, description="run directory (default: runs/<recipe name>)")
    seed: int = Field(0, ge=0, lt=INT64, description="seed of calibration sampling and everything else the run draws")

    @field_validator("data", mode="before")
    @classmethod
    def _data_for_task(cls, value: Any, info) -> DataConfig | ImageDataConfig:
        """The `data` section's schema follows `task`: token streams for causal-lm, images for the image tasks."""
        config_class = DATA_CONFIGS.get(info.data.get("task"), DATA_CONFIGS[DEFAULT_TASK])
        if isinstance(value, (DataConfig, ImageDataConfig)):
            value = value.model_dump()
        try:
            return config_class.model_validate(value if value is not None else {})
        except ValidationError as error:
            raise SectionError("; ".join(_section_errors(error, "data", config_class))) from None

    @field_validator("method", mode="before")
    @classmethod
    def _method_config(cls, value: Any) -> MethodConfig:
        if isinstance(value, MethodConfig):
            return value
        if not isinstance(value, dict) or "name" not in value:
            raise ValueError("method needs a `name`, e.g. method: {name: wanda, sparsity: 2:4}")
        try:
            declared = get_declaration(value["name"])
        except UserInputError as error:
            raise ValueError(str(error)) from None
        return declared.config_class.model_validate(value)

    @model_validator(mode="after")
    def _method_supports_task(self):
        """A method runs on the tasks it declares (MethodSpec.tasks); any other pairing is refused up front."""
        supported = get_declaration(self.method.name).tasks
        if self.task not in supported:
            others = sorted(name for name, declared in METHODS.items() if self.task in declared.tasks)
            raise ValueError(
                f"method {self.method.name!r} does not support task {self.task!r}; it supports "
                f"{', '.join(sorted(supported))}. For {self.task}, use one of: {', '.join(others)}."
            )
        return self

    @model_validator(mode="after")
    def _distillation_trains_a_causal_lm(self):
        """train.distill shapes the loss of mask training on text: meaningless for a method that trains nothing
        or a task without next-token distributions."""
        if not self.train.distill:
            return self
        if self.task != DEFAULT_TASK:
            raise ValueError(f"train.distill applies to task {DEFAULT_TASK}, not {self.task}; remove it.")
        if get_declaration(self.method.name).kind != "learnable":
            learnable = sorted(name for name, declared in METHODS.items() if declared.kind == "learnable")
            raise ValueError(
                f"train.distill needs a method that trains masks ({', '.join(learnable)}); "
                f"{self.method.name!r} trains nothing. Remove train.distill."
            )
        return self

    @model_validator(mode="after")
    def _recovery_applies(self):
        """recover.steps trains the pruned model's kept weights: it needs a plain pruned model or masks on inputs
        (activation sparsity: the weights train under the thresholds and model/ keeps them, so export.save_model
        stays on), not per-input gating, the whole model on the device, and recover.distill a task with next-token
        distributions."""
        if not self.recover.steps:
            return self
        declared = get_declaration(self.method.name)
        if not declared.plain_model and not declared.masks_inputs:
            raise ValueError(
                f"recover.steps: {self.method.name} chooses what to compute per input and leaves no plain model to "
                "recover (its predictors were fitted to the weights as they are, which recovery would move); remove "
                "the recover section."
            )
        if declared.masks_inputs and not self.export.save_model:
            raise ValueError(
                f"recover.steps: after recovery, the run directory's model/ is where {self.method.name}'s trained "
                "weights are kept (its thresholds lie beside them), and export.save_model: false would lose them; "
                "remove export.save_model: false, or the recover section."
            )
        if self.runtime.offload != "none":
            raise ValueError(
                f"recover.steps trains the whole pruned model on the device, which runtime.offload: "
                f"{self.runtime.offload} does not hold; use runtime.offload: none, or remove the recover section."
            )
        if self.recover.distill and self.task != DEFAULT_TASK:
            raise ValueError(
                f"recover.distill applies to task {DEFAULT_TASK} (a teacher's next-token distributions), not "
                f"{self.task}; remove it (recovery then trains on the task's own loss)."
            )
        return self

    @model_validator(mode="after")
    def _structural_export(self):
        """export.round_to / export.uniform shape a structural method's masks, so its config receives them."""
        for key in ("round_to", "uniform"):
            value = getattr(self.export, key)
            if key not in self.export.model_fields_set or value in (None, False):
                continue
            if key not in type(self.method).model_fields:
                raise ValueError(
                    f"export.{key} applies to structural methods (vib, structured), not {self.method.name}."
                )
            if key in self.method.model_fields_set and getattr(self.method, key) != value:
                raise ValueError(f"export.{key} and method.{key} differ; set only export.{key}.")
            setattr(self.method, key, value)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", serialize_as_any=True)

    def fingerprint(self) -> str:
        """A short hash of everything that decides the result (not where it is written). Settings added after
        run directories existed (LATER_SETTINGS) are left out at their neutral value, so those runs keep their
        fingerprint: they still resume, and sweeps and benchmarks still reuse them."""
        content = {key: value for key, value in self.to_dict().items() if key != "output"}
        if not self.recover.steps:  # a section added later; without steps it decides nothing
            del content["recover"]
        for section, key, neutral in LATER_SETTINGS:
            if key in content[section] and content[section][key] == neutral:  # a task's section may lack it
                del content[section][key]
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides to a raw recipe dict; values are parsed as YAML."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise UserInputError(f"--set {override!r}: expected KEY=VALUE, e.g. --set method.sparsity=0.5")
        set_dotted(raw, key.strip(), load_yaml(text, f"the value of --set {override!r}"), f"--set {override!r}")
    return raw


def set_dotted(raw: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    """raw[a][b][c] = value for dotted 'a.b.c', creating sections; `origin` names the setting in errors."""
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserInputError(f"{origin}: {part!r} is a value, not a section")
        node = child
    node[leaf] = value


def _describe(error: ValidationError, raw: dict[str, Any]) -> str:
    lines, unknown = [], {}  # unknown keys by section: one line per section, its allowed keys said once
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            unknown.setdefault(".".join(str(part) for part in item["loc"][:-1]), []).append(repr(where))
        elif item["type"] == "missing" and item["loc"] == ("method",):
            lines.append(f"the recipe has no `method` section. {MINIMAL_RECIPE}")
        elif isinstance(item.get("ctx", {}).get("error"), SectionError):  # names its keys already
            lines.append(item["msg"].removeprefix("Value error, "))
        else:
            lines.append(_worded(item, where, error))
    for section, keys in unknown.items():
        lines.append(
            f"unknown key{'s' if len(keys) > 1 else ''} {', '.join(keys)}; allowed keys"
            f"{' in ' + section if section else ''}: {_allowed_keys(section, raw)}"
        )
    return "invalid recipe: " + "; ".join(filter(None, lines))


MINIMAL_RECIPE = (
    "A minimal recipe is the single line `method: {name: wanda, sparsity: 2:4}`: model (smollm2-135m), data "
    "(embedded-docs), eval and output (runs/<file name>) have defaults; recipes/default.yaml spells them all out."
)


def _worded(item: dict, where: str, error: ValidationError) -> str | None:
    """One field's error as `where: what is wrong` (None when another error of the same field says it)."""
    if item["type"] == "finite_number":
        return (
            f"{where.removesuffix('.float')}: {item['input']!r} is not a finite number; give a number "
            "(inf and nan are not allowed)"
        )
    if item["type"] == "string_type" and any(
        other["type"] == "finite_number" and other["loc"][:-1] == item["loc"][:-1] for other in error.errors()
    ):
        return None  # a `str | float` field given inf/nan: its float branch's error says it
    message = item["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


class SectionError(ValueError):
    """A section validated by hand (its schema follows another key), its errors already worded in full."""


def _section_errors(error: ValidationError, section: str, config_class: type[StrictConfig]) -> list[str]:
    """A nested section's errors, worded like `_describe`'s (validated by hand when its schema varies)."""
    lines = []
    for item in error.errors():
        where = ".".join([section, *map(str, item["loc"])])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key {where!r}; allowed keys in {section}: {', '.join(config_class.model_fields)}")
        else:
            lines.append(_worded(item, where, error))
    return list(filter(None, lines))


def _allowed_keys(section: str, raw: dict[str, Any]) -> str:
    if section == "method":
        config_class = get_declaration(raw["method"]["name"]).config_class
    else:
        config_class = Recipe
        for part in filter(None, section.split(".")):
            config_class = config_class.model_fields[part].annotation
    return ", ".join(config_class.model_fields)


def parse_recipe(raw: dict[str, Any]) -> Recipe:
    if not isinstance(raw, dict):
        raise UserInputError(f"a recipe must be a YAML mapping. {MINIMAL_RECIPE}")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        raise UserInputError(_describe(error, raw)) from None


def parse_options(config_class: type[StrictConfig], options: dict[str, Any]) -> StrictConfig:
    """A config section built from command-line options (`prune eval --seq-len 0`): errors name the option."""
    try:
        return config_class.model_validate(options)
    except ValidationError as error:
        problems = [
            f"--{str(item['loc'][0]).replace('_', '-')} {item['input']!r}: {item['msg']}" for item in error.errors()
        ]
        raise UserInputError("; ".join(problems) + ".") from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a recipe file, apply `--set` overrides, validate; default output dir is runs/<file stem>."""
    path = Path(path)
    raw = read_mapping(
        path, "recipe", f"recipe {str(path)!r} not found; pass a YAML file such as recipes/default.yaml."
    )
    raw = apply_overrides(raw, list(overrides))
    raw.setdefault("output", f"runs/{path.stem}")
    return parse_recipe(raw)
