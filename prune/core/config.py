"""The config base classes: a strict section (unknown keys are errors) and the keys every method shares.

A config class's fields are its documentation: each carries its default and a `description=`, and
`sample_yaml` renders them as the YAML a recipe would hold, descriptions as comments. Every config class's
docstring ends with that sample, generated when the class is defined, so it cannot drift from the fields.
"""

from __future__ import annotations

import inspect
import os
import textwrap
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from prune.core.errors import UserInputError
from prune.core.sparsity import Sparsity, parse_sparsity

# llm-compressor's spellings of keys that mean the same here: accepted in a method section, written canonically
KEY_ALIASES = {"block_size": "blocksize", "dampening_frac": "dampening"}
REQUIRED = "<required>"  # what a sample shows for a key without a default
COMMENT_COLUMN = 40  # comments line up after keys up to this long; a longer line has its comment right after it


def sample_yaml(config_class: type[BaseModel], section: str | None = None, **values: Any) -> str:
    """Every key of `config_class` at its default (or at `values[key]`), as YAML under `section`, with each
    key's description as a comment. A nested config (e.g. vib's `units`) becomes a nested mapping; a key with
    neither default nor value shows `<required>`."""
    rows = [(f"{section}:", None)] if section else []
    rows += _rows(config_class, values, "  " if section else "")
    width = max((len(text) for text, _ in rows if len(text) <= COMMENT_COLUMN), default=0)
    return "".join(f"{text.ljust(width)}  # {note}\n" if note else f"{text}\n" for text, note in rows)


def _rows(config_class: type[BaseModel], values: dict[str, Any], indent: str) -> list[tuple[str, str | None]]:
    rows = []
    for name, field in config_class.model_fields.items():
        if name in values:
            value = values[name]
        elif field.is_required():
            value = REQUIRED
        else:
            value = field.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            rows.append((f"{indent}{name}:", field.description))
            rows += _rows(type(value), dict(value), indent + "  ")
        else:
            rows.append((f"{indent}{name}: {_flow(value)}", field.description))
    return rows


def _flow(value: Any) -> str:
    """One value in YAML flow style, quoted where plain YAML would read it as something else (e.g. '2:4')."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20, sort_keys=False).removesuffix("...\n").strip()


def normalize_path(value: str) -> str:
    """`runs/x/`, `runs//x` and `./runs/x` name one directory: spelled one way, so that a recipe, its
    fingerprint and `--resume`'s comparison see the same run. Hub ids and aliases pass unchanged."""
    return os.path.normpath(value) if value else value


# a local path (or a name that may be one: a model alias, a hub id, a data source)
PathText = Annotated[str, AfterValidator(normalize_path)]


INT64 = 2**63  # torch (tensors, generators) and the C code under it hold integers in 64 bits
FLOAT32 = (1.1754943508222875e-38, 3.4028234663852886e38)  # smallest normal and largest float32 magnitudes


