"""The trainable part of dynamic channel gating (Fire Together Wire Together, Elkerdawy et al., CVPR 2022):
a small predictor per gated layer, and the self-supervised labels it learns from (FTWT calls them targets; so
do the recipe key `target: mass|uniform` and the report's `target_*` fields).

Predictor: the layer's input, pooled (spatial mean for a conv; the token itself for an FFN), optionally a
softmax over its channels (FTWT's choice for pooled conv features), then one linear map (FTWT's 1x1 conv)
or, with `rank`, two (a low-rank factorization, cheaper for wide FFNs) -> one logit per output channel.
The gate keeps channel c when sigmoid(logit_c) > 0.5, i.e. logit_c > 0, computed without gradient.

Labels, from the *unmasked* output of the layer: per channel the largest |activation| over positions (per
token for an FFN), normalized to a distribution over channels. `mass`: keep the largest k(x) channels,
k(x) = the largest k whose top-k mass stays within the threshold r (channels scoring exactly zero are never
labelled keep, as in FTWT at r = 1). `uniform`: keep a fixed fraction of the highest-scoring channels. The loss is
binary cross-entropy of the logits against these labels (see prune.methods.gating.method).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from prune.masks.base import Mask
from prune.methods.gating.config import check_threshold

MASS_TOLERANCE = 1e-6  # float cumsums of a distribution; FTWT uses 1e-5


def mass_labels(scores: Tensor, threshold: float) -> Tensor:
    """Bool [N, C]: per row, the largest k channels whose share of the row's total score stays <= r."""
    check_threshold(threshold)
    scores = scores.float()
    total = scores.sum(dim=-1, keepdim=True)
    share = scores / total.clamp_min(torch.finfo(scores.dtype).tiny)
    ordered, order = share.sort(dim=-1, descending=True)
    kept_sorted = (ordered.cumsum(dim=-1) <= threshold + MASS_TOLERANCE) & (ordered > 0)
    return torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)


def uniform_labels(scores: Tensor, prune_fraction: float) -> Tensor:
    """Bool [N, C]: per row, the C - int(prune_fraction * C) highest-scoring channels (FTWT's `uniform`)."""
    channels = scores.shape[-1]
    keep = channels - int(prune_fraction * channels)
    top = scores.topk(keep, dim=-1).indices
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter(-1, top, True)


@dataclass(frozen=True)
class LabelRule:
    """Which channels of an input the predictor should keep: `mass` or `uniform` (see the module doc)."""

    kind: Literal["mass", "uniform"]
    threshold: float = 0.9  # mass
    prune_fraction: float = 0.5  # uniform

    def __call__(self, scores: Tensor) -> Tensor:
        if self.kind == "mass":
            return mass_labels(scores, self.threshold)
        return uniform_labels(scores, self.prune_fraction)


class Predictor(nn.Module):
    """pooled [N, C_in] -> (softmax over C_in) -> linear (or low-rank) -> logits [N, C_out]."""

    def __init__(self, in_features: int, out_features: int, *, softmax: bool, rank: int | None, init_bias: float):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.softmax, self.rank = softmax, rank
        if rank is None:
            self.proj = nn.Linear(in_features, out_features)
            nn.init.zeros_(self.proj.weight)  # every channel on at step 0: training starts from the dense model
            nn.init.constant_(self.proj.bias, init_bias)
        else:
            self.reduce = nn.Linear(in_features, rank, bias=False)
            self.proj = nn.Linear(rank, out_features)
            nn.init.normal_(self.reduce.weight, std=1.0 / math.sqrt(in_features))
            nn.init.zeros_(self.proj.weight)  # the factor product starts at zero, yet both factors get gradients
            nn.init.constant_(self.proj.bias, init_bias)

    def forward(self, pooled: Tensor) -> Tensor:
        z = pooled.to(self.proj.weight.dtype)  # predictors stay float32 under a bf16 model
        z = z.softmax(dim=-1) if self.softmax else z
        return self.proj(self.reduce(z) if self.rank is not None else z)

    def flops(self) -> int:
        """FLOPs of one input's prediction: 2 per MAC of the linear map(s)."""
        if self.rank is None:
            return 2 * self.in_features * self.out_features
        return 2 * self.rank * (self.in_features + self.out_features)


@dataclass
class Record:
    """What one training forward leaves for the BCE loss: logits (with grad), labels, and the chosen mask."""

    logits: Tensor
    labels: Tensor
    keep: Tensor


class GatingMask(Mask):
    """The gate of one layer. It owns the predictor, so the trainer (which optimizes mask parameters only)
    trains exactly the predictors. `hard()` is the mask the last training forward chose, [inputs, channels]
    (a per-input mask has no single static value); `record` holds what the BCE loss needs."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rule: LabelRule,
        *,
        softmax: bool = True,
        rank: int | None = None,
        detach_input: bool = True,
        init_bias: float = 3.0,
    ):
        super().__init__()
        self.predictor = Predictor(in_features, out_features, softmax=softmax, rank=rank, init_bias=init_bias)
        self.rule = rule
        self.detach_input = detach_input
        self.record: Record | None = None
        self._last_keep: Tensor | None = None

    @property
    def channels(self) -> int:
        return self.predictor.out_features

    def predict(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, keep) for pooled inputs [N, C_in]. Keep is 1[sigmoid(logit) > 0.5], without gradient;
        in decoupled mode the predictor's input is detached, so only the BCE loss reaches the predictor."""
        if self.detach_input:
            pooled = pooled.detach()
        if not self.training:
            with torch.no_grad():
                logits = self.predictor(pooled)
        else:
            logits = self.predictor(pooled)
        return logits, logits.detach() > 0

    def remember(self, logits: Tensor, scores: Tensor, keep: Tensor) -> None:
        """Training forward: labels from the unmasked layer's channel scores, kept for the loss."""
        with torch.no_grad():
            labels = self.rule(scores.detach())
        self.record = Record(logits, labels, keep)
        self._last_keep = keep.detach()

    def take_record(self) -> Record | None:
        record, self.record = self.record, None
        return record

    def hard(self) -> Tensor:
        if self._last_keep is None:
            return torch.zeros(0, dtype=torch.bool)
        return self._last_keep

    def extra_repr(self) -> str:
        return f"{self.rule}, detach_input={self.detach_input}"
