"""Cuts from calibration text: per wrapped module, the magnitudes below which a target share of entries lies.

One layer-by-layer pass over the dense model (prune.calibration.layerwise.collect_stats; memory: one block's
activations) samples the entries each cut will be compared with: the input x of every targeted projection
(teal) or a = act(gate(x)) of every gated FFN (cats), each sampled entry with its index j.

An entry is scored |v_j| s_j and the threshold t is the `sparsity`-quantile of the sampled scores; the cut the
wrapper compares |v_j| with is c_j = t / s_j. So on text like the calibration text that share of entries is
zero, and which entries go first is decided by the score:
- `magnitude` (s_j = 1): TEAL's and CATS's published rule, |v_j| alone.
- `weighted`: what zeroing entry j costs the module's output. teal: s_j = ||W[:, j]||, the norm of the column
  the entry multiplies (WINA, Chen et al. 2025); cats: s_i = rms(up_i(x)) ||W_down[:, i]||, the typical size of
  neuron i's up value times its down column, so |a_i| s_i estimates |h_i| ||W_down[:, i]|| without computing up.
Which one the benchmark keeps is chosen on validation perplexity (benchmarks/RESULTS.md, `activation`).

Cuts come from the dense model's activations (TEAL's way): upstream sparsity shifts downstream activations a
little, so the share reached on held-out text is measured and reported, not assumed. Allocation across layers
is uniform: every module targets the same share of its entries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from prune.calibration.layerwise import collect_stats
from prune.models.blocks import weight_matrix

SAMPLE_SIZE = 1 << 21  # entries sampled per module: the quantile's standard error is ~0.0004 at 50%
CALIBRATION_BATCH = 4  # windows per calibration forward
Score = Literal["magnitude", "weighted"]


class EntrySample:
    """A seeded random sample (at most `per_call` per forward) of the entries `read(x)` gives for a module's
    inputs x, as |value| and column index; plus, when `read` also returns a companion [tokens, width] (cats'
    up(x)), the per-column sum of its squares over every token."""

    def __init__(self, per_call: int, read: Callable[[Tensor], tuple[Tensor, Tensor | None]], seed: int):
        self.per_call = per_call
        self.read = read
        self.generator = torch.Generator().manual_seed(seed)
        self.values: list[Tensor] = []
        self.columns: list[Tensor] = []
        self.companion_squares: Tensor | None = None
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        entries, companion = self.read(x.reshape(-1, x.shape[-1]))
        entries = entries.detach().float().cpu()
        width = entries.shape[-1]
        flat = entries.abs().flatten()
        picked = torch.randint(flat.numel(), (min(self.per_call, flat.numel()),), generator=self.generator)
        self.values.append(flat[picked])
        self.columns.append(picked % width)
        self.tokens += entries.shape[0]
        if companion is not None:
            squares = companion.detach().float().cpu().pow(2).sum(dim=0)
            self.companion_squares = squares if self.companion_squares is None else self.companion_squares + squares

    def companion_rms(self) -> Tensor:
        return (self.companion_squares / max(self.tokens, 1)).sqrt()

    def cut(self, share: float, scale: Tensor) -> Tensor:
        """c_j = t / s_j, t the `share`-quantile of the sampled scores |v_j| s_j (s = `scale`, [width])."""
        scores = torch.cat(self.values) * scale[torch.cat(self.columns)]
        rank = min(max(round(share * scores.numel()), 1), scores.numel())
        threshold = float(scores.kthvalue(rank).values)
        return threshold / scale  # a zero score scale (a dead column) gives an infinite cut: never kept


def calibrate(
    model: nn.Module, names: list[str], sparsity: float, calibration: Tensor, score: Score, seed: int = 0
) -> dict[str, Tensor]:
    """The cut (float32 [entries]) of each named module for `sparsity`: of a projection's input (teal) or of a
    gated FFN's act(gate(x)) (cats), from the dense model's forwards over `calibration` [windows, seq_len]."""
    modules = dict(model.named_modules())
    sites = {name: _site(name, modules[name]) for name in names}  # the linear whose input is read
    readers = {id(modules[site]): read for site, read in sites.values()}
    batches = -(-len(calibration) // CALIBRATION_BATCH)
    per_call = -(-SAMPLE_SIZE // batches)
    by_site = {site: name for name, (site, _) in sites.items()}
    cuts: dict[str, Tensor] = {}

    def sink(samples: dict[str, EntrySample]) -> None:  # one block's samples, dropped once read
        for site, sample in samples.items():
            name = by_site[site]
            cuts[name] = sample.cut(sparsity, _scale(modules[name], sample, score))

    collect_stats(
        model,
        list(by_site),
        lambda module: EntrySample(per_call, readers[id(module)], seed),
        calibration,
        batch_size=CALIBRATION_BATCH,
        share_inputs=False,  # q/k/v read one input, but their columns (hence weighted scores) differ
        sink=sink,
        progress=False,
    )
    return {name: cuts[name] for name in names}


def _site(name: str, module: nn.Module) -> tuple[str, Callable[[Tensor], tuple[Tensor, Tensor | None]]]:
    """(the linear whose input is read, what turns that input into (entries, companion)): a projection's own
    input; a gated FFN's gate_proj input, into act(gate(x)) with up(x) beside it."""
    if hasattr(module, "gate_proj"):  # F.linear, not the modules: calling gate_proj would rerun the hook reading it
        gate, up = module.gate_proj, module.up_proj
        return f"{name}.gate_proj", lambda x: (
            module.act_fn(F.linear(x, gate.weight, gate.bias)),
            F.linear(x, up.weight, up.bias),
        )
    return name, lambda x: (x, None)


def _scale(module: nn.Module, sample: EntrySample, score: Score) -> Tensor:
    """s_j of each entry of `module` under `score` (see the module docstring), float32 on the CPU."""
    if hasattr(module, "gate_proj"):
        width = module.up_proj.out_features
        if score == "magnitude":
            return torch.ones(width)
        return sample.companion_rms() * module.down_proj.weight.detach().float().cpu().norm(dim=0)
    weight = weight_matrix(module).detach().float().cpu()
    return torch.ones(weight.shape[1]) if score == "magnitude" else weight.norm(dim=0)
