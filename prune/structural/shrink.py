"""Structural export: a gated model becomes a really smaller model, and such a model loads again.

`shrink(model, structure, decisions)` slices every parameter along the axes the structural map names (the
kept heads' q/k/v/o rows and columns, the kept neurons' gate/up/down, the kept hidden channels of
everything, the kept layers), folds the gates' evaluation values into the weights (a unit's value scales its
column of the output projection; the hidden and layer values scale what writes the residual stream; with
tied embeddings the final norm is divided by the hidden values so the tied head reads the same logits), and
builds the new model from its new config. The exported model's logits equal the gated model's in
evaluation mode (tests check < 1e-4 in float32).

Config. When every kept layer has the same sizes and the family's config can say so, the standard fields
say it all (hidden_size, num_attention_heads, num_key_value_heads, intermediate_size, num_hidden_layers,
head_dim) and plain `AutoModelForCausalLM.from_pretrained` loads it. What a config can say: Llama validates
hidden_size % num_attention_heads == 0 (with `export.uniform`, VIB aligns the kept width to it), GPT-2 has no
head_dim, so heads x head_dim must equal the width. Otherwise the config also holds `maskprune_layer_sizes`
(per kept layer: heads, kv_heads, intermediate) and `maskprune_head_dim`; the standard head fields are then
placeholders (1 head, which passes the validations) and `prune.load_model(path)` (`load_resized`) rebuilds
each layer at its own size before loading the weights.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedModel,
)
from transformers.pytorch_utils import Conv1D

from prune.core.errors import UserInputError
from prune.models.loading import load_states
from prune.structural.config import FFN, HEADS, HIDDEN, LAYERS
from prune.structural.layout import Entry, Structure, unit_input_kind

REEXPORT = "re-export it with `prune run`."  # the fix for a shrunk checkpoint that does not fit its config

LAYER_SIZES_KEY = "maskprune_layer_sizes"
HEAD_DIM_KEY = "maskprune_head_dim"


# --------------------------------------------------------------------------------------------- slicing


def _slice(tensor: Tensor, entry: Entry, keeps: dict[str, Tensor]) -> Tensor:
    for dim, axis in enumerate(entry.axes):
        if axis.kind is not None:
            tensor = tensor.index_select(dim, axis.channels(keeps[axis.kind]))
    return tensor


def _scale_axis(tensor: Tensor, dim: int, values: Tensor) -> Tensor:
    shape = [1] * tensor.dim()
    shape[dim] = -1
    return tensor * values.to(tensor.dtype).reshape(shape)


def _axis_of(entry: Entry, kind: str) -> int:
    return next(dim for dim, axis in enumerate(entry.axes) if axis.kind == kind)


def _new_tensor(
    tensor: Tensor,
    entry: Entry,
    relative: str,
    structure: Structure,
    keeps: dict,
    values: dict,
    layer_value: Tensor | None,
) -> Tensor:
    """One parameter sliced to the kept units, with the gate values folded in (see the module doc)."""
    out = _slice(tensor, entry, keeps)
    hidden_values = values[HIDDEN][keeps[HIDDEN]]
    if entry.fold == "writer":
        dim = _axis_of(entry, HIDDEN)
        out = _scale_axis(out, dim, hidden_values)
        if layer_value is not None:
            out = out * layer_value.to(out.dtype)
        kind = unit_input_kind(relative)
        if kind is not None:
            axis = entry.axes[_axis_of(entry, kind)]
            unit_values = values[kind][keeps[kind]].repeat_interleave(axis.unit)
            out = _scale_axis(out, _axis_of(entry, kind), unit_values)
    elif entry.fold == "final_norm" and structure.tied:
        out = out / hidden_values.to(out.dtype)  # the tied head reads the embedding that now carries the values
    return out


def shrunk_state(state: dict[str, Tensor], structure: Structure, decisions: dict) -> dict[str, Tensor]:
    """The sliced, folded state dict with kept layers renumbered 0..L'-1."""
    hidden_keep, hidden_value = decisions[HIDDEN]
    kept_layers = (
        [i for i, (keep, _) in enumerate(decisions[LAYERS] or []) if bool(keep[0])]
        if decisions[LAYERS]
        else list(range(structure.num_layers))
    )
    renumber = {old: new for new, old in enumerate(kept_layers)}
    pattern = re.compile(rf"^{re.escape(structure.blocks)}\.(\d+)\.(.+)$")
    new: dict[str, Tensor] = {}
    for name, tensor in state.items():
        match = pattern.match(name)
        if match is None:
            entry = structure.global_entries.get(name)
            keeps, values, layer_value, relative = {HIDDEN: hidden_keep}, {HIDDEN: hidden_value}, None, name
            new_name = name
        else:
            index, relative = int(match.group(1)), match.group(2)
            if index not in renumber:
                continue
            entry = structure.layer_entries.get(relative)
            head_keep, head_value = decisions[HEADS][index]
            ffn_keep, ffn_value = decisions[FFN][index]
            keeps = {HIDDEN: hidden_keep, HEADS: head_keep, FFN: ffn_keep}
            values = {HIDDEN: hidden_value, HEADS: head_value, FFN: ffn_value}
            layer_value = decisions[LAYERS][index][1][0] if decisions[LAYERS] else None
            new_name = f"{structure.blocks}.{renumber[index]}.{relative}"
        with torch.no_grad():
            new[new_name] = (
                tensor.clone()
                if entry is None
                else _new_tensor(tensor, entry, relative, structure, keeps, values, layer_value).contiguous()
            )
    if structure.tied and "lm_head.weight" in new:
        new["lm_head.weight"] = new[structure.embeddings[0] + ".weight"]
    return new


