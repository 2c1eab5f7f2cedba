"""prune.data.text: sources, deterministic disjoint splits, blocks. A char-level stub tokenizer keeps these fast."""

from __future__ import annotations

import json
import time

import datasets
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prune.core import hub
from prune.core.errors import UserInputError
from prune.data import config
from prune.data import text as data


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


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(2, 5000),
    heldout=st.floats(0.001, 0.95),
    validation=st.floats(0.001, 0.95),
    seq_len=st.integers(1, 64),
)
def test_three_parts_are_disjoint_contiguous_and_cover_the_stream(n, heldout, validation, seq_len):
    ids = torch.arange(n)  # every token value is its position
    n_test, n_validation = round(n * heldout), round(n * validation)
    try:
        splits = data.split_tokens(ids, heldout, validation)
    except UserInputError:
        assert min(n_test, n_validation, n - n_test - n_validation) < 1  # only when a part would be empty
        return
    parts = [splits.train_ids, splits.validation_ids, splits.test_ids]
    assert torch.equal(torch.cat(parts), ids) and min(part.numel() for part in parts) >= 1
    assert (splits.test_ids.numel(), splits.validation_ids.numel()) == (n_test, n_validation)
    for name, part in zip(data.PARTS, parts):  # report.json's ranges are exactly the parts' positions
        start, end = splits.ranges[name]
        assert torch.equal(part, ids[start:end])
    windows = [set(data.token_blocks(part, seq_len).flatten().tolist()) for part in parts]
    assert not (windows[0] & windows[1] or windows[0] & windows[2] or windows[1] & windows[2])
    assert splits.describe(seq_len)["windows"] == {
        name: part.numel() // seq_len for name, part in zip(data.PARTS, parts)
    }


def test_prepare_is_deterministic_validation_sits_before_the_test_tail():
    tok = CharTokenizer()
    a = data.prepare(tok, "embedded-docs", heldout_fraction=0.1, validation_fraction=0.05)
    b = data.prepare(tok, "embedded-docs", heldout_fraction=0.1, validation_fraction=0.05)
    assert all(torch.equal(a.part(name), b.part(name)) for name in data.PARTS) and a.ranges == b.ranges
    text = "\n\n".join(data.load_documents("embedded-docs"))
    assert a.ranges["test"] == (len(text) - round(0.1 * len(text)), len(text))
    assert a.ranges["validation"] == (a.ranges["test"][0] - round(0.05 * len(text)), a.ranges["test"][0])
    assert a.test_text(tok) == text[-a.test_ids.numel() :]
    assert a.test_ids.dtype == torch.long and a.test_ids.dim() == 1


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, True])
def test_bad_fractions(bad):
    with pytest.raises(UserInputError, match="heldout_fraction"):
        data.split_tokens(torch.arange(100), bad)
    with pytest.raises(UserInputError, match="validation_fraction"):
        data.split_tokens(torch.arange(100), 0.1, bad)


def test_too_small_text_says_what_it_has_and_what_the_run_needs():
    splits = data.split_tokens(torch.arange(1000), 0.1, 0.1)  # 800 / 100 / 100 tokens
    splits.require("x.txt", 50, {"train": (16, "calibration_samples=16"), "validation": (2, "eval"), "test": (1, "t")})
    with pytest.raises(UserInputError) as error:
        splits.require(
            "x.txt",
            50,
            {
                "train": (17, "calibration_samples=17"),
                "validation": (3, "train.eval_windows=3"),
                "test": (1, "the test perplexity"),
            },
        )
    message = str(error.value)
    assert "'x.txt' (1,000 tokens)" in message and "seq_len=50" in message
    assert "train part has 800 tokens (16 windows) but calibration_samples=17 needs 17 windows = 850 tokens" in message
    assert "validation part has 100 tokens (2 windows) but train.eval_windows=3 needs 3 windows = 150" in message
    assert "test part" not in message


# --- blocks -----------------------------------------------------------------------------------------------------


