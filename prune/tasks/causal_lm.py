"""One model, the test parts of its texts -> every figure the recipe's `eval` section asks for.

Used for the dense baseline and the pruned model alike, so the two are measured the same way. Only test parts
are read here (the in-domain source's and each `eval.extra_texts` entry's); every perplexity carries a 95%
bootstrap interval over its windows (`eval.bootstrap`, fixed seed: a rerun prints the same interval) and the
per-window NLL sums, so that `prune compare` can pair two runs window by window.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict

import torch
from torch import nn

from eval.accuracy import accuracy_scores
from eval.bootstrap import perplexity_ci
from eval.flops import count_flops, count_params
from eval.latency import measure_latency
from eval.perplexity import perplexity
from eval.semi_structured import semi_structured_speedup
from prune.data.text import TokenSplits
from prune.tasks.eval_config import EvalConfig


def measure(model: nn.Module, tokenizer, splits: TokenSplits, config: EvalConfig, seq_len: int, label: str,
            device: torch.device | None = None, *, extra: Mapping[str, TokenSplits]) -> dict:
    """Figures for one model, keyed like report.json; `extra` holds the prepared `config.extra_texts`; `seconds`
    says how long measuring took. Latency is timed on `device` (runtime.device; None: where the model is), which
    under runtime.offload: cpu is not where the model waits."""
    assert list(extra) == list(dict.fromkeys(config.extra_texts)), "extra must hold the prepared eval.extra_texts"
    start = time.perf_counter()
    model.eval()
    figures: dict = {}
    batched = {} if config.batch_size is None else {"batch_size": config.batch_size}
    if config.perplexity:
        figures["perplexity"] = _perplexity(model, splits.test_blocks(seq_len), f"perplexity ({label})", batched)
        if extra:
            figures["extra_texts"] = {
                name: {"perplexity": _perplexity(model, text.test_blocks(seq_len), f"{name} ({label})", batched)}
                for name, text in extra.items()
            }
    if config.tasks:
        scores = accuracy_scores(
            model, tokenizer, config.tasks, heldout_text=splits.test_text(tokenizer), limit=config.limit,
            **batched,
        )
        figures["accuracy"] = {task: score.value for task, score in scores.items()}
        figures["accuracy_stderr"] = {task: score.stderr for task, score in scores.items()}
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


def _perplexity(model: nn.Module, blocks: torch.Tensor, desc: str, batched: dict) -> dict:
    result = perplexity(model, blocks, desc=desc, **batched)
    return {
        "value": result.value, "tokens": result.tokens, "seq_len": blocks.shape[1], "windows": result.windows,
        "ci95": list(perplexity_ci(result.window_nll, result.window_tokens)),
        "window_nll": list(result.window_nll),
    }


def with_dense(report: dict, dense: dict) -> dict:
    """The dense figures under `dense`, and each dense perplexity beside the pruned one (`perplexity.dense`,
    `extra_texts.<name>.perplexity.dense`)."""
    report["dense"] = dict(dense)
    if "perplexity" in dense and "perplexity" in report:
        report["perplexity"]["dense"] = dense["perplexity"]["value"]
    for name, figures in report.get("extra_texts", {}).items():
        if name in dense.get("extra_texts", {}):
            figures["perplexity"]["dense"] = dense["extra_texts"][name]["perplexity"]["value"]
    return report


def data_report(source: str, seq_len: int, splits: TokenSplits, extra: Mapping[str, TokenSplits],
                used: dict[str, dict]) -> dict:
    """report.json's `data`: where each part of each text lies, how many windows it holds, and which part (and
    how many windows) each use read: `used` maps a use (calibration, training, selection) to its part."""
    measured = {"perplexity": {"part": "test", "windows": splits.windows(seq_len)["test"]},
                "accuracy": {"part": "test", "note": "docs_lastword is built from the test text; other tasks "
                             "bring their own data"}}
    return {
        "source": source, "seq_len": seq_len, **splits.describe(seq_len), "used": {**used, **measured},
        "extra_texts": {name: {**text.describe(seq_len),
                               "used": {"perplexity": {"part": "test", "windows": text.windows(seq_len)["test"]}}}
                        for name, text in extra.items()},
    }
