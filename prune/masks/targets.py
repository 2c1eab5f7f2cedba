"""Which modules a method prunes: glob patterns over module names, or by default every linear in the blocks.

`select_by_glob` is the one glob selector every method uses (weight masks, binary masks, gating), so a pattern
means the same thing and fails the same way everywhere.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase

from torch import nn

from prune.core.errors import UserInputError, summarize_names
from prune.core.sparsity import Sparsity
from prune.models.blocks import LINEAR_TYPES, find_blocks, in_out_features


def select_targets(model: nn.Module, patterns: list[str] | None, module_types=LINEAR_TYPES) -> list[str]:
    """Names of the modules to mask. Default: every linear inside the decoder blocks (never embeddings or
    lm_head unless a pattern names them)."""
    candidates = [name for name, module in model.named_modules() if isinstance(module, module_types)]
    if patterns is None:
        prefix, _ = find_blocks(model)
        selected = [name for name in candidates if name.startswith(prefix + ".")]
    else:
        selected = select_by_glob(candidates, patterns, f"{'/'.join(t.__name__ for t in module_types)} module")
    if not selected:
        raise UserInputError(f"{type(model).__name__} has no linear layers to prune; pass `method.targets`.")
    refuse_tied(model, selected)
    return selected


def select_by_glob(
    candidates: Sequence[str],
    patterns: Sequence[str],
    what: str,
    *,
    example: str = "*.mlp.*",
    explain: Callable[[str], str] = lambda pattern: "",
) -> list[str]:
    """The candidate names the glob patterns match (`fnmatchcase` over the full name), pattern by pattern, each
    name once. Every pattern must match a candidate: a typo would otherwise silently prune less. The error names
    the pattern and the nearest candidates; `explain(pattern)` may add why a module it matched is no candidate."""
    selected: dict[str, None] = {}
    for pattern in patterns:
        hits = [name for name in candidates if fnmatchcase(name, pattern)]
        if not hits:
            nearest = difflib.get_close_matches(pattern, candidates, n=4, cutoff=0.0)
            raise UserInputError(
                f"target pattern {pattern!r} matches no {what}{explain(pattern)}; the nearest {what} names: "
                f"{', '.join(nearest) or 'none'}. Patterns are globs over the full module name, e.g. {example!r}."
            )
        selected.update(dict.fromkeys(hits))
    return list(selected)


def refuse_tied(model: nn.Module, names: list[str], setting: str = "method.targets") -> None:
    """A target sharing its weight with the input embeddings (tied lm_head) would prune (or train) both at once;
    `setting` is the recipe key that named it."""
    embeddings = _input_embeddings(model)
    modules = dict(model.named_modules())
    tied = [name for name in names if embeddings is not None and modules[name].weight is embeddings.weight]
    if tied:
        raise UserInputError(
            f"{', '.join(tied)} share their weight with the input embeddings (tie_word_embeddings), so a mask "
            f"would prune the embeddings too; leave them out of `{setting}`."
        )


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's input embeddings, or None where it has no single one (CLIP's two towers: transformers
    raises NotImplementedError there)."""
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def nm_compatible(model: nn.Module, names: list[str], m: int, skip_incompatible: bool) -> list[str]:
    """Drop (or refuse) layers whose input size is not a multiple of M: N:M groups would not tile them."""
    modules = dict(model.named_modules())
    bad = [name for name in names if in_out_features(modules[name])[0] % m]
    if bad and not skip_incompatible:
        sizes = ", ".join(str(size) for size in sorted({in_out_features(modules[name])[0] for name in bad}))
        raise UserInputError(
            f"{len(bad)} targeted layer(s) have an input size ({sizes}) not divisible by M={m}: "
            f"{summarize_names(bad)}. Choose an M that divides them, exclude them with `method.targets`, or set "
            "`method.skip_incompatible: true` to leave them dense."
        )
    return [name for name in names if name not in bad]


def method_targets(
    model: nn.Module, patterns: list[str] | None, sparsity: Sparsity, skip_incompatible: bool
) -> list[str]:
    """The targets a method prunes: selected by pattern, then (for N:M) those whose inputs tile into groups."""
    names = select_targets(model, patterns)
    return nm_compatible(model, names, sparsity.m, skip_incompatible) if sparsity.is_nm else names
