"""benchmarks/recover.py's choice and curves without a run: the variant kept is the one lowest on validation,
and the curves plot each variant's validation scores against the tokens it had read."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from benchmarks import recover as bench


def fake_run(directory: Path, scores: list[tuple[int, float]]) -> SimpleNamespace:
    """A run directory whose recovery log holds these validation scores between training records."""
    (directory / "recover").mkdir(parents=True)
    records = []
    for step, value in scores:
        records += [{"step": step, "loss": 1.0, "tokens_per_s": 50.0}, {"step": step, "eval_perplexity": value}]
    (directory / "recover" / "train_log.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    return SimpleNamespace(output=str(directory))


def test_the_curve_reads_only_validation_records(tmp_path):
    recipe = fake_run(tmp_path / "a", [(0, 86.0), (25, 60.0), (50, 57.0)])
    assert bench.validation_curve(Path(recipe.output)) == [(0, 86.0), (25, 60.0), (50, 57.0)]


def test_the_kept_variant_is_the_lowest_on_validation_and_the_plot_is_written(tmp_path):
    slow = fake_run(tmp_path / "slow", [(0, 86.0), (25, 60.0)])
    fast = fake_run(tmp_path / "fast", [(0, 86.0), (25, 50.0)])
    runs = {
        "slow": (slow, {"recover": {"best_eval_perplexity": 60.0, "steps": 25, "tokens_seen": 51_200}}),
        "fast": (fast, {"recover": {"best_eval_perplexity": 50.0, "steps": 25, "tokens_seen": 51_200}}),
    }
    assert bench.chosen_variant(runs) == "fast"
    path = tmp_path / "curves.png"
    bench.plot_curves({"sparsegpt": runs}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
