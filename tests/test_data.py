"""prune.data.text: sources, deterministic disjoint splits, blocks. A char-level stub tokenizer keeps these fast."""
from __future__ import annotations

import json
import time

import datasets
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prune.data import text as data

from prune.core import hub
from prune.core.errors import UserInputError


class CharTokenizer:
    """One token per character: all data.py needs is `tokenizer(text)["input_ids"]` and `decode`."""

    def __call__(self, text, add_special_tokens=True, verbose=True, **kwargs):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(map(chr, ids))


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)


# --- splits -----------------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 2000), fraction=st.floats(0.001, 0.999))
def test_split_is_a_contiguous_cut_covering_the_stream(n, fraction):
    ids = torch.arange(n)
    try:
        splits = data.split_tokens(ids, fraction)
    except UserInputError:
        assert round(n * fraction) in (0, n)  # only when one part would be empty
        return
    assert torch.equal(torch.cat([splits.train_ids, splits.heldout_ids]), ids)
    assert splits.train_ids.numel() >= 1 and splits.heldout_ids.numel() >= 1
    assert splits.heldout_ids.numel() == round(n * fraction)
    assert not set(splits.train_ids.tolist()) & set(splits.heldout_ids.tolist())


def test_prepare_is_deterministic_and_holds_out_the_tail():
    tok = CharTokenizer()
    a = data.prepare(tok, "embedded-docs", heldout_fraction=0.1)
    b = data.prepare(tok, "embedded-docs", heldout_fraction=0.1)
    assert torch.equal(a.train_ids, b.train_ids) and torch.equal(a.heldout_ids, b.heldout_ids)
    text = "\n\n".join(data.load_documents("embedded-docs"))
    assert a.train_ids.numel() + a.heldout_ids.numel() == len(text)
    assert a.heldout_text(tok) == text[-a.heldout_ids.numel():]
    assert a.heldout_ids.dtype == torch.long and a.heldout_ids.dim() == 1


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, True])
def test_bad_heldout_fraction(bad):
    with pytest.raises(UserInputError, match="heldout_fraction"):
        data.split_tokens(torch.arange(100), bad)


# --- blocks -----------------------------------------------------------------------------------------------------

def test_token_blocks_are_consecutive_and_drop_the_remainder():
    blocks = data.TokenSplits.blocks(torch.arange(10), 3)
    assert blocks.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert data.token_blocks(torch.arange(2), 3).shape == (0, 3)
    with pytest.raises(UserInputError, match="seq_len"):
        data.token_blocks(torch.arange(10), 0)


def test_calibration_blocks_distinct_reproducible_seeded_and_from_train_only():
    splits = data.split_tokens(torch.arange(10_000), 0.2)  # train = 0..7999, every value unique
    a = splits.calibration_blocks(32, 16, seed=0)
    assert a.shape == (32, 16)
    assert torch.equal(a, splits.calibration_blocks(32, 16, seed=0))
    assert not torch.equal(a, splits.calibration_blocks(32, 16, seed=1))
    assert len({row[0] for row in a.tolist()}) == 32  # distinct blocks
    assert int(a.max()) < 8000  # never from the held-out part
    assert all(row[0] % 16 == 0 for row in a.tolist())  # aligned to the block grid: non-overlapping
    held = splits.heldout_blocks(16)
    assert held.shape == (125, 16) and int(held.min()) == 8000
    assert splits.train_blocks(16).shape == (500, 16)


def test_too_many_calibration_blocks_says_how_many_fit():
    splits = data.split_tokens(torch.arange(1000), 0.1)  # 900 train tokens -> 9 blocks of 100
    with pytest.raises(UserInputError, match="holds only 9"):
        splits.calibration_blocks(10, 100, seed=0)
    with pytest.raises(UserInputError, match="fewer than seq_len"):
        splits.heldout_blocks(500)


# --- local files ------------------------------------------------------------------------------------------------

def test_txt_is_one_verbatim_document(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first para\n\n\nsecond para\n", encoding="utf-8")
    assert data.load_documents(str(path)) == ["first para\n\n\nsecond para\n"]


def test_jsonl_json_parquet(tmp_path):
    rows = [{"text": "alpha", "id": 1}, {"text": "beta", "id": 2}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (tmp_path / "a.json").write_text(json.dumps(rows), encoding="utf-8")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    for name in ("a.jsonl", "a.json", "a.parquet"):
        assert data.load_documents(str(tmp_path / name)) == ["alpha", "beta"], name
    splits = data.prepare(CharTokenizer(), str(tmp_path / "a.jsonl"), heldout_fraction=0.5)
    assert splits.heldout_text(CharTokenizer()) == "alpha\n\nbeta"[-splits.heldout_ids.numel():]


def test_missing_column_lists_the_columns(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"body": "x", "id": 1}), encoding="utf-8")
    with pytest.raises(UserInputError, match=r"no column 'text'.*\['body', 'id'\]"):
        data.load_documents(str(path))
    assert data.load_documents(str(path), text_column="body") == ["x"]


def test_missing_or_unsupported_file(tmp_path, offline):
    with pytest.raises(UserInputError, match="no such file"):
        data.load_documents(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserInputError, match="no such file"):
        data.load_documents("corpus.txt")  # looks like a file, not a Hub name: no Hub round-trip
    (tmp_path / "a.csv").write_text("text\nx\n")
    with pytest.raises(UserInputError, match="unsupported file type"):
        data.load_documents(str(tmp_path / "a.csv"))


def test_heldout_split_only_for_hub_datasets(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("hello world")
    with pytest.raises(UserInputError, match="Hub datasets only"):
        data.prepare(CharTokenizer(), str(path), heldout_split="test")


def test_embedded_docs_sorted_and_substantial():
    from pydoc_data.topics import topics

    docs = data.load_documents("embedded-docs")
    assert docs == [topics[k] for k in sorted(topics)]
    assert sum(map(len, docs)) > 100_000


# --- Hub --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["wikitext", "c4", "someorg/some-corpus"])
def test_hub_dataset_offline_fails_at_once_saying_what_to_pass(name, offline):
    start = time.monotonic()
    with pytest.raises(UserInputError) as err:
        data.load_documents(name)
    assert time.monotonic() - start < 1.0
    message = str(err.value)
    assert "unreachable" in message and "embedded-docs" in message and ".txt" in message


def test_hub_aliases_and_heldout_split(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return datasets.Dataset.from_dict({"text": [f"{split} text"] * 3})

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = data.prepare(CharTokenizer(), "wikitext", heldout_split="test")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "train", {}),
                     ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", {})]
    assert splits.heldout_text(CharTokenizer()).startswith("test text")
    calls.clear()
    data.load_documents("c4")
    assert calls == [("allenai/c4", None, "validation",
                      {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}})]
    with pytest.raises(UserInputError, match="training split too"):
        data.prepare(CharTokenizer(), "wikitext", heldout_split="train")
    with pytest.raises(UserInputError, match="splits"):
        data.load_documents("c4", split="test")