def test_token_blocks_are_consecutive_and_drop_the_remainder():
    blocks = data.TokenSplits.blocks(torch.arange(10), 3)
    assert blocks.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert data.token_blocks(torch.arange(2), 3).shape == (0, 3)
    with pytest.raises(UserInputError, match="seq_len"):
        data.token_blocks(torch.arange(10), 0)


def test_calibration_blocks_distinct_reproducible_seeded_and_from_train_only():
    splits = data.split_tokens(torch.arange(10_000), 0.2, 0.1)  # train = 0..6999, every value unique
    a = splits.calibration_blocks(32, 16, seed=0)
    assert a.shape == (32, 16)
    assert torch.equal(a, splits.calibration_blocks(32, 16, seed=0))
    assert not torch.equal(a, splits.calibration_blocks(32, 16, seed=1))
    assert len({row[0] for row in a.tolist()}) == 32  # distinct blocks
    assert int(a.max()) < 7000  # never from the validation or test part
    assert all(row[0] % 16 == 0 for row in a.tolist())  # aligned to the block grid: non-overlapping
    held = splits.test_blocks(16)
    assert held.shape == (125, 16) and int(held.min()) == 8000
    assert splits.validation_blocks(16).shape == (62, 16) and int(splits.validation_blocks(16).min()) == 7000
    assert splits.train_blocks(16).shape == (437, 16)


def test_too_many_calibration_blocks_says_how_many_fit():
    splits = data.split_tokens(torch.arange(1000), 0.1, 0.05)  # 850 train tokens -> 8 blocks of 100
    with pytest.raises(UserInputError, match="holds only 8"):
        splits.calibration_blocks(9, 100, seed=0)
    with pytest.raises(UserInputError, match="fewer than seq_len"):
        splits.test_blocks(500)


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
    assert splits.test_text(CharTokenizer()) == "alpha\n\nbeta"[-splits.test_ids.numel() :]


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


def test_every_shipped_text_is_an_alias_read_from_the_registry_table(monkeypatch, offline):
    monkeypatch.setattr(data, "registry_text", lambda name: f"the text {name}")
    for name in ("moby-dick", "sotu", "brown"):
        assert data.load_documents(name) == [f"the text {name}"]  # offline: no Hub needed


def test_streaming_offline_is_refused_naming_the_local_alternatives(offline):
    config = data.DataConfig(source="someorg/web-corpus", stream_tokens=1000)
    with pytest.raises(UserInputError) as error:
        data.prepare_source(CharTokenizer(), config)
    message = str(error.value)
    assert "unreachable" in message and "`general`" in message and "moby-dick" in message and ".txt" in message


def test_streaming_reads_only_the_documents_the_token_budget_needs(monkeypatch):
    """`data.stream_tokens`: datasets' IterableDataset (here over a local generator) is read until the budget is
    met, and the stream is cut to exactly that many tokens before the usual split."""
    rows_read, calls = [], []

    def rows():
        for index in range(1000):
            rows_read.append(index)
            yield {"text": f"document {index:03d} " * 5, "id": index}

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return datasets.IterableDataset.from_generator(rows)

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    config = data.DataConfig(source="someorg/web-corpus", stream_tokens=1000, seq_len=16)
    splits = data.prepare_source(CharTokenizer(), config)
    assert calls == [("someorg/web-corpus", None, "train", {"streaming": True})]
    assert sum(splits.part(name).numel() for name in data.PARTS) == 1000  # 1000 characters = tokens
    assert len(rows_read) < 20  # 70 characters a document: 15 documents meet the budget, not all 1000
    assert CharTokenizer().decode(splits.train_ids[:24].tolist()) == "document 000 document 00"
    mixed = data.prepare_mix(
        CharTokenizer(), data.DataConfig(mix=["someorg/web-corpus"], stream_tokens=500, seq_len=16)
    )
    assert sum(mixed["someorg/web-corpus"].part(name).numel() for name in data.PARTS) == 500  # a mix text too
    local = data.prepare(CharTokenizer(), "embedded-docs", stream_tokens=500)  # shipped texts are read whole
    assert sum(local.part(name).numel() for name in data.PARTS) > 100_000