# ---------------------------------------------------------------------------------------------- config


def layer_sizes(structure: Structure, decisions: dict) -> list[dict[str, int]]:
    """Per kept layer: query heads, key/value heads, intermediate neurons."""
    sizes = []
    for index in range(structure.num_layers):
        if decisions[LAYERS] and not bool(decisions[LAYERS][index][0][0]):
            continue
        units = int(decisions[HEADS][index][0].sum())
        sizes.append(
            {
                "heads": units * structure.q_per_group,
                "kv_heads": units,
                "intermediate": int(decisions[FFN][index][0].sum()),
            }
        )
    return sizes


def shrunk_config(config, structure: Structure, decisions: dict):
    """The exported model's config: standard fields when the layers are uniform and the family can say it."""
    config = copy.deepcopy(config)
    sizes = layer_sizes(structure, decisions)
    hidden = int(decisions[HIDDEN][0].sum())
    uniform = len({tuple(size.values()) for size in sizes}) <= 1
    first = sizes[0] if sizes else {"heads": structure.q_per_group, "kv_heads": 1, "intermediate": 0}
    largest = {key: max([size[key] for size in sizes], default=first[key]) for key in first}
    chosen = first if uniform else largest
    kept = [i for i in range(structure.num_layers) if not decisions[LAYERS] or bool(decisions[LAYERS][i][0][0])]
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    # Placeholders where the standard fields cannot say it: one head passes every config validation
    # (GPT-2: n_embd % n_head, Llama: hidden_size % num_attention_heads); the per-layer list is authoritative.
    if structure.family == "gpt2":
        standard = uniform and chosen["heads"] * structure.head_dim == hidden
        config.n_embd, config.n_layer, config.n_inner = hidden, len(sizes), chosen["intermediate"]
        config.n_head = chosen["heads"] if standard else 1
    else:
        standard = uniform and hidden % chosen["heads"] == 0
        config.hidden_size, config.num_hidden_layers = hidden, len(sizes)
        config.num_attention_heads = chosen["heads"] if standard else 1
        config.num_key_value_heads = chosen["kv_heads"] if standard else 1
        config.intermediate_size, config.head_dim = chosen["intermediate"], structure.head_dim
    for key in (LAYER_SIZES_KEY, HEAD_DIM_KEY):
        if hasattr(config, key):
            delattr(config, key)
    if not standard:
        setattr(config, LAYER_SIZES_KEY, sizes)
        setattr(config, HEAD_DIM_KEY, structure.head_dim)
    return config


