"""SparseGPT (Frantar & Alistarh, 2023): choose the mask and update the surviving weights column by column
with the optimal-brain-surgeon (OBS) step, using the inverse Hessian of the layer's squared-error loss.

Our own implementation of the published algorithm. Conventions: weights are [out, in]; the keep-mask is
True = keep; all math runs in float32 and the new weight comes back in the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from prune.core.errors import UserInputError
from prune.core.sparsity import Sparsity
from prune.methods.oneshot.masking import check_nm_shape, lowest_k_mask, removed_count


class HessianStats:
    """H = 2/N * sum_t x_t x_t^T over the N input rows (tokens) seen, kept as a float32 running average so
    it stays well scaled however many samples arrive (the reference counts sequences; the scale of H does
    not change SparseGPT's result because the dampening is relative to mean(diag H))."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self.device = device
        self.hessian: Tensor | None = None
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, self.in_features).float()
        rows = x.shape[0]
        if rows == 0:
            return
        if self.hessian is None:
            self.hessian = torch.zeros(self.in_features, self.in_features, device=self.device or x.device)
        x = x.to(self.hessian.device)
        self.hessian *= self.tokens / (self.tokens + rows)
        self.tokens += rows
        x = x * (2.0 / self.tokens) ** 0.5
        self.hessian.addmm_(x.t(), x)

    def matrix(self) -> Tensor:
        if self.hessian is None:
            raise RuntimeError("HessianStats saw no inputs: the calibration forward never reached this layer.")
        return self.hessian


def _inverse_cholesky(H: Tensor, dampening: float) -> Tensor:
    """Upper Cholesky factor of (H + damp*I)^-1, retrying with 10x, 100x, 1000x the dampening.

    Damps `H`, the caller's private float32 copy, in place, and drops each factor once the next exists: at
    8192 inputs every [in, in] matrix is 256 MB, and this is the peak of a whole block's pruning."""
    if not torch.isfinite(H).all():
        raise UserInputError(
            "SparseGPT: the calibration Hessian has NaN/inf entries (the model's activations overflowed); "
            "calibrate in float32 or with fewer/shorter samples."
        )
    mean_diag = torch.diagonal(H).mean()
    base = max(dampening, 1e-3)
    added = 0.0
    for damp in [dampening] + [base * 10**k for k in (1, 2, 3)]:
        torch.diagonal(H).add_((damp - added) * mean_diag)
        added = damp
        factor, info = torch.linalg.cholesky_ex(H)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(factor)
            del factor
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper
    raise UserInputError(
        f"SparseGPT: the calibration Hessian is not positive definite even with dampening {damp:g} "
        f"(started at {dampening:g}); use more calibration samples or a larger `dampening`."
    )


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: Sparsity,
    *,
    blocksize: int = 128,
    dampening: float = 0.01,
    update_weights: bool = True,
) -> tuple[Tensor, Tensor]:
    """Prune one [out, in] weight given its [in, in] Hessian; return (weight, keep_mask).

    - dampening: `dampening * mean(diag H)` is added to the diagonal; on a failed Cholesky it is raised
      10x up to three times, then a UserInputError names the fix.
    - dead inputs (H_ii == 0) get H_ii = 1 and their weight column is zeroed.
    - N:M: at the first column of every M-group, prune the M-N smallest w^2/d^2 of the group (d = diagonal
      of the upper Cholesky factor of H^-1), with the columns already updated by earlier OBS steps;
      `blocksize` is rounded up to a multiple of M so groups never straddle blocks.
    - fraction: at the start of each column block, prune the smallest w^2/d^2 over the whole block; the
      per-block counts come from cumulative rounding, so the layer loses exactly
      `removed_count(fraction, out*in)` weights.
    - update_weights=False: return the input `weight` untouched and only the mask the OBS procedure chose.
    Pruned entries of the returned updated weight are exactly zero.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} do not match")
    out_features, in_features = weight.shape
    if sparsity.is_nm:
        check_nm_shape(in_features, sparsity)
        m, n_pruned = sparsity.m, sparsity.m - sparsity.n
        blocksize = -(-blocksize // m) * m
    W = weight.detach().to(torch.float32).clone(memory_format=torch.contiguous_format)
    H = hessian.detach().to(device=W.device, dtype=torch.float32, copy=True)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = _inverse_cholesky(H, dampening)
    del H
    pruned = torch.zeros_like(W, dtype=torch.bool)  # True = pruned, during the sweep

    for i1 in range(0, in_features, blocksize):
        i2 = min(i1 + blocksize, in_features)
        W1 = W[:, i1:i2].clone()
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diagonal(Hinv1)
        Err1 = torch.zeros_like(W1)
        mask1 = pruned[:, i1:i2]  # a view: writes go into `pruned`
        if not sparsity.is_nm:
            k = removed_count(sparsity.fraction, out_features * i2) - removed_count(
                sparsity.fraction, out_features * i1
            )
            mask1.copy_(~lowest_k_mask(W1.pow(2) / d.pow(2).unsqueeze(0), k))
        for i in range(i2 - i1):
            if sparsity.is_nm and i % m == 0:
                group = W1[:, i : i + m].pow(2) / d[i : i + m].pow(2).unsqueeze(0)
                mask1[:, i : i + m].scatter_(1, group.topk(n_pruned, dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            err = (w - q) / d[i]
            W1[:, i:].sub_(err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0))
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:].sub_(Err1 @ Hinv[i1:i2, i2:])

    keep = ~pruned
    if not update_weights:
        return weight, keep
    W.masked_fill_(pruned, 0.0)
    return W.to(weight.dtype), keep  # contiguous [out, in]
