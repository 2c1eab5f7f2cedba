"""Layer-by-layer calibration: collect per-layer input statistics and prune block after block.

The sequential scheme of SparseGPT/Wanda, with memory bounded by one block's activations:

1. Capture. Run the model on the calibration blocks only up to its first decoder block: a forward
   pre-hook (with_kwargs) on block 0 copies the hidden states into one CPU tensor [n, seq, hidden] and
   raises `_StopForward`. The other arguments the block receives (causal mask, rotary `position_embeddings`,
   `position_ids`, ...) are kept per batch, deduplicated when equal (the usual case: one copy); caches are
   dropped and `use_cache` forced off.
2. For each block holding targets: forward hooks on its targeted linears feed `make_stats(module)` with
   the module inputs while the block runs on every batch; then `prune_module` is called per target and its
   mask (and, for SparseGPT, its updated weight) is written into the module in place; then the block runs
   again with the pruned weights, and its outputs overwrite the activation tensor in place, becoming the
   next block's inputs. So block k+1's statistics come from the pruned block k. The driver holds exactly
   one activation tensor (plus one batch in flight) whatever the depth of the model.
3. Targets outside the blocks (e.g. `lm_head`): after the blocks, one full-model forward per batch with
   hooks collects their statistics (the blocks are already pruned), then they are pruned.
4. With `restore=True` (the default) each target's original weight is copied to CPU before it is touched
   and written back (also on error): the model leaves bit-identical, and the result carries the
   masks plus the updated weights of modules the method changed beyond zeroing. A block's originals go back as
   soon as its outputs are written (the next blocks read those outputs, never its weights), so one block's
   copies are held at a time; with targets outside the blocks, whose statistics come from a forward through the
   pruned blocks, they are kept to the end. `restore=False` leaves the pruned (and updated) weights in the
   model and the result carries only the masks: the updated weights as well would be a second copy of every
   target.

`collect_stats` walks the same way over the dense model (statistics only, each block run once): both drivers, and
activation sparsity's calibration, are visitors of `walk_blocks`, which captures, onloads, runs and offloads the
blocks.

`make_stats=None` (magnitude) runs no forward at all and, with `restore=True`, never writes a weight.
Hooks are removed and the train/eval mode is restored in `finally` blocks.

Sequential onloading: with a `placement` (see prune.calibration.placement), each block is brought onto the work
device (or read from disk) by `placement.onload` just before its statistics, and handed back by
`placement.offload` right after its outputs are written, so the work device holds one block plus its
activations, never the model. Blocks after the last targeted one are neither onloaded nor run.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from prune.core.errors import UserInputError
from prune.core.memory import release_freed_memory
from prune.models.blocks import LINEAR_TYPES, find_blocks, weight_matrix


class BlockPlacement(Protocol):
    """Where a decoder block's weights live between its turns (RAM, disk) and how it reaches the work device."""

    def onload(self, index: int, block: nn.Module) -> None:
        """Make block `index`'s weights real on the work device."""

    def offload(self, index: int, block: nn.Module) -> None:
        """Block `index` is done (pruned, outputs written): move it off the work device."""


class Accumulator(Protocol):
    def add(self, x: Tensor) -> None:
        """Receive a layer input shaped [..., in_features]."""


MakeStats = Callable[[nn.Module], Accumulator]
# (name, module, stats or None) -> (keep_mask [out, in], updated weight [out, in] or None)
LayerPruner = Callable[[str, nn.Module, Any], "tuple[Tensor, Tensor | None]"]

_CACHE_KEYS = ("cache", "past_key_values", "past_key_value", "layer_past")


@dataclass
class LayerwiseResult:
    masks: dict[str, Tensor] = field(default_factory=dict)  # bool [out, in] on CPU, True = keep
    weights: dict[str, Tensor] = field(default_factory=dict)  # updated [out, in] on CPU (SparseGPT update)


class _StopForward(Exception):
    """Raised by the block-0 pre-hook to end the capture forward early."""


