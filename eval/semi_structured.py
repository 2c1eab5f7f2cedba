"""PyTorch's semi-structured (2:4) sparse kernels: convert a 2:4-pruned model's linears and measure the speed-up.

A merged 2:4 model is still a dense tensor; only a kernel that skips the zeros makes it faster. PyTorch's
`to_sparse_semi_structured` (cuSPARSELt / CUTLASS) stores the 2 kept values of every group of 4 plus their
indices and runs them on NVIDIA GPUs of compute capability 8.0 or newer, in float16/bfloat16. Anywhere
else this module says so (`available: false` with the reason) instead of reporting a number it did not
measure. Only nn.Linear weights are converted (GPT-2's Conv1D stores the transpose and is left dense).
The speed-up is measured side by side on a copy of the model: the same prefill forward, dense
weights vs converted weights, median of a few timed repeats after a warm-up.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn


def is_two_four(weight: torch.Tensor) -> bool:
    """Every group of 4 consecutive weights along the input dimension holds at most 2 nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def two_four_linears(model: nn.Module) -> list[str]:
    """Names of the nn.Linear modules whose weight a 2:4 kernel can run."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and is_two_four(module.weight.detach())
    ]


def unavailable_reason(device: torch.device) -> str | None:
    """Why PyTorch's 2:4 kernels cannot run on `device`, or None when they can."""
    if device.type != "cuda":
        return (
            f"PyTorch's semi-structured (2:4) sparse kernels run on NVIDIA GPUs only (compute capability 8.0+); "
            f"this model is on {device.type}, where a 2:4 model runs as dense (see flops.semi_structured for "
            "what the kernel would compute)"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"PyTorch's 2:4 kernels need compute capability 8.0+; this GPU has {major}.{minor}"
    return None


def convert_linears(model: nn.Module, names: list[str]) -> None:
    """Replace the weights of the named linears by semi-structured sparse tensors (CUDA, float16/bfloat16): the
    conversion both this module's measurement and `prune.to_semi_structured` run."""
    from torch.sparse import to_sparse_semi_structured

    modules = dict(model.named_modules())
    for name in names:
        linear = modules[name]
        linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)


@torch.no_grad()
def _prefill_ms(model: nn.Module, tokens: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    logits = model(input_ids=tokens).logits  # warm-up (kernel selection, caches)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        logits = model(input_ids=tokens).logits
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), logits


def semi_structured_speedup(model: nn.Module, *, batch: int = 8, seq_len: int = 512, repeats: int = 5) -> dict | None:
    """Prefill time of the model's 2:4 linears run dense vs by PyTorch's 2:4 kernels, side by side, or why that
    cannot run here; None when no linear is 2:4 sparse."""
    names = two_four_linears(model)
    if not names:
        return None
    device = next(model.parameters()).device
    reason = unavailable_reason(device)
    if reason is not None:
        return {"available": False, "reason": reason, "layers": len(names)}
    half = copy.deepcopy(model).to(dtype=torch.float16).eval()
    vocab = half.get_input_embeddings().num_embeddings
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    dense_ms, dense_logits = _prefill_ms(half, tokens, repeats)
    convert_linears(half, names)
    sparse_ms, sparse_logits = _prefill_ms(half, tokens, repeats)
    return {
        "available": True,
        "layers": len(names),
        "dtype": "float16",
        "batch": batch,
        "seq_len": seq_len,
        "dense_ms": dense_ms,
        "sparse_ms": sparse_ms,
        "speedup": dense_ms / sparse_ms,
        "max_abs_logit_diff": float((dense_logits.float() - sparse_logits.float()).abs().max()),
    }
