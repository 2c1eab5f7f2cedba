"""Every file MaskPrune writes goes through here, so a reader (or a crashed run) sees the old content or the
whole new one, never a torn file or a half-written directory.

Files: written to a temp name beside the target, flushed to disk, then `os.replace`d over it (atomic on POSIX
and Windows). Directories: filled under a temp name beside the target, then renamed into place. Temp files
(mkstemp: 0600) and safetensors (0600) would otherwise keep owner-only permissions; what we publish gets what
a plain open() would give under the current umask.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from prune.core.errors import UserInputError


def readable_mode(directory: bool = False) -> int:
    """The permissions a plain open() (or mkdir) would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` to write; when the block succeeds, it replaces `path` in one step.
    On any error the temp file is removed and `path` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.chmod(tmp, readable_mode())
        os.replace(tmp, path)
    except OSError as error:  # a full disk: the error of a write or a flush names no file; name the target
        tmp.unlink(missing_ok=True)
        raise naming(error, path) from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def naming(error: OSError, path: str | os.PathLike) -> OSError:
    """`error` naming `path` when it names no file (a failed write or flush of an open file, `os.pwrite`), so that
    the CLI can say which file a full disk refused; any other error as it is."""
    if error.errno is None or error.filename is not None:
        return error
    return OSError(error.errno, error.strerror, str(path))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8, newlines as given) so readers see the old file or the whole new one."""
    with replacing(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as file:
            file.write(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Atomically write `obj` as JSON. NaN/inf are refused (strict JSON): report them as errors."""
    text = json.dumps(obj, indent=indent, sort_keys=False, allow_nan=False, default=_json_default)
    return write_text_atomic(path, text + "\n")


def write_safetensors_atomic(path: str | os.PathLike, tensors: dict[str, Tensor]) -> Path:
    """Atomically write `tensors` as one safetensors file."""
    with replacing(path) as tmp:
        save_safetensors(tensors, tmp)
    return Path(path)


def save_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike) -> None:
    """safetensors' `save_file`, a failed write raised as the OSError it is (see `os_errors_of_safetensors`)."""
    with os_errors_of_safetensors(path):
        save_file(tensors, path)


@contextmanager
def os_errors_of_safetensors(path: str | os.PathLike) -> Iterator[None]:
    """safetensors reports a failed write (a full disk, a read-only one) as a SafetensorError whose text holds the
    OS error code; raise it as that OSError, naming `path`, so the CLI says what happened (exit 2) instead of a
    traceback."""
    try:
        yield
    except SafetensorError as error:
        code = re.search(r"Os \{ code: (\d+)", str(error))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def write_tensors_with_json(
    directory: Path, tensors_file: str, tensors: dict[str, Tensor], json_file: str, info: dict
) -> None:
    """The safetensors + JSON pair a run directory holds (masks, predictors): the tensors first, then the JSON
    that describes them, each replaced atomically, so a reader checking the JSON against the tensors never sees
    either file half-written."""
    write_safetensors_atomic(directory / tensors_file, tensors)
    write_text_atomic(directory / json_file, json.dumps(info, indent=2))


def read_tensors_with_json(
    directory: Path, tensors_file: str, json_file: str, *, method: str, format_version: int
) -> tuple[dict, dict[str, Tensor]]:
    """Read back a pair written by write_tensors_with_json: (the JSON's content, the tensors). The JSON must name
    `method` and `format_version`; a missing, unreadable or foreign pair is the user's input, so each case
    raises UserInputError naming the file and the fix."""
    directory = Path(directory)
    try:
        info = json.loads((directory / json_file).read_text())
        tensors = load_file(directory / tensors_file)
    except FileNotFoundError:
        raise UserInputError(
            f"{directory} has no {tensors_file} + {json_file}; pass the run directory of a `prune run` with method "
            f"{method}."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as error:
        raise UserInputError(f"the {method} files in {directory} are corrupt ({error}); rerun `prune run`.") from None
    if not isinstance(info, dict) or info.get("format_version") != format_version or info.get("method") != method:
        raise UserInputError(
            f"{directory / json_file} is not a MaskPrune {method} file of format {format_version}; pass the run "
            f"directory of a `prune run` with method {method}."
        )
    return info, tensors


@contextmanager
def staged_directory(target: str | os.PathLike, *, complete: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield an empty directory beside `target` to fill; when the block succeeds it takes `target`'s place
    (replacing what was there), so `target` is whole or absent, never half-written.

    `complete`: for a cache entry that concurrent processes may both create. A `target` that is already
    complete wins and the staged copy is dropped; an incomplete leftover is replaced."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))
    try:
        try:
            yield staging
        except OSError as error:  # a full disk: name the file as it would have been published, not its temp name
            inside = error.filename is not None and Path(error.filename).is_relative_to(staging)
            if not inside:
                raise
            published = target / Path(error.filename).relative_to(staging)
            raise OSError(error.errno, error.strerror, str(published)) from error
        _publish(staging)
        if complete is not None and complete(target):
            return
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            if complete is None or not complete(target):  # another process finishing first is fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_pretrained_atomic(directory: str | os.PathLike, model, processor) -> None:
    """`save_pretrained` of a model and its tokenizer or processor (None: the model alone) into a staging dir,
    then swapped in: the checkpoint is whole or absent."""
    with staged_directory(directory) as staging, os_errors_of_safetensors(directory):
        model.save_pretrained(staging)
        if processor is not None:
            processor.save_pretrained(staging)


def _publish(directory: Path) -> None:
    """Give a staged directory and its files the usual permissions (mkdtemp and safetensors use 0700/0600)."""
    os.chmod(directory, readable_mode(directory=True))
    for path in directory.rglob("*"):
        os.chmod(path, readable_mode(directory=path.is_dir()))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    """Make a rename itself durable; not possible on every platform."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
