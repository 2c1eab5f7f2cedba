"""Per-input-feature sums of squares of a layer's inputs: Wanda's statistic, also the activation score of the
structured method, so it lives below both methods."""

from __future__ import annotations

from torch import Tensor


class WandaStats:
    """Accumulates sum over tokens of x_j^2 for every input feature j (float64, on the input's device)."""

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.sq_norm: Tensor | None = None
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, self.in_features)
        sq = x.double().pow(2).sum(dim=0)
        self.sq_norm = sq if self.sq_norm is None else self.sq_norm + sq
        self.tokens += x.shape[0]

    def input_sq_norm(self) -> Tensor:
        if self.sq_norm is None:
            raise RuntimeError("WandaStats saw no inputs: the calibration forward never reached this layer.")
        return self.sq_norm
