"""prune.data.seen: every text a run measures is labelled "seen in training/calibration" or "not seen", derived
from data.source and data.mix (and whether the run reads its data at all); one text named two ways is one text;
a run whose extra texts were all read gets a warning. The labels reach report.json's `data.seen` and the
comparison tables' cells."""

from __future__ import annotations

import os

import torch

from prune.data import prose
from prune.data.config import DataConfig
from prune.data.seen import NOT_SEEN, SEEN, all_seen_warning, identity, label, seen_texts
from prune.data.text import split_tokens
from prune.sweep.compare import display_row, seen_of
from prune.tasks.causal_lm import data_report


def test_source_and_mix_are_seen_and_other_texts_are_not():
    seen = seen_texts("embedded-docs", ["moby-dick"], ["embedded-docs", "moby-dick", "sotu", "brown"], reads=True)
    assert seen == {"embedded-docs": True, "moby-dick": True, "sotu": False, "brown": False}
    assert label(seen["moby-dick"]) == SEEN and label(seen["sotu"]) == NOT_SEEN


def test_a_run_that_reads_no_data_has_seen_nothing():
    """Magnitude pruning reads no text: not even its source is seen."""
    assert seen_texts("embedded-docs", ["moby-dick"], ["embedded-docs", "moby-dick"], reads=False) == {
        "embedded-docs": False,
        "moby-dick": False,
    }


def test_an_alias_and_its_cached_file_given_by_path_are_one_text(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKPRUNE_CACHE", str(tmp_path))
    by_path = str(prose.cached_path("moby-dick"))
    assert identity(by_path) == identity("moby-dick")
    assert seen_texts("embedded-docs", ["moby-dick"], [by_path], reads=True) == {by_path: True}
    assert seen_texts("embedded-docs", [by_path], ["moby-dick", "sotu"], reads=True) == {
        "moby-dick": True,
        "sotu": False,
    }


def test_one_local_file_spelt_three_ways_is_one_text_and_another_file_is_not(tmp_path, monkeypatch):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    (tmp_path / "other.txt").write_text("other notes")
    os.symlink(notes, tmp_path / "link.txt")
    monkeypatch.chdir(tmp_path)
    texts = [str(notes), "notes.txt", "./link.txt", "other.txt"]
    assert seen_texts("notes.txt", [], texts, reads=True) == {
        str(notes): True,
        "notes.txt": True,
        "./link.txt": True,
        "other.txt": False,
    }
    assert identity("someorg/corpus") == "someorg/corpus"  # a Hub dataset: its name


def test_warning_only_when_every_extra_text_was_read():
    seen = {"embedded-docs": True, "moby-dick": True, "sotu": False}
    warning = all_seen_warning(seen, ["moby-dick"])
    assert "moby-dick" in warning and "never saw" in warning and "sotu" in warning
    assert all_seen_warning(seen, ["moby-dick", "sotu"]) is None
    assert all_seen_warning(seen, []) is None  # no extra text: nothing claims to be out of domain


def _splits(start: int):
    return split_tokens(torch.arange(start, start + 400))


def test_report_data_section_carries_the_labels_and_the_warning():
    source, moby, sotu = _splits(0), _splits(1000), _splits(2000)
    used, config = {"calibration": {"part": "train", "windows": 2}}, DataConfig(source="embedded-docs", seq_len=10)
    data = data_report(config, source, {"moby-dick": moby, "sotu": sotu}, used, mix={"moby-dick": moby})
    assert data["seen"] == {"embedded-docs": True, "moby-dick": True, "sotu": False}
    assert "warning" not in data
    only_seen = data_report(config, source, {"moby-dick": moby}, used, mix={"moby-dick": moby})
    assert "moby-dick" in only_seen["warning"]
    untouched = data_report(config, source, {"moby-dick": moby}, {}, mix={"moby-dick": moby})
    assert untouched["seen"] == {"embedded-docs": False, "moby-dick": False} and "warning" not in untouched


def test_table_cells_mark_each_text_per_run():
    row = {
        "model": "m",
        "method": "wanda",
        "sparsity": "2:4",
        "status": "done",
        "perplexity": 20.0,
        "perplexity.ci95": [19.0, 21.0],
        "data.source": "embedded-docs",
        "data.seen.embedded-docs": True,
        "data.seen.moby-dick": True,
        "data.seen.sotu": False,
        "extra_texts.moby-dick.perplexity.value": 80.0,
        "extra_texts.sotu.perplexity.value": 30.0,
    }
    cells = display_row(row)
    assert cells["perplexity [95% CI]"] == "20.0 [19.0, 21.0] (seen)"
    assert cells["moby-dick [95% CI]"] == "80.0 (seen)" and cells["sotu [95% CI]"] == "30.0 (not seen)"
    dense = {key: value for key, value in row.items() if not key.startswith("data.")} | {"status": "dense"}
    assert display_row(dense)["sotu [95% CI]"] == "30.0"  # the dense model read nothing: no label
    assert seen_of(row, None) is True and seen_of(dense, "sotu") is None


def test_no_shipped_recipe_or_sweep_reads_the_never_seen_text():
    """sotu stays unread: no recipe or sweep names it as data.source or in data.mix (directly, through a sweep's
    `set`, or through `general`)."""
    from pathlib import Path

    import yaml

    from prune.data.config import GENERAL_MIX, NEVER_SEEN

    root = Path(__file__).resolve().parent.parent
    assert NEVER_SEEN not in GENERAL_MIX
    for path in sorted((root / "recipes").rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        data = {**(raw.get("data") or {}), **{k[5:]: v for k, v in (raw.get("set") or {}).items() if k[:5] == "data."}}
        mix = data.get("mix") or []
        assert data.get("source") != NEVER_SEEN and NEVER_SEEN not in (mix if isinstance(mix, list) else []), path