def test_general_mix_names_every_shipped_genre_but_the_never_seen_text_and_the_source():
    assert data.DataConfig(mix="general").mix == ["moby-dick", "brown"]
    assert data.DataConfig(source="moby-dick", mix="general").mix == ["embedded-docs", "brown"]
    assert data.DataConfig(source="notes.txt", mix="general").mix == ["embedded-docs", "moby-dick", "brown"]
    assert "sotu" not in config.GENERAL_MIX and config.NEVER_SEEN == "sotu"
    assert data.DataConfig(mix="general", source_share=0.25).source_share == 0.25  # the share stays settable


def test_hub_aliases_and_heldout_split(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return datasets.Dataset.from_dict({"text": [f"{split} text"] * 3})

    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = data.prepare(CharTokenizer(), "wikitext", heldout_split="test")
    assert calls == [
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", {}),
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", {}),
    ]
    assert splits.test_text(CharTokenizer()) == "\n\n".join(["test text"] * 3)  # the whole test split
    train_stream = "\n\n".join(["train text"] * 3)  # validation: the tail of the training split's stream
    assert splits.ranges == {"train": (0, 32), "validation": (32, 34), "test": (0, 31)}
    assert CharTokenizer().decode(splits.validation_ids.tolist()) == train_stream[32:]
    calls.clear()
    data.load_documents("c4")
    assert calls == [
        ("allenai/c4", None, "validation", {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}})
    ]
    with pytest.raises(UserInputError, match="training split too"):
        data.prepare(CharTokenizer(), "wikitext", heldout_split="train")
    with pytest.raises(UserInputError, match="splits"):
        data.load_documents("c4", split="test")


# --- out-of-domain texts ------------------------------------------------------------------------------------------


def test_moby_dick_is_an_alias_and_extra_texts_are_split_like_any_source(monkeypatch):
    monkeypatch.setattr(data, "registry_text", {"moby-dick": "Call me Ishmael. " * 100}.__getitem__)
    assert data.load_documents("moby-dick") == ["Call me Ishmael. " * 100]
    extra = data.prepare_extra(CharTokenizer(), ["moby-dick", "moby-dick"], 16, heldout_fraction=0.2)
    assert list(extra) == ["moby-dick"]
    assert extra["moby-dick"].ranges == {"train": (0, 1275), "validation": (1275, 1360), "test": (1360, 1700)}


def test_extra_text_that_cannot_be_found_or_is_too_small_names_the_entry(tmp_path, offline):
    with pytest.raises(UserInputError, match=r"eval.extra_texts entry '.*nope.txt': no such file"):
        data.prepare_extra(CharTokenizer(), [str(tmp_path / "nope.txt")], 16)
    small = tmp_path / "small.txt"
    small.write_text("x" * 100)  # 10 test tokens: no window of 16
    with pytest.raises(UserInputError, match=r"entry '.*small.txt': .*test part has 10 tokens \(0 windows\)"):
        data.prepare_extra(CharTokenizer(), [str(small)], 16)


# --- data.mix: other texts in calibration, training and selection -------------------------------------------------


