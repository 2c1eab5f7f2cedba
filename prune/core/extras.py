"""Optional dependencies: the packages of pyproject.toml's extras, which not every user installs.

`import prune` and one-shot pruning need none of them; each is imported only where it is used. A run that will
need one checks for it (`require`) before it claims its output directory or loads a model, so a missing
package is one message naming the extra to install, not an ImportError after minutes of work. `make run` and
`make test` install every extra. (`eval/` never imports `prune`: eval.accuracy words the lm-eval check itself.)
"""

from __future__ import annotations

import importlib.util

from prune.core.errors import UserInputError

# importable module -> the extra of pyproject.toml that installs it
EXTRAS: dict[str, str] = {
    "lm_eval": "lm-eval",
    "matplotlib": "plots",
    "gguf": "gguf",
    "sklearn": "vision",
    "nltk": "texts",
}


def installed(module: str) -> bool:
    """Whether `module` can be imported here, found without importing it (lm-eval alone takes seconds)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module left half-imported
        return False


def require(module: str, needed_for: str) -> None:
    """Refuse, naming the extra to install, when `module` (a key of EXTRAS) is missing: `needed_for` says what
    of the run needs it, e.g. "the training curve (train_curve.png)"."""
    if not installed(module):
        extra = EXTRAS[module]
        raise UserInputError(
            f"{needed_for} needs the Python package {module!r}, which is not installed here. Install it with "
            f"`pip install 'maskprune[{extra}]'` (or every extra: `pip install 'maskprune[all]'`; `make run` and "
            "`make test` install them all)."
        )
