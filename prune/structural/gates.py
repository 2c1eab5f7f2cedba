"""Gates on structural units, acting on outputs (`y = f(x) ⊙ z`), as wrappers on the model's own modules.

No model forward is reimplemented: transformers' attention (GQA, rotary `position_embeddings`, caches) runs
untouched. Where each kind of gate acts (see prune.structural.layout for which modules these are per family):
- heads: on the input channels of the attention output projection (o_proj / GPT-2 attn.c_proj), one value
  per head unit repeated over its channels: a closed gate is a head whose output never reaches the residual;
- FFN neurons: on the input channels of the FFN output projection (down_proj / mlp.c_proj);
- hidden dimension: on everything that writes the residual stream (the embeddings' outputs, both output
  projections' outputs), so a closed channel stays zero all the way up; every norm reading the stream then
  normalizes over the *kept* channels only (`GatedNorm`), which is what the sliced model computes;
- layers: on both output projections' outputs of the block (its whole residual contribution); a closed layer
  gate in evaluation skips the block (`GatedDecoderLayer`), exactly what the model without that layer computes.

Each gate is owned by exactly one wrapper (its `mask`; the trainer finds its parameters there); the other
wrappers that apply it hold it as a `Borrowed` reference, which has no parameters and an empty hard mask.
`UnitGate.hard()` is the bool keep per unit; `hard_value()` is the multiplier used in evaluation and folded
into the weights by the export (keep ⊙ scale: VIB keeps its gate mean mu, one-shot gates scale 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from prune.masks.base import Mask, MaskWrapper
from prune.structural.config import FFN, HEADS, HIDDEN, LAYERS
from prune.structural.layout import Counts, Structure


class UnitGate(Mask):
    """A gate over `size` units of one kind (in one layer, or model-wide for the hidden dimension).

    The keep decision is the gate's own (`natural_keep`), then adjusted by count rules: at least `min_keep`
    units (a layer keeps one head unit so its attention stays valid), the same count as its `peers` (uniform
    layers), and a count rounded to a multiple of `round_to` (and, for the hidden width of a uniform Llama
    export, of the kept query-head count: `align`, as its config demands). Adjusted counts keep the
    best-`score` units.
    """

    def __init__(self, kind: str, size: int, layer: int | None = None):
        super().__init__()
        self.kind, self.size, self.layer = kind, size, layer
        self.min_keep = 0
        self.round_to: int | None = None
        self.peers: list[UnitGate] = []  # plain list: peers are owned (and registered) elsewhere
        self.align: tuple[UnitGate | None, int, int] | None = None  # (head gate or None, q per unit, fixed units)

    # ---- what a gate kind defines
    def natural_keep(self) -> Tensor:
        raise NotImplementedError

    def score(self) -> Tensor:
        """Higher = more worth keeping (ranks units when a count rule adds or removes some)."""
        raise NotImplementedError

    def scale(self) -> Tensor:
        """The multiplier of a kept unit in evaluation."""
        raise NotImplementedError

    def sample(self) -> Tensor:
        """The multiplier in training (a fixed gate: its hard value)."""
        return self.hard_value()

    def keep_probability(self) -> Tensor:
        """Differentiable P(keep) per unit, for an expected size."""
        return self.hard().float()

    # ---- shared
    def natural_count(self) -> int:
        return int(self.natural_keep().sum())

    def count(self) -> int:
        """The number of units kept, after the count rules."""
        count = self.natural_count()
        if self.peers:
            count = round(sum(peer.natural_count() for peer in self.peers) / len(self.peers))
        count = max(count, self.min_keep)
        multiple = self.round_to or 1
        if self.align is not None:
            heads, per_unit, fixed = self.align
            multiple = math.lcm(multiple, per_unit * (heads.count() if heads is not None else fixed))
        if multiple > 1:
            count = rounded_count(count, multiple, self.size)
        return min(count, self.size)

    def hard(self) -> Tensor:
        natural = self.natural_keep()
        count = self.count()
        if count == int(natural.sum()):
            return natural
        keep = torch.zeros_like(natural)
        keep[torch.topk(self.score().detach(), count).indices] = True
        return keep

    def hard_value(self) -> Tensor:
        return self.hard().to(self.scale().dtype) * self.scale().detach()

    def value(self) -> Tensor:
        return self.sample() if self.training else self.hard_value()

    def forward(self) -> Tensor:
        return self.value()

    def extra_repr(self) -> str:
        return f"{self.kind}, size={self.size}" + (f", layer={self.layer}" if self.layer is not None else "")


def rounded_count(count: int, multiple: int, size: int) -> int:
    """The nearest of {multiples of `multiple` up to `size`, `size` itself} to `count` (0 stays 0)."""
    if count <= 0:
        return 0
    options = list(range(multiple, size + 1, multiple)) + [size]
    return min(options, key=lambda option: (abs(option - count), -option))


class FixedGate(UnitGate):
    """A fixed decision (one-shot baselines, reloaded masks): keep per unit and the scale of kept units."""

    def __init__(self, kind: str, keep: Tensor, layer: int | None = None, scale: Tensor | None = None):
        super().__init__(kind, keep.numel(), layer)
        self.register_buffer("keep", keep.to(torch.bool).clone())
        self.register_buffer("unit_scale", torch.ones(keep.numel()) if scale is None else scale.float().clone())

    def natural_keep(self) -> Tensor:
        return self.keep

    def score(self) -> Tensor:
        return self.keep.float()

    def scale(self) -> Tensor:
        return self.unit_scale


class Borrowed(Mask):
    """A reference to a gate owned by another wrapper: no parameters, an empty hard mask (counted once)."""

    def __init__(self, gate: UnitGate):
        super().__init__()
        self.__dict__["gate"] = gate  # not registered: the owner registers (and trains, saves, moves) it

    def hard(self) -> Tensor:
        return torch.zeros(0, dtype=torch.bool)


def _gate_value(gate: UnitGate | None, like: Tensor) -> Tensor | None:
    return None if gate is None else gate.value().to(like.dtype)


class _GateWrapper(MaskWrapper):
    """A wrapper holding up to three gate references beside its owned `mask`."""

    def __init__(self, base: nn.Module, mask: Mask, **gates: UnitGate | None):
        super().__init__(base, mask)
        self.__dict__["gates"] = gates

    def merged(self) -> nn.Module:
        raise RuntimeError(
            "structural gates are exported by slicing (prune.structural.shrink), not merged into weights"
        )


class GatedEmbedding(_GateWrapper):
    """Embedding output ⊙ hidden gate."""

    @property
    def weight(self) -> Tensor:
        """The embedding matrix: code that ties it to the LM head reads `get_input_embeddings().weight` (accelerate's
        FSDP grouping keeps tied weights in one shard group only when it finds the tie)."""
        return self.base.weight

    def forward(self, ids: Tensor) -> Tensor:
        out = self.base(ids)
        return out * _gate_value(self.gates["hidden"], out)


class GatedProjection(_GateWrapper):
    """An output projection: input channels ⊙ unit gate (heads or neurons), output ⊙ hidden ⊙ layer gates."""

    def __init__(self, base: nn.Module, mask: Mask, channels: int, **gates: UnitGate | None):
        super().__init__(base, mask, **gates)
        self.channels = channels  # input channels per unit

    def forward(self, x: Tensor) -> Tensor:
        unit = _gate_value(self.gates["unit"], x)
        if unit is not None:
            x = x * unit.repeat_interleave(self.channels)
        out = self.base(x)
        for name in ("hidden", "layer"):
            value = _gate_value(self.gates[name], out)
            if value is not None:
                out = out * value
        return out


class GatedNorm(_GateWrapper):
    """RMSNorm / LayerNorm over the kept hidden channels only (the stream is zero on the others).

    The count of kept channels is the hidden gate's hard count in both modes, so evaluation computes exactly
    what the sliced model computes. LayerNorm also centres over the kept channels and zeroes the others'
    output (its bias would make them nonzero). With every channel kept this is the original norm itself."""

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gates["hidden"]
        keep = gate.hard()
        kept = int(keep.sum())
        if kept == keep.numel():
            return self.base(x)
        eps = getattr(self.base, "variance_epsilon", None) or getattr(self.base, "eps", 1e-6)
        dtype = x.dtype
        h = x.float()
        if isinstance(self.base, nn.LayerNorm):
            k = keep.to(h.dtype)
            mean = (h * k).sum(-1, keepdim=True) / kept
            h = (h - mean) * k
            out = h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) / kept + eps)
            if self.base.weight is not None:
                out = out * self.base.weight
            if self.base.bias is not None:
                out = out + self.base.bias * k
            return out.to(dtype)
        out = h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) / kept + eps)
        return self.base.weight * out.to(dtype)


class GatedDecoderLayer(_GateWrapper):
    """Owns a layer gate (applied by the block's output projections); in evaluation a closed gate skips the
    block, which then returns its input: what the model without the layer computes."""

    def forward(self, *args, **kwargs):
        gate = self.gates["layer"]
        if not gate.training and not bool(gate.hard()[0]):
            return args[0] if args else kwargs["hidden_states"]
        return self.base(*args, **kwargs)


@dataclass
class GateSet:
    """Every gate of a gated model, by kind and layer (None where a kind is off)."""

    structure: Structure
    hidden: UnitGate | None = None
    heads: list[UnitGate | None] = field(default_factory=list)
    ffn: list[UnitGate | None] = field(default_factory=list)
    layers: list[UnitGate | None] = field(default_factory=list)

    def all(self) -> list[UnitGate]:
        gates = [self.hidden, *self.heads, *self.ffn, *self.layers]
        return [gate for gate in gates if gate is not None]

    def by_kind(self, kind: str) -> list[UnitGate]:
        gates = {HIDDEN: [self.hidden], HEADS: self.heads, FFN: self.ffn, LAYERS: self.layers}[kind]
        return [gate for gate in gates if gate is not None]

    def counts(self, expected: bool = False) -> Counts:
        """Kept units: hard integer counts, or differentiable expected counts (sums of keep probabilities)."""
        s = self.structure

        def count(gate: UnitGate | None, full: int):
            if gate is None:
                return full
            return gate.keep_probability().sum() if expected else gate.count()

        return Counts(
            hidden=count(self.hidden, s.hidden),
            heads=[count(g, n) for g, n in zip(self.heads, s.heads)],
            ffn=[count(g, n) for g, n in zip(self.ffn, s.ffn)],
            layers=[count(g, 1) for g in self.layers],
        )

    def decisions(self) -> dict:
        """Hard keep and value per gate, detached on CPU: what the export slices and folds."""

        def one(gate: UnitGate | None, size: int) -> tuple[Tensor, Tensor]:
            if gate is None:
                return torch.ones(size, dtype=torch.bool), torch.ones(size)
            return gate.hard().detach().cpu(), gate.hard_value().detach().float().cpu()

        s = self.structure
        return {
            HIDDEN: one(self.hidden, s.hidden),
            HEADS: [one(g, n) for g, n in zip(self.heads, s.heads)],
            FFN: [one(g, n) for g, n in zip(self.ffn, s.ffn)],
            LAYERS: [one(g, 1) for g in self.layers],
        }


def attach_unit_gates(model: nn.Module, structure: Structure, make_gate) -> GateSet:
    """Wrap the gate sites of `model`; `make_gate(kind, size, layer)` returns a UnitGate or None (kind off)."""
    s = structure
    gates = GateSet(structure=s, hidden=make_gate(HIDDEN, s.hidden, None))
    for index in range(s.num_layers):
        gates.heads.append(make_gate(HEADS, s.heads[index], index))
        gates.ffn.append(make_gate(FFN, s.ffn[index], index))
        gates.layers.append(make_gate(LAYERS, 1, index))
    placed: dict[str, nn.Module] = {}
    if gates.hidden is not None:
        for i, name in enumerate(s.embeddings):
            owner = gates.hidden if i == 0 else Borrowed(gates.hidden)
            placed[name] = GatedEmbedding(model.get_submodule(name), owner, hidden=gates.hidden)
        norms = [s.final_norm] + [s.layer_name(i, n) for i in range(s.num_layers) for n in s.block_norms]
        for name in norms:
            placed[name] = GatedNorm(model.get_submodule(name), Borrowed(gates.hidden), hidden=gates.hidden)
    for index in range(s.num_layers):
        layer = gates.layers[index]
        sites = ((s.attn_out, gates.heads[index], s.q_per_group * s.head_dim), (s.ffn_out, gates.ffn[index], 1))
        for relative, unit, channels in sites:
            if unit is None and gates.hidden is None and layer is None:
                continue
            name = s.layer_name(index, relative)
            owner = unit if unit is not None else Borrowed(layer or gates.hidden)
            placed[name] = GatedProjection(
                model.get_submodule(name), owner, channels, unit=unit, hidden=gates.hidden, layer=layer
            )
    for name, wrapper in placed.items():  # inner modules first: block names stay valid until blocks wrap
        model.set_submodule(name, wrapper)
    for index, layer in enumerate(gates.layers):
        if layer is not None:
            name = s.layer_name(index)
            model.set_submodule(name, GatedDecoderLayer(model.get_submodule(name), layer, layer=layer))
    return gates
