"""Which texts a run read: every perplexity is labelled "seen in training/calibration" or "not seen".

Why: a figure on a text the masks were calibrated or trained on says how they fit that text, not how the
model does on text it never met; a reader must be able to tell the two apart in every report and table.
The label is derived from the recipe's data section, never written by hand: a run that reads its data
(calibration, training, or the choice of the best masks) reads `data.source` and every `data.mix` text (their
train and validation parts), so each of those is seen and every other text is not; a run that reads no data
(magnitude pruning) has seen none. The source's own test part is never read, but its genre was: its in-domain
figure is labelled seen too.

Two names are one text when they name the same thing: a shipped text's alias and its cached file given by
path, or one local file spelt two ways (relative, with ~, through a symlink).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from prune.core.hub import looks_like_hub_id
from prune.data.config import EMBEDDED_DOCS, NEVER_SEEN
from prune.data.prose import TEXTS, cached_path

SEEN = "seen in training/calibration"
NOT_SEEN = "not seen"


def identity(name: str) -> str:
    """The text `name` stands for: an alias's cached file, a local file's resolved path, a Hub dataset's name."""
    if name == EMBEDDED_DOCS:
        return name
    if name in TEXTS:
        return str(cached_path(name).resolve())
    path = Path(name).expanduser()
    if path.exists() or not looks_like_hub_id(name):
        return str(path.resolve())
    return name


def seen_texts(source: str, mix: Iterable[str], texts: Iterable[str], reads: bool) -> dict[str, bool]:
    """For each of `texts`: whether a run with this `data.source` and `data.mix` read any part of it; `reads`:
    whether the run read its data at all (calibration, training or selection)."""
    read = {identity(name) for name in (source, *mix)} if reads else set()
    return {name: identity(name) in read for name in texts}


def label(seen: bool) -> str:
    return SEEN if seen else NOT_SEEN


def all_seen_warning(seen: dict[str, bool], extra_texts: Iterable[str]) -> str | None:
    """The report's warning when every `eval.extra_texts` entry was read by the run: then no figure says how
    the model does on text it never saw (None when one is not seen, or when there are none)."""
    extra = list(extra_texts)
    if not extra or not all(seen[name] for name in extra):
        return None
    return (
        f"every eval.extra_texts entry ({', '.join(extra)}) was read by this run's calibration or training "
        "(data.source / data.mix), so no figure here shows how the pruned model does on text it never saw; add a "
        f"text the run does not read to eval.extra_texts (e.g. {NEVER_SEEN})."
    )
