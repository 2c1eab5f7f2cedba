"""Turn importance scores into a keep-mask (True = keep), shaped like the [out, in] weight matrix.

N:M keeps the N highest-scoring weights in every group of M consecutive weights along the input dimension
of each output row. A fraction removes exactly `removed_count(fraction, count)` weights, either over the
whole layer (`granularity="layer"`) or in every output row (`granularity="row"`). Ties are broken by
`torch.topk`, which is deterministic for a given input on a given device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from prune.core.errors import UserInputError
from prune.core.sparsity import Sparsity

GRANULARITIES = ("layer", "row")


def removed_count(fraction: float, count: int) -> int:
    """How many of `count` weights a fraction removes: fraction * count rounded half up (0.5 * 3 -> 2),
    so the rule does not depend on Python's round-half-to-even."""
    return min(count, max(0, math.floor(fraction * count + 0.5)))


def check_nm_shape(in_features: int, sparsity: Sparsity) -> None:
    if in_features % sparsity.m != 0:
        raise UserInputError(
            f"{sparsity} sparsity needs in_features divisible by {sparsity.m}, got {in_features}; exclude this "
            f"layer from `method.targets` or choose an M that divides it."
        )


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the top-n of every m consecutive scores along the last (input) dimension."""
    out_features, in_features = scores.shape
    groups = scores.reshape(out_features, in_features // m, m)
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(out_features, in_features)


def lowest_k_mask(scores: Tensor, k: int, dim: int | None = None) -> Tensor:
    """Keep-mask removing exactly the k lowest scores: over all entries (dim=None) or along `dim`."""
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if k <= 0:
        return keep
    if dim is None:
        keep.view(-1)[scores.reshape(-1).topk(k, largest=False).indices] = False
    else:
        keep.scatter_(dim, scores.topk(k, dim=dim, largest=False).indices, False)
    return keep


def mask_from_scores(scores: Tensor, sparsity: Sparsity, granularity: str = "layer") -> Tensor:
    """Bool keep-mask for a [out, in] score matrix (higher score = more important)."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [out, in], got shape {tuple(scores.shape)}")
    if sparsity.is_nm:
        check_nm_shape(scores.shape[1], sparsity)
        return nm_mask(scores, sparsity.n, sparsity.m)
    if granularity == "layer":
        return lowest_k_mask(scores, removed_count(sparsity.fraction, scores.numel()))
    if granularity == "row":
        return lowest_k_mask(scores, removed_count(sparsity.fraction, scores.shape[1]), dim=1)
    raise UserInputError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}.")
