"""`prune compare` bolds a best point only among runs scored on the same test windows: runs of one model measured on
other windows (another seq_len, text or split) are refused with what differs, never ranked together."""

from __future__ import annotations

import json

import pytest

from prune.core.errors import UserInputError
from prune.sweep.compare import rows_from_runs


def _report(model: str, method: str, seq_len: int, source: str = "docs.txt", test=(900, 1000)) -> dict:
    windows = (test[1] - test[0]) // seq_len
    return {
        "model": model,
        "method": method,
        "sparsity": {"target": "0.5", "achieved": 0.5},
        "perplexity": {
            "value": 20.0 if method == "wanda" else 30.0,
            "tokens": windows * (seq_len - 1),
            "seq_len": seq_len,
            "windows": windows,
            "ci95": [19.0, 31.0],
            "window_nll": [3.0] * windows,
        },
        "data": {"source": source, "seq_len": seq_len, "splits": {"test": list(test)}},
        "timings": {"prune": 1.0},
    }


def _runs(tmp_path, *reports: dict) -> list:
    directories = []
    for index, report in enumerate(reports):
        directory = tmp_path / f"run{index}"
        directory.mkdir(parents=True)
        (directory / "report.json").write_text(json.dumps(report))
        directories.append(directory)
    return directories


def test_runs_of_one_model_on_other_test_windows_are_refused(tmp_path):
    runs = _runs(tmp_path, _report("tiny", "wanda", 32), _report("tiny", "magnitude", 16))
    with pytest.raises(UserInputError, match="other test windows") as refused:
        rows_from_runs(runs)
    message = str(refused.value)
    assert "seq_len 32" in message and "seq_len 16" in message and str(runs[0]) in message and str(runs[1]) in message


@pytest.mark.parametrize("other", [{"source": "moby.txt"}, {"test": (800, 900)}])
def test_another_text_or_split_is_refused_too(tmp_path, other):
    runs = _runs(tmp_path, _report("tiny", "wanda", 32), _report("tiny", "magnitude", 32, **other))
    with pytest.raises(UserInputError, match="other test windows"):
        rows_from_runs(runs)


def test_same_windows_or_other_models_compare(tmp_path):
    rows = rows_from_runs(_runs(tmp_path, _report("tiny", "wanda", 32), _report("tiny", "magnitude", 32)))
    assert [row["method"] for row in rows if row["best"]] == ["wanda"]
    rows = rows_from_runs(_runs(tmp_path / "models", _report("a", "wanda", 32), _report("b", "magnitude", 16)))
    assert sorted(row["model"] for row in rows if row["best"]) == ["a", "b"]  # each model its own best
