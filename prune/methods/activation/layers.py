"""The wrappers of activation sparsity, which modules they fit, and the counting of what they zero.

- `ThresholdedLinear` (teal) wraps one projection (nn.Linear, or GPT-2's Conv1D): y = W (x * (|x| > c)) + b.
- `ThresholdedFFN` (cats) wraps one gated FFN `down(act(gate(x)) * up(x))`: a = act(gate(x)) is computed
  whole, then y = down((a * (|a| > c)) * up(x)), so up and down only matter for the neurons kept.
The cut c is a float32 vector, one value per entry (input feature or FFN neuron): a single threshold t spread
over the entries as they are scored (c_j = t / s_j for a score |x_j| s_j; prune.methods.activation.calibrate).

A call of at most `max_tokens` tokens (decode) on the CPU runs the sparse kernel (prune.methods.activation
.kernel), which reads only the weight columns of the entries kept; every other call (prefill, a GPU, autograd)
runs the masked dense computation, which gives the same numbers up to float summation order. That computation is
differentiable in the weights (a zeroed entry gives its weight column a zero gradient), so recovery training
(prune.recovery) trains the base weights, or LoRA adapters on them, with the thresholds in the forward; a call
whose graph autograd keeps (an input or a weight that requires grad) or a base wrapped by an adapter never runs
the kernel, which reads the plain weights and computes no gradient. The kernel reads
W's columns as rows of W^T: a Conv1D stores W^T already; for an nn.Linear (and the FFN's gate and down) a
transposed copy is made on the first sparse call (one extra copy of the targeted weights: the price of contiguous
columns).

Both paths compare |x| with the cut in float32, so they keep exactly the same entries in any dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from prune.core.errors import UserInputError
from prune.masks.base import Mask, MaskWrapper, bypassing, wrappers
from prune.methods.activation import kernel
from prune.models.blocks import weight_matrix


class Threshold(Mask):
    """The cut of one wrapped module, float32 [entries] (an entry of magnitude at or below its cut is zero), and
    the share of entries it was calibrated to zero. A buffer, not a parameter: nothing trains. A per-input mask
    has no static value, so `hard()` is empty (the report measures what was zeroed instead)."""

    cut: Tensor

    def __init__(self, cut: Tensor, target: float):
        super().__init__()
        self.register_buffer("cut", cut.detach().to(torch.float32).contiguous(), persistent=False)
        self.target = float(target)

    def hard(self) -> Tensor:
        return torch.zeros(0, dtype=torch.bool)

    def extra_repr(self) -> str:
        return f"entries={self.cut.numel()}, target={self.target:g}"


@dataclass
class Zeroed:
    """Entries seen and entries zeroed by one wrapper while counting (inputs of a projection; FFN neurons)."""

    entries: int = 0
    zeroed: int = 0

    def add(self, kept: Tensor) -> None:
        self.entries += kept.numel()
        self.zeroed += kept.numel() - int(kept.count_nonzero())

    @property
    def fraction(self) -> float:
        return self.zeroed / self.entries if self.entries else 0.0


class Thresholded(MaskWrapper):
    """What both wrappers share: `bypass` runs the base module untouched (the dense model), `counts` collects
    what the threshold zeroes, `max_tokens` bounds the calls that run the sparse kernel.

    The kernel's operands (the cut, W^T, biases) are gathered once and kept with the weight versions and dtype
    they were made for, so a decode call pays one comparison, not the lookups and copies (decode runs a wrapper
    ~200 times per token of a small model, where microseconds add up)."""

    mask: Threshold
    masks_inputs = True

    def __init__(self, base: nn.Module, mask: Threshold, max_tokens: int):
        super().__init__(base, mask)
        self.max_tokens = max_tokens
        self.bypass = False
        self.counts: Zeroed | None = None
        self._operands: tuple | None = None  # (dtype, source weights, their versions, the kernel's operands)

    def sparse_call(self, x: Tensor) -> bool:
        """Whether this call runs the sparse kernel: few tokens, on the CPU, in a dtype it serves, no autograd
        (neither the input nor a parameter of the module requires grad), plain layers (no adapter: recovery's
        LoRA), nothing being counted."""
        return (
            x.shape[0] <= self.max_tokens
            and self.counts is None
            and x.device.type == "cpu"
            and x.dtype in kernel.DTYPES
            and self.plain_layers()
            and not (torch.is_grad_enabled() and (x.requires_grad or self.trains()))
            and kernel.backend() == "cpp"
        )

    def operands(self, dtype: torch.dtype) -> tuple:
        """The kernel's operands after the activations, remade when the dtype changes or a source weight is
        changed: in place (its version counter moves) or given new data (`weight.data = ...`, as peft's merge of an
        adapter does, which leaves the version counter alone but moves the data)."""
        cached = self._operands
        if cached is None or cached[0] != dtype or _states(cached[1]) != cached[2]:
            sources = self.source_weights()
            cached = self._operands = (dtype, sources, _states(sources), self.make_operands())
        return cached[3]

    def trains(self) -> bool:
        """Whether a parameter of the wrapped module requires grad (recovery trains it)."""
        return any(param.requires_grad for param in self.base.parameters())

    def plain_layers(self) -> bool:
        """Whether the layers the kernel reads are the plain ones it was written for (not wrapped by an adapter)."""
        raise NotImplementedError

    def source_weights(self) -> tuple[Tensor, ...]:
        """The weights the operands copy or read."""
        raise NotImplementedError

    def make_operands(self) -> tuple:
        raise NotImplementedError

    def merged(self) -> nn.Module:
        raise UserInputError(
            "activation sparsity zeroes inputs per token, so no fixed mask can be merged into the weights; "
            "load the sparse model with prune.load_model(run_dir) (the base model plus its thresholds)."
        )


def _states(weights: tuple[Tensor, ...]) -> tuple[tuple[int, int], ...]:
    """Each weight's version counter and data address: one of them moves whenever the weight's values can have."""
    return tuple((weight._version, weight.data_ptr()) for weight in weights)


def columns(module: nn.Module) -> Tensor:
    """W^T [in, out], contiguous: a Conv1D's own weight (stored so), else a transposed copy."""
    if isinstance(module, Conv1D) and module.weight.is_contiguous():
        return module.weight.detach()
    return weight_matrix(module).detach().t().contiguous()


