"""Dense and sparse decode timed side by side in one process, so a shared or throttled CPU slows both alike.

The same model runs both ways: with its thresholds bypassed (the dense model) and with them (the sparse model).
Rounds alternate dense and sparse (eval.latency.measure_latency, one timed run each, after one untimed run of
each); the medians over rounds are reported, with the ratio of the medians.
"""

from __future__ import annotations

import statistics
from contextlib import nullcontext

from torch import nn

from eval.latency import measure_latency
from prune.methods.activation.layers import bypassed

ROUNDS = 5


def side_by_side(model: nn.Module, rounds: int = ROUNDS, prompt_len: int = 128, decode_tokens: int = 32) -> dict:
    """Decode and prefill tokens/s of the dense and the sparse model, alternated `rounds` times, and the
    speedups (sparse over dense; below 1 the sparse model is slower)."""
    runs: dict[str, list] = {"dense": [], "sparse": []}
    for round_index in range(rounds + 1):
        for label in runs:
            with bypassed(model) if label == "dense" else nullcontext():
                result = measure_latency(model, prompt_len=prompt_len, decode_tokens=decode_tokens, repeats=1, warmup=0)
            if round_index:  # the first round warms both up
                runs[label].append(result)
    figures = {
        label: {
            "decode_tokens_per_s": statistics.median(1000.0 / r.decode_ms_per_token for r in results),
            "prefill_tokens_per_s": statistics.median(r.prefill_tokens_per_s for r in results),
        }
        for label, results in runs.items()
    }
    return {
        **figures,
        "decode_speedup": figures["sparse"]["decode_tokens_per_s"] / figures["dense"]["decode_tokens_per_s"],
        "prefill_speedup": figures["sparse"]["prefill_tokens_per_s"] / figures["dense"]["prefill_tokens_per_s"],
        "rounds": rounds,
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
    }
