"""The structural map: which tensors of a model hold attention heads, FFN neurons, the hidden dimension and
whole layers, and what each unit costs in parameters and FLOPs.

One table per family says, for every parameter, what each of its axes is made of: `Axis("hidden")` (the
residual-stream width, shared by the whole model), `Axis("heads", unit)` (`unit` channels per head unit),
`Axis("ffn")` (one channel per intermediate neuron), or a fixed size (the vocabulary). Three things are read
off that one table, so they cannot disagree:
- the size arithmetic: parameters and FLOPs as a function of unit counts, exact for integer counts and
  differentiable for expected counts (the budget of a learned mask, `size`);
- the physical export: which rows/columns to keep when slicing (prune.structural.shrink);
- the rebuild of a model whose layers have different sizes (prune.structural.shrink).

Head units under grouped-query attention. A unit is one key/value head *with its query heads*: dropping it
removes one k/v head and the `q_per_group` query heads that read it, so every exported layer is a valid GQA
attention (the same query-per-key/value ratio, any number of groups). Without GQA a unit is one head.

FLOPs follow eval/flops.py's convention (2 per multiply-accumulate, matmuls and attention only, no causal
discount): a weight used as a matmul costs 2*S FLOPs per element for a sequence of S tokens; attention
scores and their weighted sum cost 4*S*S per query channel.

Supported families: Llama-style decoders (llama, mistral, qwen2) and GPT-2. A new family needs a table of its
parameters (`_LLAMA_RULES` is the model), its gate sites, and its attention attributes (prune.structural.shrink).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from prune.core.errors import UserInputError
from prune.structural.config import FFN, HEADS, HIDDEN

Cost = Literal["none", "matmul", "attention"]
Fold = Literal["none", "writer", "final_norm"]  # writer: scaled by hidden/layer values (and its units' values)


@dataclass(frozen=True)
class Axis:
    """One axis of a parameter: `segments` x `unit` channels per unit of `kind`, or a fixed size (kind None)."""

    kind: str | None
    unit: int = 1
    segments: int = 1

    def size(self, count) -> object:
        """Channels along this axis for `count` kept units (a fixed axis ignores the count)."""
        return self.unit if self.kind is None else count * self.unit * self.segments

    def channels(self, keep: Tensor) -> Tensor:
        """Indices of the channels of the kept units (`keep`: bool per unit), segment by segment."""
        units = torch.nonzero(keep, as_tuple=False).flatten()
        within = (units[:, None] * self.unit + torch.arange(self.unit)).flatten()
        return torch.cat([within + s * keep.numel() * self.unit for s in range(self.segments)])


@dataclass(frozen=True)
class Entry:
    """A parameter (name relative to its block, or to the model for global entries), or the attention
    scores (name None), with its axes, its cost, and how export folds gate values into it."""

    name: str | None
    axes: tuple[Axis, ...]
    params: bool = True  # False for a tied copy (GPT-2/Llama lm_head tied to the embedding)
    cost: Cost = "none"
    fold: Fold = "none"

    def elements(self, counts: dict[str, object]) -> object:
        out = 1
        for axis in self.axes:
            out = out * axis.size(counts.get(axis.kind, 1) if axis.kind else 1)
        return out

    def flops_factor(self, seq_len: int) -> int:
        return {"none": 0, "matmul": 2 * seq_len, "attention": 4 * seq_len * seq_len}[self.cost]


@dataclass
class Counts:
    """Kept units: `hidden` channels, and per layer `heads` units, `ffn` neurons and `layers` (0..1 kept).
    Integers give exact sizes; tensors of expected counts give a differentiable expected size."""

    hidden: object
    heads: Sequence[object]
    ffn: Sequence[object]
    layers: Sequence[object]


@dataclass
class Structure:
    """A model's structural map: gate sites (module names), unit inventory, and the parameter table."""

    family: str
    blocks: str  # name of the ModuleList of decoder blocks
    embeddings: tuple[str, ...]  # modules whose outputs enter the residual stream (hidden gate)
    final_norm: str
    block_norms: tuple[str, ...]  # relative to a block
    attn_out: str  # relative: the projection whose input holds the heads and whose output is the residual write
    ffn_out: str  # relative: the projection whose input holds the FFN neurons
    hidden: int
    head_dim: int
    q_per_group: int  # query heads per head unit (GQA ratio; 1 without GQA)
    heads: list[int]  # head units per layer
    ffn: list[int]  # neurons per layer
    global_entries: dict[str, Entry] = field(default_factory=dict)
    layer_entries: dict[str, Entry] = field(default_factory=dict)
    tied: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.heads)

    def layer_name(self, index: int, relative: str = "") -> str:
        return f"{self.blocks}.{index}" + (f".{relative}" if relative else "")

    def full_counts(self) -> Counts:
        return Counts(self.hidden, list(self.heads), list(self.ffn), [1] * self.num_layers)

    def size(self, counts: Counts, quantity: str = "params", seq_len: int = 512):
        """Parameters (`quantity="params"`) or FLOPs of one [1, seq_len] forward for the given kept counts."""
        if quantity not in ("params", "flops"):
            raise ValueError(f"quantity must be params or flops, got {quantity!r}")

        def weight(entry: Entry) -> int:
            if quantity == "params":
                return int(entry.params and entry.name is not None)
            return entry.flops_factor(seq_len)

        total = 0
        for entry in self.global_entries.values():
            if weight(entry):
                total = total + weight(entry) * entry.elements({HIDDEN: counts.hidden})
        for index in range(self.num_layers):
            local = {HIDDEN: counts.hidden, HEADS: counts.heads[index], FFN: counts.ffn[index]}
            layer = sum(weight(e) * e.elements(local) for e in self.layer_entries.values() if weight(e))
            total = total + counts.layers[index] * layer
        return total


