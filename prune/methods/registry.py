"""The one list of pruning methods. A new method is one package under prune/methods/ and one line here."""

from __future__ import annotations

from prune.core.errors import UserInputError
from prune.methods.binary.method import BINARY
from prune.methods.depth.method import DEPTH
from prune.methods.gating.method import GATING
from prune.methods.nm_gumbel.method import NM_GUMBEL
from prune.methods.oneshot.method import MAGNITUDE, SPARSEGPT, WANDA
from prune.methods.spec import MethodSpec
from prune.methods.structured.method import STRUCTURED
from prune.methods.vib.method import VIB

METHODS: dict[str, MethodSpec] = {
    spec.name: spec for spec in (MAGNITUDE, WANDA, SPARSEGPT, STRUCTURED, DEPTH, NM_GUMBEL, VIB, BINARY, GATING)
}


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise UserInputError(f"unknown method {name!r}; available methods: {', '.join(sorted(METHODS))}.")
    return METHODS[name]
