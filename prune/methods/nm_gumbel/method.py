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
sigma; with prior strength 3 the noise then hands a share of the groups to another candidate at step 0, which
wrecks the prior (benchmarks/RESULTS.md, section `code_figures`). We therefore start from noise-free logits
equal to the shift, with sigma = `init_std` (0.01, the std of MaskLLM's init): the prior candidate beats every other
one by at least prior_strength * sigma in every group, so the hard mask at step 0 is the prior exactly,
and the scaled logits kappa * logits have the same spread as MaskLLM's. Exploration comes from the
Gumbel noise of each forward, not from the init. Without a prior (`prior: none`) the logits are drawn from
N(0, init_std^2) as in MaskLLM.

The fused forward/backward of the masked linear lives in `prune.methods.nm_gumbel.kernel`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from prune.core.errors import UserInputError
from prune.core.schedules import scheduled
from prune.core.sparsity import Sparsity, parse_sparsity
from prune.masks.base import Mask, Objective, WeightMasked, wrap, wrappers
from prune.masks.storage import encode_nm, nm_candidates, read_masks
from prune.masks.targets import method_targets
from prune.methods.nm_gumbel import config as declared
from prune.methods.nm_gumbel.config import ONESHOT_PRIORS, NMGumbelConfig
from prune.methods.nm_gumbel.kernel import gumbel_noise, gumbel_probs, masked_linear, soft_from_probs
from prune.methods.oneshot import method as oneshot
from prune.methods.spec import MethodSpec
from prune.models.blocks import weight_matrix

# stored Gumbel noise: bfloat16 converts faster than float16 on CPU (benchmarks/RESULTS.md, `code_figures`); a
# relative rounding of 2^-9 of the noise is immaterial next to the logit gaps it perturbs
NOISE_DTYPE = torch.bfloat16


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

    def __init__(
        self,
        out_features: int,
        in_features: int,
        n: int,
        m: int,
        *,
        tau: float = 4.0,
        kappa: float = 100.0,
        sparse_weight_reg: float = 0.0,
        init_std: float = 0.01,
        store_noise: bool | None = None,
        device=None,
    ):
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
        # is not. Step time and peak memory of both: benchmarks/RESULTS.md, section `nm_step`.
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
        # max(0).indices, not argmax(0): the same first-maximum index, but on CPU torch's argmax over a short
        # leading dimension (the C candidates) takes a slow path, several times slower.
        index = self.logits.detach().max(0).indices  # [out, G]
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


# --------------------------------------------------------------------------------------------------- attach


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
        return {
            "tau": values["tau"],
            "kappa": values["kappa"],
            "reg_scale": self.config.sparse_weight_reg * (1.0 - values["progress"]),
        }

    def regularizer(self, model: nn.Module) -> Tensor:
        terms = [
            wrapper.mask.regularizer(weight_matrix(wrapper.base))
            for wrapper in wrappers(model).values()
            if isinstance(wrapper.mask, NMGumbelMask)
        ]
        if not terms:
            return torch.zeros(())
        return torch.stack([term.to(terms[0].device) for term in terms]).sum()


def compute_prior(
    model: nn.Module, names: list[str], config: NMGumbelConfig, pattern: Sparsity, calibration: Tensor | None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
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
        for name in names
        if name in masks and tuple(masks[name].shape) != tuple(weight_matrix(modules[name]).shape)
    ]
    if missing or extra or wrong:
        details = "; ".join(
            filter(
                None,
                [
                    f"no saved mask for {', '.join(missing[:4])}" if missing else "",
                    f"saved masks for modules not targeted here: {', '.join(extra[:4])}" if extra else "",
                    f"shapes differ: {', '.join(wrong[:4])}" if wrong else "",
                ],
            )
        )
        raise UserInputError(
            f"the masks in {run} (model {meta.get('model', '?')}) do not fit this model's targets: {details}. "
            "Transfer masks between runs of the same model with the same method.targets."
        )
    return masks


def nm_gumbel_targets(model: nn.Module, config: NMGumbelConfig) -> list[str]:
    return method_targets(model, config.targets, config.pattern, config.skip_incompatible)


def check_prior_run(model: nn.Module, config: NMGumbelConfig) -> None:
    """A prior taken from another run (a path): its masks exist, have this pattern and fit this model's targets."""
    if config.prior not in (*ONESHOT_PRIORS, "none"):
        try:
            transferred_prior(model, nm_gumbel_targets(model, config), config.pattern, config.prior)
        except UserInputError as error:
            raise UserInputError(f"method.prior {config.prior!r}: {error}") from None


def attach_nm_gumbel(model: nn.Module, config: NMGumbelConfig, calibration: Tensor | None) -> NMGumbelObjective:
    """Wrap every target with a learnable N:M mask initialized from the prior; return the training objective."""
    pattern = config.pattern
    names = nm_gumbel_targets(model, config)
    priors, updated = compute_prior(model, names, config, pattern, calibration)
    modules = dict(model.named_modules())
    if config.prior_update_weights:
        with torch.no_grad():
            for name, weight in updated.items():
                weight_matrix(modules[name]).copy_(weight)
    wrapped, masks = {}, []
    for name in names:
        weight = weight_matrix(modules[name])
        mask = NMGumbelMask(
            *weight.shape,
            pattern.n,
            pattern.m,
            tau=config.tau_start,
            kappa=config.kappa_start,
            sparse_weight_reg=config.sparse_weight_reg,
            init_std=config.init_std,
            device=weight.device,
        )
        if name in priors:
            mask.init_from_prior(priors[name], config.prior_strength, config.init_std)
        wrapped[name] = NMGumbelLinear(modules[name], mask)
        masks.append(mask)
    wrap(model, wrapped)
    return NMGumbelObjective(config, masks)


NM_GUMBEL = MethodSpec(
    declared.NM_GUMBEL,
    attach_nm_gumbel,
    needs_calibration=True,
    fsdp=True,
    targets=nm_gumbel_targets,
    check=check_prior_run,
    trained_per_weight=lambda config: math.comb(config.pattern.m, config.pattern.n) / config.pattern.m,
)
