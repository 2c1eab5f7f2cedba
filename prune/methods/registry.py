"""The one list of pruning methods. A new method is one package under prune/methods/ and one line here.

METHODS holds each method's declaration (prune.methods.declaration), imported from its package's torch-free
`config.py`: the config class, kind and tasks that validating a recipe needs. Its MethodSpec (attach and the
hooks, in the package's `method.py`, which imports torch and transformers) is imported by `get_method` when a
run needs it. The deferral is for start-up time, not to break a cycle: a bad recipe, `--set` key or method name
is refused in well under a second, before the seconds that `import torch` takes.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from prune.core.config import MethodConfig, validated
from prune.core.errors import UserInputError, described
from prune.methods.activation.config import ACTIVATION
from prune.methods.binary.config import BINARY
from prune.methods.declaration import MethodDeclaration
from prune.methods.depth.config import DEPTH
from prune.methods.gating.config import GATING
from prune.methods.nm_gumbel.config import NM_GUMBEL
from prune.methods.oneshot.config import MAGNITUDE, SPARSEGPT, WANDA
from prune.methods.structured.config import STRUCTURED
from prune.methods.vib.config import VIB

if TYPE_CHECKING:
    from prune.methods.spec import MethodSpec  # imports torch

METHODS: dict[str, MethodDeclaration] = {
    declared.name: declared
    for declared in (MAGNITUDE, WANDA, SPARSEGPT, STRUCTURED, DEPTH, NM_GUMBEL, VIB, BINARY, GATING, ACTIVATION)
}


def saved_file_pairs() -> list[tuple[str, str]]:
    """The (tensors, description JSON) pairs methods save instead of the weight masks'
    (MethodDeclaration.saved_files)."""
    return [declared.saved_files for declared in METHODS.values() if declared.saved_files]


def get_declaration(name: str) -> MethodDeclaration:
    """The declaration of method `name` (no torch import); UserInputError naming the methods when unknown."""
    if name not in METHODS:
        raise UserInputError(f"unknown method {name!r}; available methods: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def get_method(name: str) -> MethodSpec:
    """The MethodSpec of method `name`, imported from where its declaration says."""
    module, _, attribute = get_declaration(name).spec.partition(":")
    return getattr(import_module(module), attribute)


def method_config(name: str, **fields) -> MethodConfig:
    """The validated config of a registered method, e.g. `method_config("wanda", sparsity="2:4")`: the same
    keys as a recipe's `method` section (llm-compressor's `mask_structure`, `block_size` and `dampening_frac`
    are read as ours). A bad or unknown key is a UserInputError naming it. No torch import."""
    if not isinstance(name, str):
        raise UserInputError(f"name must be a method's name such as 'wanda', got {described(name)}.")
    return validated(get_declaration(name).config_class, {"name": name, **fields}, name)
