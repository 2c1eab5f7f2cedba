"""Cuts from calibration text: per wrapped module, the magnitudes below which a target share of entries lies.

The dense model runs block by block over the calibration windows (prune.calibration.layerwise.walk_blocks;
memory: one block's activations). In each block, forward hooks sample the entries each cut will be compared
with -- the input x of every targeted projection (teal) or a = act(gate(x)) of every gated FFN (cats) -- each
sampled entry with its index j.

An entry is scored |v_j| s_j, and a module's cut for a share p of zeros is c_j = t / s_j with t the p-quantile of
its sampled scores: on text like the calibration text that share of its entries is zero, and the score decides
which go first:
- `magnitude` (s_j = 1): TEAL's and CATS's published rule, |v_j| alone.
- `weighted`: what zeroing entry j costs the module's output. teal: s_j = ||W[:, j]||, the norm of the column
  the entry multiplies (WINA, Chen et al. 2025); cats: s_i = rms(up_i(x)) ||W_down[:, i]||, the typical size of
  neuron i's up value times its down column, so |a_i| s_i estimates |h_i| ||W_down[:, i]|| without computing up.

Allocation (the share p of each module):
- `uniform`: every module the target share, so the share of wrapped weights a token skips is the target too.
- `greedy` (TEAL's greedy, teal only): per block, the modules that read one input form a group (q/k/v, o,
  gate/up, down). Each group's cost curve is measured alone: the squared error of the block's output against
  the dense block's, on the first GREEDY_BATCHES calibration batches, with that group at each share in LEVELS.
  Then, from no sparsity, each step moves the group whose curve rises least per weight skipped to its next
  level, until the block skips the target share of its wrapped weights (the last step shortened to land on
  it). TEAL re-measures every candidate after every step; taking the groups' errors as adding up costs 4 x 9
  block runs instead of hundreds, and every block still skips the target share, spread by what each group
  costs.

Cuts come from the dense model's activations (TEAL's way): upstream sparsity shifts downstream activations a
little, so the share reached on held-out text is measured and reported, not assumed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from prune.calibration.layerwise import BlockTurn, walk_blocks
from prune.masks.base import unwrap
from prune.methods.activation.layers import Threshold, entries, is_gated_ffn, wrap
from prune.models.blocks import in_out_features, weight_matrix

SAMPLE_SIZE = 1 << 21  # entries sampled per module: the quantile's standard error is ~0.0004 at 50%
CALIBRATION_BATCH = 4  # windows per calibration forward
LEVELS = [step / 10 for step in range(10)]  # greedy allocation: the shares of zeros a group moves through
GREEDY_BATCHES = 1  # greedy allocation: calibration batches (of CALIBRATION_BATCH windows) its errors read
Score = Literal["magnitude", "weighted"]
Allocation = Literal["uniform", "greedy"]


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
        values, companion = self.read(x.reshape(-1, x.shape[-1]))
        values = values.detach().float().cpu()
        flat = values.abs().flatten()
        picked = torch.randint(flat.numel(), (min(self.per_call, flat.numel()),), generator=self.generator)
        self.values.append(flat[picked])
        self.columns.append(picked % values.shape[-1])
        self.tokens += values.shape[0]
        if companion is not None:
            squares = companion.detach().float().cpu().pow(2).sum(dim=0)
            self.companion_squares = squares if self.companion_squares is None else self.companion_squares + squares

    def companion_rms(self) -> Tensor:
        return (self.companion_squares / max(self.tokens, 1)).sqrt()

    def scored(self, scale: Tensor) -> Tensor:
        """The sampled scores |v_j| s_j, sorted (s = `scale`, [width])."""
        return (torch.cat(self.values) * scale[torch.cat(self.columns)]).sort().values


def cut_at(scores: Tensor, scale: Tensor, share: float) -> Tensor:
    """c_j = t / s_j, t the `share`-quantile of the sorted `scores`; share 0 keeps every nonzero entry."""
    if share <= 0:
        return torch.zeros_like(scale)
    threshold = float(scores[min(max(round(share * len(scores)), 1), len(scores)) - 1])
    return threshold / scale  # a zero scale (a dead column) gives an infinite cut: never kept


def calibrate(
    model: nn.Module,
    names: list[str],
    sparsity: float,
    calibration: Tensor,
    score: Score,
    allocation: Allocation,
    seed: int = 0,
) -> dict[str, Threshold]:
    """The threshold (cut float32 [entries] + its share of zeros) of each named module for `sparsity`: of a
    projection's input (teal) or of a gated FFN's act(gate(x)) (cats), from the dense model's forwards over
    `calibration` [windows, seq_len]."""
    modules = dict(model.named_modules())
    per_call = -(-SAMPLE_SIZE // -(-len(calibration) // CALIBRATION_BATCH))
    thresholds: dict[str, Threshold] = {}

    def visit(turn: BlockTurn) -> None:
        if turn.outputs is None:
            raise ValueError(f"targets outside the decoder blocks cannot be calibrated: {turn.names[:3]}")
        greedy = allocation == "greedy"
        # uniform: the dense block's one run samples and writes its outputs; greedy compares candidates on the
        # block's inputs first, and writes after
        samples, groups = _sample(modules, turn.names, lambda: turn.run(turn.writes and not greedy), per_call, seed)
        scales = {name: _scale(modules[name], samples[name], score) for name in turn.names}
        scored = {name: samples[name].scored(scales[name]) for name in turn.names}
        if greedy:
            shares = _greedy(turn.scope, turn.prefix, modules, groups, scored, scales, sparsity, turn.outputs)
            if turn.writes:
                turn.run(True)
        else:
            shares = dict.fromkeys(turn.names, sparsity)
        thresholds.update(
            {name: Threshold(cut_at(scored[name], scales[name], shares[name]), shares[name]) for name in turn.names}
        )

    targets = {name: modules[name] for name in names}
    walk_blocks(model, targets, calibration, visit, CALIBRATION_BATCH, None, "calibrating blocks", progress=False)
    return {name: thresholds[name] for name in names}


def _sample(modules, names, run, per_call, seed) -> tuple[dict[str, EntrySample], list[list[str]]]:
    """One dense run of the block with hooks: each module's EntrySample and the groups of modules that read one
    input (in the order they run)."""
    samples = {name: EntrySample(per_call, _reader(modules[name]), seed) for name in names}
    first_input: dict[str, Tensor] = {}
    handles = []
    for name in names:
        site = modules[name].gate_proj if is_gated_ffn(modules[name]) else modules[name]

        def hook(module, args, name=name):
            first_input.setdefault(name, args[0])
            samples[name].add(args[0].detach())

        handles.append(site.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    for name in names:
        leader = next((group for group in groups if first_input[group[0]] is first_input[name]), None)
        (leader.append(name) if leader is not None else groups.append([name]))
    return samples, groups


def _reader(module: nn.Module) -> Callable[[Tensor], tuple[Tensor, Tensor | None]]:
    """What turns the input a module's sample reads into (entries, companion): a projection's input as it is; a
    gated FFN's (read at gate_proj) into act(gate(x)) with up(x) beside it (F.linear: calling the projections
    would rerun the hook)."""
    if is_gated_ffn(module):
        gate, up = module.gate_proj, module.up_proj
        return lambda x: (module.act_fn(F.linear(x, gate.weight, gate.bias)), F.linear(x, up.weight, up.bias))
    return lambda x: (x, None)


def _scale(module: nn.Module, sample: EntrySample, score: Score) -> Tensor:
    """s_j of each entry of `module` under `score` (see the module docstring), float32 on the CPU."""
    if score == "magnitude":
        return torch.ones(entries(module))
    if is_gated_ffn(module):
        return sample.companion_rms() * module.down_proj.weight.detach().float().cpu().norm(dim=0)
    return weight_matrix(module).detach().float().cpu().norm(dim=0)


def _weights(module: nn.Module) -> int:
    """The weights a token reads through the wrapped entries of `module` (a gated FFN: up and down)."""
    if is_gated_ffn(module):
        return 2 * module.up_proj.in_features * module.up_proj.out_features
    in_features, out_features = in_out_features(module)
    return in_features * out_features


def _greedy(block, prefix, modules, groups, scored, scales, sparsity, outputs) -> dict[str, float]:
    """Each group's share of zeros (TEAL's greedy on error curves, see the module docstring), per module."""
    weights = [sum(_weights(modules[name]) for name in group) for group in groups]
    total = sum(weights)
    local = {name: name[len(prefix) :] for group in groups for name in group}
    layers = wrap(block, {local[name]: Threshold(cut_at(scored[name], scales[name], 0.0), 0.0) for name in local}, 1)

    def set_share(index: int, share: float) -> None:
        for name in groups[index]:
            mask = layers[local[name]].mask
            mask.cut = cut_at(scored[name], scales[name], share).to(mask.cut.device)

    curves = []  # curves[g][k]: squared error of the block output with group g alone at LEVELS[k]
    try:
        dense = outputs(GREEDY_BATCHES)  # every share 0: the dense block
        for index in range(len(groups)):
            curve = [0.0]
            for level in LEVELS[1:]:
                set_share(index, level)
                curve.append(float((outputs(GREEDY_BATCHES) - dense).pow(2).sum()))
            set_share(index, 0.0)
            curves.append(curve)
    finally:
        unwrap(block)
    steps = [0] * len(groups)  # each group's position on LEVELS
    skipped = 0.0  # weights skipped so far
    while skipped < sparsity * total:
        movable = [index for index in range(len(groups)) if steps[index] + 1 < len(LEVELS)]
        if not movable:
            break
        index = min(movable, key=lambda i: (curves[i][steps[i] + 1] - curves[i][steps[i]]) / weights[i])
        gain = (LEVELS[steps[index] + 1] - LEVELS[steps[index]]) * weights[index]
        if skipped + gain >= sparsity * total:  # the last step, shortened to land on the target
            shares = [LEVELS[step] for step in steps]
            shares[index] += (sparsity * total - skipped) / weights[index]
            return {name: shares[i] for i, group in enumerate(groups) for name in group}
        steps[index] += 1
        skipped += gain
    return {name: LEVELS[steps[i]] for i, group in enumerate(groups) for name in group}
