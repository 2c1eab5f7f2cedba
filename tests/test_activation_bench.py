"""benchmarks/activation.py's speed verdicts without a run: a run whose own dense timings disagree (the shared
CPU's load changed under them) judges no speed goal."""

from __future__ import annotations

from benchmarks import activation as bench


def timed(dense_rate: float, speedup: float) -> dict:
    return {"speed": {"dense": {"decode_tokens_per_s": dense_rate}, "decode_speedup": speedup}}


def test_the_dense_range_covers_levels_and_recoveries():
    result = {"levels": [timed(12.0, 1.3), {**timed(15.0, 1.5), "recovered": timed(9.0, 1.4)}]}
    assert bench.dense_decode_range(result) == (9.0, 15.0)


def test_speed_goals_are_judged_only_on_steady_timings():
    assert bench.speed_verdict(1.31, 1.3, spread=1.1) == "met"
    assert bench.speed_verdict(1.28, 1.3, spread=1.1) == "not met"
    assert bench.speed_verdict(1.58, 1.3, spread=bench.TIMING_SPREAD + 0.01) == "not judged"
    assert bench.speed_verdict(1.31, 1.3, spread=bench.TIMING_SPREAD) == "met"
