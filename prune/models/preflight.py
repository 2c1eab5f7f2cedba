"""Will the model fit? Checked from config.json before any weight is read, so a model that cannot fit ends with
exit 2, the figures and the fix, instead of the OOM killer.

The parameter count comes from the architecture built on the meta device (accelerate's `init_empty_weights`:
exact for any transformers architecture, no memory); the bytes are that count times the chosen dtype's size.
What must fit where depends on `runtime.offload`: the whole model on the device (none), the whole model in RAM
and one block on the device (cpu), one block in RAM (disk). The same skeleton gives the sizes that decide a
forward's activations (`ModelShape`), from which prune.runs.preflight estimates what calibration, training and
evaluation add on top of the weights; and its tensor shapes, against which the checkpoint's safetensors headers
are checked (prune.models.shards.check_checkpoint), so a damaged or mismatched checkpoint is refused before the
run directory is claimed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from prune.core.errors import UserInputError
from prune.models.blocks import LINEAR_TYPES, find_blocks, in_out_features
from prune.models.loading import checkpoint_errors
from prune.models.runtime import Runtime
from prune.models.shards import INDEX_FILE, SINGLE_FILE, check_checkpoint

GB = 1024**3
# Activation estimate, per token of a batch (measured on CPU float32 Llamas with 4 and 8 blocks, seq 256-512,
# benchmarks/RESULTS.md `memory_estimate`; the estimate lies 7-8% above the measured growth of peak RSS):
BLOCK_FACTOR = 1.5  # values a block keeps for the backward, per (in + out) feature of its linear layers
LOGIT_COPIES = 3  # float32 vocabulary-sized values per token: the logits, their log-softmax and its gradient


@dataclass(frozen=True)
class ModelSize:
    parameters: int
    largest_block_parameters: int

    def bytes(self, dtype: torch.dtype) -> int:
        return self.parameters * dtype.itemsize

    def block_bytes(self, dtype: torch.dtype) -> int:
        return self.largest_block_parameters * dtype.itemsize


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide how much memory a forward's activations take, read from the skeleton."""

    hidden: int  # the residual stream's width
    vocab: int  # the output layer's width (the logits)
    blocks: int
    block_features: int  # sum of (in + out) features of the largest block's linear layers

    def training_bytes_per_token(self, dtype: torch.dtype) -> int:
        """What one token of a micro-batch keeps alive until the backward: every block's saved values and the
        float32 logits, their log-softmax and its gradient (attention is the memory-efficient kernel: no
        seq_len x seq_len scores are kept)."""
        return round(self.blocks * self.block_features * BLOCK_FACTOR * dtype.itemsize + self.vocab * 4 * LOGIT_COPIES)

    def inference_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Without gradients only one block's values live at a time, plus the logits."""
        return round(self.block_features * BLOCK_FACTOR * dtype.itemsize + self.vocab * 4 * LOGIT_COPIES)


def model_skeleton(model_dir: Path) -> nn.Module:
    """The model a directory's config.json describes, every tensor on the meta device (no weight is read)."""
    with checkpoint_errors(str(model_dir)):
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    model.tie_weights()  # a tied head is the embedding's tensor, as in the loaded model (not a tensor of its own)
    return model


def model_size(model_dir: Path) -> ModelSize:
    """Parameter counts of the model a directory's config.json describes (no weight is read)."""
    return size_of(model_skeleton(model_dir))


def size_of(model: nn.Module) -> ModelSize:
    _, blocks = find_blocks(model)
    largest = max((sum(p.numel() for p in block.parameters()) for block in blocks), default=0)
    return ModelSize(sum(p.numel() for p in model.parameters()), largest)


def shape_of(model: nn.Module) -> ModelShape:
    _, blocks = find_blocks(model)
    features = [
        sum(sum(in_out_features(module)) for module in block.modules() if isinstance(module, LINEAR_TYPES))
        for block in blocks
    ]
    output = model.get_output_embeddings()
    vocab = in_out_features(output)[1] if output is not None else model.config.vocab_size
    return ModelShape(model.config.hidden_size, vocab, len(blocks), max(features, default=0))


def available_ram() -> int:
    """Bytes of RAM this process can still get without swapping (MemAvailable: free + reclaimable cache)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_device_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator; None for the CPU (its memory is the RAM)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


def check_fit(size: ModelSize, runtime: Runtime, free_ram: int, free_device: int | None) -> None:
    """UserInputError with the figures and the fix when the model cannot be held the way `runtime` says."""
    dtype_name = str(runtime.dtype).removeprefix("torch.")
    whole, block = size.bytes(runtime.dtype), size.block_bytes(runtime.dtype)
    needs: list[tuple[str, int, int]] = []  # (where, bytes needed, bytes free)
    on_device = free_device is not None
    if runtime.offload == "none":
        needs.append((str(runtime.device), whole, free_device) if on_device else ("RAM", whole, free_ram))
    elif runtime.offload == "cpu":
        needs.append(("RAM", whole, free_ram))
        if on_device:
            needs.append((str(runtime.device), block, free_device))
    else:  # disk: one block resident
        needs.append(("RAM", block, free_ram))
        if on_device:
            needs.append((str(runtime.device), block, free_device))
    for where, need, free in needs:
        if need > free:
            raise UserInputError(
                f"the model does not fit: {size.parameters / 1e9:.2f}B parameters are {whole / GB:.2f} GB in "
                f"{dtype_name} (largest block {block / GB:.2f} GB); with runtime.offload: {runtime.offload} it "
                f"needs {need / GB:.2f} GB of {where}, and {free / GB:.2f} GB is free. Use a smaller runtime.dtype "
                "(bfloat16 halves float32), runtime.offload: "
                f"{'disk' if runtime.offload != 'disk' else 'disk with fewer calibration samples'} "
                f"(one block in memory at a time), or another device."
            )


def resident_bytes(size: ModelSize, runtime: Runtime, on_device: bool) -> int:
    """The weights `runtime` keeps on the work device (`on_device`) or in RAM while a stage runs there."""
    whole, block = size.bytes(runtime.dtype), size.block_bytes(runtime.dtype)
    if runtime.offload == "disk":
        return block
    if runtime.device.type == "cpu":  # the device is the RAM: offload none and cpu both hold the whole model there
        return whole
    holds_whole = runtime.offload == "none" if on_device else runtime.offload == "cpu"
    return whole if holds_whole else block


def preflight(model_dir: Path, runtime: Runtime) -> nn.Module:
    """Check that the checkpoint in `model_dir` is whole and matches its config.json, and that the model fits as
    `runtime` says, on this machine, now; returns the model's skeleton (meta device) for the run's own checks."""
    model = model_skeleton(model_dir)
    if runtime.streams or (model_dir / INDEX_FILE).is_file() or (model_dir / SINGLE_FILE).is_file():
        expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
        required = {name for name, _ in model.named_parameters()} if runtime.streams else set()  # tied: once
        check_checkpoint(model_dir, expected, required)
    check_fit(size_of(model), runtime, available_ram(), available_device_memory(runtime.device))
    return model