# ------------------------------------------------------------------------------------------- build/load


def _resized_linear(old: nn.Module, in_features: int, out_features: int) -> nn.Module:
    dtype, has_bias = old.weight.dtype, old.bias is not None
    if isinstance(old, Conv1D):
        new = Conv1D(out_features, in_features).to(dtype)
        if not has_bias:
            new.bias = None
        return new
    return nn.Linear(in_features, out_features, bias=has_bias, dtype=dtype)


def _resize_layers(model: PreTrainedModel, config) -> None:
    """Rebuild every layer's attention and FFN projections at the sizes config.maskprune_layer_sizes names."""
    sizes, hd = getattr(config, LAYER_SIZES_KEY), getattr(config, HEAD_DIM_KEY)
    if config.model_type == "gpt2":
        d = config.n_embd
        for index, (block, size) in enumerate(zip(model.transformer.h, sizes)):
            q, f, attn = size["heads"] * hd, size["intermediate"], block.attn
            attn.c_attn = _resized_linear(attn.c_attn, d, 3 * q)
            attn.c_proj = _resized_linear(attn.c_proj, q, d)
            block.mlp.c_fc = _resized_linear(block.mlp.c_fc, d, f)
            block.mlp.c_proj = _resized_linear(block.mlp.c_proj, f, d)
            attn.num_heads, attn.head_dim, attn.split_size, attn.embed_dim = size["heads"], hd, q, d
            attn.scaling = hd**-0.5 if config.scale_attn_weights else 1.0
            if config.scale_attn_by_inverse_layer_idx:
                attn.scaling /= float(index + 1)
        return
    d = config.hidden_size
    for layer, size in zip(model.model.layers, sizes):
        q, kv, f, attn, mlp = (
            size["heads"] * hd,
            size["kv_heads"] * hd,
            size["intermediate"],
            layer.self_attn,
            layer.mlp,
        )
        attn.q_proj = _resized_linear(attn.q_proj, d, q)
        attn.k_proj = _resized_linear(attn.k_proj, d, kv)
        attn.v_proj = _resized_linear(attn.v_proj, d, kv)
        attn.o_proj = _resized_linear(attn.o_proj, q, d)
        attn.num_key_value_groups = size["heads"] // size["kv_heads"]
        mlp.gate_proj = _resized_linear(mlp.gate_proj, d, f)
        mlp.up_proj = _resized_linear(mlp.up_proj, d, f)
        mlp.down_proj = _resized_linear(mlp.down_proj, f, d)


def build_model(config, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A randomly initialised model of `config`'s (possibly per-layer) sizes, ready for `load_state_dict`."""
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    if getattr(config, LAYER_SIZES_KEY, None):
        _resize_layers(model, config)
    return model.eval()


def shrink(model: PreTrainedModel, structure: Structure, decisions: dict) -> PreTrainedModel:
    """The physically smaller model (see the module doc); `model` must already be unwrapped."""
    config = shrunk_config(model.config, structure, decisions)
    weight = next(model.parameters())
    new = build_model(config, weight.dtype)
    load_states(new, [shrunk_state(model.state_dict(), structure, decisions)], "the exported state", REEXPORT)
    new.generation_config = copy.deepcopy(model.generation_config)
    return new.to(weight.device).eval()


def has_layer_sizes(path: str | Path) -> bool:
    """True for a saved model whose layers differ in size (it needs `load_resized`)."""
    config = Path(path) / "config.json"
    return config.is_file() and LAYER_SIZES_KEY in json.loads(config.read_text())


def load_resized(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a model saved with per-layer sizes: rebuild the shrunk architecture, then load its weights."""
    path = Path(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    model = build_model(config, dtype)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserInputError(f"{path} has no *.safetensors weights; save the model with save_pretrained.")
    load_states(model, map(load_file, files), str(path), REEXPORT)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()