def prune_layerwise(
    model: nn.Module,
    target_names: list[str],
    prune_module: LayerPruner,
    make_stats: MakeStats | None,
    calib_blocks: Tensor | None = None,
    *,
    batch_size: int = 1,
    restore: bool = True,
    progress: bool = True,
    placement: BlockPlacement | None = None,
    keep_results: bool = True,
) -> LayerwiseResult:
    """Prune `target_names` of `model` block by block on `calib_blocks` (LongTensor [n, seq_len]).
    `keep_results=False` (with `restore=False`) keeps no mask or updated weight in the result: the pruned weights
    carry them, and a streamed model's masks would not fit in memory."""
    modules = _resolve_targets(model, target_names)
    result = LayerwiseResult()
    if make_stats is None and placement is None:
        with torch.no_grad():
            for name, module in modules.items():
                _prune_one(name, module, None, prune_module, result, apply=not restore, originals=None)
        return result
    if make_stats is None:
        return _prune_placed_without_data(model, modules, prune_module, result, placement, restore, keep_results)

    originals: dict[str, Tensor] | None = {} if restore else None
    blocks_name, blocks = find_blocks(model)
    # a whole-model forward after the blocks (targets outside them) reads every block's pruned weights
    keep_originals = any(_block_index(name, blocks_name, len(blocks)) is None for name in modules)

    def visit(turn: BlockTurn) -> None:
        """Statistics of the turn's targets from the (pruned) blocks before, then prune them; then the block's
        outputs, after which no forward reads its pruned weights: its originals go back."""
        stats = _collect(modules, turn.names, make_stats, lambda: turn.run(False))
        for name in turn.names:
            _prune_one(name, modules[name], stats[name], prune_module, result, True, originals)
            if not keep_results:
                _forget(result, name)
        del stats
        release_freed_memory()
        if turn.writes:
            turn.run(True)
        if originals and not keep_originals:
            _restore(modules, originals)

    try:
        walk_blocks(model, modules, calib_blocks, visit, batch_size, placement, "pruning blocks", progress)
    finally:
        if originals:
            _restore(modules, originals)
    return result


def _restore(modules: dict[str, nn.Module], originals: dict[str, Tensor]) -> None:
    """Write the saved original weights back and drop the copies."""
    with torch.no_grad():
        while originals:
            name, original = originals.popitem()
            modules[name].weight.copy_(original)


@dataclass
class BlockTurn:
    """One visit of `walk_blocks`: `scope` (a decoder block, or the whole model for the targets outside the
    blocks), its target `names`, and the ways to run it, as it is at that moment, over the calibration batches."""

    scope: nn.Module
    prefix: str  # the scope's module name and a dot ("" for the whole model): a target's name inside it follows
    names: list[str]
    writes: bool  # a later block reads this one's outputs: the visitor's last run must be run(True)
    run: Callable[[bool], None]  # every batch; with write=True its outputs replace its inputs (the model ignores it)
    # a block's outputs over its first `batches` batches (None: every batch) [rows, seq, hidden] on the CPU, its
    # inputs left as they are (a visitor comparing candidates); None for the whole model
    outputs: Callable[[int | None], Tensor] | None = None


def walk_blocks(
    model: nn.Module,
    modules: dict[str, nn.Module],
    calib_blocks: Tensor | None,
    visit: Callable[[BlockTurn], None],
    batch_size: int,
    placement: BlockPlacement | None,
    desc: str,
    progress: bool,
) -> None:
    """The one walk of the layer-by-layer drivers (prune_layerwise, collect_stats, activation's calibration):
    capture block 0's inputs for the calibration batches, then for each block up to the last holding one of
    `modules` (onloaded by `placement`), `visit` its BlockTurn; the visitor leaves the block's outputs written
    into the activations when `writes` (a later block reads them). A block without targets just runs. Targets
    outside the blocks are visited last with the whole model as scope. No gradients; evaluation mode, restored at
    the end. Memory: one block's inputs, plus what a visitor holds."""
    blocks, prefix, per_block, outside, last, batches = _plan(model, modules, calib_blocks, batch_size)
    _check_placed(placement, outside)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if last >= 0:
                acts, calls = _capture_block_inputs(model, blocks[0], batches)

                def outputs(block: nn.Module, batches: int | None) -> Tensor:
                    return torch.cat(
                        [_call_block(block, acts, call).to(device="cpu", dtype=acts.dtype) for call in calls[:batches]]
                    )

                for index in tqdm(range(last + 1), desc=desc, disable=not progress):
                    block, names, writes = blocks[index], per_block[index], index < last
                    if placement is not None:
                        placement.onload(index, block)
                    if names:
                        turn = BlockTurn(
                            block,
                            f"{prefix}{index}.",
                            names,
                            writes,
                            lambda write, block=block: _run_block(block, acts, calls, write),
                            lambda batches=None, block=block: outputs(block, batches),
                        )
                        visit(turn)
                    elif writes:
                        _run_block(block, acts, calls, write=True)
                    if placement is not None:
                        placement.offload(index, block)
                del acts, calls
            if outside:
                run_model = _whole_model_runner(model, batches)
                visit(BlockTurn(model, "", outside, False, lambda write: run_model()))
    finally:
        model.train(was_training)


