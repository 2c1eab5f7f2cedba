"""Which modules dynamic gating can target, the wrappers that gate them, and per-input FLOPs accounting.

Gate sites (the modules gating can wrap), found by structure (no model class tables):
- a Conv2d+BatchNorm2d block: a module whose children are exactly (Conv2d, BatchNorm2d[, a parameter-free
  activation]) -- HF ResNet's `ResNetConvLayer` and `ResNetShortCut`, `nn.Sequential(conv, bn, relu)` --
  wrapped whole; or, in any other parent, a Conv2d child registered right before the BatchNorm2d that
  normalizes it (torchvision's conv1/bn1 convention): the pair moves into the wrapper and the BN slot
  becomes nn.Identity (same function, so unwrap gives back conv+BN, not the original two slots);
- a transformer FFN: Llama-style (gate_proj, up_proj, down_proj, act_fn) or GPT-2-style (c_fc, c_proj, act).

A gated layer computes its output y, the gate keeps a subset of its output channels (conv) or intermediate
neurons (FFN, per token), and the rest are zero. While the gate trains, the wrapper records the predictor's
logits and the labels from the unmasked y (prune.methods.gating.predictor), and by default passes on the
*masked* output, as FTWT's code does (`out = out * mask_binary` in ConvWithMask.forward, training included):
each predictor then learns on the inputs it will see at inference. `train_masked=False` passes the unmasked
output instead. In eval mode an FFN runs the sparse path (prune.methods.gating.sparse_ffn); a conv computes every
channel and zeroes the unselected ones (the FLOPs figures count what a channel-skipping kernel would run).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
from torch import Tensor, nn

from prune.core.errors import UserInputError
from prune.masks.base import MaskWrapper, bypassing, wrappers
from prune.masks.targets import select_by_glob
from prune.methods.gating.predictor import GatingMask, uniform_labels
from prune.methods.gating.sparse_ffn import (
    PackedFFN,
    ffn_flops,
    intermediate,
    output,
    pack_gated,
    pack_plain,
    sparse_ffn,
)
from prune.models.blocks import LINEAR_TYPES, weight_matrix

FFN_KINDS = ("ffn_gated", "ffn_plain")
EXPECTED = (
    "a Conv2d followed by its BatchNorm2d, or a transformer FFN with gate_proj/up_proj/down_proj + act_fn "
    "(Llama) or c_fc/c_proj + act (GPT-2)"
)


# ------------------------------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class GateSite:
    kind: str  # ffn_gated | ffn_plain | conv_block | conv_pair
    bn_name: str | None = None  # conv_pair: the qualified name of the BN that follows the conv


def ffn_kind(module: nn.Module) -> str | None:
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) and callable(
        getattr(module, "act_fn", None)
    ):
        return "ffn_gated"
    if all(isinstance(getattr(module, n, None), LINEAR_TYPES) for n in ("c_fc", "c_proj")) and callable(
        getattr(module, "act", None)
    ):
        return "ffn_plain"
    return None


def _bn_follows(conv: nn.Module, bn: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels


def is_conv_block(module: nn.Module) -> bool:
    children = list(module.children())
    return (
        len(children) in (2, 3)
        and _bn_follows(children[0], children[1])
        and (len(children) == 2 or not any(True for _ in children[2].parameters()))
    )


def find_gate_sites(model: nn.Module) -> dict[str, GateSite]:
    """Every gate site by qualified name (a conv pair is named by its conv)."""
    sites: dict[str, GateSite] = {}
    gated = [name for name, module in model.named_modules() if isinstance(module, GatedLayer)]
    for name, module in model.named_modules():
        if any(name == g or name.startswith(f"{g}.") for g in gated):
            continue  # already gated
        prefix = f"{name}." if name else ""
        kind = ffn_kind(module)
        if kind is not None:
            sites[name] = GateSite(kind)
        elif is_conv_block(module):
            sites[name] = GateSite("conv_block")
        else:
            children = list(module.named_children())
            for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
                if _bn_follows(conv, bn):
                    sites[prefix + conv_name] = GateSite("conv_pair", prefix + bn_name)
    inside_others = [n for n in sites if any(n.startswith(f"{other}.") for other in sites if other != n)]
    return {n: site for n, site in sites.items() if n not in inside_others}


def describe(name: str, module: nn.Module) -> str:
    children = ", ".join(f"{n}: {type(c).__name__}" for n, c in module.named_children()) or "no children"
    return f"{name or '<root>'} ({type(module).__name__} with {children})"


def select_gate_sites(model: nn.Module, patterns: list[str] | None) -> dict[str, GateSite]:
    """The sites to gate: those matching the glob patterns; by default every FFN (else every conv block)."""
    sites = find_gate_sites(model)
    if not sites:
        raise UserInputError(f"{type(model).__name__} has nothing gating can target; it needs {EXPECTED}.")
    if patterns is None:
        ffns = {name: site for name, site in sites.items() if site.kind in FFN_KINDS}
        return ffns or sites
    modules = dict(model.named_modules())

    def not_gateable(pattern: str) -> str:
        found = [describe(name, module) for name, module in modules.items() if fnmatchcase(name, pattern)][:3]
        return f" (it matches {'; '.join(found)}: gating needs {EXPECTED})" if found else ""

    chosen = select_by_glob(list(sites), patterns, "gateable module", example="*.mlp", explain=not_gateable)
    return {name: sites[name] for name in chosen}


# -------------------------------------------------------------------------------------------------- wrappers


@dataclass
class GateStats:
    """Sums over the inputs (images or tokens) seen while accounting; per-input figures divide by `inputs`."""

    channels: int
    inputs: int = 0
    kept: float = 0.0
    dense_flops: float = 0.0
    gated_flops: float = 0.0  # what runs: the selected channels plus the predictor
    predictor_flops: float = 0.0
    labels: float = 0.0  # channels the k(x) rule would keep
    hits_label: float = 0.0  # selected and labelled keep
    hits_oracle: float = 0.0  # selected and among the top-k(selected) channels by score (the oracle's choice)

    def add(
        self, keep: Tensor, scores: Tensor, labels: Tensor, dense: float, computed: Tensor, predictor: float
    ) -> None:
        """One batch: keep/scores/labels [inputs, channels]; `dense` and `predictor` FLOPs per input;
        `computed` [inputs] the FLOPs the chosen channels need."""
        counts = keep.sum(dim=-1)
        self.inputs += keep.shape[0]
        self.kept += float(counts.sum())
        self.dense_flops += dense * keep.shape[0]
        self.gated_flops += float(computed.sum()) + predictor * keep.shape[0]
        self.predictor_flops += predictor * keep.shape[0]
        self.labels += float(labels.sum())
        self.hits_label += float((keep & labels).sum())
        self.hits_oracle += float(oracle_overlap(scores, keep, counts))


def oracle_overlap(scores: Tensor, keep: Tensor, counts: Tensor) -> Tensor:
    """Per input, how many selected channels are among the `counts` highest-scoring ones."""
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 = highest score
    return (keep & (rank < counts.unsqueeze(-1))).sum()


class GatedLayer(MaskWrapper):
    """Shared parts: `bypass` runs the base module untouched (the dense model), `stats` collects accounting."""

    mask: GatingMask

    def __init__(self, base: nn.Module, mask: GatingMask, train_masked: bool = True):
        super().__init__(base, mask)
        self.train_masked = train_masked
        self.bypass = False
        self.stats: GateStats | None = None

    def merged(self) -> nn.Module:
        raise UserInputError(
            "a gated layer chooses its channels per input, so no fixed mask can be merged into "
            "its weights; restore the gated model with prune.load_model(run_dir)."
        )


class GatedConv(GatedLayer):
    """Gates the output channels of a Conv2d+BN(+activation) block per image."""

    def _conv(self) -> nn.Conv2d:
        return next(m for m in self.base.children() if isinstance(m, nn.Conv2d))

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.bypass:
            return y
        logits, keep = self.mask.predict(x.mean(dim=(2, 3)))
        if self.mask.training:
            self.mask.remember(logits, y.detach().abs().amax(dim=(2, 3)), keep)
            if not self.train_masked:
                return y
        elif self.stats is not None:
            self._account(x, y, keep)
        return y * keep[:, :, None, None].to(y.dtype)

    @torch.no_grad()
    def _account(self, x: Tensor, y: Tensor, keep: Tensor) -> None:
        conv = self._conv()
        per_channel = (
            2 * (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1] * y.shape[2] * y.shape[3]
        )
        if conv.groups == 1:  # input channels that are zero everywhere (a gated producer) need no work
            active_in = (x.abs().amax(dim=(2, 3)) > 0).sum(dim=1)
            computed = keep.sum(dim=1) * active_in * (per_channel // conv.in_channels)
        else:
            computed = keep.sum(dim=1) * per_channel
        predictor = self.mask.predictor.flops() + x[0].numel()  # linear map(s) + the spatial mean's adds
        scores = y.abs().amax(dim=(2, 3))
        self.stats.add(keep, scores, self.mask.rule(scores), per_channel * conv.out_channels, computed, predictor)


class ConvBN(nn.Module):
    """A conv and the BN that normalizes it, moved together into a wrapper (the torchvision conv1/bn1 case)."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class GatedFFN(GatedLayer):
    """Gates the intermediate neurons of a transformer FFN per token; eval mode runs the sparse path."""

    def __init__(self, base: nn.Module, mask: GatingMask, train_masked: bool = True, max_union: float = 0.9):
        kind = ffn_kind(base)
        if kind is None:
            raise UserInputError(f"cannot gate {describe('FFN', base)}: gating needs {EXPECTED}.")
        super().__init__(base, mask, train_masked)
        self.gated = kind == "ffn_gated"
        self.max_union = max_union
        self.oracle_fraction: float | None = None  # set by `oracle()`: keep this share of each token's top |h|
        self._packed: PackedFFN | None = None

    def _intermediate(self, x: Tensor) -> Tensor:
        base = self.base
        return base.act_fn(base.gate_proj(x)) * base.up_proj(x) if self.gated else base.act(base.c_fc(x))

    def _down(self, h: Tensor) -> Tensor:
        base = self.base
        if self.gated:
            return base.down_proj(h)
        y = base.c_proj(h)
        return base.dropout(y) if hasattr(base, "dropout") else y

    def packed(self) -> PackedFFN:
        """Neuron-major copies of the FFN weights for the sparse path (made once, remade if weights change)."""
        base = self.base
        if self.gated:
            current = (
                base.gate_proj.weight,
                base.up_proj.weight,
                base.down_proj.weight,
                base.gate_proj.bias,
                base.up_proj.bias,
                base.down_proj.bias,
            )
        else:
            current = (base.c_fc.weight, base.c_proj.weight, base.c_fc.bias, base.c_proj.bias)
        versions = tuple(t._version for t in current if t is not None)
        if self._packed is None or self._packed.source_versions != versions:
            if self.gated:
                self._packed = pack_gated(base.gate_proj, base.up_proj, base.down_proj, base.act_fn)
            else:
                self._packed = pack_plain(
                    weight_matrix(base.c_fc).detach(),
                    base.c_fc.bias,
                    weight_matrix(base.c_proj).detach().t(),
                    base.c_proj.bias,
                    base.act,
                )
        return self._packed

    def forward(self, x: Tensor) -> Tensor:
        if self.bypass:
            return self.base(x)
        flat = x.reshape(-1, x.shape[-1])
        logits, keep = self.mask.predict(flat)
        if self.mask.training:
            h = self._intermediate(flat)
            self.mask.remember(logits, h.detach().abs(), keep)
            y = self._down(h * keep.to(h.dtype) if self.train_masked else h)
        elif self.stats is not None or self.oracle_fraction is not None:
            with torch.no_grad():
                packed = self.packed()
                h = intermediate(flat, packed)
                if self.oracle_fraction is not None:  # the ceiling: the largest |h| of each token, from h itself
                    keep = uniform_labels(h.abs(), 1.0 - self.oracle_fraction)
                if self.stats is not None:
                    self._account(h, keep, packed)
                y = output(h * keep.to(h.dtype), packed)
        else:
            with torch.no_grad():
                y = sparse_ffn(flat, keep, self.packed(), self.max_union)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _account(self, h: Tensor, keep: Tensor, packed: PackedFFN) -> None:
        scores = h.abs()
        dense = ffn_flops(packed.hidden, packed.intermediate, self.gated)
        computed = ffn_flops(packed.hidden, keep.sum(dim=1), self.gated)
        self.stats.add(keep, scores, self.mask.rule(scores), dense, computed, self.mask.predictor.flops())


