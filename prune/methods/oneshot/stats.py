"""What the one-shot methods read from a layer's inputs, gathered once and kept: the sweep's shared statistics.

`InputStats` accumulates Wanda's per-feature sum of squares (float64) and, when asked, SparseGPT's Hessian, from
the same rows in one pass; it answers `input_sq_norm()` like `WandaStats` and `matrix()` like `HessianStats`,
so `prune.methods.oneshot.method.prune_from_stats` takes it for either method. `tensors()` / `from_tensors()` turn it
into plain tensors for a safetensors file and back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prune.calibration.input_norms import WandaStats
from prune.methods.oneshot.sparsegpt import HessianStats


class InputStats:
    def __init__(self, in_features: int, hessian: bool = False):
        self.in_features = in_features
        self.norms = WandaStats(in_features)
        self.hessian = HessianStats(in_features) if hessian else None

    def add(self, x: Tensor) -> None:
        self.norms.add(x)
        if self.hessian is not None:
            self.hessian.add(x)

    @property
    def tokens(self) -> int:
        return self.norms.tokens

    def input_sq_norm(self) -> Tensor:
        return self.norms.input_sq_norm()

    def matrix(self) -> Tensor:
        if self.hessian is None:
            raise RuntimeError("these statistics were gathered without the Hessian (no SparseGPT point asked for it)")
        return self.hessian.matrix()

    def tensors(self) -> dict[str, Tensor]:
        out = {"sq_norm": self.input_sq_norm().cpu(), "tokens": torch.tensor([self.tokens])}
        if self.hessian is not None:
            out["hessian"] = self.matrix().cpu().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> InputStats:
        sq_norm = tensors["sq_norm"]
        stats = cls(sq_norm.numel(), hessian="hessian" in tensors)
        stats.norms.sq_norm = sq_norm
        stats.norms.tokens = int(tensors["tokens"][0])
        if stats.hessian is not None:
            stats.hessian.hessian = tensors["hessian"]
            stats.hessian.tokens = stats.norms.tokens
        return stats
