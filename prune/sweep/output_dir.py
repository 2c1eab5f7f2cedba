"""The directories `prune compare` and `prune sweep` write, under the rules of a run directory (prune.runs.run_dir):
MaskPrune writes only into a new or empty directory, which it marks as its own, or into one carrying its marker;
any other directory is refused, and replacing a previous output removes only the files that command writes.

`claim` checks and creates the directory and writes the marker; a command that then refuses its input before
writing anything hands the directory back with `release_if_unused`, so a refusal leaves nothing behind.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from prune.core.atomic import write_text_atomic
from prune.core.errors import UserInputError


@dataclass(frozen=True)
class OutputKind:
    """What one command writes: its marker file, the name of its output in messages, and its own entries."""

    marker: str
    what: str  # e.g. "comparison"
    command: str  # e.g. "prune compare"
    own: frozenset[str]  # the names at the top of the directory the command writes (files or folders)


def check(directory: Path, kind: OutputKind, *, overwrite: bool, existing_ok: bool) -> None:
    """Refuse, before anything is written, an output `kind` may not use: a file or a path below one; a non-empty
    directory without `kind`'s marker; one holding a previous output unless `overwrite` (or `existing_ok`: a sweep
    resumes its own points)."""
    for path in (directory, *directory.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                where = "is a file" if path == directory else f"lies below the file {path}"
                raise UserInputError(f"output {directory} {where}; choose a directory for --output.")
            break
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    if not (directory / kind.marker).is_file():
        entries = sorted(entry.name for entry in directory.iterdir())
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise UserInputError(
            f"output {directory} exists and is not a MaskPrune {kind.what} (it holds {shown}, but no {kind.marker} "
            f"marker); {kind.command} writes only into a new or empty directory or one of its own outputs, and "
            "never deletes files it did not write. Choose another --output (or empty that directory yourself)."
        )
    if not overwrite and not existing_ok and any((directory / name).exists() for name in kind.own):
        raise UserInputError(
            f"output {directory} already holds a {kind.what}; pass --overwrite to replace it (only the files "
            f"{kind.command} writes are removed), or choose another --output."
        )


def claim(directory: Path, kind: OutputKind, *, overwrite: bool = False, existing_ok: bool = False) -> bool:
    """Check (see `check`), create the directory and mark it; with `overwrite`, remove the previous output's own
    files (nothing else). Returns whether the directory was created here (for `release_if_unused`)."""
    check(directory, kind, overwrite=overwrite, existing_ok=existing_ok)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        directory / kind.marker, f"A MaskPrune {kind.what}. {kind.command} removes only its own files here.\n"
    )
    if overwrite:
        for name in kind.own:
            entry = directory / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
    return created


def release_if_unused(directory: Path, kind: OutputKind, created: bool) -> None:
    """Remove a directory `claim` created when nothing but its marker was written into it."""
    if created and directory.is_dir() and [entry.name for entry in directory.iterdir()] == [kind.marker]:
        shutil.rmtree(directory)
