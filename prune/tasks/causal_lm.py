"""One model, one set of held-out data -> every figure the recipe's `eval` section asks for.

Used for the dense baseline and the pruned model alike, so the two are measured the same way.
"""
from __future__ import annotations

import time
from dataclasses import asdict

import torch
from torch import nn

from eval.accuracy import task_accuracy
from eval.flops import count_flops, count_params
from eval.latency import measure_latency
from eval.perplexity import perplexity
from eval.semi_structured import semi_structured_speedup
from prune.data.text import TokenSplits
from prune.tasks.eval_config import EvalConfig


def measure(model: nn.Module, tokenizer, splits: TokenSplits, config: EvalConfig, seq_len: int, label: str,
            device: torch.device | None = None) -> dict:
    """Figures for one model, keyed like report.json; `seconds` says how long measuring took. Latency is timed on
    `device` (runtime.device; None: where the model is), which under runtime.offload: cpu is not where the model
    waits."""
    start = time.perf_counter()
    model.eval()
    figures: dict = {}
    batched = {} if config.batch_size is None else {"batch_size": config.batch_size}
    if config.perplexity:
        result = perplexity(model, splits.heldout_blocks(seq_len), desc=f"perplexity ({label})", **batched)
        figures["perplexity"] = {"value": result.value, "tokens": result.tokens, "seq_len": seq_len}
    if config.tasks:
        figures["accuracy"] = task_accuracy(
            model, tokenizer, config.tasks, heldout_text=splits.heldout_text(tokenizer), limit=config.limit,
            **batched,
        )
    params = count_params(model)
    figures["params"] = {"total": params.total, "nonzero": params.nonzero}
    if config.flops:
        flops = count_flops(model, seq_len)
        figures["flops"] = {"dense": flops.dense, "pruned": flops.sparse, "semi_structured": flops.semi_structured}
    if config.latency:
        figures["latency"] = asdict(measure_latency(model, device=device))
    if config.semi_structured_kernel:
        kernel = semi_structured_speedup(model, seq_len=seq_len)
        if kernel is not None:
            figures["semi_structured_kernel"] = kernel
    figures["seconds"] = time.perf_counter() - start
    return figures
