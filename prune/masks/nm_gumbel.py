"""MaskLLM's learnable N:M mask (Fang et al., 2024): a categorical choice among the C(M,N) keep-patterns of
every group of M consecutive weights along the input dimension, learned with Gumbel-softmax.

Training forward: probs = gumbel_softmax(kappa_t * logits, tau_t) per group (a fresh Gumbel sample every
forward), soft mask = probs @ candidates, and the layer computes x @ (W ⊙ soft)^T. Evaluation and export use
the hard mask, the argmax candidate of each group, which is exactly N:M by construction. Only the logits
train; the weights stay frozen.

Prior (MaskLLM's rule, our code): candidate c of a group whose prior keeps the set P gets the shift
`prior_strength * sigma * (|c ∩ P| - (N - 1))`: the candidate equal to the prior is raised by
prior_strength * sigma, a candidate sharing one kept position fewer is left alone, and every further
position of disagreement lowers it by another prior_strength * sigma (for 2:4 this is MaskLLM's
`(priors - 1) * gate.std() * strength`). MaskLLM adds this to N(0, 0.01^2) logits and uses their std as
sigma; with prior strength 3 the noise then lets another candidate win ~5.5% of groups at step 0, which
wrecks the prior (SmolLM2: perplexity 60 -> 431). We therefore start from noise-free logits equal to the
shift, with sigma = `init_std` (0.01, the std of MaskLLM's init): the prior candidate beats every other
one by at least prior_strength * sigma in every group, so the hard mask at step 0 is the prior exactly,
and the scaled logits kappa * logits have the same spread as MaskLLM's. Exploration comes from the
Gumbel noise of each forward, not from the init. Without a prior (`prior: none`) the logits are drawn from
N(0, init_std^2) as in MaskLLM.

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

import math
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn
from torch.nn import functional as F

from prune.blocks import weight_matrix
from prune.errors import UserInputError
from prune.masks.base import Mask, Objective, WeightMasked, wrap, wrappers
from prune.masks.storage import encode_nm, nm_candidates, read_masks
from prune.masks.targets import method_targets
from prune.oneshot import methods as oneshot
from prune.registry import MethodConfig, register_method
from prune.schedules import scheduled
from prune.sparsity import Sparsity, parse_sparsity

ONESHOT_PRIORS = ("sparsegpt", "wanda", "magnitude")
MAX_CANDIDATES = 256
# stored Gumbel noise: bfloat16 converts ~10x faster than float16 on CPU; a relative rounding of 2^-9 of
# the noise is immaterial next to the logit gaps it perturbs
NOISE_DTYPE = torch.bfloat16
_PLANE_LIMIT = 16  # up to this many candidates, soft masks are sums of probability planes


# ----------------------------------------------------------------------------------------------- tensor math

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


def masked_linear(x: Tensor, weight: Tensor, bias: Tensor | None, logits: Tensor, noise: int | Tensor,
                  tau: float, kappa: float, n: int, m: int, want_sq: bool = False) -> tuple[Tensor, Tensor]:
    """(x @ (W ⊙ soft)^T + b, ||W ⊙ soft||^2) with soft = gumbel_softmax(kappa*logits, tau) @ candidates(N:M).

    `logits` is [C, out, in/M] (candidate-major); `noise` an int seed (the noise is drawn from it, and drawn
    again in the backward) or a [C, out, in/M] Gumbel tensor of any float dtype (kept for the backward).
    Gradients: x, the logits, and W/b only where they require grad. The second output is 0 unless `want_sq`."""
    return _MaskedLinear.apply(x, weight, bias, logits, noise, float(tau), float(kappa), n, m, want_sq)


def prior_logits(prior: Tensor, n: int, m: int, strength: float, sigma: float) -> Tensor:
    """Noise-free [C, out, in/M] logits from a bool [out, in] N:M prior (MaskLLM's shift, see the module doc)."""
    out_features, in_features = prior.shape
    groups = prior.reshape(out_features, in_features // m, m)
    if not torch.all(groups.sum(-1) == n):
        raise UserInputError(f"the prior mask is not exactly {n}:{m} (some group keeps a different count).")
    candidates = nm_candidates(n, m).to(device=prior.device, dtype=torch.float32)
    overlap = torch.einsum("cm,ogm->cog", candidates, groups.float())  # kept positions shared with the prior
    return (overlap - (n - 1)).mul_(strength * sigma)


# ---------------------------------------------------------------------------------------------------- masks

class NMGumbelMask(Mask):
    """The learnable N:M mask of one [out, in] weight: logits over the C(M,N) candidates of every group."""

    def __init__(self, out_features: int, in_features: int, n: int, m: int, *, tau: float = 4.0,
                 kappa: float = 100.0, sparse_weight_reg: float = 0.0, init_std: float = 0.01,
                 store_noise: bool | None = None, device=None):
        super().__init__()
        if in_features % m:
            raise UserInputError(f"in_features {in_features} is not a multiple of M={m}.")
        self.n, self.m = n, m
        self.out_features, self.in_features = out_features, in_features
        candidates = nm_candidates(n, m)
        self.register_buffer("candidates", candidates.to(device=device), persistent=False)  # bool [C, M]
        self.logits = nn.Parameter(
            torch.randn(len(candidates), out_features, in_features // m, device=device) * init_std
        )
        self.tau, self.kappa, self.progress = float(tau), float(kappa), 0.0
        self.sparse_weight_reg = float(sparse_weight_reg)
        self._sq_norm: Tensor | None = None  # ||W ⊙ soft||^2 of the latest training forward
        # The backward needs the forward's Gumbel noise: kept as bfloat16 (3 bytes per weight for 2:4), or
        # redrawn from its seed (nothing kept, one more RNG pass). None: keep it on CPU, where the generator
        # is the costliest part of the mask's work, redraw it on accelerators, where RNG is cheap and memory
        # is not. On SmolLM2-135M (CPU): step 1.31x vs 1.43x a dense step, peak RSS 1.48x vs 1.32x.
        self.store_noise = store_noise

    @property
    def group_logits(self) -> Tensor:
        """The logits as [out, in/M, C] (a view)."""
        return self.logits.permute(1, 2, 0)

    def set_schedule(self, tau: float, kappa: float, progress: float) -> None:
        self.tau, self.kappa, self.progress = float(tau), float(kappa), float(progress)
        self._sq_norm = None  # a stale value from a step whose regularizer was never taken

    @torch.no_grad()
    def init_from_prior(self, prior: Tensor, strength: float, sigma: float) -> None:
        self.logits.copy_(prior_logits(prior.to(self.logits.device), self.n, self.m, strength, sigma))

    def sample_noise(self) -> Tensor:
        """A fresh [C, out, in/M] Gumbel sample (from the global RNG)."""
        return gumbel_noise(self.logits.shape, _draw_seed(), self.logits.device, self.logits.dtype)

    def soft(self, noise: Tensor | None = None) -> Tensor:
        """The [out, in] soft mask by plain autograd ops (the fused path is `masked_linear`)."""
        noise = self.sample_noise() if noise is None else noise
        probs = gumbel_probs(self.logits, noise, self.tau, self.kappa)
        return soft_from_probs(probs, self.n, self.m)

    def hard(self) -> Tensor:
        index = self.logits.detach().argmax(0)  # [out, G]
        return self.candidates[index].reshape(self.out_features, self.in_features)

    def regularizer_scale(self) -> float:
        """The factor of ||W ⊙ soft||^2 in the loss now: -lambda * (1 - t/T)."""
        return -self.sparse_weight_reg * (1.0 - self.progress)

    def regularizer(self, weight: Tensor) -> Tensor:
        """-lambda * (1 - t/T) * ||W ⊙ soft||^2: with the soft mask of the latest training forward when there
        was one (as MaskLLM), else a fresh sample."""
        scale = self.regularizer_scale()
        sq, self._sq_norm = self._sq_norm, None
        if scale == 0.0:
            return weight.new_zeros((), dtype=torch.float32)
        if sq is None:
            sq = (weight.detach() * self.soft().to(weight.dtype)).pow(2).sum()
        return sq.float() * scale

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The training-mode layer: fused, memory-light x @ (W ⊙ soft)^T + b."""
        want_sq = self.regularizer_scale() != 0.0
        store = self.store_noise if self.store_noise is not None else self.logits.device.type == "cpu"
        noise = _draw_seed()
        if store:  # the rounded sample is what the forward uses too: forward and backward agree exactly
            noise = gumbel_noise(self.logits.shape, noise, self.logits.device, self.logits.dtype).to(NOISE_DTYPE)
        y, sq = masked_linear(x, weight, bias, self.logits, noise, self.tau, self.kappa, self.n, self.m, want_sq)
        self._sq_norm = sq if want_sq else None
        return y

    def extra_repr(self) -> str:
        return f"{self.n}:{self.m}, out={self.out_features}, in={self.in_features}, candidates={len(self.candidates)}"


def _draw_seed() -> int:
    """A seed drawn from the global torch RNG, so `torch.manual_seed` makes whole runs reproducible; under
    data parallelism each process draws its own noise (the processes share the global seed)."""
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        seed = (seed + 1_000_003 * torch.distributed.get_rank()) % 2**62
    return seed


class NMGumbelLinear(WeightMasked):
    """WeightMasked whose training forward is the fused `masked_linear` (eval: W ⊙ hard, as every wrapper)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.mask.training:
            return self.mask.linear(x, weight_matrix(self.base), self.base.bias)
        return super().forward(x)


# ------------------------------------------------------------------------------------------ config + attach

class NMGumbelConfig(MethodConfig):
    """MaskLLM's learnable N:M masks (Gumbel-softmax over the C(M,N) candidates of each group). Sample YAML,
    every default spelled out (MaskLLM's scripts: tau 4 -> 0.05, kappa 1e2 -> 5e2, prior strength 3,
    weight regularization 1e-5):

        method:
          name: nm_gumbel
          sparsity: 2:4              # N:M only (any N < M)
          prior: sparsegpt           # sparsegpt | wanda | magnitude | none | a run directory (mask transfer)
          prior_strength: 3.0        # prior candidate raised by strength * init_std (noise-free logits)
          init_std: 0.01             # logit scale: unit of the prior shift; std of the init with prior none
          tau_start: 4.0             # Gumbel-softmax temperature, annealed to tau_end
          tau_end: 0.05
          kappa_start: 100.0         # logit scale factor, annealed to kappa_end
          kappa_end: 500.0
          schedule: linear           # linear | cosine | constant, for tau and kappa
          sparse_weight_reg: 1.0e-5  # loss -= lambda * (1 - t/T) * sum ||W ⊙ soft||^2 (0: off)
          prior_update_weights: false  # apply SparseGPT's weight update (prior: sparsegpt) before learning
        train: {steps: 500}          # the logits are what trains (MaskPrune's one trainer)
    """

    prior: str = Field("sparsegpt", description="initial mask: sparsegpt | wanda | magnitude | none | a run directory")
    prior_strength: float = Field(3.0, ge=0, description="the prior candidate's lead, in units of init_std")
    init_std: float = Field(0.01, gt=0, description="logit scale: the prior shift's unit; init std with prior none")
    tau_start: float = Field(4.0, description="Gumbel-softmax temperature at step 0")
    tau_end: float = Field(0.05, description="Gumbel-softmax temperature at the last step")
    kappa_start: float = Field(100.0, description="logit scale factor at step 0")
    kappa_end: float = Field(500.0, description="logit scale factor at the last step")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="how tau and kappa move")
    sparse_weight_reg: float = Field(1e-5, ge=0, description="lambda of the sparse-weight regularizer (0: off)")
    prior_update_weights: bool = Field(False, description="apply SparseGPT's weight update to the frozen weights")

    @field_validator("tau_start", "tau_end", "kappa_start", "kappa_end")
    @classmethod
    def _positive(cls, value: float, info):
        if not value > 0:
            what = "temperature (it divides the logits)" if info.field_name.startswith("tau") else "logit scale"
            raise ValueError(f"{info.field_name} must be > 0: it is the Gumbel-softmax {what}; got {value}.")
        return value

    @field_validator("prior")
    @classmethod
    def _known_prior(cls, value: str):
        looks_like_path = "/" in value or "\\" in value or Path(value).expanduser().is_dir()
        if value not in (*ONESHOT_PRIORS, "none") and not looks_like_path:
            raise ValueError(
                f"prior {value!r} is neither {', '.join(ONESHOT_PRIORS)}, none, nor a run directory "
                "(a path such as runs/my-run whose masks.safetensors to start from)."
            )
        return value

    @model_validator(mode="after")
    def _nm_only(self):
        pattern = parse_sparsity(self.sparsity)
        if not pattern.is_nm:
            raise ValueError(
                f"nm_gumbel learns N:M masks; use 2:4 (or another N:M such as 4:8), not the fraction "
                f"{self.sparsity}. For unstructured sparsity use magnitude, wanda or sparsegpt."
            )
        count = math.comb(pattern.m, pattern.n)
        if count > MAX_CANDIDATES:
            raise ValueError(
                f"{pattern} has {count} candidate patterns per group ({count / pattern.m:.0f} logits per weight); "
                f"nm_gumbel supports at most {MAX_CANDIDATES}, e.g. 2:4, 1:4, 4:8."
            )
        if self.prior_update_weights and self.prior != "sparsegpt":
            raise ValueError("prior_update_weights applies SparseGPT's weight update; it needs prior: sparsegpt.")
        return self

    @property
    def changes_weights(self) -> bool:
        return self.prior_update_weights


class NMGumbelObjective(Objective):
    """Sets tau/kappa/progress on the masks each step; the regularizer -lambda (1-t/T) sum ||W ⊙ soft||^2."""

    def __init__(self, config: NMGumbelConfig, masks: list[NMGumbelMask]):
        self.config = config
        self.masks = masks

    def schedule(self, step: int, total_steps: int) -> dict[str, float]:
        progress = min(max(step / total_steps, 0.0), 1.0) if total_steps > 0 else 1.0
        c = self.config
        return {
            "tau": scheduled(c.tau_start, c.tau_end, progress, c.schedule),
            "kappa": scheduled(c.kappa_start, c.kappa_end, progress, c.schedule),
            "progress": progress,
        }

    def begin_step(self, step: int, total_steps: int) -> dict[str, float]:
        values = self.schedule(step, total_steps)
        for mask in self.masks:
            mask.set_schedule(values["tau"], values["kappa"], values["progress"])
        return {"tau": values["tau"], "kappa": values["kappa"],
                "reg_scale": self.config.sparse_weight_reg * (1.0 - values["progress"])}

    def regularizer(self, model: nn.Module) -> Tensor:
        terms = [wrapper.mask.regularizer(weight_matrix(wrapper.base)) for wrapper in wrappers(model).values()
                 if isinstance(wrapper.mask, NMGumbelMask)]
        if not terms:
            return torch.zeros(())
        return torch.stack([term.to(terms[0].device) for term in terms]).sum()


def compute_prior(model: nn.Module, names: list[str], config: NMGumbelConfig, pattern: Sparsity,
                  calibration: Tensor | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """({name: bool prior}, {name: SparseGPT-updated weight}) for the configured prior; ({}, {}) for none."""
    prior = config.prior
    if prior == "none":
        return {}, {}
    if prior == "magnitude":
        return oneshot.magnitude(model, names, pattern).masks, {}
    if prior in ("wanda", "sparsegpt") and calibration is None:
        raise UserInputError(f"prior {prior} needs calibration blocks; use prior: magnitude or none without data.")
    if prior == "wanda":
        return oneshot.wanda(model, names, pattern, "row", calibration).masks, {}
    if prior == "sparsegpt":
        result = oneshot.sparsegpt(model, names, pattern, calibration, update_weights=True)
        return result.masks, result.weights
    return transferred_prior(model, names, pattern, prior), {}


def transferred_prior(model: nn.Module, names: list[str], pattern: Sparsity, run: str | Path) -> dict[str, Tensor]:
    """The hard masks saved in a run directory, checked against this model's targets, shapes and pattern."""
    masks, meta = read_masks(Path(run).expanduser())
    saved = (meta.get("config") or {}).get("sparsity")
    try:
        saved_pattern = parse_sparsity(saved) if saved is not None else None
    except UserInputError:
        saved_pattern = None
    if saved is not None and saved_pattern != pattern:
        raise UserInputError(
            f"the masks in {run} were learned for sparsity {saved}, not {pattern}; "
            f"a prior must have the same N:M pattern. Use a {pattern} run, or set method.sparsity to {saved}."
        )
    not_nm = [name for name, keep in masks.items() if keep.dim() != 2 or encode_nm(keep, pattern.n, pattern.m) is None]
    if not_nm:
        raise UserInputError(
            f"the masks in {run} are not exactly {pattern} (e.g. {', '.join(not_nm[:3])}); a prior must keep "
            f"{pattern.n} of every {pattern.m} weights. Use a run pruned to {pattern}."
        )
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in masks]
    extra = [name for name in masks if name not in names]
    wrong = [
        f"{name} (saved {tuple(masks[name].shape)}, weight {tuple(weight_matrix(modules[name]).shape)})"
        for name in names if name in masks and tuple(masks[name].shape) != tuple(weight_matrix(modules[name]).shape)
    ]
    if missing or extra or wrong:
        details = "; ".join(filter(None, [
            f"no saved mask for {', '.join(missing[:4])}" if missing else "",
            f"saved masks for modules not targeted here: {', '.join(extra[:4])}" if extra else "",
            f"shapes differ: {', '.join(wrong[:4])}" if wrong else "",
        ]))
        raise UserInputError(
            f"the masks in {run} (model {meta.get('model', '?')}) do not fit this model's targets: {details}. "
            "Transfer masks between runs of the same model with the same method.targets."
        )
    return masks


@register_method("nm_gumbel", NMGumbelConfig, kind="learnable", needs_calibration=True)
def attach_nm_gumbel(model: nn.Module, config: NMGumbelConfig, calibration: Tensor | None) -> NMGumbelObjective:
    """Wrap every target with a learnable N:M mask initialized from the prior; return the training objective."""
    pattern = config.pattern
    names = method_targets(model, config.targets, pattern, config.skip_incompatible)
    priors, updated = compute_prior(model, names, config, pattern, calibration)
    modules = dict(model.named_modules())
    if config.prior_update_weights:
        with torch.no_grad():
            for name, weight in updated.items():
                weight_matrix(modules[name]).copy_(weight)
    wrapped, masks = {}, []
    for name in names:
        weight = weight_matrix(modules[name])
        mask = NMGumbelMask(*weight.shape, pattern.n, pattern.m, tau=config.tau_start, kappa=config.kappa_start,
                            sparse_weight_reg=config.sparse_weight_reg, init_std=config.init_std,
                            device=weight.device)
        if name in priors:
            mask.init_from_prior(priors[name], config.prior_strength, config.init_std)
        wrapped[name] = NMGumbelLinear(modules[name], mask)
        masks.append(mask)
    wrap(model, wrapped)
    return NMGumbelObjective(config, masks)
