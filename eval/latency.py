"""Wall-clock latency: prefill throughput and per-token decode time with the KV cache.

A manual loop rather than `generate()`: prefill and decode are timed apart, and no sampling,
stopping or logits processing is mixed into the numbers. One prefill forward over `prompt_len`
random tokens (batch 1) builds the cache; then `decode_tokens` single-token forwards each extend
it, feeding back the greedy token. Each of `repeats` runs is timed with `time.perf_counter`
(after `warmup` untimed runs, with a device synchronize around CUDA timings); the median is kept.

`alternated` times several models (or one model in several states) in turn, round after round, in one process:
a neighbour's load on a shared CPU then slows each of them alike, and their medians compare.

transformers 5.x renamed the cache argument and output field `past_key_values` -> `cache`; the
forward signature is inspected so both spellings work.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LatencyResult:
    prefill_tokens_per_s: float
    decode_ms_per_token: float
    prompt_len: int
    decode_tokens: int
    repeats: int
    device: str


def _cache_names(model: nn.Module) -> tuple[str, str]:
    """(forward keyword, output attribute) for the KV cache of this model."""
    params = inspect.signature(model.forward).parameters
    if "cache" in params:
        return "cache", "cache"
    return "past_key_values", "past_key_values"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _vocab_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    return model.get_input_embeddings().num_embeddings


def _cache_of(output, attr: str):
    cache = getattr(output, attr, None)
    if cache is None and attr == "cache":  # a model that still answers with the old field name
        cache = getattr(output, "past_key_values", None)
    return cache


@torch.no_grad()
def _run_once(model, prompt: torch.Tensor, decode_tokens: int, arg: str, attr: str) -> tuple[float, float]:
    device = prompt.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    _sync(device)
    prefill = time.perf_counter() - t0

    cache = _cache_of(out, attr)
    if cache is None:
        raise RuntimeError(f"{type(model).__name__} returned no KV cache (neither .cache nor .past_key_values)")
    token = out.logits[:, -1:].argmax(dim=-1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=token, use_cache=True, **{arg: cache})
        new_cache = _cache_of(out, attr)
        cache = cache if new_cache is None else new_cache
        token = out.logits[:, -1:].argmax(dim=-1)
    _sync(device)
    decode = time.perf_counter() - t0
    return prefill, decode


def measure_latency(
    model: nn.Module,
    *,
    prompt_len: int = 128,
    decode_tokens: int = 32,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    device: torch.device | None = None,
) -> LatencyResult:
    """Median prefill tokens/s and decode ms/token over `repeats` runs at batch size 1, on `device` (default: the
    model's); a model waiting elsewhere (e.g. in CPU memory while its blocks visit a GPU) is moved there for the
    measurement and back after, since latency means the whole model running on that device."""
    if prompt_len < 1 or decode_tokens < 1 or repeats < 1 or warmup < 0:
        raise ValueError("prompt_len, decode_tokens and repeats must be >= 1 and warmup >= 0")
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, _vocab_size(model), (1, prompt_len), generator=gen).to(device)
    arg, attr = _cache_names(model)

    was_training = model.training
    model.eval()
    model.to(device)
    try:
        for _ in range(warmup):
            _run_once(model, prompt, decode_tokens, arg, attr)
        runs = [_run_once(model, prompt, decode_tokens, arg, attr) for _ in range(repeats)]
    finally:
        model.to(home)
        model.train(was_training)

    prefill_s = statistics.median(r[0] for r in runs)
    decode_s = statistics.median(r[1] for r in runs)
    tiny = 1e-9  # perf_counter resolution guard: never divide by zero
    result = LatencyResult(
        prefill_tokens_per_s=prompt_len / max(prefill_s, tiny),
        decode_ms_per_token=1000.0 * decode_s / decode_tokens,
        prompt_len=prompt_len,
        decode_tokens=decode_tokens,
        repeats=repeats,
        device=str(device),
    )
    if not (math.isfinite(result.prefill_tokens_per_s) and math.isfinite(result.decode_ms_per_token)):
        raise RuntimeError(f"latency measurement gave non-finite numbers: {result}")
    return result


def alternated(timers: dict[str, Callable[[], LatencyResult]], rounds: int) -> dict[str, dict[str, float]]:
    """Run every timer once per round, in turn, for `rounds` rounds after one untimed round that warms them all
    up; per label the medians over rounds: decode_ms_per_token and prefill_tokens_per_s. A timer is one
    `measure_latency` run (repeats=1, warmup=0) of its model in the state it is timed in."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    results: dict[str, list[LatencyResult]] = {label: [] for label in timers}
    for round_index in range(rounds + 1):
        for label, timer in timers.items():
            result = timer()
            if round_index:
                results[label].append(result)
    return {
        label: {
            "decode_ms_per_token": statistics.median(r.decode_ms_per_token for r in runs),
            "prefill_tokens_per_s": statistics.median(r.prefill_tokens_per_s for r in runs),
        }
        for label, runs in results.items()
    }
