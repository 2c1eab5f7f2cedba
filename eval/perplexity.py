"""Perplexity over non-overlapping token windows.

The caller cuts the held-out split into rows of a `[n, seq_len]` LongTensor; each row is one
window. Every token after the first of each row is predicted, so exactly `n * (seq_len - 1)` tokens
are scored. Token NLLs are summed with `cross_entropy(reduction="sum")` on the shifted logits (a
model's own `labels=` averaging is not trusted: some models shift, some average over padding).
The per-window sums and token counts come back too: the window is the unit a bootstrap interval or a paired
comparison of two models resamples (`eval.bootstrap`).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from eval.metric_errors import NonFiniteError

NLL_CHUNK = 128  # positions per cross-entropy call in window_nll


@dataclass(frozen=True)
class PerplexityResult:
    value: float  # exp(nll)
    tokens: int  # predicted tokens: n * (seq_len - 1)
    windows: int  # rows scored
    nll: float  # mean negative log-likelihood per predicted token (nats)
    window_nll: tuple[float, ...]  # summed NLL (nats) of each window, in row order
    window_tokens: tuple[int, ...]  # predicted tokens of each window (seq_len - 1)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def without_cache(model: torch.nn.Module) -> dict:
    """`use_cache=False` where the model's forward takes it: a whole-window forward that is never continued would
    otherwise build a key and a value tensor per layer for every position, only to drop them."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int = 1,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of `model` on `blocks` (LongTensor `[n, seq_len]`, one window per row).

    Raises `NonFiniteError` when any window's loss is NaN/inf (the message says how many), and
    `ValueError` for malformed input.
    """
    if blocks.ndim != 2:
        raise ValueError(f"blocks must be a 2-D LongTensor [n, seq_len], got shape {tuple(blocks.shape)}")
    if blocks.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
        raise ValueError(f"blocks must hold integer token ids, got dtype {blocks.dtype}")
    n, seq_len = blocks.shape
    if n == 0 or seq_len < 2:
        raise ValueError(f"need at least one window of >= 2 tokens, got shape {tuple(blocks.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    was_training = model.training
    model.eval()
    device = model_device(model)
    no_cache = without_cache(model)
    sums: list[float] = []
    try:
        for start in tqdm(range(0, n, batch_size), desc=desc, leave=False):
            batch = blocks[start : start + batch_size].to(device=device, dtype=torch.long)
            sums += window_nll(_logits(model(input_ids=batch, **no_cache)), batch).tolist()
    finally:
        model.train(was_training)
    return perplexity_of(sums, seq_len, desc)


def window_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """The summed NLL (float64, nats) of each window of `batch` [b, seq] from its logits [b, seq, vocab], every
    token after the first predicted: one function for every way a model is run (whole, or streamed block by
    block), so the same logits give the same figures bit for bit. The cross-entropy runs on NLL_CHUNK positions at
    a time: its log-softmax over the whole window would be a second tensor as large as the logits (100 MB for one
    512-token window of a 49k vocabulary), the evaluation's peak memory; each position's value is the same."""
    shift_logits, targets = logits[:, :-1], batch[:, 1:]  # views: nothing copied
    per_token = torch.cat(
        [
            F.cross_entropy(
                shift_logits[:, start : start + NLL_CHUNK].float().reshape(-1, logits.size(-1)),
                targets[:, start : start + NLL_CHUNK].reshape(-1),
                reduction="none",
            ).view(len(batch), -1)
            for start in range(0, targets.shape[1], NLL_CHUNK)
        ],
        dim=1,
    )
    return per_token.sum(dim=1, dtype=torch.float64)


def perplexity_of(sums: list[float], seq_len: int, desc: str) -> PerplexityResult:
    """The corpus perplexity of windows of `seq_len` tokens whose summed NLLs are `sums`. Raises
    `NonFiniteError` when any window's loss is NaN/inf (the message says how many)."""
    n = len(sums)
    bad_windows = sum(not math.isfinite(value) for value in sums)
    if bad_windows:
        raise NonFiniteError(
            f"{desc}: the loss was NaN/inf in {bad_windows} of {n} windows "
            "(diverged or broken weights?); refusing to report a perplexity"
        )
    tokens = n * (seq_len - 1)
    nll = math.fsum(sums) / tokens
    try:
        value = math.exp(nll)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise NonFiniteError(f"{desc}: mean NLL {nll:.1f} nats overflows exp(); perplexity is infinite")
    return PerplexityResult(
        value=value, tokens=tokens, windows=n, nll=nll, window_nll=tuple(sums), window_tokens=(seq_len - 1,) * n
    )
