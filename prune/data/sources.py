"""What a text source names: an embedded text, a local file or a Hub dataset, and the checks a local file passes
before it is read. Torch-free, so `prune run` refuses a missing or wrong data path before torch is imported."""

from __future__ import annotations

from pathlib import Path

from prune.core import hub
from prune.core.errors import UserInputError
from prune.data.config import ALIASES, EMBEDDED_DOCS

FILE_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def source_kind(source: str) -> str:
    """embedded (ALIASES: embedded-docs and the pinned registry texts), file (a path, or a name with a file
    suffix) or hub."""
    if source in ALIASES:
        return "embedded"
    path = Path(source).expanduser()
    if path.exists() or path.suffix.lower() in FILE_SUFFIXES or not hub.looks_like_hub_id(source):
        return "file"
    return "hub"


def file_format(path: Path) -> str:
    """The `datasets` builder that reads the file at `path` (text for .txt); UserInputError when `path` is a
    directory, is missing, or has a suffix no builder reads."""
    if path.is_dir():
        examples = sorted(str(child) for child in path.iterdir() if child.suffix.lower() in FILE_SUFFIXES)[:3]
        raise UserInputError(
            f"data source {str(path)!r} is a directory; pass one file in it"
            + (f" (e.g. {', '.join(examples)})" if examples else "")
            + f": a .txt/.jsonl/.json/.parquet file, a Hub dataset name or `{EMBEDDED_DOCS}`."
        )
    if not path.is_file():
        raise UserInputError(
            f"no such file {str(path)!r}; pass an existing .txt/.jsonl/.json/.parquet file, a Hub dataset name "
            f"(wikitext, c4, org/name) or a shipped text ({', '.join(ALIASES)})."
        )
    builder = FILE_SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise UserInputError(f"{str(path)!r}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}.")
    return builder


def check_local_source(source: str) -> None:
    """A source that names a local file must be one a builder reads (see `file_format`); others pass."""
    if source_kind(source) == "file":
        file_format(Path(source).expanduser())


def entry_error(setting: str, source: str, error: UserInputError) -> UserInputError:
    """`error` of one text of a list setting (data.mix, eval.extra_texts), naming the entry."""
    return UserInputError(f"{setting} entry {source!r}: {error}")
