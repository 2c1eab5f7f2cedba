"""Dense and sparse decode timed side by side in one process, so a shared or throttled CPU slows both alike.

The same model runs both ways: with its thresholds bypassed (the dense model) and with them (the sparse model).
Rounds alternate dense and sparse (eval.latency.alternated: one timed run each, after one untimed round); the
medians over rounds are reported, with the ratio of the medians.
"""

from __future__ import annotations

from contextlib import nullcontext

from torch import nn

from eval.latency import alternated, measure_latency
from prune.methods.activation.layers import bypassed

ROUNDS = 5


def side_by_side(model: nn.Module, rounds: int = ROUNDS, prompt_len: int = 128, decode_tokens: int = 32) -> dict:
    """Decode and prefill tokens/s of the dense and the sparse model, alternated `rounds` times, and the
    speedups (sparse over dense; below 1 the sparse model is slower)."""

    def timer(dense: bool):
        def run_once():
            with bypassed(model) if dense else nullcontext():
                return measure_latency(model, prompt_len=prompt_len, decode_tokens=decode_tokens, repeats=1, warmup=0)

        return run_once

    medians = alternated({"dense": timer(True), "sparse": timer(False)}, rounds)
    figures = {
        label: {
            "decode_tokens_per_s": 1000.0 / values["decode_ms_per_token"],
            "prefill_tokens_per_s": values["prefill_tokens_per_s"],
        }
        for label, values in medians.items()
    }
    return {
        **figures,
        "decode_speedup": figures["sparse"]["decode_tokens_per_s"] / figures["dense"]["decode_tokens_per_s"],
        "prefill_speedup": figures["sparse"]["prefill_tokens_per_s"] / figures["dense"]["prefill_tokens_per_s"],
        "rounds": rounds,
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
    }
