"""One-shot pruning and perplexity of a model streamed from its safetensors shards (runtime.offload: disk).

The model is a skeleton on the meta device (accelerate's `init_empty_weights`: no weight memory; buffers such as
rotary frequencies stay real). Only the tensors outside the decoder blocks (embeddings, final norm, head) are
read up front; the layer-by-layer driver then brings one block at a time in from the shards (`FromShards`),
prunes it and writes it to the output checkpoint. Resident at any time: the tensors outside the blocks, one
block, and the calibration activations [n, seq, hidden]. The computation is the in-memory driver's own, so the
streamed result is bit-identical to pruning the loaded model. `stream_rewrite` is the same walk for a structural
method: the dense statistics (`collect_stats`), a decision per block, and the block's tensors written in the
smaller shapes of the output model's config.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from eval.perplexity import PerplexityResult, perplexity_of, window_nll
from prune.calibration.layerwise import (
    Accumulator,
    LayerPruner,
    MakeStats,
    _block_index,
    _capture_block_inputs,
    _forward_kwargs,
    _run_block,
    collect_stats,
    prune_layerwise,
    visit_placed_blocks,
)
from prune.calibration.placement import FromShards, Rewrite, unchanged
from prune.core.memory import release_freed_memory
from prune.models.blocks import find_blocks
from prune.models.loading import checkpoint_errors
from prune.models.shards import ShardedWriter, ShardReader, TensorSpec


def skeleton(model_dir: Path, dtype: torch.dtype) -> PreTrainedModel:
    """The model of `model_dir` with every parameter on the meta device, a tied head tied as the loaded model's
    (what its structural map reads)."""
    with checkpoint_errors(str(model_dir)):
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    model.config.dtype = dtype
    model.tie_weights()
    return model.eval()


def _block_names(model: nn.Module) -> tuple[str, set[str]]:
    blocks_name, blocks = find_blocks(model)
    prefix = blocks_name + "." if blocks_name else ""
    return blocks_name, {prefix + name for name in blocks.state_dict()}


def _load_outside_blocks(model: nn.Module, reader: ShardReader, dtype: torch.dtype) -> None:
    """Read every checkpoint tensor that is not in a block (embeddings, final norm, head) into the skeleton;
    a tied head shares the embedding's tensor, as transformers ties it."""
    _, in_blocks = _block_names(model)
    for name, _, _ in reader.specs().values():
        if name not in in_blocks:
            tensor = reader.get_tensor(name)
            set_module_tensor_to_device(
                model, name, "cpu", value=tensor, dtype=dtype if tensor.is_floating_point() else None
            )
    model.tie_weights()


def output_specs(
    model: nn.Module, reader: ShardReader, dtype: torch.dtype, shapes: dict[str, tuple[int, ...]] | None = None
) -> list[TensorSpec]:
    """The output checkpoint: the input's tensors in model order, floating ones in `dtype`, in their `shapes`
    (default: the input's)."""
    source, shapes = reader.specs(), shapes or {}
    order = [name for name in model.state_dict() if name in source]
    order += [name for name in source if name not in set(order)]
    return [
        (name, dtype if source[name][1].is_floating_point else source[name][1], shapes.get(name, source[name][2]))
        for name in order
    ]


def _shapes_of(config) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a model of `config` (built on the meta device: nothing allocated)."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


@contextmanager
def _streamed_output(
    model_dir: Path,
    out_dir: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_shard_bytes: int,
    config=None,
    rewrite: Rewrite = unchanged,
):
    """The skeleton of `model_dir` (the tensors outside the blocks read) and a `FromShards` placement writing the
    blocks into `out_dir` as `rewrite` says, in the shapes of a model of `config` (default: the input's). The
    caller walks the blocks; then the tensors it never wrote are copied through `rewrite`, and the index,
    config.json and generation config are written."""
    reader = ShardReader(model_dir)
    model = skeleton(model_dir, dtype)
    _load_outside_blocks(model, reader, dtype)
    blocks_name, _ = _block_names(model)
    specs = output_specs(model, reader, dtype, _shapes_of(config) if config is not None else None)
    with ShardedWriter(out_dir, specs, max_shard_bytes) as writer:
        yield model, FromShards(model, blocks_name, reader, writer, device, dtype, rewrite)
        for name in writer.pending():  # blocks never visited and the tensors outside the blocks
            writer.write(name, rewrite(name, reader.get_tensor(name)).to(writer.where[name].entries[name][0]))
    (config or model.config).save_pretrained(out_dir)
    _copy_generation_config(model_dir, out_dir)