def gate_sites(
    model: nn.Module, sites: dict[str, GateSite], make_mask, *, train_masked: bool = True, max_union: float = 0.9
) -> dict[str, GatedLayer]:
    """Replace each site by its gated wrapper; `make_mask(in_features, out_features)` builds each gate."""
    modules = dict(model.named_modules())
    gated: dict[str, GatedLayer] = {}
    for name, site in sites.items():
        module = modules[name]
        if site.kind in FFN_KINDS:
            hidden, inter = (
                (module.gate_proj.in_features, module.gate_proj.out_features)
                if site.kind == "ffn_gated"
                else tuple(reversed(weight_matrix(module.c_fc).shape))
            )
            wrapper = GatedFFN(module, make_mask(hidden, inter), train_masked, max_union)
        else:
            base = module if site.kind == "conv_block" else ConvBN(module, modules[site.bn_name])
            conv = base.conv if site.kind == "conv_pair" else next(iter(base.children()))
            wrapper = GatedConv(base, make_mask(conv.in_channels, conv.out_channels), train_masked)
            if site.kind == "conv_pair":
                model.set_submodule(site.bn_name, nn.Identity())
        model.set_submodule(name, wrapper)
        gated[name] = wrapper
    return gated


def gated_layers(model: nn.Module) -> dict[str, GatedLayer]:
    return {name: w for name, w in wrappers(model).items() if isinstance(w, GatedLayer)}