# ------------------------------------------------------------------------------------------------- families

LLAMA_TYPES = ("llama", "mistral", "qwen2")
GPT2_TYPES = ("gpt2",)
SUPPORTED = "Llama-style decoders (model_type llama, mistral, qwen2) and GPT-2 (gpt2)"


def _llama_rules(r: int, hd: int) -> dict[str, tuple[tuple[Axis, ...], Cost, Fold]]:
    d, q, kv, f = Axis(HIDDEN), Axis(HEADS, r * hd), Axis(HEADS, hd), Axis(FFN)
    return {
        "self_attn.q_proj.weight": ((q, d), "matmul", "none"),
        "self_attn.q_proj.bias": ((q,), "none", "none"),
        "self_attn.k_proj.weight": ((kv, d), "matmul", "none"),
        "self_attn.k_proj.bias": ((kv,), "none", "none"),
        "self_attn.v_proj.weight": ((kv, d), "matmul", "none"),
        "self_attn.v_proj.bias": ((kv,), "none", "none"),
        "self_attn.o_proj.weight": ((d, q), "matmul", "writer"),
        "self_attn.o_proj.bias": ((d,), "none", "writer"),
        "mlp.gate_proj.weight": ((f, d), "matmul", "none"),
        "mlp.gate_proj.bias": ((f,), "none", "none"),
        "mlp.up_proj.weight": ((f, d), "matmul", "none"),
        "mlp.up_proj.bias": ((f,), "none", "none"),
        "mlp.down_proj.weight": ((d, f), "matmul", "writer"),
        "mlp.down_proj.bias": ((d,), "none", "writer"),
        "input_layernorm.weight": ((d,), "none", "none"),
        "post_attention_layernorm.weight": ((d,), "none", "none"),
    }


