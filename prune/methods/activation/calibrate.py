"""Thresholds from calibration text: per wrapped module, the magnitude below which a target share of entries lies.

One layer-by-layer pass over the dense model (prune.calibration.layerwise.collect_stats; memory: one block's
activations) samples the magnitudes each threshold will compare: the input of every targeted projection (teal;
q/k/v read one input and share one sample, as do gate/up) or act(gate(x)) of every gated FFN (cats). A
threshold is the `sparsity`-quantile of its sample, so on text like the calibration text that share of entries
falls at or below it. Thresholds come from the dense model's activations (TEAL's way): upstream sparsity shifts
downstream activations a little, so the share reached on held-out text is measured and reported, not assumed.

Allocation across layers is uniform: every threshold targets the same share, so the share of weight columns
skipped model-wide is the target too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from prune.calibration.layerwise import collect_stats

SAMPLE_SIZE = 1 << 21  # magnitudes kept per threshold: the quantile's standard error is ~0.0004 at 50%
CALIBRATION_BATCH = 4  # windows per calibration forward


class MagnitudeSample:
    """A seeded random sample of |f(x)| entries of one module's inputs x, at most `per_call` per forward."""

    def __init__(self, per_call: int, transform: Callable[[Tensor], Tensor], seed: int):
        self.per_call = per_call
        self.transform = transform
        self.generator = torch.Generator().manual_seed(seed)
        self.parts: list[Tensor] = []

    def add(self, x: Tensor) -> None:
        values = self.transform(x).detach().abs().flatten().float().cpu()
        if values.numel() > self.per_call:
            values = values[torch.randint(values.numel(), (self.per_call,), generator=self.generator)]
        self.parts.append(values)

    def quantile(self, share: float) -> float:
        """The magnitude at or below which `share` of the sampled entries lie."""
        values = torch.cat(self.parts)
        rank = min(max(round(share * values.numel()), 1), values.numel())
        return float(values.kthvalue(rank).values)


def calibrate(
    model: nn.Module, names: list[str], sparsity: float, calibration: Tensor, seed: int = 0
) -> dict[str, float]:
    """The threshold of each named module for `sparsity`: of its input (a projection, teal) or of
    act(gate(x)) (a gated FFN, cats), from the model's forwards over `calibration` [windows, seq_len]."""
    modules = dict(model.named_modules())
    read_at = {name: _input_site(name, modules[name]) for name in names}  # the linear whose input is sampled
    transforms = {id(modules[site]): transform for site, transform in read_at.values()}
    batches = -(-len(calibration) // CALIBRATION_BATCH)
    per_call = -(-SAMPLE_SIZE // batches)

    def make_sample(module: nn.Module) -> MagnitudeSample:
        return MagnitudeSample(per_call, transforms[id(module)], seed)

    thresholds: dict[str, float] = {}
    by_site = {site: name for name, (site, _) in read_at.items()}

    def sink(samples: dict[str, MagnitudeSample]) -> None:  # one block's samples, dropped once read
        for site, sample in samples.items():
            thresholds[by_site[site]] = sample.quantile(sparsity)

    collect_stats(
        model,
        list(by_site),
        make_sample,
        calibration,
        batch_size=CALIBRATION_BATCH,
        sink=sink,
        progress=False,
    )
    return {name: thresholds[name] for name in names}


def _input_site(name: str, module: nn.Module) -> tuple[str, Callable[[Tensor], Tensor]]:
    """(the linear whose input carries the magnitudes, what turns that input into them): a projection's own
    input; a gated FFN's gate_proj input, through act(gate(x))."""
    if hasattr(module, "gate_proj"):
        return f"{name}.gate_proj", lambda x: module.act_fn(module.gate_proj(x))
    return name, lambda x: x
