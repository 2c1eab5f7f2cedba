"""Every config class documents itself: its fields carry defaults and descriptions, and the YAML sample generated
from them parses back to exactly those defaults (so the sample a docstring shows is a working recipe section)."""

import textwrap

import pytest
import yaml

from prune.core.config import StrictConfig, sample_yaml
from prune.data.images import ImageDataConfig
from prune.methods.registry import METHODS
from prune.models.runtime import RuntimeConfig
from prune.recovery.config import RecoverConfig
from prune.runs.recipe import DataConfig, ExportConfig, Recipe, parse_recipe
from prune.sweep.recipe import SweepRecipe
from prune.tasks.data_config import ZeroShotDataConfig
from prune.tasks.eval_config import EvalConfig
from prune.training.config import TrainConfig

SECTIONS = {
    "data": DataConfig,
    "data (images)": ImageDataConfig,
    "data (zero-shot)": ZeroShotDataConfig,
    "train": TrainConfig,
    "recover": RecoverConfig,
    "eval": EvalConfig,
    "export": ExportConfig,
    "runtime": RuntimeConfig,
}


def _config_classes() -> list[type[StrictConfig]]:
    found, todo = [], [StrictConfig]
    while todo:
        for subclass in todo.pop().__subclasses__():
            found.append(subclass)
            todo.append(subclass)
    return found


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_method_sample_parses_back_to_its_defaults(name):
    config_class = METHODS[name].config_class
    parsed = yaml.safe_load(sample_yaml(config_class, "method", name=name))
    assert list(parsed) == ["method"] and list(parsed["method"]) == list(config_class.model_fields)
    assert config_class.model_validate(parsed["method"]).model_dump() == config_class(name=name).model_dump()


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_a_recipe_section_sample_parses_back_to_its_defaults(section):
    config_class = SECTIONS[section]
    parsed = yaml.safe_load(sample_yaml(config_class, "section"))["section"]
    assert config_class.model_validate(parsed) == config_class()


def test_a_whole_recipe_sample_is_a_valid_recipe():
    text = sample_yaml(Recipe, data=DataConfig(), method=METHODS["wanda"].config_class(name="wanda"))
    assert parse_recipe(yaml.safe_load(text)).to_dict() == parse_recipe({"method": {"name": "wanda"}}).to_dict()


def test_every_config_key_has_a_description():
    classes = _config_classes()
    assert {Recipe, SweepRecipe, DataConfig, TrainConfig} <= set(classes)
    undocumented = [
        f"{cls.__name__}.{name}" for cls in classes for name, field in cls.model_fields.items() if not field.description
    ]
    assert not undocumented


def test_docstrings_show_the_generated_sample():
    for cls in _config_classes():
        assert textwrap.indent(sample_yaml(cls), "    ") in cls.__doc__, cls.__name__
    assert "  # FFN intermediate neurons" in METHODS["vib"].config_class.__doc__  # a nested section's comment


def test_a_sample_quotes_what_plain_yaml_would_misread():
    text = sample_yaml(METHODS["wanda"].config_class, "method", name="wanda", sparsity="2:4")
    assert "sparsity: '2:4'" in text  # unquoted, YAML 1.1 reads 2:4 as the base-60 integer 124
    assert sample_yaml(SweepRecipe).startswith("base: <required>")
