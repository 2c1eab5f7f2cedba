"""benchmarks/maskllm_budget.py's logic without a run: budgets as whole steps, the goal's verdict on the not-seen
text, and the section and plot it writes from rows shaped like `prune compare`'s."""

from __future__ import annotations

import json

import pytest

from benchmarks import maskllm_budget as budget


def test_a_budget_is_a_whole_number_of_steps():
    assert budget.steps_for(204_800, 1024) == 200
    with pytest.raises(SystemExit, match="e.g. 49152"):
        budget.steps_for(50_000, 1024)
    with pytest.raises(SystemExit, match="whole number of steps"):
        budget.steps_for(512, 1024)


def row(docs: float, sotu: float, width: float, steps: int | None = None) -> dict:
    figures = {
        "dir": f"runs/{steps}",
        "data.source": "embedded-docs",
        "perplexity": docs,
        "perplexity.ci95": [docs - width, docs + width],
        "extra_texts.moby-dick.perplexity.value": 2 * docs,
        "extra_texts.moby-dick.perplexity.ci95": [2 * docs - width, 2 * docs + width],
        "extra_texts.sotu.perplexity.value": sotu,
        "extra_texts.sotu.perplexity.ci95": [sotu - width, sotu + width],
    }
    if steps is not None:  # a learned run: its training and what it read
        figures |= {"train.steps": steps, "train.tokens_seen": steps * 1024, "train.best_step": steps}
        figures |= {"data.seen.embedded-docs": True, "data.seen.moby-dick": True, "data.seen.sotu": False}
    return figures


DENSE, SPARSEGPT = row(10.0, 20.0, 1.0), row(25.0, 37.0, 2.0, 0)


def test_the_goal_needs_intervals_apart_and_at_most_twice_dense():
    assert budget.goal(row(16.0, 30.0, 2.0, 200), SPARSEGPT, DENSE) == (True, True)
    assert budget.goal(row(16.0, 33.5, 2.0, 200), SPARSEGPT, DENSE) == (False, True)  # overlaps 35 - 39
    assert budget.goal(row(16.0, 30.0, 2.0, 200), SPARSEGPT, row(10.0, 14.0, 1.0)) == (True, False)


def test_section_and_plot(tmp_path):
    points = {50 * 1024: row(20.0, 36.0, 2.0, 50), 200 * 1024: row(16.0, 30.0, 2.0, 200)}
    dirs = {}
    for tokens in points:
        dirs[tokens] = tmp_path / str(tokens)
        dirs[tokens].mkdir()
        (dirs[tokens] / "report.json").write_text(json.dumps({"timings": {"train": 600.0, "eval": 60.0}}))
    body = budget.section(points, dirs, DENSE, SPARSEGPT, budget.shipped_recipe(), "python x.py", "")
    assert "met at 204,800 training tokens" in body  # the smaller budget overlaps SparseGPT's interval
    assert "| 51,200 | 50 | 50 |" in body and "(not seen)" in body and "1.50 |" in body
    assert "The shipped recipe (204,800 tokens): sotu 30.00 [28.00, 32.00]" in body

    worse = {tokens: row(20.0, 36.0, 2.0, tokens // 1024) for tokens in points}
    assert "not met at any budget run here" in budget.section(
        worse, dirs, DENSE, SPARSEGPT, budget.shipped_recipe(), "python x.py", ""
    )
    budget.plot(points, DENSE, SPARSEGPT, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