def _gpt2_rules(hd: int) -> dict[str, tuple[tuple[Axis, ...], Cost, Fold]]:
    # Conv1D stores weights as [in, out]
    d, h, qkv, f = Axis(HIDDEN), Axis(HEADS, hd), Axis(HEADS, hd, 3), Axis(FFN)
    return {
        "attn.c_attn.weight": ((d, qkv), "matmul", "none"),
        "attn.c_attn.bias": ((qkv,), "none", "none"),
        "attn.c_proj.weight": ((h, d), "matmul", "writer"),
        "attn.c_proj.bias": ((d,), "none", "writer"),
        "mlp.c_fc.weight": ((d, f), "matmul", "none"),
        "mlp.c_fc.bias": ((f,), "none", "none"),
        "mlp.c_proj.weight": ((f, d), "matmul", "writer"),
        "mlp.c_proj.bias": ((d,), "none", "writer"),
        "ln_1.weight": ((d,), "none", "none"),
        "ln_1.bias": ((d,), "none", "none"),
        "ln_2.weight": ((d,), "none", "none"),
        "ln_2.bias": ((d,), "none", "none"),
    }


# The axis of a writer's weight that holds the units it reads (gated on its input) is folded per unit.
_UNIT_INPUT = {
    "self_attn.o_proj.weight": HEADS,
    "mlp.down_proj.weight": FFN,
    "attn.c_proj.weight": HEADS,
    "mlp.c_proj.weight": FFN,
}


def unsupported(model: nn.Module, detail: str = "") -> UserInputError:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return UserInputError(
        f"structured pruning has no structural map for {type(model).__name__} (model_type {model_type!r})"
        f"{': ' + detail if detail else ''}. Supported: {SUPPORTED}. To add a family, give prune/structure.py a "
        "table of its parameters (which axes are hidden / heads / ffn, like _llama_rules), its gate sites "
        "(embeddings, blocks, output projections, norms) and, in prune/shrink.py, how to set its attention "
        "attributes when sizes change."
    )


