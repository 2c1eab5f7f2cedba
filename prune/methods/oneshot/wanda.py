"""Wanda (Sun et al., 2023): importance |W_ij| * ||X_j||_2, the weight times the norm of its input feature."""

from __future__ import annotations

import torch
from torch import Tensor


def wanda_scores(weight: Tensor, input_sq_norm: Tensor) -> Tensor:
    """|W| * sqrt(sum_x x_j^2), broadcast over output rows; float32, [out, in]."""
    norm = input_sq_norm.to(device=weight.device, dtype=torch.float64).sqrt().float()
    return weight.detach().float().abs() * norm.unsqueeze(0)
