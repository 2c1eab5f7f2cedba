"""Bootstrap confidence intervals for perplexity, and paired comparisons between runs.

Why: a perplexity is one number measured on a finite held-out text. Two pruned models 0.3 apart may be
indistinguishable on that text, and a table that ranks them without saying so invites a wrong conclusion.

The resampling unit is the scored window (one row of the `[n, seq_len]` block tensor that
`eval.perplexity` scores): tokens inside a window depend on each other strongly, windows much less, so
resampling tokens would make the intervals far too narrow. Corpus perplexity is a ratio of sums,
`exp(sum nll / sum tokens)`, so every resample recomputes that ratio rather than averaging per-window
perplexities (which would weight short windows like long ones and overstate perplexity).

Comparisons are paired: both models are scored on the same windows, and resampling the same window
indices for both cancels the variation that comes from which text happened to be held out. The
difference between two runs is far better determined than either perplexity alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Verdict = Literal["worse", "better", "not distinguishable"]

BEST = "best"
NOT_DISTINGUISHABLE_FROM_BEST = "not distinguishable from best"
WORSE = "worse"

# Resamples are drawn in chunks of at most this many indices, so memory stays bounded for large corpora.
_CHUNK_INDICES = 1 << 22


@dataclass(frozen=True)
class PairedComparison:
    """Run A against run B on the same windows: `ratio` = ppl_a / ppl_b, with its bootstrap interval."""

    ratio: float
    low: float
    high: float
    level: float

    def verdict(self) -> Verdict:
        """Worse when the whole interval of ppl_a/ppl_b lies above 1, better when it lies below 1; else the
        held-out text cannot tell the two runs apart at this level ("not distinguishable")."""
        if self.low > 1.0:
            return "worse"
        if self.high < 1.0:
            return "better"
        return "not distinguishable"


def perplexity_ci(
    window_nll_sums: Sequence[float] | torch.Tensor,
    window_token_counts: Sequence[float] | torch.Tensor,
    *,
    seed: int = 0,
    resamples: int = 2000,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the corpus perplexity `exp(sum nll / sum tokens)`.

    `window_nll_sums[i]` is the summed token NLL (nats) of window i and `window_token_counts[i]` its number
    of predicted tokens. Windows are resampled with replacement; the same `seed` gives the same interval.
    """
    nll, tokens = _validated(("window_nll_sums", window_nll_sums), ("window_token_counts", window_token_counts))
    _check_settings(resamples, level)
    nll_total, token_total = _resampled_sums([nll, tokens], seed, resamples)
    return _interval(nll_total / token_total, level)


def paired_bootstrap(
    nll_a: Sequence[float] | torch.Tensor,
    nll_b: Sequence[float] | torch.Tensor,
    tokens: Sequence[float] | torch.Tensor,
    *,
    seed: int = 0,
    resamples: int = 2000,
    level: float = 0.95,
) -> PairedComparison:
    """Compare run A with run B scored on the same windows (per-window NLL sums, shared token counts).

    Each resample draws one set of window indices for both runs and recomputes the log-perplexity
    difference `(sum nll_a - sum nll_b) / sum tokens`; its exponential is ppl_a / ppl_b.
    """
    a, b, t = _validated(("nll_a", nll_a), ("nll_b", nll_b), ("tokens", tokens))
    _check_settings(resamples, level)
    diff, token_total = _resampled_sums([a - b, t], seed, resamples)
    low, high = _interval(diff / token_total, level)
    return PairedComparison(ratio=math.exp(float((a - b).sum() / t.sum())), low=low, high=high, level=level)


def verdicts_against_best(
    window_nll_sums: Mapping[str, Sequence[float] | torch.Tensor],
    tokens: Sequence[float] | torch.Tensor,
    *,
    seed: int = 0,
    resamples: int = 2000,
    level: float = 0.95,
) -> dict[str, str]:
    """The word each candidate gets in a table beside the best of its group (e.g. one sparsity level).

    The best is the lowest point perplexity; every other candidate is "worse" when its paired interval of
    ppl / ppl_best lies wholly above 1, else "not distinguishable from best". All candidates must have
    been scored on the same windows.
    """
    if not window_nll_sums:
        raise ValueError("verdicts_against_best needs at least one candidate, got none")
    totals = {
        name: float(_validated((name, nll), ("tokens", tokens))[0].sum()) for name, nll in window_nll_sums.items()
    }
    best = min(totals, key=totals.__getitem__)
    words = {}
    for name, nll in window_nll_sums.items():
        if name == best:
            words[name] = BEST
            continue
        comparison = paired_bootstrap(nll, window_nll_sums[best], tokens, seed=seed, resamples=resamples, level=level)
        words[name] = WORSE if comparison.verdict() == "worse" else NOT_DISTINGUISHABLE_FROM_BEST
    return words


def _validated(*named: tuple[str, Sequence[float] | torch.Tensor]) -> list[torch.Tensor]:
    """1-D float64 tensors of one common, non-zero length, all finite; the last one (token counts) > 0."""
    tensors = []
    for name, values in named:
        tensor = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
        if tensor.ndim != 1:
            raise ValueError(f"{name} must be one value per window (1-D), got shape {tuple(tensor.shape)}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} holds NaN or inf; a non-finite window has no perplexity to bootstrap")
        tensors.append(tensor)
    lengths = {name: len(tensor) for (name, _), tensor in zip(named, tensors)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"one value per window is needed in each input, but the lengths differ: {lengths}")
    if not tensors[0].numel():
        raise ValueError("no windows: the bootstrap needs at least one scored window")
    if (tensors[-1] <= 0).any():
        raise ValueError(f"{named[-1][0]} must be positive for every window (predicted tokens per window)")
    return tensors


def _check_settings(resamples: int, level: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be strictly between 0 and 1 (e.g. 0.95), got {level}")


def _resampled_sums(values: list[torch.Tensor], seed: int, resamples: int) -> list[torch.Tensor]:
    """For each resample, the sums of every tensor in `values` over one shared draw of window indices."""
    n = len(values[0])
    generator = torch.Generator().manual_seed(seed)
    rows = max(1, _CHUNK_INDICES // n)
    sums: list[list[torch.Tensor]] = [[] for _ in values]
    for start in range(0, resamples, rows):
        index = torch.randint(n, (min(rows, resamples - start), n), generator=generator)
        for acc, tensor in zip(sums, values):
            acc.append(tensor[index].sum(dim=1))
    return [torch.cat(acc) for acc in sums]


def _interval(log_values: torch.Tensor, level: float) -> tuple[float, float]:
    """Percentile interval of `exp(log_values)`: exp is monotone, so quantiles commute with it."""
    tail = (1.0 - level) / 2.0
    low, high = torch.quantile(log_values, torch.tensor([tail, 1.0 - tail], dtype=log_values.dtype))
    return math.exp(float(low)), math.exp(float(high))
