"""The tensor math of MaskLLM's N:M mask: Gumbel noise, candidate probabilities, soft masks, and the fused
masked-linear autograd function the training forward runs (`prune.methods.nm_gumbel.method` holds the method).

Speed and memory. The fused `masked_linear` autograd function computes x @ (W ⊙ soft)^T + b and saves only
x, references to W and the logits, and its Gumbel noise (bfloat16 on CPU, where the generator is the
costliest part of the mask's work, and there filled in parallel chunks; on accelerators only the seed,
the backward redraws it): no weight-sized tensor (plain autograd keeps W ⊙ soft, the soft mask and the
probabilities of every layer until the backward, which here recomputes them). The logits are stored candidate-major,
[C, out, in/M], so that the softmax over candidates runs
over contiguous planes (several times faster on CPU than a softmax over a trailing dimension of 6), and
soft masks are sums of probability planes rather than a matmul with K = C; `group_logits` is the
[out, in/M, C] view. The sparse-weight regularizer ||W ⊙ soft||^2 is a second output of the same
function: one reduction in the forward, one fused term in the backward, no second pass over the weights.
benchmarks/nm_step.py measures a step against dense fine-tuning (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cache

import torch
from torch import Tensor
from torch.nn import functional as F

from prune.masks.storage import nm_candidates

_PLANE_LIMIT = 16  # up to this many candidates, soft masks are sums of probability planes


def gumbel_noise(shape, seed: int, device, dtype=torch.float32) -> Tensor:
    """Standard Gumbel noise -log(-log U), reproducible from `seed` (the backward regenerates it)."""
    return _neg_gumbel(shape, seed, device, dtype).neg_()


def _neg_gumbel(shape, seed: int, device, dtype) -> Tensor:
    """log(-log U) = minus a Gumbel sample: U in [tiny, 1) keeps both logs finite without clamping passes."""
    u = _uniform(shape, seed, torch.device(device), dtype)
    return u.log_().neg_().log_()


def _uniform(shape, seed: int, device: torch.device, dtype) -> Tensor:
    """U[tiny, 1) from `seed`. On CPU the generator (mt19937) runs on one core and is the costliest part of
    the mask's work, so large tensors are filled in fixed chunks of 2^20, each from its own generator, by
    torch.get_num_threads() threads (ATen releases the GIL): the values depend on the seed only, never on
    the thread count."""
    u = torch.empty(shape, device=device, dtype=dtype)
    low = torch.finfo(dtype).tiny
    if device.type != "cpu" or u.numel() <= _RNG_CHUNK:
        return u.uniform_(low, 1.0, generator=torch.Generator(device=device).manual_seed(seed))
    chunks = u.view(-1).split(_RNG_CHUNK)

    def fill(index: int) -> None:
        generator = torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**63)
        chunks[index].uniform_(low, 1.0, generator=generator)

    threads = torch.get_num_threads()
    if threads <= 1:
        for index in range(len(chunks)):
            fill(index)
    else:
        list(_rng_pool(threads).map(fill, range(len(chunks))))
    return u


_RNG_CHUNK = 1 << 20
_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _rng_pool(threads: int) -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL[0] != threads:
        _POOL = (threads, ThreadPoolExecutor(threads, thread_name_prefix="nm-gumbel-rng"))
    return _POOL[1]


def gumbel_probs(logits: Tensor, noise: Tensor, tau: float, kappa: float) -> Tensor:
    """softmax((kappa * logits + noise) / tau) over the candidate dimension 0 of [C, ...] tensors."""
    return torch.softmax(torch.add(noise, logits, alpha=kappa).div_(tau), dim=0)


def _probs_from(logits: Tensor, noise: int | Tensor, tau: float, kappa: float) -> Tensor:
    """gumbel_probs with the noise regenerated from a seed (in place, without extra passes) or given (a
    bfloat16 noise tensor is promoted inside the add, without a converted copy)."""
    if isinstance(noise, Tensor):
        return gumbel_probs(logits, noise, tau, kappa)
    z = _neg_gumbel(logits.shape, noise, logits.device, logits.dtype)
    return torch.softmax(z.mul_(-1.0 / tau).add_(logits, alpha=kappa / tau), dim=0)


@cache
def _structure(n: int, m: int) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """(candidates containing each position, positions kept by each candidate) of the N:M candidates."""
    keep = nm_candidates(n, m)
    by_position = tuple(tuple(keep[:, j].nonzero().flatten().tolist()) for j in range(m))
    by_candidate = tuple(tuple(row.nonzero().flatten().tolist()) for row in keep)
    return by_position, by_candidate


def _candidate_matrix(n: int, m: int, like: Tensor) -> Tensor:
    return nm_candidates(n, m).to(device=like.device, dtype=like.dtype)


def soft_from_probs(probs: Tensor, n: int, m: int) -> Tensor:
    """[C, out, G] probabilities -> the [out, G*M] soft mask, soft[.., j] = sum of the probs of the
    candidates keeping position j (= probs^T @ candidates). Plane sums when C is small (faster on CPU
    than a matmul with K = C; written in place, so only outside autograd), a matmul otherwise."""
    c, out_features = probs.shape[0], probs.shape[1]
    if c > _PLANE_LIMIT or (probs.requires_grad and torch.is_grad_enabled()):
        return (probs.reshape(c, -1).t() @ _candidate_matrix(n, m, probs)).reshape(out_features, -1)
    by_position, _ = _structure(n, m)
    soft = probs.new_empty((*probs.shape[1:], m))
    for j, members in enumerate(by_position):
        plane = soft[..., j]  # written in place through the strided view
        if len(members) == 1:
            plane.copy_(probs[members[0]])
            continue
        torch.add(probs[members[0]], probs[members[1]], out=plane)
        for k in members[2:]:
            plane.add_(probs[k])
    return soft.reshape(out_features, -1)


def _probs_grad(grad_soft: Tensor, n: int, m: int, shape) -> Tensor:
    """d probs [C, out, G] from d soft [out, G*M]: d probs_c = sum of d soft over the positions c keeps."""
    if shape[0] > _PLANE_LIMIT:
        return (_candidate_matrix(n, m, grad_soft) @ grad_soft.reshape(-1, m).t()).reshape(shape)
    _, by_candidate = _structure(n, m)
    grouped = grad_soft.reshape(*shape[1:], m)
    grad = grad_soft.new_empty(shape)
    for index, positions in enumerate(by_candidate):
        if len(positions) == 1:
            grad[index].copy_(grouped[..., positions[0]])
            continue
        torch.add(grouped[..., positions[0]], grouped[..., positions[1]], out=grad[index])
        for j in positions[2:]:
            grad[index].add_(grouped[..., j])
    return grad


class _MaskedLinear(torch.autograd.Function):
    """y = x @ (W ⊙ soft)^T + b and sq = ||W ⊙ soft||^2, soft recomputed (not stored) in the backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, logits, noise, tau, kappa, n, m, want_sq):
        # `noise`: an int seed (regenerated in the backward) or a Gumbel tensor (saved for the backward)
        probs = _probs_from(logits, noise, tau, kappa)
        w_eff = soft_from_probs(probs, n, m).to(weight.dtype).mul_(weight)
        del probs
        y = F.linear(x, w_eff.to(x.dtype), None if bias is None else bias.to(x.dtype))
        sq = torch.dot(w_eff.reshape(-1), w_eff.reshape(-1)) if want_sq else w_eff.new_zeros(())
        ctx.seed = noise if isinstance(noise, int) else None
        ctx.tau, ctx.kappa, ctx.n, ctx.m, ctx.want_sq, ctx.has_bias = tau, kappa, n, m, want_sq, bias is not None
        ctx.save_for_backward(x, weight, logits, None if ctx.seed is not None else noise)
        ctx.set_materialize_grads(False)
        return y, sq

    @staticmethod
    def backward(ctx, grad_y, grad_sq):
        x, weight, logits, saved_noise = ctx.saved_tensors
        needs_x, needs_w, needs_b, needs_logits = ctx.needs_input_grad[:4]
        out_features, in_features = weight.shape
        probs = _probs_from(logits, ctx.seed if saved_noise is None else saved_noise, ctx.tau, ctx.kappa)
        soft = soft_from_probs(probs, ctx.n, ctx.m).to(weight.dtype)
        w_eff = soft * weight
        grad_x = grad_w = grad_b = grad_logits = grad_eff = None
        # d z / d logits = kappa / tau: folded into the weight-gradient matmul (free) unless W needs its grad
        rate = ctx.kappa / ctx.tau
        scale = rate if needs_logits and not needs_w else 1.0
        if grad_y is not None:
            dy = grad_y.reshape(-1, out_features)
            if needs_x:
                grad_x = (dy @ w_eff.to(dy.dtype)).reshape(x.shape).to(x.dtype)
            if needs_w or needs_logits:
                x2 = x.reshape(-1, in_features).to(dy.dtype)
                grad_eff = torch.addmm(dy.new_zeros(()), dy.t(), x2, beta=0, alpha=scale).to(weight.dtype)
            if needs_b and ctx.has_bias:
                grad_b = dy.sum(0)
        if grad_sq is not None and ctx.want_sq and (needs_w or needs_logits):
            if grad_eff is None:
                grad_eff = torch.zeros_like(w_eff)
            grad_eff.addcmul_(w_eff, (2 * scale) * grad_sq.to(w_eff.dtype))  # d ||W_eff||^2 = 2 W_eff
        del w_eff
        if grad_eff is not None:
            if needs_w:
                grad_w = grad_eff * soft
            del soft
            if needs_logits:
                grad_soft = grad_eff.mul_(weight) if not needs_w else grad_eff * weight
                grad_probs = _probs_grad(grad_soft, ctx.n, ctx.m, probs.shape).to(probs.dtype)
                del grad_soft, grad_eff
                # softmax backward over candidates, p * (g - sum_c p g), as p*g - p * sum(p*g): several
                # times faster on CPU than aten's softmax backward along a leading dimension
                grad_logits = grad_probs.mul_(probs)
                grad_logits.addcmul_(probs, grad_logits.sum(0, keepdim=True), value=-1.0)
                if scale != rate:
                    grad_logits.mul_(rate)
        return grad_x, grad_w, grad_b, grad_logits, None, None, None, None, None, None


def masked_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    logits: Tensor,
    noise: int | Tensor,
    tau: float,
    kappa: float,
    n: int,
    m: int,
    want_sq: bool = False,
) -> tuple[Tensor, Tensor]:
    """(x @ (W ⊙ soft)^T + b, ||W ⊙ soft||^2) with soft = gumbel_softmax(kappa*logits, tau) @ candidates(N:M).

    `logits` is [C, out, in/M] (candidate-major); `noise` an int seed (the noise is drawn from it, and drawn
    again in the backward) or a [C, out, in/M] Gumbel tensor of any float dtype (kept for the backward).
    Gradients: x, the logits, and W/b only where they require grad. The second output is 0 unless `want_sq`."""
    return _MaskedLinear.apply(x, weight, bias, logits, noise, float(tau), float(kappa), n, m, want_sq)