def _check_placed(placement: BlockPlacement | None, outside: list[str]) -> None:
    """Placed blocks are all a placement moves: targets outside them cannot be reached."""
    if placement is not None and outside:
        raise UserInputError(
            f"targets outside the decoder blocks ({', '.join(outside[:3])}) cannot be pruned with runtime.offload; "
            "narrow method.targets to the blocks, or use runtime.offload: none."
        )


def visit_placed_blocks(
    model: nn.Module,
    placement: BlockPlacement,
    visit: Callable[[int, nn.Module], None],
    wanted: Callable[[int], bool] = lambda index: True,
) -> None:
    """The data-free walk over placed blocks: each `wanted` block onloaded, `visit(index, block)`ed, offloaded."""
    _, blocks = find_blocks(model)
    with torch.no_grad():
        for index, block in enumerate(blocks):
            if wanted(index):
                placement.onload(index, block)
                visit(index, block)
                placement.offload(index, block)


def _prune_placed_without_data(
    model, modules, prune_module, result, placement: BlockPlacement, restore: bool, keep_results: bool
) -> LayerwiseResult:
    """Data-free pruning (magnitude) of placed blocks: onload each block, prune its targets, offload."""
    blocks_name, blocks = find_blocks(model)
    per_block = [
        [name for name in modules if _block_index(name, blocks_name, len(blocks)) == index]
        for index in range(len(blocks))
    ]

    def visit(index: int, block: nn.Module) -> None:
        for name in per_block[index]:
            _prune_one(name, modules[name], None, prune_module, result, apply=not restore, originals=None)
            if not keep_results:
                _forget(result, name)

    visit_placed_blocks(model, placement, visit, lambda index: bool(per_block[index]))
    return result


def _forget(result: LayerwiseResult, name: str) -> None:
    result.masks.pop(name, None)
    result.weights.pop(name, None)


def _whole_model_runner(model: nn.Module, batches: list[Tensor]) -> Callable[[], None]:
    """Runs the whole model over the calibration batches: for targets outside the decoder blocks."""
    forward_kwargs, device = _forward_kwargs(model), _input_device(model)

    def run() -> None:
        for batch in batches:
            model(batch.to(device), **forward_kwargs)

    return run


