"""The sparse execution path of a gated transformer FFN: compute only the intermediate neurons a mask selects.

An FFN is `down(act(gate(x)) * up(x))` (Llama) or `c_proj(act(c_fc(x)))` (GPT-2). Neuron i owns row i of
gate and up and column i of down, so skipping it skips 3 (Llama) or 2 (GPT-2) dot products of length
`hidden`. `pack_*` copies those weights once into neuron-major rows (gate row | up row side by side; down
transposed), so that selecting neurons is one contiguous row gather (`index_select`) for gate+up, and for one
token down is a fused gather-and-weighted-sum of its rows (`embedding_bag`, no copy). This costs one extra
copy of the FFN weights, made lazily on the first sparse forward.

Tokens with different masks: the path computes the *union* of the selected neurons of the tokens in the
call and then zeroes, per token, the neurons that token did not select, so the result equals the masked
dense FFN exactly (up to float summation order). For decode (one token) the union is the token's own
mask: a real saving. For a prefill of many tokens the union is usually most of the layer; above
`max_union` the gather would only add copying, so the masked dense path runs instead (same numbers).
Whether the gather pays off at a given sparsity is measured, not assumed (benchmarks/gating.py).

FLOPs follow eval/flops.py: 2 per multiply-accumulate, elementwise work (activation, bias, masking) not
counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass
class PackedFFN:
    """Neuron-major weights of one FFN. `in_rows` is [I, 2H] (gate row | up row) for gated FFNs and [I, H]
    (up row) for plain ones; `down_rows` is [I, H] (column i of down, as a row)."""

    gated: bool
    in_rows: Tensor
    in_bias: Tensor | None  # [I, 2] or [I]
    down_rows: Tensor
    down_bias: Tensor | None  # [H]
    act: Callable[[Tensor], Tensor]
    source_versions: tuple[int, ...]  # weight versions when packed: repacked if the base weights change

    @property
    def hidden(self) -> int:
        return self.down_rows.shape[1]

    @property
    def intermediate(self) -> int:
        return self.down_rows.shape[0]


def _versions(*tensors: Tensor | None) -> tuple[int, ...]:
    return tuple(t._version for t in tensors if t is not None)


@torch.no_grad()
def pack_gated(gate: nn.Linear, up: nn.Linear, down: nn.Linear, act: Callable) -> PackedFFN:
    """Llama-style `down(act(gate(x)) * up(x))` with nn.Linear projections."""
    bias = None
    if gate.bias is not None or up.bias is not None:
        zeros = gate.weight.new_zeros(gate.out_features)
        bias = torch.stack(
            [gate.bias if gate.bias is not None else zeros, up.bias if up.bias is not None else zeros], dim=1
        ).contiguous()
    in_rows = torch.cat([gate.weight, up.weight], dim=1).contiguous()
    down_rows = down.weight.t().contiguous()
    versions = _versions(gate.weight, up.weight, down.weight, gate.bias, up.bias, down.bias)
    return PackedFFN(True, in_rows, bias, down_rows, down.bias, act, versions)


@torch.no_grad()
def pack_plain(
    weight_in: Tensor, bias_in: Tensor | None, weight_out_rows: Tensor, bias_out: Tensor | None, act: Callable
) -> PackedFFN:
    """GPT-2-style `c_proj(act(c_fc(x)))`; `weight_in` is [I, H] (out, in), `weight_out_rows` is [I, H]."""
    versions = _versions(weight_in, weight_out_rows, bias_in, bias_out)
    return PackedFFN(False, weight_in.contiguous(), bias_in, weight_out_rows.contiguous(), bias_out, act, versions)


_WORKSPACES: dict[tuple, Tensor] = {}


def gather_rows(matrix: Tensor, idx: Tensor) -> Tensor:
    """matrix[idx] written into a reused buffer: a fresh multi-MB tensor per call costs page faults that take
    as long as the copy itself. The result is only valid until the next gather from a matrix of this shape."""
    key = (tuple(matrix.shape), matrix.dtype, matrix.device)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = torch.empty_like(matrix)
    return torch.index_select(matrix, 0, idx, out=_WORKSPACES[key][: idx.numel()])


def intermediate(x: Tensor, packed: PackedFFN, idx: Tensor | None = None) -> Tensor:
    """The FFN's intermediate activations h for the neurons `idx` (all when None): [N, k]."""
    rows = packed.in_rows if idx is None else gather_rows(packed.in_rows, idx)
    bias = packed.in_bias if idx is None or packed.in_bias is None else packed.in_bias.index_select(0, idx)
    if packed.gated:
        hidden = packed.hidden
        out = F.linear(x, rows.view(-1, hidden))  # [N, 2k]: gate and up of each neuron, interleaved
        out = out.view(x.shape[0], -1, 2)
        if bias is not None:
            out = out + bias
        return packed.act(out[..., 0]) * out[..., 1]
    return packed.act(F.linear(x, rows, bias))


def output(h: Tensor, packed: PackedFFN, idx: Tensor | None = None) -> Tensor:
    """down(h) for intermediate activations h of the neurons `idx` (all when None). One token: a fused
    gather-and-weighted-sum of the selected down rows (embedding_bag), so no gathered copy is made."""
    if idx is not None and h.shape[0] == 1:
        y = F.embedding_bag(
            idx.unsqueeze(0), packed.down_rows, per_sample_weights=h.to(packed.down_rows.dtype), mode="sum"
        )
    else:
        y = h @ (packed.down_rows if idx is None else gather_rows(packed.down_rows, idx))
    return y if packed.down_bias is None else y + packed.down_bias


def masked_dense(x: Tensor, keep: Tensor, packed: PackedFFN) -> Tensor:
    """Every neuron computed, the unselected ones zeroed before down: the reference the sparse path equals."""
    return output(intermediate(x, packed) * keep.to(x.dtype), packed)


def sparse_ffn(x: Tensor, keep: Tensor, packed: PackedFFN, max_union: float = 0.9) -> Tensor:
    """FFN of tokens x [N, H] computing only the neurons selected by keep [N, I] (their union across the N
    tokens, then per-token zeroing); the masked dense path when the union exceeds `max_union` of the layer."""
    union = keep.any(dim=0)
    idx = union.nonzero().squeeze(1)
    if idx.numel() > max_union * packed.intermediate:
        return masked_dense(x, keep, packed)
    if idx.numel() == 0:
        y = x.new_zeros(x.shape[0], packed.hidden)
        return y if packed.down_bias is None else y + packed.down_bias
    h = intermediate(x, packed, idx)
    if x.shape[0] > 1:  # one token selected exactly its union: nothing to zero
        h = h * keep.index_select(1, idx).to(h.dtype)
    return output(h, packed, idx)


def ffn_flops(hidden: int, kept: Tensor | int, gated: bool) -> Tensor | int:
    """FLOPs of one token's FFN computing `kept` neurons: 2 per MAC, over 3 (gated) or 2 projections."""
    return 2 * (3 if gated else 2) * hidden * kept