def bypassed(model: nn.Module) -> AbstractContextManager[None]:
    """Run the model as if no gate existed (the dense model), e.g. to count its FLOPs."""
    return bypassing(gated_layers(model).values())


@contextmanager
def oracle(model: nn.Module, keep_fraction: float) -> Iterator[None]:
    """Replace every FFN gate's choice by the perfect per-token one: the `keep_fraction` of neurons with the
    largest |h|, computed from the full activations (an upper bound on what a predictor can reach)."""
    layers = [layer for layer in gated_layers(model).values() if isinstance(layer, GatedFFN)]
    for layer in layers:
        layer.oracle_fraction = keep_fraction
    try:
        yield
    finally:
        for layer in layers:
            layer.oracle_fraction = None


@contextmanager
def accounting(model: nn.Module) -> Iterator[dict[str, GateStats]]:
    """Collect per-input FLOPs and mask quality of every gated layer over the eval forwards inside the block."""
    layers = gated_layers(model)
    stats = {name: GateStats(layer.mask.channels) for name, layer in layers.items()}
    for name, layer in layers.items():
        layer.stats = stats[name]
    try:
        yield stats
    finally:
        for layer in layers.values():
            layer.stats = None


def summarize(stats: dict[str, GateStats]) -> dict:
    """Per-input FLOPs (dense, gated incl. predictors, reduction) and mask quality over all gated layers."""
    inputs = max((s.inputs for s in stats.values()), default=0)
    dense = sum(s.dense_flops for s in stats.values())
    gated = sum(s.gated_flops for s in stats.values())
    kept, channels = sum(s.kept for s in stats.values()), sum(s.channels * s.inputs for s in stats.values())
    labels = sum(s.labels for s in stats.values())
    return {
        "inputs": inputs,
        "flops_per_input": {
            "dense": dense / max(inputs, 1),
            "gated": gated / max(inputs, 1),
            "predictors": sum(s.predictor_flops for s in stats.values()) / max(inputs, 1),
            "reduction": 1.0 - gated / dense if dense else 0.0,
        },
        "keep_fraction": kept / channels if channels else 0.0,
        "target_keep_fraction": labels / channels if channels else 0.0,
        "target_recall": sum(s.hits_label for s in stats.values()) / labels if labels else 1.0,
        "target_precision": sum(s.hits_label for s in stats.values()) / kept if kept else 1.0,
        "oracle_recall": sum(s.hits_oracle for s in stats.values()) / kept if kept else 1.0,
        "layers": {
            name: {
                "keep_fraction": s.kept / max(s.channels * s.inputs, 1),
                "reduction": 1.0 - s.gated_flops / s.dense_flops if s.dense_flops else 0.0,
            }
            for name, s in stats.items()
        },
    }