def _resolve_targets(model: nn.Module, target_names: list[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    resolved = {}
    for name in target_names:
        module = modules.get(name)
        if module is None:
            raise UserInputError(f"target {name!r} is not a module of {type(model).__name__}.")
        if not isinstance(module, LINEAR_TYPES):
            raise UserInputError(f"target {name!r} is a {type(module).__name__}; one-shot methods prune linears.")
        resolved[name] = module
    return resolved


def _prefix(blocks_name: str) -> str:
    """What the names of the modules inside the blocks start with, before the block's index."""
    return blocks_name + "." if blocks_name else ""


def _block_index(name: str, blocks_name: str, count: int) -> int | None:
    prefix = _prefix(blocks_name)
    if not name.startswith(prefix):
        return None
    head = name[len(prefix) :].split(".", 1)[0]
    return int(head) if head.isdigit() and int(head) < count else None


def _prune_one(name, module, stats, prune_module, result, apply: bool, originals) -> None:
    """Ask `prune_module` for the mask (and maybe new weight); write them into the module if `apply`."""
    weight = weight_matrix(module)
    mask, new_weight = prune_module(name, module, stats)
    mask = mask.to(device=weight.device, dtype=torch.bool)
    if mask.shape != weight.shape:
        raise ValueError(f"{name}: mask shape {tuple(mask.shape)} != weight [out, in] {tuple(weight.shape)}")
    if new_weight is not None:
        new_weight = new_weight.to(device=weight.device, dtype=weight.dtype).masked_fill(~mask, 0)
        if not apply or originals is not None:  # written in place for good: the model holds it
            result.weights[name] = new_weight.cpu()
    result.masks[name] = mask.cpu()
    if apply:
        if originals is not None and name not in originals:
            originals[name] = module.weight.detach().to("cpu", copy=True)
        if new_weight is not None:
            weight.copy_(new_weight)
        else:
            weight.masked_fill_(~mask, 0)


def _collect(modules, names, make_stats: MakeStats, run: Callable[[], None]) -> dict[str, Accumulator]:
    """Run `run()` with forward hooks feeding one accumulator per named module; hooks always removed."""
    stats = {name: make_stats(modules[name]) for name in names}
    handles = []
    try:
        for name in names:

            def hook(module, args, output, acc=stats[name]):
                acc.add(args[0].detach())

            handles.append(modules[name].register_forward_hook(hook))
        run()
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """use_cache=False when the model's forward takes it (no KV cache is built during calibration)."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


@dataclass
class _BlockCall:
    """How block 0 was called for one batch: the hidden-states slot and the other arguments."""

    rows: slice  # rows of the activation tensor this batch covers
    args: tuple  # positional arguments after the hidden states
    kwargs: dict  # keyword arguments (hidden states removed if passed by keyword)
    by_keyword: bool


def _capture_block_inputs(model: nn.Module, block0: nn.Module, batches: list[Tensor]):
    """One CPU tensor [n, seq, hidden] of block-0 inputs, and one _BlockCall per batch."""
    acts: Tensor | None = None
    calls: list[_BlockCall] = []
    state = {"start": 0}
    total = sum(len(b) for b in batches)

    def pre_hook(module, args, kwargs):
        nonlocal acts
        by_keyword = not args
        hidden = kwargs["hidden_states"] if by_keyword else args[0]
        if acts is None:
            acts = torch.empty((total, *hidden.shape[1:]), dtype=hidden.dtype, device="cpu")
        rows = slice(state["start"], state["start"] + hidden.shape[0])
        acts[rows] = hidden.detach().cpu()
        rest = tuple(None if _is_cache(a) else a for a in args[1:])
        kw = {k: (None if (k in _CACHE_KEYS or _is_cache(v)) else v) for k, v in kwargs.items() if k != "hidden_states"}
        if "use_cache" in kw:
            kw["use_cache"] = False
        previous = calls[-1] if calls else None
        if previous is not None and _same(previous.args, rest) and _same(previous.kwargs, kw):
            rest, kw = previous.args, previous.kwargs  # share one copy across batches
        calls.append(_BlockCall(rows, rest, kw, by_keyword))
        raise _StopForward

    forward_kwargs = _forward_kwargs(model)
    device = _input_device(model)
    handle = block0.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(batch.to(device), **forward_kwargs)
            except _StopForward:
                pass
            else:
                raise RuntimeError("the calibration forward never reached the first block")
            state["start"] += len(batch)
    finally:
        handle.remove()
    return acts, calls


def _run_block(block: nn.Module, acts: Tensor, calls: list[_BlockCall], write: bool) -> None:
    """Run `block` on every batch; with `write`, its outputs replace its inputs in `acts` (in place)."""
    for call in calls:
        out = _call_block(block, acts, call)
        if write:
            acts[call.rows] = out.to(device="cpu", dtype=acts.dtype)


def _call_block(block: nn.Module, acts: Tensor, call: _BlockCall) -> Tensor:
    """The block's hidden-states output for one batch of `acts`."""
    device = next(block.parameters()).device
    hidden = acts[call.rows].to(device)
    args, kwargs = _to_device(call.args, device), _to_device(call.kwargs, device)
    out = block(*args, hidden_states=hidden, **kwargs) if call.by_keyword else block(hidden, *args, **kwargs)
    return out if isinstance(out, Tensor) else out[0]  # a tuple, a list or a ModelOutput


def _is_cache(value: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, Cache)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def collect_stats(
    model: nn.Module,
    target_names: list[str],
    make_stats: MakeStats,
    calib_blocks: Tensor,
    *,
    batch_size: int = 1,
    share_inputs: bool = True,
    sink: Callable[[dict[str, Accumulator]], None] | None = None,
    progress: bool = True,
    placement: BlockPlacement | None = None,
) -> dict[str, Accumulator]:
    """One layer-by-layer pass over the *dense* model: input statistics for every target, no weight touched.

    Unlike `prune_layerwise`, block k+1 sees the dense block k's outputs, so the statistics are the unpruned
    model's and serve any number of sparsity levels (the sweep's shared path); each block runs once per batch
    (its targets' statistics are gathered while its outputs are written). Memory: one block's activations,
    as in `prune_layerwise`. With `share_inputs`, targets that read the very same input tensor (q/k/v,
    gate/up) share one accumulator: `stats[q] is stats[k]`. With `sink`, each block's statistics are handed
    over as soon as they are complete and not kept (the return value is then empty), so the caller can
    write them to disk and hold one block's statistics at a time. With a `placement`, each block visits the work
    device for its turn as in `prune_layerwise`, and `sink` runs while the block is still there (so it can read
    the block's weights beside its statistics).
    """
    modules = _resolve_targets(model, target_names)
    result: dict[str, Accumulator] = {}
    emit = sink or result.update

    def visit(turn: BlockTurn) -> None:
        """The statistics of the turn's targets, gathered while the block runs once and (when it writes) writes its
        outputs."""
        emit(_collect_shared(modules, turn.names, make_stats, turn.scope, share_inputs, lambda: turn.run(turn.writes)))

    walk_blocks(model, modules, calib_blocks, visit, batch_size, placement, "calibration statistics", progress)
    return result


def _collect_shared(
    modules, names, make_stats: MakeStats, scope: nn.Module, share_inputs: bool, run: Callable[[], None]
) -> dict[str, Accumulator]:
    """Like `_collect`, but a target whose input is the same tensor as an earlier target's in the same call of
    `scope` (one batch) reuses that target's accumulator instead of adding the same rows again."""
    stats: dict[str, Accumulator] = {}
    seen: list[tuple[Tensor, str]] = []  # inputs of this call of `scope`, held so their memory is not reused

    def same(a: Tensor, b: Tensor) -> bool:
        return a is b or (
            a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
        )

    def hook(module, args, output, name):
        x = args[0]
        if share_inputs:
            leader = next((first for ref, first in seen if same(ref, x)), None)
            if leader is not None:
                stats.setdefault(name, stats[leader])
                return
            seen.append((x, name))
        if name not in stats:
            stats[name] = make_stats(module)
        stats[name].add(x.detach())

    handles = [scope.register_forward_pre_hook(lambda module, args: seen.clear())]
    try:
        for name in names:
            handles.append(
                modules[name].register_forward_hook(
                    lambda module, args, output, name=name: hook(module, args, output, name)
                )
            )
        run()
    finally:
        for handle in handles:
            handle.remove()
        seen.clear()
    return stats


def _plan(model: nn.Module, modules: dict[str, nn.Module], calib_blocks: Tensor | None, batch_size: int):
    """Check the calibration input and group the targets by block: (blocks, the prefix of their names, target names
    per block, targets outside the blocks, index of the last block with targets, calibration batches)."""
    if calib_blocks is None or calib_blocks.dim() != 2 or len(calib_blocks) == 0:
        raise UserInputError("calibration needs token blocks shaped [n_samples, seq_len] with n_samples >= 1.")
    if batch_size < 1:
        raise UserInputError(f"calibration batch_size must be >= 1, got {batch_size}.")
    blocks_name, blocks = find_blocks(model)
    per_block: list[list[str]] = [[] for _ in blocks]
    outside: list[str] = []
    for name in modules:
        index = _block_index(name, blocks_name, len(blocks))
        (outside if index is None else per_block[index]).append(name)
    last = max((i for i, names in enumerate(per_block) if names), default=-1)
    return blocks, _prefix(blocks_name), per_block, outside, last, list(torch.split(calib_blocks, batch_size))
