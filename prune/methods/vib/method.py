"""VIB masks (VTrans): variational information-bottleneck gates on heads, FFN neurons, the hidden dimension
and whole layers, trained to a parameter or FLOPs budget, then exported as a really smaller model.

Gate (one per unit, our code after Dai et al. 2018 / VTrans): parameters mu and log sigma^2, initialised at
mu = 1, log sigma^2 = -9. Training multiplies the unit's output by z = mu + eps * sigma (eps ~ N(0, 1), fresh
every forward); evaluation and export use the deterministic z = mu on kept units and 0 on the others.
log alpha = log sigma^2 - log mu^2; a unit is kept when log alpha < 0 (count rules can override this: a
layer keeps at least one head unit and one FFN neuron so it stays a valid layer, and `export.round_to` /
`export.uniform` adjust counts, keeping the units of lowest log alpha). The information penalty is
KL = 1/2 * sum log(1 + mu^2 / sigma^2) = 1/2 * sum softplus(-log alpha).

Budget: s = 1 - E[size] / dense size is the expected share removed, in parameters or FLOPs (prune.structural.layout,
from the keep probabilities P(keep) = sigmoid(-log alpha / keep_temperature)). The Lagrangian
lambda1 (s - t) + lambda2 (s - t)^2 pulls s to the target t, which warms up linearly from 0 over the first
`target_warmup` share of the steps; lambda1 and lambda2 are trained by gradient *ascent* (a hook negates their
gradients), at `lagrangian_lr_scale` times the mask learning rate.

`budget_value: hard` (the default) evaluates s at the hard decisions while its gradient stays that of the
expected share (straight-through). Why: the KL keeps pushing every unit toward the keep boundary, where
P(keep) is fractional, so a constraint met in expectation can leave the real size far from the target (the toy
problem of tests/test_vib.py shows both forms). With the hard value the multipliers see the real gap and
stop only when the model that will be exported meets the target. `budget_value: expected` is the plain form.

Variants (VTrans): all three train the masks only, as the one trainer does: full = the whole train split,
Fast = a share of it (`data.fraction`, e.g. 0.05), Faster = mask-only training, which is what every run here is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prune.core.distributed import whole
from prune.core.errors import UserInputError
from prune.masks.base import Objective
from prune.methods.spec import MethodSpec
from prune.methods.vib import config as declared
from prune.methods.vib.config import VIBConfig
from prune.structural.config import FFN, HEADS, HIDDEN, LAYERS, StructuralBudgetConfig
from prune.structural.gates import GateSet, UnitGate, attach_unit_gates
from prune.structural.layout import structure_of
from prune.structural.store import (
    budget_reachable,
    export_gated,
    load_gated,
    report_gated,
    save_gates,
)

# periodic evaluations keep the best masks only among those removing at least the target share minus this
BUDGET_TOLERANCE = 0.01


class VIBGate(UnitGate):
    """mu and log sigma^2 per unit (see the module doc). Both are read whole (prune.core.distributed.whole): under
    FSDP the budget, the KL and the hidden-dimension gate (applied in every block, owned by the embeddings) read
    them outside the forward of the shard group that holds them."""

    def __init__(
        self,
        kind: str,
        size: int,
        layer: int | None = None,
        *,
        mu_init: float = 1.0,
        log_sigma2_init: float = -9.0,
        keep_temperature: float = 1.0,
        log_sigma2_lr_scale: float = 1.0,
        device=None,
    ):
        super().__init__(kind, size, layer)
        self.mu = nn.Parameter(torch.full((size,), float(mu_init), device=device))
        self.log_sigma2 = nn.Parameter(torch.full((size,), float(log_sigma2_init), device=device))
        self.log_sigma2.lr_scale = log_sigma2_lr_scale  # read by the trainer (prune.training.trainer.param_groups)
        self.keep_temperature = float(keep_temperature)

    def log_alpha(self) -> Tensor:
        return whole(self.log_sigma2) - torch.log(whole(self.mu).pow(2) + 1e-12)

    def natural_keep(self) -> Tensor:
        return self.log_alpha().detach() < 0

    def score(self) -> Tensor:
        return -self.log_alpha().detach()

    def scale(self) -> Tensor:
        return whole(self.mu)

    def sample(self) -> Tensor:
        mu = whole(self.mu)
        return mu + torch.randn_like(mu) * torch.exp(0.5 * whole(self.log_sigma2))

    def keep_probability(self) -> Tensor:
        return torch.sigmoid(-self.log_alpha() / self.keep_temperature)

    def kl(self) -> Tensor:
        """1/2 * sum log(1 + mu^2 / sigma^2), written stably as 1/2 * sum softplus(-log alpha)."""
        return 0.5 * nn.functional.softplus(-self.log_alpha()).sum()


def configure_counts(gates: GateSet, config: StructuralBudgetConfig) -> None:
    """Count rules: at least one head unit and one neuron per layer, one hidden channel; rounding; uniform."""
    structure = gates.structure
    if config.round_to is not None:
        widths = {FFN: min(structure.ffn), HIDDEN: structure.hidden}
        gated = {kind: width for kind, width in widths.items() if gates.by_kind(kind)}
        if not gated:
            raise UserInputError("export.round_to rounds FFN and hidden sizes; switch on units.ffn or units.hidden.")
        for kind, width in gated.items():
            if config.round_to > width:
                raise UserInputError(
                    f"export.round_to {config.round_to} is larger than the {kind} dimension ({width}); "
                    f"use a multiple such as 8 or 64 that is at most {width}."
                )
    for kind in (HEADS, FFN, HIDDEN):  # a layer keeps a valid attention and FFN (GPT-2 cannot run 0 neurons)
        for gate in gates.by_kind(kind):
            gate.min_keep = 1
    for kind in (FFN, HIDDEN):
        for gate in gates.by_kind(kind):
            gate.round_to = config.round_to
    if config.uniform:
        for kind in (HEADS, FFN):
            peers = gates.by_kind(kind)
            for gate in peers:
                gate.peers = peers
        if gates.hidden is not None and structure.family == "llama":  # its config needs hidden % heads == 0
            heads = gates.by_kind(HEADS)
            gates.hidden.align = (heads[0] if heads else None, structure.q_per_group, structure.heads[0])


def check_structural_config(model: nn.Module, config: StructuralBudgetConfig, kinds: set[str]):
    """The structure, after the checks that need the model (reachable target, supported layer dropping)."""
    structure = structure_of(model)
    if LAYERS in kinds and getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise UserInputError(
            "units.layers cannot drop layers of a GPT-2 that scales attention by layer index "
            "(scale_attn_by_inverse_layer_idx); switch units.layers off."
        )
    budget_reachable(structure, kinds, config.quantity, config.share, config.flops_seq_len)
    return structure


class VIBObjective(Objective):
    """KL + Lagrangian budget; the multipliers are extra parameters trained by ascent."""

    def __init__(self, gates: GateSet, config: VIBConfig):
        self.gates, self.config = gates, config
        structure = gates.structure
        self.dense = float(structure.size(structure.full_counts(), config.quantity, config.flops_seq_len))
        self.units = sum(gate.size for gate in gates.all())
        device = gates.all()[0].mu.device
        self.lambdas = [nn.Parameter(torch.zeros((), device=device)) for _ in range(2)]
        for param in self.lambdas:
            param.register_hook(lambda grad: -grad)  # gradient ascent under the shared minimizing optimizer
            param.lr_scale = config.lagrangian_lr_scale
        self.budget = 0.0
        self.last: dict[str, float] = {}

    def budget_at(self, step: int, total_steps: int) -> float:
        warmup = self.config.target_warmup * total_steps
        return self.config.share * (1.0 if warmup <= 0 else min(1.0, step / warmup))

    def expected_removed(self) -> Tensor:
        counts = self.gates.counts(expected=True)
        size = self.gates.structure.size(counts, self.config.quantity, self.config.flops_seq_len)
        return 1.0 - size / self.dense

    def hard_removed(self) -> float:
        size = self.gates.structure.size(self.gates.counts(), self.config.quantity, self.config.flops_seq_len)
        return 1.0 - float(size) / self.dense

    def begin_step(self, step: int, total_steps: int) -> dict[str, float]:
        self.budget = self.budget_at(step, total_steps)
        return {
            "target": self.budget,
            "hard_removed": self.hard_removed(),
            "lambda1": self.lambdas[0].item(),
            "lambda2": self.lambdas[1].item(),
            **self.last,
        }

    def regularizer(self, model: nn.Module) -> Tensor:
        kl = torch.stack([gate.kl() for gate in self.gates.all()]).sum() / self.units
        removed = self.expected_removed()
        self.last = {"expected_removed": removed.item(), "kl": kl.item()}
        if self.config.budget_value == "hard":
            removed = removed + (self.hard_removed() - removed).detach()
        gap = removed - self.budget
        lagrangian = self.lambdas[0] * gap + self.lambdas[1] * gap * gap
        return self.config.kl_weight * kl + lagrangian

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.lambdas)

    def selectable(self) -> bool:
        """The hard masks remove the target share, give or take BUDGET_TOLERANCE."""
        return self.hard_removed() >= self.config.share - BUDGET_TOLERANCE


def attach_vib(model: nn.Module, config: VIBConfig, calibration: Tensor | None) -> VIBObjective:
    """Wrap the model's structural units with VIB gates; return the KL + budget objective."""
    kinds = config.units.kinds()
    structure = check_structural_config(model, config, kinds)
    device = next(model.parameters()).device

    def make(kind: str, size: int, layer: int | None):
        if kind not in kinds:
            return None
        return VIBGate(
            kind,
            size,
            layer,
            mu_init=config.mu_init,
            log_sigma2_init=config.log_sigma2_init,
            keep_temperature=config.keep_temperature,
            log_sigma2_lr_scale=config.log_sigma2_lr_scale,
            device=device,
        )

    gates = attach_unit_gates(model, structure, make)
    configure_counts(gates, config)
    return VIBObjective(gates, config)


VIB = MethodSpec(
    declared.VIB,
    attach_vib,
    needs_calibration=False,
    fsdp=True,
    save=save_gates,
    load=load_gated,
    export=export_gated,
    report=report_gated,
)