def stream_prune(
    model_dir: Path,
    out_dir: Path,
    target_names,
    prune_module: LayerPruner,
    make_stats: MakeStats | None,
    calib_blocks: Tensor | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1,
    max_shard_bytes: int = 2 * 1024**3,
) -> None:
    """Prune the checkpoint in `model_dir` block by block into a sharded checkpoint in `out_dir` (config.json,
    shards, index; `target_names(model)` picks the targets of the skeleton). The pruned weights carry the masks."""
    with _streamed_output(model_dir, out_dir, device=device, dtype=dtype, max_shard_bytes=max_shard_bytes) as (
        model,
        placement,
    ):
        prune_layerwise(
            model,
            target_names(model),
            prune_module,
            make_stats,
            calib_blocks,
            batch_size=batch_size,
            restore=False,
            progress=False,
            placement=placement,
            keep_results=False,
        )


def stream_rewrite(
    model_dir: Path,
    out_dir: Path,
    config,
    rewrite: Rewrite,
    decide: Callable[[nn.Module, int, dict[str, Accumulator]], None],
    stat_targets,
    make_stats: MakeStats | None,
    calib_blocks: Tensor | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1,
    max_shard_bytes: int = 2 * 1024**3,
) -> None:
    """Rewrite the checkpoint in `model_dir` block by block into a checkpoint of `config` (its shapes) in
    `out_dir`: each block read from the shards, its *dense* calibration statistics gathered on the targets
    `stat_targets(model)` names (`collect_stats`: block k+1 sees the dense block k, as a whole-model forward does;
    none when `make_stats` is None), `decide(model, index, stats)` called while the block is on the device, then
    its tensors written as `rewrite(name, tensor)` (a structural method slices them to the units it keeps).
    Every block must have targets (`decide` is what `rewrite` reads)."""
    with _streamed_output(
        model_dir, out_dir, device=device, dtype=dtype, max_shard_bytes=max_shard_bytes, config=config, rewrite=rewrite
    ) as (model, placement):
        blocks_name, blocks = find_blocks(model)
        if make_stats is None:
            visit_placed_blocks(model, placement, lambda index, block: decide(model, index, {}))
            return

        def sink(stats: dict[str, Accumulator]) -> None:
            decide(model, _block_index(next(iter(stats)), blocks_name, len(blocks)), stats)

        collect_stats(
            model,
            stat_targets(model),
            make_stats,
            calib_blocks,
            batch_size=batch_size,
            share_inputs=False,
            sink=sink,
            progress=False,
            placement=placement,
        )


def _copy_generation_config(model_dir: Path, out_dir: Path) -> None:
    source = model_dir / "generation_config.json"
    if source.is_file():
        (out_dir / source.name).write_text(source.read_text())


@torch.no_grad()
def stream_perplexity(
    model_dir: Path,
    blocks: Tensor,
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int = 1,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity of the checkpoint in `model_dir` on token windows `blocks` [n, seq], one decoder block in
    memory at a time (as SparseGPT's reference evaluation): every window goes through block k before block k+1
    is read. The head then runs on the last hidden states through the model's own forward, the blocks replaced
    by a stand-in that returns them. The per-window NLLs are summed as `eval.perplexity` sums them, so the result
    (intervals and paired comparisons included) is the loaded model's."""
    reader = ShardReader(model_dir)
    model = skeleton(model_dir, dtype)
    _load_outside_blocks(model, reader, dtype)
    blocks_name, layers = find_blocks(model)
    placement = FromShards(model, blocks_name, reader, None, device, dtype)
    batches = list(torch.split(blocks, batch_size))
    acts, calls = _capture_block_inputs(model, layers[0], batches)
    for index, layer in enumerate(layers):
        placement.onload(index, layer)
        _run_block(layer, acts, calls, write=True)
        placement.offload(index, layer)
    release_freed_memory()
    sums: list[float] = []
    for call, batch in zip(calls, batches):
        sums += window_nll(_head_logits(model, layers, batch, acts[call.rows]), batch).tolist()
    return perplexity_of(sums, blocks.shape[1], desc)


class _Replay(nn.Module):
    """Stands in for the decoder blocks: the first returns the final hidden states, the others pass them on."""

    def __init__(self, hidden: Tensor | None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        return self.hidden if self.hidden is not None else hidden_states


def _head_logits(model: nn.Module, layers: nn.ModuleList, batch: Tensor, hidden: Tensor) -> Tensor:
    real = list(layers)
    try:
        for index in range(len(layers)):
            layers[index] = _Replay(hidden if index == 0 else None)
        output = model(batch, **_forward_kwargs(model))
    finally:
        for index, layer in enumerate(real):
            layers[index] = layer
    return output.logits if hasattr(output, "logits") else output[0]
