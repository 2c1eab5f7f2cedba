"""Parameter and FLOP counts, dense and as a sparse kernel would run them.

Conventions (honest, and stated once here):
- One multiply-accumulate is 2 FLOPs (the convention of `torch.utils.flop_counter`).
- `dense` is what `FlopCounterMode` reports for one forward of a `[batch, seq_len]` input: matmuls,
  convolutions and attention. Elementwise ops (norms, activations, softmax, bias adds) are not
  counted by it, nor here. On CPU the fused SDPA kernel
  (`aten._scaled_dot_product_flash_attention_for_cpu`) is missing from torch's table, so we register
  torch's own SDPA formula for it; CPU and GPU counts then agree. Causal masking is not discounted.
- `sparse` is the unstructured-sparse ideal: for every `nn.Linear` / GPT-2 `Conv1D` whose weight has
  zeros, its counted FLOPs times the weight's nonzero fraction. No real kernel reaches this at
  moderate sparsity; it is an upper bound on savings.
- `semi_structured` is what an N:M sparse kernel runs: for every such weight that is exactly N:M
  along its input dimension (each group of M consecutive inputs holds <= N nonzeros), its FLOPs
  times N/M; other modules count dense. `None` when no weight is N:M.
- Weights are read as they are: masks must be merged into the weights (the export step) for
  zeros to be seen; a wrapper that multiplies by a mask inside its forward is counted dense.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from eval.perplexity import without_cache

try:  # GPT-2 style layers store the weight as [in, out]
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a hard dependency, but keep flops usable
    Conv1D = ()  # type: ignore[assignment]

NM_GROUP_SIZES: tuple[int, ...] = (4, 8)


@dataclass(frozen=True)
class ParamCount:
    total: int
    nonzero: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.total if self.total else 0.0


@dataclass(frozen=True)
class FlopCount:
    dense: int
    sparse: int
    semi_structured: int | None = None
    # Dense FLOPs per linear layer (module name as in `named_modules()`).
    by_module: dict[str, int] = field(default_factory=dict)
    # The N:M pattern found per linear layer, e.g. {"model.layers.0.mlp.up_proj": (2, 4)}.
    nm_patterns: dict[str, tuple[int, int]] = field(default_factory=dict)


def count_params(model: nn.Module) -> ParamCount:
    """Unique parameters (tied weights counted once) and how many of them are nonzero."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    total = nonzero = 0
    for p in model.parameters():  # already de-duplicates shared Parameter objects
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))
        if key in seen:  # distinct Parameter objects viewing the same memory
            continue
        seen.add(key)
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return ParamCount(total=total, nonzero=nonzero)


def _linear_weight_out_in(module: nn.Module) -> torch.Tensor | None:
    """The weight as [out, in] for nn.Linear and transformers' Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.detach().t()
    return None


def nm_pattern(weight_out_in: torch.Tensor, group_sizes: tuple[int, ...] = NM_GROUP_SIZES) -> tuple[int, int] | None:
    """The sparsest N:M pattern (N < M) the weight satisfies along its input dim, or None.

    N is the largest nonzero count in any group of M consecutive inputs. Ties in N/M prefer the
    smaller M (2:4 over 4:8). A weight whose input dim is not a multiple of M cannot be N:M for that M.
    """
    w = weight_out_in
    if w.ndim != 2:
        return None
    best: tuple[int, int] | None = None
    for m in group_sizes:
        if w.shape[1] % m:
            continue
        # counted in uint8 (M <= 255): summing the bool tensor as it is would widen all of it to int64 first, 8
        # bytes per weight (a 226 MB peak for SmolLM2's head, whose dequantized weights hold zeros)
        n = int((w != 0).reshape(w.shape[0], -1, m).sum(dim=-1, dtype=torch.uint8).max())
        if n < m and (best is None or n / m < best[0] / best[1]):
            best = (n, m)
    return best


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping() -> dict:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None or op in FlopCounterMode(display=False).flop_registry:  # a later torch knows it
        return {}
    return {op: _sdpa_cpu_flop}


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        size = getattr(cfg, "vocab_size", None)
        if isinstance(size, int) and size > 0:
            return size
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None:
        return emb.num_embeddings
    raise ValueError("cannot tell the vocabulary size: pass a model with config.vocab_size or input embeddings")


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def count_flops(model: nn.Module, seq_len: int, batch_size: int = 1, *, seed: int = 0) -> FlopCount:
    """FLOPs of one forward of `model` on a `[batch_size, seq_len]` batch of random token ids."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, _vocab_size(model), (batch_size, seq_len), generator=gen).to(_device(model))

    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
        with counter:
            model(input_ids=input_ids, **without_cache(model))
    finally:
        model.train(was_training)

    dense = int(counter.get_total_flops())
    # Keys are module FQNs prefixed by the root's class name: "LlamaForCausalLM.model.layers.0...".
    counts = counter.get_flop_counts()
    root = type(model).__name__

    by_module: dict[str, int] = {}
    nm_patterns: dict[str, tuple[int, int]] = {}
    saved_unstructured = 0.0
    saved_nm = 0.0
    for name, module in model.named_modules():
        weight = _linear_weight_out_in(module)
        if weight is None:
            continue
        flops = int(sum(counts.get(f"{root}.{name}" if name else root, {}).values()))
        by_module[name] = flops
        if flops == 0 or weight.numel() == 0:
            continue
        nonzero = int(torch.count_nonzero(weight))
        if nonzero == weight.numel():
            continue
        saved_unstructured += flops * (1.0 - nonzero / weight.numel())
        pattern = nm_pattern(weight)
        if pattern is not None:
            nm_patterns[name] = pattern
            saved_nm += flops * (1.0 - pattern[0] / pattern[1])

    return FlopCount(
        dense=dense,
        sparse=int(round(dense - saved_unstructured)),
        semi_structured=int(round(dense - saved_nm)) if nm_patterns else None,
        by_module=by_module,
        nm_patterns=nm_patterns,
    )