class StrictConfig(BaseModel):
    """A config section whose unknown keys are errors, not silently ignored, and whose numbers are usable: `inf`/
    `nan` (YAML `.inf`, `.nan`) in any numeric field is an error, never a learning rate or a fraction, and an
    integer must fit the 64 bits torch holds it in (a seed of 2^70 would overflow inside torch), a float the float32
    tensors it scales (a temperature of 1e-300 would overflow them)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="after")
    @classmethod
    def _fits_torch(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
            raise ValueError(f"{value} does not fit in 64 bits (|value| < 2^63); give a smaller number")
        if isinstance(value, float) and value and not FLOAT32[0] <= abs(value) <= FLOAT32[1]:
            raise ValueError(
                f"{value:g} is outside float32's range (magnitudes {FLOAT32[0]:.2g} to {FLOAT32[1]:.2g}, or 0), "
                "which the tensors it scales hold; give a number in that range"
            )
        return value

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """Append the sample generated from the fields to the class docstring (help(), IDEs, the docs)."""
        super().__pydantic_init_subclass__(**kwargs)
        own = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
        sample = textwrap.indent(sample_yaml(cls), "    ")
        cls.__doc__ = (
            f"{own}\n\nSample YAML, every key at its default (generated from the fields):\n\n{sample}".lstrip()
        )


def validated(config_class: type[StrictConfig], fields: dict[str, Any], label: str) -> StrictConfig:
    """`fields` (a Python API caller's dict) as `config_class`; a bad or unknown key is a UserInputError naming it,
    worded like a recipe's: `invalid <label> config: <key>: <what is wrong>`."""
    try:
        return config_class.model_validate(fields)
    except ValidationError as error:
        allowed = ", ".join(config_class.model_fields)
        problems = "; ".join(_problem(item, allowed) for item in error.errors())
        raise UserInputError(f"invalid {label} config: {problems}") from None


def _problem(item: dict, allowed: str) -> str:
    """One validation error, worded like a recipe's: the key, then what is wrong with it."""
    where, message = ".".join(map(str, item["loc"])), item["msg"].removeprefix("Value error, ")
    if item["type"] == "extra_forbidden":
        return f"unknown key {where!r}; allowed keys: {allowed}"
    return f"{where}: {message}" if where else message


class MethodConfig(StrictConfig):
    """Keys every method shares; each method's config class adds its own."""

    name: str = Field(description="the method, by its name in prune.methods.registry (e.g. wanda)")
    sparsity: str | float = Field("2:4", description="'N:M' or a fraction of the targeted weights removed")
    targets: list[str] | None = Field(
        None,
        description="glob patterns over module names (null: every linear "
        "inside the decoder blocks); every pattern must match",
    )
    skip_incompatible: bool = Field(
        False,
        description="N:M layers whose input size is not divisible by M: skip them (true) or refuse the recipe (false)",
    )

    @model_validator(mode="before")
    @classmethod
    def _canonical_keys(cls, data: Any) -> Any:
        """llm-compressor's spellings, accepted where they mean what ours do (KEY_ALIASES, and `mask_structure`:
        see `sparsity_from_mask_structure`), rewritten to ours before validation, so a resolved recipe and
        masks.json hold one spelling. A key of another method stays as it is and is refused as unknown."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for alias, key in KEY_ALIASES.items():
            if alias in data and key in cls.model_fields:
                if key in data:
                    raise ValueError(f"{alias!r} is llm-compressor's name for {key!r}; give only one of them.")
                data[key] = data.pop(alias)
        if "mask_structure" in data and "sparsity" in cls.model_fields:
            data["sparsity"] = sparsity_from_mask_structure(data.pop("mask_structure"), data.get("sparsity"))
        return data

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError(
                "is an empty list, which would prune nothing; name at least one pattern (a glob over module names, "
                "e.g. ['*.mlp.*']), or leave method.targets out for the method's default targets"
            )
        return value

    @field_validator("sparsity", mode="before")
    @classmethod
    def _valid_sparsity(cls, value):
        try:
            parse_sparsity(value)
        except UserInputError as error:
            raise ValueError(str(error)) from None
        return value

    @property
    def pattern(self) -> Sparsity:
        return parse_sparsity(self.sparsity)

    def target_label(self) -> str:
        """How reports name the target (a method whose target is not an N:M/fraction sparsity overrides it)."""
        return str(self.pattern)

    @property
    def changes_weights(self) -> bool:
        """True when the method also rewrites weights, so the saved masks alone cannot rebuild the model."""
        return False


def sparsity_from_mask_structure(structure: Any, sparsity: Any) -> Any:
    """Our `sparsity` for llm-compressor's `mask_structure` (with its `sparsity`, if given). There "N:M" zeroes
    N weights of every M (its SparseGPT and Wanda prune the N smallest of each group) and "0:0" means unstructured;
    here "N:M" keeps N of M. So "2:4" is "2:4" in both, and "1:4" (one of four zeroed) is our "3:4". A `sparsity`
    beside an N:M structure must be the share it removes (llm-compressor ignores it; here it must not disagree)."""
    text = str(structure).strip()
    pruned, _, group = text.partition(":")
    if not (pruned.isdigit() and group.isdigit()):
        raise ValueError(f"mask_structure {structure!r} is not 'N:M' (e.g. '2:4', or '0:0' for unstructured).")
    pruned_count, group_size = int(pruned), int(group)
    if (pruned_count, group_size) == (0, 0):
        if sparsity is None:
            raise ValueError("mask_structure '0:0' means unstructured: give sparsity as a fraction, e.g. 0.5.")
        return sparsity
    if not 0 < pruned_count < group_size:
        raise ValueError(f"mask_structure {text!r} needs 0 < N < M (N of every M weights zeroed, e.g. '2:4').")
    ours = f"{group_size - pruned_count}:{group_size}"
    if sparsity is not None:
        try:
            given = parse_sparsity(sparsity)
        except UserInputError as error:
            raise ValueError(str(error)) from None
        if abs(given.removed_fraction - pruned_count / group_size) > 1e-9 or (given.is_nm and str(given) != ours):
            raise ValueError(
                f"mask_structure {text!r} zeroes {pruned_count} of every {group_size} weights (sparsity {ours} "
                f"here), but sparsity is {sparsity!r}; drop one of the two."
            )
    return ours
