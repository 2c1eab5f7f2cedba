"""The run directory: checked before anything runs, claimed once the input is known good, locked while a
run writes it, written atomically, never mistaken for a finished run, and never emptied of files MaskPrune
did not write.

Claiming a new (or empty) directory writes the marker `.maskprune-run` first: only a directory carrying it
is a MaskPrune run that `--overwrite` may replace, and then only the names in `RUN_FILES` (plus their
staging leftovers) are removed; anything else the user put there stays. A run writes `recipe.yaml` at the
claim and `report.json` last, so a directory without `report.json` is an unfinished run. While a run
writes, it holds an exclusive lock on `.maskprune-lock` (which records its pid; filelock's descriptor lock:
`flock` on POSIX, `LockFileEx` on Windows): a second `prune run` on the same directory is refused, and a lock
left by a killed run is no lock at all (the operating system drops it).
Every file goes through a temp name and `os.replace`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml
from filelock import lock_descriptor, unlock_descriptor

from prune.core.atomic import readable_mode, write_text_atomic
from prune.core.errors import UserInputError
from prune.core.yaml_io import read_mapping
from prune.masks.storage import CONFIG_FILE, TENSORS_FILE
from prune.methods.registry import saved_file_pairs
from prune.recovery.stage import STAGE as RECOVER_DIR
from prune.runs.paths import EVAL_JSON, EVAL_MD, check_output
from prune.training.checkpoint import POINTER, check_resumable

MARKER_FILE = ".maskprune-run"
LOCK_FILE = ".maskprune-lock"
RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "report.json"
REPORT_MD = "report.md"
DENSE_FILE = "dense.json"
MODEL_DIR = "model"
TRAIN_DIR = "train"
CURVE_FILE = "train_curve.png"
CHECKPOINTS = Path(TRAIN_DIR) / "checkpoints"
RECOVER_CURVE = "recover_curve.png"
RECOVER_CHECKPOINTS = Path(RECOVER_DIR) / "checkpoints"
# Everything a run writes at the top of its directory: the one list `--overwrite` removes (besides the
# marker and the lock, which stay with the directory).
RUN_FILES = frozenset(
    {
        MARKER_FILE,
        LOCK_FILE,
        RECIPE_FILE,
        REPORT_FILE,
        REPORT_MD,
        DENSE_FILE,
        TENSORS_FILE,
        CONFIG_FILE,
        *(name for pair in saved_file_pairs() for name in pair),
        MODEL_DIR,
        TRAIN_DIR,
        CURVE_FILE,
        EVAL_JSON,
        EVAL_MD,
        RECOVER_DIR,
        RECOVER_CURVE,
    }
)
_MARKER_TEXT = "A MaskPrune run directory. --overwrite removes only MaskPrune's own files here.\n"
_held: dict[str, int] = {}  # run directory -> descriptor of its locked LOCK_FILE, for the runs of this process


def check(directory: str | Path, recipe_dict: dict, *, overwrite: bool, resume: bool = False) -> None:
    """Refuse, before anything is loaded or written, an output this run may not use: a file or a path below
    one; a directory that is not a MaskPrune run; a run another process is writing; a finished run or an
    unfinished one with checkpoints (unless --overwrite / --resume); for --resume, a run that is finished,
    has no checkpoint or was made by another recipe. An unfinished run without checkpoints holds nothing to
    continue and is simply replaced."""
    directory = Path(directory)
    check_output(directory)
    if resume:
        _check_resumable(directory, recipe_dict)
        return
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    if not (directory / MARKER_FILE).is_file():
        raise UserInputError(_not_a_run(directory))
    _check_unlocked(directory)
    if (directory / REPORT_FILE).exists():
        if not overwrite:
            raise UserInputError(
                f"output {directory} already holds a finished run; pass --overwrite to replace it (only MaskPrune's "
                "files are removed), or choose another --output."
            )
        return
    step = last_checkpoint(directory)
    if step is not None and not overwrite:
        raise UserInputError(
            f"output {directory} holds an unfinished run with checkpoints up to {step}. Pass --resume to "
            "continue it (with the same recipe), --overwrite to start over and delete its checkpoints, or choose "
            "another --output."
        )


def claim(directory: str | Path, recipe_dict: dict, *, overwrite: bool, resume: bool = False) -> Path:
    """Check the output (see `check`), create it, lock it for this process and write `recipe.yaml`. Without
    `resume`, MaskPrune's files of a previous run there are removed first; `resume` keeps them (checkpoints).
    The lock is held until `release(directory)` or the end of the process."""
    directory = Path(directory)
    check(directory, recipe_dict, overwrite=overwrite, resume=resume)
    directory.mkdir(parents=True, exist_ok=True)
    if not resume and not any(directory.iterdir()):
        write_text_atomic(directory / MARKER_FILE, _MARKER_TEXT)
    lock(directory)
    try:
        check(directory, recipe_dict, overwrite=overwrite, resume=resume)  # again: no other run can start now
        if not resume:
            remove_run_files(directory)
            write_text_atomic(directory / RECIPE_FILE, yaml.safe_dump(recipe_dict, sort_keys=False))
    except BaseException:
        release(directory)
        raise
    return directory


def release(directory: str | Path) -> None:
    """Drop this process's lock on a run directory (a no-op when it holds none)."""
    descriptor = _held.pop(_key(Path(directory)), None)
    if descriptor is not None:
        os.close(descriptor)  # closing the descriptor releases its lock