def structure_of(model: nn.Module) -> Structure:
    """The structural map of a causal LM, checked against every parameter it has."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in LLAMA_TYPES and hasattr(model, "model") and hasattr(model.model, "layers"):
        structure = _llama_structure(model)
    elif model_type in GPT2_TYPES and hasattr(model, "transformer"):
        structure = _gpt2_structure(model)
    else:
        raise unsupported(model)
    _check_covered(model, structure)
    return structure


def _base_module(module: nn.Module) -> nn.Module:
    """Look through a gate wrapper (prune.structural.gates) to the original module."""
    return getattr(module, "base", module)


def _llama_structure(model: nn.Module) -> Structure:
    layers = model.model.layers
    attn = _base_module(layers[0]).self_attn
    hd = attn.head_dim
    r = attn.num_key_value_groups
    heads, ffn = [], []
    for layer in layers:
        layer = _base_module(layer)
        heads.append(_base_module(layer.self_attn.k_proj).out_features // hd)
        ffn.append(_base_module(layer.mlp.down_proj).in_features)
    hidden = _base_module(model.model.embed_tokens).embedding_dim
    vocab = _base_module(model.model.embed_tokens).num_embeddings
    d = Axis(HIDDEN)
    tied = _base_module(model.lm_head).weight is _base_module(model.model.embed_tokens).weight
    rules = _llama_rules(r, hd)
    structure = Structure(
        family="llama",
        blocks="model.layers",
        embeddings=("model.embed_tokens",),
        final_norm="model.norm",
        block_norms=("input_layernorm", "post_attention_layernorm"),
        attn_out="self_attn.o_proj",
        ffn_out="mlp.down_proj",
        hidden=hidden,
        head_dim=hd,
        q_per_group=r,
        heads=heads,
        ffn=ffn,
        tied=tied,
    )
    structure.global_entries = {
        "model.embed_tokens.weight": Entry("model.embed_tokens.weight", (Axis(None, vocab), d), fold="writer"),
        "model.norm.weight": Entry("model.norm.weight", (d,), fold="final_norm"),
        "lm_head.weight": Entry("lm_head.weight", (Axis(None, vocab), d), params=not tied, cost="matmul"),
    }
    structure.layer_entries = _layer_entries(model, structure, rules)
    return structure


def _gpt2_structure(model: nn.Module) -> Structure:
    config, blocks = model.config, model.transformer.h
    attn = _base_module(blocks[0]).attn
    hd = attn.head_dim
    heads, ffn = [], []
    for block in blocks:
        block = _base_module(block)
        heads.append(_base_module(block.attn.c_proj).weight.shape[0] // hd)
        ffn.append(_base_module(block.mlp.c_proj).weight.shape[0])
    if getattr(config, "add_cross_attention", False):
        raise unsupported(model, "GPT-2 with cross-attention")
    wte, wpe = _base_module(model.transformer.wte), _base_module(model.transformer.wpe)
    d = Axis(HIDDEN)
    tied = _base_module(model.lm_head).weight is wte.weight
    structure = Structure(
        family="gpt2",
        blocks="transformer.h",
        embeddings=("transformer.wte", "transformer.wpe"),
        final_norm="transformer.ln_f",
        block_norms=("ln_1", "ln_2"),
        attn_out="attn.c_proj",
        ffn_out="mlp.c_proj",
        hidden=wte.embedding_dim,
        head_dim=hd,
        q_per_group=1,
        heads=heads,
        ffn=ffn,
        tied=tied,
    )
    structure.global_entries = {
        "transformer.wte.weight": Entry("transformer.wte.weight", (Axis(None, wte.num_embeddings), d), fold="writer"),
        "transformer.wpe.weight": Entry("transformer.wpe.weight", (Axis(None, wpe.num_embeddings), d), fold="writer"),
        "transformer.ln_f.weight": Entry("transformer.ln_f.weight", (d,), fold="final_norm"),
        "transformer.ln_f.bias": Entry("transformer.ln_f.bias", (d,), fold="final_norm"),
        "lm_head.weight": Entry("lm_head.weight", (Axis(None, wte.num_embeddings), d), params=not tied, cost="matmul"),
    }
    structure.layer_entries = _layer_entries(model, structure, _gpt2_rules(hd))
    return structure


def _layer_entries(model, structure: Structure, rules) -> dict[str, Entry]:
    """The table entries of the parameters block 0 really has (biases are optional), plus attention scores."""
    block = _base_module(model.get_submodule(structure.layer_name(0)))
    names = {_unwrapped_name(name) for name, _ in block.named_parameters() if ".mask." not in f".{name}"}
    entries = {}
    for name in names:
        if name not in rules:
            raise unsupported(
                model, f"its blocks hold a parameter {name!r} that the {structure.family} map does not know"
            )
        axes, cost, fold = rules[name]
        entries[name] = Entry(name, axes, cost=cost, fold=fold)
    q_axis = Axis(HEADS, structure.q_per_group * structure.head_dim)
    entries["<attention>"] = Entry(None, (q_axis,), params=False, cost="attention")
    return entries


def unit_input_kind(relative_name: str) -> str | None:
    """HEADS or FFN when this writer weight's input axis holds gated units (their gate values fold into it)."""
    return _UNIT_INPUT.get(relative_name)


def _unwrapped_name(name: str) -> str:
    """A parameter name with gate wrappers' `.base` (and their masks) removed."""
    return ".".join(part for part in name.split(".") if part != "base")


def _check_covered(model: nn.Module, structure: Structure) -> None:
    """Every parameter of the model is in the table: otherwise slicing would leave it the wrong size."""
    known = set(structure.global_entries)
    prefix = structure.blocks + "."
    for name, _ in model.named_parameters(remove_duplicate=False):
        name = _unwrapped_name(name)
        if ".mask." in f".{name}":
            continue  # gate parameters of a wrapped model
        if name.startswith(prefix):
            relative = name[len(prefix) :].split(".", 1)[1]
            if relative not in structure.layer_entries:
                raise unsupported(model, f"parameter {name!r} is not in the {structure.family} map")
        elif name not in known:
            raise unsupported(model, f"parameter {name!r} is not in the {structure.family} map")