class ThresholdedLinear(Thresholded):
    """teal: a projection whose input entries of magnitude at or below the threshold are zero."""

    def plain_layers(self) -> bool:
        return isinstance(self.base, (nn.Linear, Conv1D))

    def source_weights(self) -> tuple[Tensor, ...]:
        return (self.base.weight,)

    def make_operands(self) -> tuple:
        return columns(self.base), self.mask.cut, self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        if self.bypass:
            return self.base(x)
        flat = x.reshape(-1, x.shape[-1])
        if self.sparse_call(flat):
            y = kernel.threshold_linear(flat, *self.operands(x.dtype))
            return y.reshape(*x.shape[:-1], y.shape[-1])
        cut = self.mask.cut
        if self.counts is not None:
            self.counts.add(flat.abs() > cut)
        return self.base(kernel.masked(x, cut))


class ThresholdedFFN(Thresholded):
    """cats: a gated FFN whose neurons with |act(gate(x))| at or below the threshold are zero."""

    def plain_layers(self) -> bool:
        return is_gated_ffn(self.base)

    def source_weights(self) -> tuple[Tensor, ...]:
        return self.base.gate_proj.weight, self.base.up_proj.weight, self.base.down_proj.weight

    def make_operands(self) -> tuple:
        """(the gate's operands, the FFN's). The gate is read whole, through the kernel with a zero cut (only
        exact zeros skipped): on this CPU a decode step runs faster that way than with torch's dense linear
        (benchmarks/RESULTS.md, `activation`). Neuron i's up weights are row i of W_up as stored, its down
        weights column i of W_down, a row of W^T."""
        gate, up, down = self.base.gate_proj, self.base.up_proj, self.base.down_proj
        every_input = torch.zeros(gate.in_features, dtype=torch.float32)
        return (
            (columns(gate), every_input, gate.bias),
            (self.mask.cut, up.weight.detach().contiguous(), up.bias, columns(down), down.bias),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.bypass:
            return self.base(x)
        base = self.base
        flat = x.reshape(-1, x.shape[-1])
        if self.sparse_call(flat):
            gate, ffn = self.operands(x.dtype)
            act = base.act_fn(kernel.threshold_linear(flat, *gate))
            y = kernel.threshold_ffn(flat, act, *ffn)
        else:
            act = base.act_fn(base.gate_proj(flat))
            cut = self.mask.cut
            if self.counts is not None:
                self.counts.add(act.abs() > cut)
            y = base.down_proj(kernel.masked(act, cut) * base.up_proj(flat))
        return y.reshape(*x.shape[:-1], y.shape[-1])


# --------------------------------------------------------------------------------------------------- sites


def is_gated_ffn(module: nn.Module) -> bool:
    """A SwiGLU-style FFN: nn.Linear gate_proj, up_proj, down_proj and an act_fn (Llama, Mistral, Qwen)."""
    return all(
        isinstance(getattr(module, name, None), nn.Linear) for name in ("gate_proj", "up_proj", "down_proj")
    ) and (callable(getattr(module, "act_fn", None)))


def entries(module: nn.Module) -> int:
    """How many entries a threshold of `module` cuts: a gated FFN's neurons, a projection's input features."""
    return module.up_proj.out_features if is_gated_ffn(module) else weight_matrix(module).shape[1]


def thresholded(model: nn.Module) -> dict[str, Thresholded]:
    """Every activation-sparsity wrapper of the model, by the name of the module it replaced."""
    return {name: wrapper for name, wrapper in wrappers(model).items() if isinstance(wrapper, Thresholded)}


def wrap(model: nn.Module, thresholds: dict[str, Threshold], max_tokens: int) -> dict[str, Thresholded]:
    """Replace each named module by its wrapper: a gated FFN by ThresholdedFFN, a projection by ThresholdedLinear."""
    modules = dict(model.named_modules())
    wrapped: dict[str, Thresholded] = {}
    for name, threshold in thresholds.items():
        module = modules[name]
        kind = ThresholdedFFN if is_gated_ffn(module) else ThresholdedLinear
        device = next(module.parameters()).device
        wrapped[name] = kind(module, threshold.to(device), max_tokens)
        model.set_submodule(name, wrapped[name])
    return wrapped


def bypassed(model: nn.Module) -> AbstractContextManager[None]:
    """Run the model as if no threshold existed: the dense model, e.g. to time it beside the sparse one."""
    return bypassing(thresholded(model).values())


@contextmanager
def counting(model: nn.Module) -> Iterator[dict[str, Zeroed]]:
    """Count, per wrapper, the entries its threshold zeroes in the forwards inside the block."""
    layers = thresholded(model)
    counts = {name: Zeroed() for name in layers}
    for name, layer in layers.items():
        layer.counts = counts[name]
    try:
        yield counts
    finally:
        for layer in layers.values():
            layer.counts = None