def remove_run_files(directory: Path) -> None:
    """Delete what a run wrote in `directory` (RUN_FILES but the marker and the lock, and staging leftovers of
    interrupted atomic writes); every other file stays."""
    for entry in directory.iterdir():
        ours = entry.name in RUN_FILES - {MARKER_FILE, LOCK_FILE} or _is_staging(entry.name)
        if not ours:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def checkpoint_step(directory: str | Path, checkpoints: Path = CHECKPOINTS) -> int | None:
    """The step of the run's latest checkpoint of a training stage (mask training by default), None when it has
    none."""
    pointer = Path(directory) / checkpoints / POINTER
    name = pointer.read_text().strip() if pointer.is_file() else ""
    return int(name.removeprefix("step-")) if name.removeprefix("step-").isdigit() else None


def last_checkpoint(directory: str | Path) -> str | None:
    """Where an unfinished run got to, for messages: `recovery step N` once recovery checkpointed (it runs after
    mask training), else `step N` of mask training; None without any checkpoint."""
    recovery = checkpoint_step(directory, RECOVER_CHECKPOINTS)
    if recovery is not None:
        return f"recovery step {recovery}"
    step = checkpoint_step(directory)
    return None if step is None else f"step {step}"


def read_recipe(directory: Path) -> dict:
    """A run's recipe.yaml as a mapping (not validated: callers read the keys they need)."""
    return read_mapping(directory / RECIPE_FILE, f"the run's {RECIPE_FILE}", _no_recipe(directory))


def require_run(directory: str | Path) -> Path:
    directory = Path(directory)
    if not (directory / RECIPE_FILE).is_file():
        raise UserInputError(_no_recipe(directory))
    return directory


def _no_recipe(directory: Path) -> str:
    return f"{directory} is not a run directory (no {RECIPE_FILE}); pass a `prune run` output."


def _not_a_run(directory: Path) -> str:
    entries = sorted(entry.name for entry in directory.iterdir())
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    return (
        f"output {directory} exists and is not a MaskPrune run (it holds {shown}, but no {MARKER_FILE} marker); "
        "MaskPrune writes only into a new or empty directory or one of its own runs, and never deletes files it "
        "did not write. Choose another --output (or empty that directory yourself)."
    )


def _check_resumable(directory: Path, recipe_dict: dict) -> None:
    require_run(directory)
    _check_unlocked(directory)
    if (directory / REPORT_FILE).exists():
        raise UserInputError(f"{directory} holds a finished run; nothing to resume (use --overwrite to redo it).")
    saved = read_recipe(directory)
    changed = sorted(set(_flatten(saved).items()) ^ set(_flatten(recipe_dict).items()))
    if changed:
        keys = sorted({key for key, _ in changed})
        raise UserInputError(
            f"cannot resume {directory}: the recipe changed ({', '.join(keys)}). Resume with the same recipe, "
            "or start over with --overwrite."
        )
    if last_checkpoint(directory) is None:
        raise UserInputError(
            f"nothing to resume in {directory}: the run wrote no checkpoint ({CHECKPOINTS / POINTER}); run the "
            "same command without --resume to start it again."
        )
    for section, checkpoints in (("train", CHECKPOINTS), ("recover", RECOVER_CHECKPOINTS)):  # each stage that got there
        if (directory / checkpoints / POINTER).is_file():
            check_resumable(directory / checkpoints, (recipe_dict.get(section) or {}).get("steps", 0), section)


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Leaf keys and values; `output` is where a run is, not what it computes (the directory resumed is it)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif f"{prefix}{key}" != "output":
            flat[f"{prefix}{key}"] = repr(value)
    return flat


def _key(directory: Path) -> str:
    return os.path.realpath(directory)


def lock(directory: Path) -> None:
    """Take the exclusive lock of a run directory for this process, or refuse: another run is writing it."""
    release(directory)  # this process re-claiming a directory it holds (e.g. a sweep point rewritten)
    descriptor = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, readable_mode())
    if not lock_descriptor(descriptor, blocking=False):
        holder = _holder(directory / LOCK_FILE)
        os.close(descriptor)
        raise UserInputError(_in_use(directory, holder))
    os.ftruncate(descriptor, 0)
    os.write(descriptor, f"{os.getpid()}\n".encode())
    _held[_key(directory)] = descriptor


def _check_unlocked(directory: Path) -> None:
    """Refuse a directory whose lock another live run holds (a lock file left by a dead run does not count)."""
    path = directory / LOCK_FILE
    if _key(directory) in _held or not path.is_file():
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        if not lock_descriptor(descriptor, blocking=False):  # taken for an instant, and let go at once
            raise UserInputError(_in_use(directory, _holder(path)))
        unlock_descriptor(descriptor)
    finally:
        os.close(descriptor)


def _holder(path: Path) -> str:
    """The pid a lock file records (Windows keeps a locked file's first byte from other processes: unknown)."""
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def _in_use(directory: Path, holder: str) -> str:
    return (
        f"output {directory} is in use: another `prune run` (pid {holder}) is writing it right now. Wait for it to "
        "finish (or stop it), or choose another --output."
    )


def _is_staging(name: str) -> bool:
    """Temp names of MaskPrune's atomic writes (`.recipe.yaml.x1y2.tmp`, `.model-x1y2`, `.masks.safetensors-x1`)."""
    return name.startswith(".") and any(name[1:].startswith((f"{known}.", f"{known}-")) for known in RUN_FILES)
