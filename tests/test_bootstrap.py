"""Bootstrap intervals: calibrated coverage on data with a known answer, reproducibility, verdicts, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from eval.bootstrap import (
    BEST,
    NOT_DISTINGUISHABLE_FROM_BEST,
    WORSE,
    paired_bootstrap,
    perplexity_ci,
    verdicts_against_best,
)


def _windows(generator: torch.Generator, n: int, mean_nll: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` windows: token counts uniform in [50, 150]; each window's per-token NLL lognormal (sigma 0.5, so
    skewed) with mean exactly `mean_nll`, drawn independently of the count, so the ratio of sums
    estimates exp(mean_nll)."""
    tokens = torch.randint(50, 151, (n,), generator=generator).double()
    sigma = 0.5
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    per_token = mean_nll * torch.exp(sigma * z - sigma**2 / 2)
    return per_token * tokens, tokens


def test_interval_covers_the_true_perplexity_about_95_percent_of_the_time(one_thread):
    # 200 windows: with a few dozen the percentile interval of a skewed ratio runs a little narrow (~0.93).
    mean_nll, datasets = 3.0, 300
    truth = math.exp(mean_nll)
    generator = torch.Generator().manual_seed(1234)
    covered = 0
    for i in range(datasets):
        nll, tokens = _windows(generator, 200, mean_nll)
        low, high = perplexity_ci(nll, tokens, seed=i, resamples=500)
        covered += low <= truth <= high
    assert 0.90 <= covered / datasets <= 0.98, f"empirical coverage {covered / datasets:.3f}"


def test_interval_brackets_the_point_estimate_and_narrows_with_more_windows():
    generator = torch.Generator().manual_seed(0)
    nll, tokens = _windows(generator, 400)
    point = math.exp(float(nll.sum() / tokens.sum()))
    low, high = perplexity_ci(nll, tokens, resamples=500)
    assert low < point < high
    low_small, high_small = perplexity_ci(nll[:40], tokens[:40], resamples=500)
    assert high_small - low_small > high - low


def test_same_seed_same_interval_and_another_seed_differs():
    generator = torch.Generator().manual_seed(7)
    nll, tokens = _windows(generator, 50)
    first = perplexity_ci(nll, tokens, seed=3, resamples=300)
    assert perplexity_ci(nll.tolist(), tokens.tolist(), seed=3, resamples=300) == first
    assert perplexity_ci(nll, tokens, seed=4, resamples=300) != first
    b = nll + 0.1 * tokens
    assert paired_bootstrap(nll, b, tokens, seed=3, resamples=300) == paired_bootstrap(
        nll, b, tokens, seed=3, resamples=300
    )


def test_paired_comparison_verdicts():
    generator = torch.Generator().manual_seed(11)
    a, tokens = _windows(generator, 80)
    same = paired_bootstrap(a, a.clone(), tokens, resamples=500)
    assert same.ratio == 1.0 and same.verdict() == "not distinguishable"

    noise = torch.randn(80, generator=generator, dtype=torch.float64) * 0.2 * tokens
    b = a + 0.3 * tokens + noise  # 0.3 nats per token worse, window to window noise on top
    worse = paired_bootstrap(b, a, tokens, resamples=500)
    assert worse.verdict() == "worse"
    assert worse.low <= worse.ratio <= worse.high and worse.low > 1.0
    assert paired_bootstrap(a, b, tokens, resamples=500).verdict() == "better"


def test_table_verdicts_against_the_best_of_a_level():
    generator = torch.Generator().manual_seed(5)
    base, tokens = _windows(generator, 80)
    jitter = torch.randn(80, generator=generator, dtype=torch.float64) * 0.05 * tokens
    candidates = {
        "wanda": base,
        "sparsegpt": base + (jitter - jitter.mean()),  # same total as wanda: a tie in expectation and in fact
        "magnitude": base + 0.3 * tokens,
    }
    words = verdicts_against_best(candidates, tokens, resamples=500)
    assert words["magnitude"] == WORSE
    assert sorted([words["wanda"], words["sparsegpt"]]) == sorted([BEST, NOT_DISTINGUISHABLE_FROM_BEST])
    assert verdicts_against_best({"only": base}, tokens, resamples=10) == {"only": BEST}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: perplexity_ci([1.0, 2.0], [10.0]), "lengths differ"),
        (lambda: perplexity_ci([], []), "no windows"),
        (lambda: paired_bootstrap([1.0], [1.0, 2.0], [5.0]), "lengths differ"),
        (lambda: paired_bootstrap([], [], []), "no windows"),
        (lambda: perplexity_ci([1.0, float("nan")], [5.0, 5.0]), "NaN or inf"),
        (lambda: perplexity_ci([1.0, 2.0], [5.0, 0.0]), "positive"),
        (lambda: perplexity_ci([[1.0]], [[5.0]]), "1-D"),
        (lambda: perplexity_ci([1.0], [5.0], level=1.0), "level"),
        (lambda: perplexity_ci([1.0], [5.0], resamples=0), "resamples"),
        (lambda: verdicts_against_best({}, [5.0]), "at least one candidate"),
        (lambda: verdicts_against_best({"only": [float("inf")]}, [5.0]), "NaN or inf"),
    ],
)
def test_bad_input_is_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
