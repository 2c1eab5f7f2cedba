"""YAML reading that keeps `2:4` a string.

PyYAML follows YAML 1.1, where an unquoted `2:4` is a base-60 integer (124) and `1:30.5` a base-60 float.
Nobody writing a pruning recipe means that, so our loader resolves ints and floats without the base-60 forms.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from prune.core.errors import UserInputError


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's sexagesimal numbers."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
        r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def load_yaml(text: str, origin: str = "the YAML") -> Any:
    """Parse `text`; a syntax error is bad input, reported with its line and column and `origin` (what holds it)."""
    try:
        return yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserInputError(
            f"{origin} is not valid YAML ({problem}{where}); fix the syntax there, quoting values that hold "
            "YAML's special characters ([ ] { } : # ,), e.g. 'a: [1, 2]' or \"note: 'x # y'\"."
        ) from None


def read_mapping(path: Path, what: str, not_found: str) -> dict[str, Any]:
    """The YAML mapping in the file `path` (a recipe, a sweep): `not_found` is the error when the file is missing,
    `what` names the file when it holds no mapping. An empty file is an empty mapping."""
    if path.is_dir():
        found = sorted(str(child) for child in path.iterdir() if child.suffix in (".yaml", ".yml", ".json"))
        raise UserInputError(
            f"{what} {str(path)!r} is a directory; pass one YAML file"
            + (f", e.g. {', '.join(found[:3])}" if found else " (such as recipes/default.yaml)")
            + "."
        )
    if not path.is_file():
        raise UserInputError(not_found)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserInputError(
            f"{what} {str(path)!r} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
        ) from None
    raw = load_yaml(text, f"{what} {str(path)!r}") or {}
    if not isinstance(raw, dict):
        raise UserInputError(f"{what} {str(path)!r} is not a YAML mapping of `key: value` lines.")
    return raw
