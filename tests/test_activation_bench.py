"""benchmarks/activation.py's verdicts and rendering without a run: a run whose own dense timings disagree (the
shared CPU's load changed under them) judges no speed goal; the cats every-neuron control shows when measured."""

from __future__ import annotations

import json

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


def test_the_cats_every_neuron_control_is_rendered_when_measured():
    """A run that timed the FFN read whole through the kernel says so beside its cats rows; an older run's json,
    without that control, renders as before."""
    result = json.loads(bench.JSON.read_text())
    result.pop("every_neuron", None)
    assert "Every FFN neuron read through the kernel" not in bench.render(result)
    result["every_neuron"] = {"decode_speedup": 1.07, "prefill_speedup": 0.9}
    assert "Every FFN neuron read through the kernel (cats, cut 0: gate, up and down read whole): decode 1.07x" in (
        bench.render(result)
    )