def test_interleave_alternates_windows_of_every_text_and_keeps_the_source_test_part():
    source = data.split_tokens(torch.arange(0, 200), heldout_fraction=0.1, validation_fraction=0.2)
    other = data.split_tokens(torch.arange(1000, 1400), heldout_fraction=0.1, validation_fraction=0.2)
    assert data.interleave(source, {}, 10) is source  # no mix: exactly what was read before
    woven = data.interleave(source, {"other": other}, 10)
    train = woven.train_blocks(10)
    source_train, other_train = source.train_blocks(10), other.train_blocks(10)
    assert train[0].tolist() == source_train[0].tolist() and train[1].tolist() == other_train[0].tolist()
    assert train[2].tolist() == source_train[1].tolist()  # window by window
    assert sorted(map(tuple, train.tolist())) == sorted(map(tuple, torch.cat([source_train, other_train]).tolist()))
    validation = woven.validation_blocks(10)
    assert {row[0] >= 1000 for row in validation[:2].tolist()} == {True, False}  # the first two: both texts
    assert len(validation) == len(source.validation_blocks(10)) + len(other.validation_blocks(10))
    assert torch.equal(woven.test_ids, source.test_ids) and woven.ranges == source.ranges
    never_read = set(other.test_ids.tolist())  # the mix text's test part is in no window of any part
    assert not never_read & set(train.flatten().tolist()) and not never_read & set(validation.flatten().tolist())


def test_source_share_cuts_the_longer_side_to_the_share_and_reads_no_window_twice():
    source = data.split_tokens(torch.arange(0, 300), heldout_fraction=0.1, validation_fraction=0.1)  # 24 train windows
    long = data.split_tokens(torch.arange(1000, 2000), heldout_fraction=0.1, validation_fraction=0.1)  # 80
    short = data.split_tokens(torch.arange(5000, 5100), heldout_fraction=0.1, validation_fraction=0.1)  # 8
    assert data.shared_train_windows(source, {"long": long}, 10, None) == [24, 80]  # unset: every window
    assert data.shared_train_windows(source, {"long": long}, 10, 0.5) == [24, 24]  # the mix text is cut
    assert data.shared_train_windows(source, {"long": long}, 10, 0.75) == [24, 8]
    assert data.shared_train_windows(source, {"long": long, "short": short}, 10, 0.5) == [16, 8, 8]  # source cut
    woven = data.interleave(source, {"long": long}, 10, source_share=0.75)
    train = woven.train_blocks(10).tolist()
    from_source = [row for row in train if row[0] < 1000]
    assert len(from_source) == 24 and len(train) == 32  # 0.75 of the train windows are the source's
    assert len({tuple(row) for row in train}) == len(train)  # no window twice
    assert [row[0] for row in train if row[0] >= 1000] == [1000 + 10 * i for i in range(8)]  # the first ones kept
    assert len(woven.validation_blocks(10)) == len(source.validation_blocks(10)) + len(long.validation_blocks(10))
    with pytest.raises(UserInputError, match=r"source_share=0.01 leaves no train window of data.source.*source 24"):
        data.shared_train_windows(source, {"short": short}, 10, 0.01)


def test_source_share_needs_a_mix():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="source_share .* data.mix, which is empty"):
        data.DataConfig(source_share=0.5)
    assert data.DataConfig(mix=["moby-dick"], source_share=0.5).source_share == 0.5


def test_mix_must_name_other_texts_once(monkeypatch, tmp_path, offline):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="repeats a text or names data.source"):
        data.DataConfig(source="embedded-docs", mix=["embedded-docs"])
    with pytest.raises(ValidationError, match="repeats a text"):
        data.DataConfig(mix=["moby-dick", "moby-dick"])
    config = data.DataConfig(seq_len=16, mix=[str(tmp_path / "nope.txt")])
    with pytest.raises(UserInputError, match=r"data.mix entry '.*nope.txt': no such file"):
        data.prepare_mix(CharTokenizer(), config)


def test_a_text_in_both_mix_and_extra_texts_is_prepared_once(monkeypatch):
    monkeypatch.setattr(data, "registry_text", {"moby-dick": "Call me Ishmael. " * 100}.__getitem__)
    config = data.DataConfig(seq_len=16, mix=["moby-dick"])
    extra = data.prepare_extra(CharTokenizer(), ["moby-dick"], 16)
    monkeypatch.setattr(data, "prepare", lambda *args, **kwargs: pytest.fail("moby-dick tokenized a second time"))
    assert data.prepare_mix(CharTokenizer(), config, extra)["moby-dick"] is extra["moby-dick"]
